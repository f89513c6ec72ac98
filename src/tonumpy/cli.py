"""The ``tonumpy`` command: look inside tensor files and convert them to NumPy files.

``tonumpy show FILE`` prints the tree in a file (key path, type, shape, dtype, device, bytes,
and with ``--stats`` min/max/mean and NaN/Inf counts; with ``--depth``, dotted names are grouped
by segment); ``tonumpy convert SRC DST`` writes it as ``.npz``, ``.safetensors``, ``.parquet``,
``.npy``, ``.pt`` (for ``torch.load(weights_only=True)``) or a directory of ``.npy`` files.
Errors are one line on stderr and exit status 2 (``--debug`` shows the traceback); output is
coloured only on a terminal (and never with ``NO_COLOR`` set). Text that comes from a file
(keys, class names, values) is printed with control characters escaped. SIGTERM and SIGHUP stop
a conversion as Ctrl-C does: nothing is left behind, and the exit status is 128 + the signal's
number.
"""

from __future__ import annotations

# first, before numpy and torch load: Ctrl-C while the command starts is one line
from . import _startup  # isort: skip  # noqa: F401

import argparse
import contextlib
import functools
import itertools
import math
import os
import signal
import sys
import threading
import time
import traceback
import warnings
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any, NoReturn, TextIO

import numpy as np
import torch

from . import __version__
from . import io as tio
from .convert import to_numpy
from .errors import TonumpyError
from .io import Contents, LazyArray, escape, nbytes, short, value_chunks

__all__ = ["main"]

EXIT_ERROR = 2
EXIT_INTERRUPTED = 130
#: Inputs at least this large get a progress bar (on a terminal).
PROGRESS_MIN_BYTES = 64 << 20
_STATS_CHUNK = 1 << 22  # elements per chunk when computing --stats
_STOP_SIGNALS = ("SIGTERM", "SIGHUP")


# ------------------------------------------------------------------------------ parsing


