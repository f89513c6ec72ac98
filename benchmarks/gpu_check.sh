#!/usr/bin/env bash
# The GPU check: every `cuda`-marked test, the transfer benchmark's quick matrix, then the
# accumulate workload (the tiny GPT-2's full logits, issue 22) with the model, the batches and
# reduce= on the GPU (the Accumulator's asynchronous copies through pinned staging buffers), on
# one GPU, in under 11 minutes. Run it from the repository root, in an environment where tonumpy
# and its dev extra (transformers included) are installed with a CUDA build of torch:
#
#     bash benchmarks/gpu_check.sh [OUT_DIR]
#
# OUT_DIR (default: gpu-check/) receives tests.log, tests.xml (JUnit), transfer.json,
# transfer.log and accumulate.log. Exits non-zero if no GPU is visible, or if any test failed
# or a benchmark could not run (the accumulate ratios are reported, not enforced, on a GPU: the
# asked ratios are the CPU host's).
set -uo pipefail
cd "$(dirname "$0")/.."
out="${1:-gpu-check}"
mkdir -p "$out"
export PYTHONUNBUFFERED=1

python - <<'EOF' || { echo "gpu_check: no CUDA device visible to torch" >&2; exit 3; }
import sys, torch
if not torch.cuda.is_available():
    sys.exit(1)
print(f"torch {torch.__version__}, CUDA {torch.version.cuda}, "
      f"{torch.cuda.device_count()} x {torch.cuda.get_device_name()}")
EOF

status=0
# the CUDA tests (every file that has any), with a time bound per test
timeout 240 python -m pytest -q -p no:cacheprovider -m cuda -o addopts="" -rs \
    --junitxml="$out/tests.xml" tests 2>&1 | tee "$out/tests.log" || status=1

# the transfer benchmark's quick matrix: speed-up over naive per-leaf copies, distance to the bus
timeout 120 python benchmarks/transfer.py --quick --json "$out/transfer.json" 2>&1 \
    | tee "$out/transfer.log" || status=1

# the accumulate workload on the GPU: plain idiom (.cpu() per batch), transformers, tonumpy in
# memory and with directory=, with and without a device-side reduce= (argmax), 2 rounds;
# W1-W7 are CPU-only and skipped here
timeout 300 python benchmarks/accumulate.py --device cuda --only-gpt2 --no-peers --repeat 2 \
    2>&1 | tee "$out/accumulate.log"
rc=${PIPESTATUS[0]}
# 1: a ratio missed (reported above); 2: wrong results; other: the benchmark failed
if [ "$rc" -ne 0 ] && [ "$rc" -ne 1 ]; then status=1; fi

exit "$status"
