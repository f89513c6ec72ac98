#!/usr/bin/env bash
# Install the peers that benchmarks/run.py measures tonumpy against, into the active venv,
# without replacing its torch. Missing peers are only reported as "not installed" by run.py.
set -euo pipefail
cd "$(dirname "$0")/.."
before=$(python -c "import torch; print(torch.__version__)")
# peers whose requirements an installed torch already satisfies (the `bench` extra)
pip install -e ".[bench]"
# fastai requires torchvision (which would pull a different torch): no deps, then what
# fastai.torch_core.to_np needs
pip install --no-deps fastai fasttransform
pip install fastcore fastprogress fastdownload "plum-dispatch<2.10" pandas scipy pillow pyyaml \
    requests cloudpickle
after=$(python -c "import torch; print(torch.__version__)")
if [ "$before" != "$after" ]; then
    echo "torch changed from $before to $after: reinstall torch==$before" >&2
    exit 1
fi
echo "peers installed; torch is still $after"