class _Parser(argparse.ArgumentParser):
    """argparse, but usage errors are one line and exit with status 2."""

    def error(self, message: str) -> NoReturn:
        self.exit(EXIT_ERROR, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def _parser() -> _Parser:
    common = _Parser(add_help=False)
    common.add_argument(
        "--debug",
        action="store_true",
        default=argparse.SUPPRESS,
        help="show the full traceback of an error",
    )
    parser = _Parser(
        prog="tonumpy",
        description="Look inside tensor files and convert them to NumPy files, without pickle.",
    )
    parser.add_argument("--version", action="version", version=f"tonumpy {__version__}")
    parser.add_argument("--debug", action="store_true", help="show the full traceback of an error")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    show = commands.add_parser(
        "show",
        parents=[common],
        help="print the tree of tensors in a file",
        description="Print the tree in a .pt/.pth/.bin/.ckpt, .npz, .npy, .safetensors, .parquet "
        "file, a directory of .npy files, or a Hugging Face checkpoint directory (what "
        "save_pretrained writes: model.safetensors, pytorch_model.bin, or shards with their "
        "index): key path, type, shape, dtype, device and bytes per leaf.",
    )
    show.add_argument("file", metavar="FILE")
    show.add_argument(
        "--depth",
        type=_depth,
        default=None,
        metavar="N",
        help="show N levels of keys at most; dotted names (encoder.layer.0.weight, as in a "
        "state dict or checkpoint) are grouped by segment, one level per segment",
    )
    show.add_argument(
        "--stats", action="store_true", help="add min, max, mean and NaN/Inf counts per array"
    )

    convert = commands.add_parser(
        "convert",
        parents=[common],
        help="convert a file to .npz, .safetensors, .parquet, .npy, .pt or a directory of .npy "
        "files",
        description="Convert SRC (any file show reads, a Hugging Face checkpoint directory "
        "included) to DST. DST's kind follows its name: .npz (tree structure kept; load it "
        "with tonumpy.load or np.load), .safetensors, .parquet (one row per example), .npy (one "
        "array), .pt/.pth/.bin/.ckpt (tensors in dicts, lists and tuples, for "
        "torch.load(weights_only=True)), or a name without suffix (or ending in /) for a "
        "directory of .npy files, one per leaf.",
    )
    convert.add_argument("src", metavar="SRC")
    convert.add_argument("dst", metavar="DST")
    convert.add_argument("--force", action="store_true", help="replace DST if it exists")
    convert.add_argument(
        "--ml-dtypes",
        action="store_true",
        help="keep bfloat16/float8 bit-exact (stored as their bits, the dtype in the structure) "
        "instead of widening them to float32",
    )
    convert.add_argument(
        "--plain-containers",
        action="store_true",
        help="for .pt/.pth/.bin/.ckpt output: write containers that were a class in SRC "
        "(namedtuple, dataclass, ModelOutput) as dicts, which torch.load(weights_only=True) "
        "reads; refused for other kinds of DST",
    )
    for sub in (show, convert):
        sub.add_argument(
            "--unsafe-load",
            action="store_true",
            help="unpickle a torch file with weights_only=False: this RUNS any code in the "
            "file; only for files you trust",
        )
    return parser


def _depth(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"--depth wants a whole number, not {text!r}") from None
    if value < 0:
        raise argparse.ArgumentTypeError("--depth cannot be negative")
    return value


# ------------------------------------------------------------------------------- output


class _Style:
    """ANSI colours, or nothing when the stream is not a terminal (or NO_COLOR is set)."""

    def __init__(self, stream: TextIO) -> None:
        isatty = getattr(stream, "isatty", None)
        self.enabled = bool(isatty and isatty()) and not os.environ.get("NO_COLOR")

    def __call__(self, text: str, code: str) -> str:
        return f"\033[{code}m{text}\033[0m" if self.enabled and text else text


def _size(n: int) -> str:
    """Bytes in binary units.

    Examples:
        >>> _size(512), _size(1536), _size(3 << 30)
        ('512 B', '1.5 KiB', '3.0 GiB')
    """
    value = float(n)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if value < 1024 or unit == "TiB":
            return f"{int(value)} B" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    raise AssertionError  # pragma: no cover


def _key(key: Any) -> str:
    return escape(key) if isinstance(key, str) else short(key, 80)


def _num(x: float) -> str:
    if isinstance(x, float) and not math.isfinite(x):
        return str(x)
    return f"{x:.4g}"


class _Bar:
    """A small progress bar on stderr, drawn only on a terminal and for large inputs."""

    def __init__(self, stream: TextIO, label: str) -> None:
        isatty = getattr(stream, "isatty", None)
        self.stream = stream
        self.label = label
        self.active = bool(isatty and isatty())
        self.start = time.monotonic()
        self.last = 0.0
        self.drawn = False

    def __call__(self, done: int, total: int) -> None:
        if not self.active or total < PROGRESS_MIN_BYTES:
            return
        now = time.monotonic()
        if now - self.last < 0.1 and done < total:
            return
        self.last = now
        width = 30
        filled = width * done // max(total, 1)
        bar = "#" * filled + "-" * (width - filled)
        percent = 100 * done // max(total, 1)
        self.stream.write(
            f"\r{self.label} [{bar}] {percent:3d}%  {_size(done)} / {_size(total)}"
            f"  {now - self.start:.1f} s "
        )
        self.stream.flush()
        self.drawn = True

    def close(self) -> None:
        if self.drawn:
            self.stream.write("\r\033[K")
            self.stream.flush()


# ---------------------------------------------------------------------------------- show


def _leaf_facts(
    leaf: Any, source: dict[str, Any], *, stored_as_arrays: bool = False
) -> tuple[str, str, str, str, int, list[str]] | None:
    """(type, shape, dtype, device, bytes, flags) for an array leaf; None for other leaves.

    ``stored_as_arrays``: the file holds NumPy arrays (a bfloat16 one is read as a tensor,
    NumPy having no bfloat16 of its own, but it is an array in the file). A sparse tensor's
    bytes are those it holds (indices and values); its dense size is a flag.
    """
    flags = []
    size = nbytes(leaf)
    if isinstance(leaf, torch.Tensor):
        dtype = str(leaf.dtype).removeprefix("torch.")
        device = source.get("device", str(leaf.device))
        if leaf.requires_grad or source.get("requires_grad"):
            flags.append("grad")
        if leaf.is_meta:
            flags.append("meta: no data")
        elif leaf.layout != torch.strided:
            dense = math.prod(leaf.shape) * leaf.element_size()
            flags.append(f"{str(leaf.layout).removeprefix('torch.')}, dense {_size(dense)}")
        type_name = "ndarray" if stored_as_arrays else type(leaf).__name__
        shape = tuple(leaf.shape)
    elif isinstance(leaf, np.ndarray | np.generic | LazyArray):
        bits = leaf.bits if isinstance(leaf, LazyArray) else None
        dtype = bits or _dtype_name(leaf.dtype)
        shape = tuple(leaf.shape)
        device = source.get("device", "cpu")
        if source.get("requires_grad"):
            flags.append("grad")
        type_name = "ndarray"
    else:
        return None
    was = source.get("dtype")
    if was and was != dtype:
        flags.append(f"was {escape(str(was))}")
    return type_name, str(shape), escape(dtype), escape(str(device)), size, flags


@functools.lru_cache(maxsize=256)
def _dtype_name(dtype: np.dtype[Any]) -> str:
    """``str(dtype)``, once per dtype (NumPy builds the name in Python each time)."""
    return str(dtype)


def _stats(leaf: Any) -> list[str]:
    """[min, max, mean, nan, inf] of an array leaf, over its finite values, as text.

    Computed a chunk at a time for every dtype (bfloat16 widened a chunk at a time, members of
    a ``.npz`` read a chunk at a time): memory does not grow with the array.
    """
    chunks = _value_chunks(leaf)
    if chunks is None:
        return ["-"] * 5
    lo, hi, total, count, nans, infs = math.inf, -math.inf, 0.0, 0, 0, 0
    for chunk in chunks:
        if chunk.dtype.kind not in "biuf":
            return ["-"] * 5
        finite = chunk
        if chunk.dtype.kind == "f":
            nan_mask = np.isnan(chunk)
            inf_mask = np.isinf(chunk)
            nans += int(nan_mask.sum())
            infs += int(inf_mask.sum())
            finite = chunk[~(nan_mask | inf_mask)]
        if finite.size:
            lo = min(lo, float(finite.min()))
            hi = max(hi, float(finite.max()))
            total += float(finite.sum(dtype=np.float64))
            count += finite.size
    if not count:
        return ["-", "-", "-", str(nans), str(infs)]
    return [_num(lo), _num(hi), _num(total / count), str(nans), str(infs)]


def _value_chunks(leaf: Any) -> Iterator[np.ndarray] | None:
    """The values of an array leaf as 1-d NumPy chunks; None when there are none to summarise."""
    if isinstance(leaf, torch.Tensor) and (
        leaf.is_meta or leaf.layout != torch.strided or leaf.is_nested or leaf.is_complex()
    ):
        return None
    return value_chunks(leaf, _STATS_CHUNK)


def _plural(n: int, word: str) -> str:
    return f"{n:,} {word}{'' if n == 1 else 's'}"


def _prefix_sums(values: Iterator[int]) -> list[int]:
    """``[0, v0, v0 + v1, ...]``: the total of any range of leaves in O(1)."""
    return [0, *itertools.accumulate(values)]


class _Entry:
    """A value under its original key, while dotted names are grouped."""

    def __init__(self, key: str, value: Any) -> None:
        self.key = key
        self.value = value


#: Names of more segments than this are shown whole (a hostile file's key of 10,000 dots
#: would otherwise nest 10,000 levels).
_MAX_SEGMENTS = 32


def _segments(key: Any) -> list[str] | None:
    """The segments of a dotted name (``"layer.0.weight"``); None for any other key."""
    if not isinstance(key, str) or "." not in key or key.count(".") >= _MAX_SEGMENTS:
        return None
    parts = key.split(".")
    return parts if all(parts) else None


def _nest(mapping: dict[Any, Any]) -> dict[Any, Any] | None:
    """A dict's items nested by the segments of dotted names; None if two names would clash.

    A group is keyed by its segment and a dot (``"encoder."``), so a group and a key without
    dots never share a name; a key that is not a dotted name stays as it is.
    """
    nested: dict[Any, Any] = {}
    for key, value in mapping.items():
        parts = _segments(key)
        target, name = nested, key
        if parts is not None:
            for part in parts[:-1]:
                group = target.setdefault(f"{part}.", {})
                if not isinstance(group, dict):
                    return None
                target = group
            name = parts[-1]
        if name in target:
            return None
        target[name] = _Entry(key, value)
    return nested


class _Grouped:
    """A tree for display, its dotted names grouped by segment; where each node came from.

    Examples:
        >>> shown = _Grouped({"enc.a.w": 1, "enc.b": 2, "head": 3})
        >>> shown.tree
        {'enc.': {'a.': {'w': 1}, 'b': 2}, 'head': 3}
        >>> sorted(shown.groups), shown.origin[("enc.", "a.", "w")]
        ([('enc.',), ('enc.', 'a.')], ('enc.a.w',))
    """

    def __init__(self, tree: Any) -> None:
        self.groups: set[tuple[Any, ...]] = set()
        self.origin: dict[tuple[Any, ...], tuple[Any, ...]] = {}
        self.tree = self._walk(tree, (), ())

    def _walk(self, x: Any, old: tuple[Any, ...], new: tuple[Any, ...]) -> Any:
        if old != new:
            self.origin[new] = old
        if type(x) in (list, tuple):
            items = [self._walk(v, (*old, i), (*new, i)) for i, v in enumerate(x)]
            return items if type(x) is list else tuple(items)
        if type(x) is not dict:
            return x
        nested = _nest(x)
        if nested is None:
            return {k: self._walk(v, (*old, k), (*new, k)) for k, v in x.items()}
        return self._build(nested, old, new)

    def _build(self, nested: dict[Any, Any], old: tuple[Any, ...], new: tuple[Any, ...]) -> Any:
        result = {}
        for name, item in nested.items():
            path = (*new, name)
            if isinstance(item, _Entry):
                result[name] = self._walk(item.value, (*old, item.key), path)
            else:
                self.groups.add(path)
                result[name] = self._build(item, old, path)
        return result


def _rows(
    contents: Contents, depth: int | None, stats: bool
) -> tuple[list[tuple[str, list[str]]], dict[str, int]]:
    """(row_kind, cells) for each node shown, in order; and the totals over every leaf.

    One pass over the tree as it is stored ([`tonumpy.io.walk`][]): a container's arrays and
    bytes are a range of the flat list of leaves, summed from prefix sums. With a ``depth``,
    dotted names are grouped by segment first ([`_Grouped`][]), each segment a level.
    """
    shown = _Grouped(contents.tree) if depth is not None else None
    leaves, nodes = tio.walk(shown.tree if shown is not None else contents.tree)
    groups = shown.groups if shown is not None else set()
    origin = shown.origin if shown is not None else {}
    is_array = [_is_array(leaf) for leaf in leaves]
    sizes = [nbytes(leaf) if array else 0 for leaf, array in zip(leaves, is_array, strict=True)]
    arrays_before = _prefix_sums(iter(is_array))
    bytes_before = _prefix_sums(iter(sizes))
    rows: list[tuple[str, list[str]]] = []
    totals = {
        "arrays": arrays_before[-1],
        "elements": sum(
            math.prod(leaf.shape) for leaf, array in zip(leaves, is_array, strict=True) if array
        ),
        "bytes": bytes_before[-1],
        "values": sum(
            node.kind == "none" or (node.kind == "leaf" and not is_array[node.first])
            for node in nodes
        ),
    }
    arrays_only = contents.format not in ("torch", "safetensors", "hugging face checkpoint")
    for node in nodes:
        level = len(node.path)
        if depth is not None and level > depth:
            continue
        name = "  " * level + (_key(node.path[-1]) if node.path else "(root)")
        end = node.first + node.size
        stored = origin.get(node.path, node.path)
        if node.kind in ("dict", "list", "tuple"):
            cls = contents.classes.get(stored) if node.path not in groups else "names"
            type_name = escape(cls.rsplit(".", 1)[-1]) if cls else _type_name(node.type)
            size = _plural(len(node.keys), "key" if node.kind == "dict" else "item")
            held = bytes_before[end] - bytes_before[node.first]
            rows.append(("container", [name, type_name, size, "", "", _size(held)]))
            if level == depth and node.keys:
                arrays = arrays_before[end] - arrays_before[node.first]
                rows.append(("more", ["  " * (level + 1) + "...", "", _plural(arrays, "array")]))
            continue
        leaf = leaves[node.first] if node.kind == "leaf" else None
        facts = _leaf_facts(leaf, contents.sources.get(stored, {}), stored_as_arrays=arrays_only)
        if facts is None:
            type_name = "None" if leaf is None else type(leaf).__name__
            rows.append(("value", [name, type_name, "= " + short(leaf)]))
            continue
        type_name, shape, dtype, device, held, flags = facts
        row = [name, type_name, shape, dtype, device, _size(held), " ".join(flags)]
        if stats:
            if contents.verify is not None:
                contents.verify(leaf)
            row += _stats(leaf)
        rows.append(("leaf", row))
    return rows, totals


def _is_array(leaf: Any) -> bool:
    """True for the leaves stored as arrays (tensors, NumPy arrays and scalars, lazy members)."""
    return isinstance(leaf, torch.Tensor | np.ndarray | np.generic | LazyArray)


def _type_name(cls: type | None) -> str:
    return escape(cls.__name__) if cls is not None else "?"


def _show(args: argparse.Namespace, out: TextIO) -> int:
    path = Path(args.file)
    # headers only: members of a .npz are not read, other files are memory-mapped
    contents = tio.read(path, unsafe_load=args.unsafe_load, lazy=True)
    style = _Style(out)
    rows, totals = _rows(contents, args.depth, args.stats)
    out.write(f"{style(escape(str(path)), '1')}: {contents.format}, {_size(_disk_size(path))}\n")
    header = ["key", "type", "shape", "dtype", "device", "bytes", ""]
    if args.stats:
        header += ["min", "max", "mean", "nan", "inf"]
    widths = [len(h) for h in header]
    for row_kind, cells in rows:
        for i, cell in enumerate(cells):
            # a value's "= ..." and a summary's text may run past the shape column
            if not (row_kind in ("value", "more") and i == len(cells) - 1):
                widths[i] = max(widths[i], len(cell))
    right = {5} | set(range(7, len(header)))

    def line(cells: list[str], codes: list[str]) -> str:
        parts = []
        for i, cell in enumerate(cells):
            width = widths[i] if i < len(widths) else 0
            text = cell.rjust(width) if i in right else cell.ljust(width)
            parts.append(style(text, codes[i]) if codes[i] and cell else text)
        return "  ".join(parts).rstrip() + "\n"

    out.write(line(header, ["2"] * len(header)))
    for row_kind, cells in rows:
        codes = [""] * len(cells)
        if row_kind == "container":
            codes[:2] = ["1", "34"]
            codes[5] = "2"
        elif row_kind == "leaf":
            codes[3], codes[6] = "36", "33"
            for i in range(len(cells) - 2, len(cells)) if args.stats else ():
                codes[i] = "31" if cells[i] not in ("0", "-") else ""
        else:
            codes[1:] = ["2"] * (len(cells) - 1)
        out.write(line(cells, codes))
    summary = (
        f"{_plural(totals['arrays'], 'array')}, {_plural(totals['elements'], 'element')}, "
        f"{_size(totals['bytes'])}"
    )
    if totals["values"]:
        summary += f"; {_plural(totals['values'], 'other value')}"
    out.write(style(summary, "1") + "\n")
    return 0


# ------------------------------------------------------------------------------- convert


def _run_convert(args: argparse.Namespace, out: TextIO, err: TextIO) -> int:
    bar = _Bar(err, "converting")
    try:
        contents = tio.convert(
            args.src,
            args.dst,
            overwrite=args.force,
            ml_dtypes=args.ml_dtypes,
            unsafe_load=args.unsafe_load,
            plain_containers=args.plain_containers,
            progress=bar,
        )
    finally:
        bar.close()
    arrays, widened = _arrays_in(contents)
    out.write(
        f"wrote {escape(args.dst)} ({_size(_disk_size(Path(args.dst)))}): "
        f"{_plural(arrays, 'array')} from {escape(args.src)} ({contents.format})\n"
    )
    exact = args.ml_dtypes or args.dst.lower().endswith((".safetensors", ".pt", ".pth"))
    if widened and not exact:
        err.write(
            f"tonumpy: note: {', '.join(sorted(widened))} widened to float32 (exactly); "
            "--ml-dtypes keeps them bit-exact\n"
        )
    return 0


def _disk_size(path: Path) -> int:
    """Bytes of a file, or of the regular files directly in a directory (links not followed)."""
    if not path.is_dir():
        return path.stat().st_size
    with os.scandir(path) as entries:
        return sum(
            e.stat(follow_symlinks=False).st_size
            for e in entries
            if e.is_file(follow_symlinks=False)
        )


def _arrays_in(contents: Contents) -> tuple[int, set[str]]:
    """The number of arrays in a tree as it was written, and the bfloat16/float8 dtypes."""
    count, widened = 0, set()
    for leaf in tio.walk(contents.tree)[0]:
        count += _is_array(leaf)
        if isinstance(leaf, torch.Tensor) and _widened(leaf.dtype):
            widened.add(str(leaf.dtype).removeprefix("torch."))
        elif isinstance(leaf, LazyArray) and leaf.bits:
            widened.add(escape(leaf.bits))
    return count, widened


@functools.lru_cache(maxsize=64)
def _widened(dtype: torch.dtype) -> bool:
    """Whether ``to_numpy`` widens ``dtype`` to float32 (bfloat16, float8; ``--ml-dtypes`` not).

    Examples:
        >>> _widened(torch.bfloat16), _widened(torch.float16), _widened(torch.int8)
        (True, False, False)
    """
    if not dtype.is_floating_point or dtype == torch.float32:
        return False
    try:
        return bool(to_numpy(torch.zeros(0, dtype=dtype)).dtype == np.float32)
    except Exception:  # noqa: BLE001 - refused, or a dtype torch cannot even make (float4_x2)
        return False


# ---------------------------------------------------------------------------------- main


#: The library's errors name the parameter that would help (``TonumpyError.option``); the
#: command names the flag that sets it.
_FLAGS = {
    "overwrite": "--force",
    "unsafe_load": "--unsafe-load",
    "ml_dtypes": "--ml-dtypes",
    "plain_containers": "--plain-containers",
}


def _message(exc: BaseException) -> str:
    """One line, control characters escaped (a path or key from a file may hold them).

    An error whose fix is a parameter of the library names the command's flag instead.

    Examples:
        >>> from tonumpy import DestinationExistsError
        >>> _message(DestinationExistsError.naming("out.npz exists; pass ", "overwrite", "."))
        'out.npz exists; pass --force.'
    """
    if isinstance(exc, OSError) and exc.strerror and exc.filename is not None:
        return escape(f"{exc.filename}: {exc.strerror}")
    message = str(exc)
    if isinstance(exc, TonumpyError) and (flag := _FLAGS.get(exc.option or "")):
        message = exc.with_option(flag)
    text = message.strip().splitlines()
    return escape(text[0]) if text else type(exc).__name__


class _Stopped(BaseException):
    """SIGTERM or SIGHUP arrived: unwind (removing temporaries) as for Ctrl-C."""

    def __init__(self, signum: int) -> None:
        super().__init__(signum)
        self.signum = signum


@contextlib.contextmanager
def _stop_signals() -> Iterator[None]:
    """Turn SIGTERM and SIGHUP into ``_Stopped``, Ctrl-C into KeyboardInterrupt.

    Each once: a second signal while the first unwinds is ignored, so clean-up completes. Only
    in the main thread (where Python runs signal handlers); the handlers are restored on exit.
    """
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    numbers = [
        getattr(signal, name) for name in (*_STOP_SIGNALS, "SIGINT") if hasattr(signal, name)
    ]
    previous = {number: signal.getsignal(number) for number in numbers}

    def handler(signum: int, frame: Any) -> None:
        for number in numbers:
            signal.signal(number, signal.SIG_IGN)
        if signum == signal.SIGINT:
            raise KeyboardInterrupt
        raise _Stopped(signum)

    for number in numbers:
        signal.signal(number, handler)
    try:
        yield
    finally:
        for number, old in previous.items():
            signal.signal(number, old if old is not None else signal.SIG_DFL)


@contextlib.contextmanager
def _quiet_libraries() -> Iterator[None]:
    """Keep library warnings (torch's deprecations, beta notices) off the user's terminal."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", category=DeprecationWarning)
        warnings.filterwarnings("ignore", category=FutureWarning)
        warnings.filterwarnings("ignore", category=UserWarning, module="torch")
        yield


def main(
    argv: Sequence[str] | None = None,
    *,
    stdout: TextIO | None = None,
    stderr: TextIO | None = None,
) -> int:
    """Run the ``tonumpy`` command line; return its exit status.

    Examples:
        >>> import io
        >>> main(["convert", "missing.pt", "out.npz"], stderr=io.StringIO())
        2

    Args:
        argv: The arguments, without the program name (default: ``sys.argv[1:]``).
        stdout: Where results go (default: ``sys.stdout``).
        stderr: Where errors, warnings and the progress bar go (default: ``sys.stderr``).

    Returns:
        0 on success, 2 on any error, 130 when interrupted (Ctrl-C), 143 on SIGTERM and 129
        on SIGHUP; nothing is left behind in each case.
    """
    out = stdout if stdout is not None else sys.stdout
    err = stderr if stderr is not None else sys.stderr
    parser = _parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exit_:  # --help, --version and usage errors
        return int(exit_.code or 0) if not isinstance(exit_.code, str) else EXIT_ERROR
    debug = getattr(args, "debug", False)
    try:
        with _quiet_libraries(), _stop_signals():
            return _run(args, out, err)
    except KeyboardInterrupt:
        err.write("tonumpy: interrupted\n")
        return EXIT_INTERRUPTED
    except _Stopped as stop:
        err.write(f"tonumpy: stopped by {signal.Signals(stop.signum).name}\n")
        return 128 + stop.signum
    except BrokenPipeError:  # `tonumpy show big.pt | head`: the reader left; stop quietly
        if out is sys.stdout:
            with contextlib.suppress(OSError):
                os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0
    except Exception as exc:  # noqa: BLE001 - every error becomes one line and status 2
        if debug:
            traceback.print_exception(exc, file=err)
        known = isinstance(exc, TonumpyError | OSError | MemoryError)
        hint = "" if known or debug else " (an unexpected error: run with --debug for details)"
        err.write(f"tonumpy: error: {_message(exc)}{hint}\n")
        return EXIT_ERROR


def _run(args: argparse.Namespace, out: TextIO, err: TextIO) -> int:
    if getattr(args, "unsafe_load", False):
        err.write(
            "tonumpy: warning: --unsafe-load unpickles the file with weights_only=False: "
            "any code it names RUNS now. Only use it for files you trust.\n"
        )
    if args.command == "show":
        return _show(args, out)
    return _run_convert(args, out, err)
