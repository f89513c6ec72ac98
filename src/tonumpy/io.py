"""Files: save and load trees of arrays without pickle; read ``torch.save`` files safely.

[`save`][] writes a ``.npz`` that any NumPy can open: one ``.npy`` member per array leaf,
named after its key path (``output.logits``), plus a member ``__tonumpy__`` holding the tree's
structure as JSON (containers, keys and their order, plain Python leaves, class names for
display). [`load`][] rebuilds the tree from it, and also reads plain NumPy ``.npz``/``.npy``
files, directories of ``.npy`` files, ``.safetensors`` files and ``torch.save`` files.

Nothing here unpickles arbitrary objects unless asked to with ``unsafe_load=True``. ``torch.save``
files are read with ``torch.load(weights_only=True, map_location="cpu")``, memory-mapped when
the file is in the zip format, with the NumPy globals that real checkpoints contain allow-listed
explicitly. Classes a file names (dataclasses, namedtuples, ``ModelOutput``, ...) are never
imported: a stand-in records what the pickle puts into each instance, and the instance comes
back as a ``dict``, its class name kept for display only. Names that are functions rather than
classes (``os.system``, ``builtins.exec``, ...) make the file be refused.

Every write is atomic: the data goes to a temporary file (or directory) next to the destination,
which is renamed into place only when complete; a failure leaves nothing behind.
"""

from __future__ import annotations

import base64
import contextlib
import dataclasses
import hashlib
import importlib
import json
import math
import os
import pickle
import re
import shutil
import tempfile
import warnings
import zipfile
from collections import OrderedDict, UserDict, deque
from collections.abc import Callable, Iterator
from io import BufferedRandom, BufferedWriter, FileIO
from pathlib import Path
from typing import Any

import numpy as np
import torch

from . import _dtypes, _tree
from .convert import to_numpy
from .errors import ConversionError, TonumpyError

__all__ = [
    "Contents",
    "FileFormatError",
    "UnsafeFileError",
    "convert",
    "load",
    "read",
    "save",
]

PathLike = str | os.PathLike[str]
Progress = Callable[[int, int], None]

#: Name of the member (``.npz``) or file (``.json`` in a directory) that holds the structure.
STRUCTURE = "__tonumpy__"
_FORMAT_VERSION = 1
_TORCH_SUFFIXES = frozenset({".pt", ".pth", ".bin", ".ckpt"})
_MAX_NAME = 120  # bytes of a sanitised leaf name before ".npy"; file systems allow 255
_MAX_RETRIES = 256


class FileFormatError(TonumpyError, ValueError):
    """A file is missing parts, truncated, corrupt, or not in a format tonumpy reads or writes."""


class UnsafeFileError(TonumpyError, ValueError):
    """A pickle would need to run code to load; it was refused and nothing ran.

    ``unsafe_load=True`` (``--unsafe-load`` on the command line) unpickles it anyway: only do
    that for files whose origin you trust.
    """


@dataclasses.dataclass
class Contents:
    """What [`read`][] found in a file, before any conversion.

    Attributes:
        tree: Containers (``dict``, ``list``, ``tuple``) of leaves: torch tensors for ``torch``
            and ``safetensors`` files and for bfloat16/float8 data stored bit-exact, NumPy
            arrays otherwise, and plain Python values.
        format: A short description: ``"torch"``, ``"tonumpy npz"``, ``"npz"``, ``"npy"``,
            ``"npy directory"``, ``"tonumpy npy directory"`` or ``"safetensors"``.
        classes: Key path -> name of the class a container had when saved (display only).
        sources: Key path -> what a leaf was before it was saved (``dtype``, ``device``,
            ``requires_grad``), where the file records it.
    """

    tree: Any
    format: str
    classes: dict[tuple[Any, ...], str] = dataclasses.field(default_factory=dict)
    sources: dict[tuple[Any, ...], dict[str, Any]] = dataclasses.field(default_factory=dict)


# ------------------------------------------------------------------------------- public API


def save(
    file: PathLike,
    tree: Any,
    /,
    *,
    ml_dtypes: bool = False,
    overwrite: bool = True,
    compress: bool = False,
) -> None:
    """Write ``tree`` to a ``.npz`` file: every array leaf, and the structure as JSON.

    Tensors are converted as by [`tonumpy.to_numpy`][]. Containers keep their keys and key
    order; namedtuples, dataclasses, ``ModelOutput`` and other classes are stored as mappings
    with their class name recorded for display. ``str``, ``int``, ``float``, ``bool``, ``None``,
    ``bytes`` and ``complex`` leaves are stored in the JSON.

    Examples:
        >>> import os, tempfile, torch
        >>> path = os.path.join(tempfile.mkdtemp(), "out.npz")
        >>> save(path, {"logits": torch.ones(2, requires_grad=True), "step": 3})
        >>> load(path)
        {'logits': array([1., 1.], dtype=float32), 'step': 3}

    Args:
        file: Where to write; ``.npz`` is the usual suffix. Written atomically.
        tree: A tensor, an array, or any nesting of containers holding them.
        ml_dtypes: Store bfloat16 and float8 tensors bit-exact (their bits, with the dtype
            name in the JSON; [`load`][] with ``ml_dtypes=True`` gives them back as
            ``ml_dtypes`` arrays) instead of widened to float32. ``ml_dtypes`` arrays in the
            tree are always stored bit-exact.
        overwrite: Replace an existing file (atomically). ``False`` raises
            ``FileExistsError`` instead.
        compress: Deflate each member, as ``numpy.savez_compressed`` does.

    Raises:
        FileExistsError: ``file`` exists and ``overwrite=False``.
        ConversionError: A leaf cannot be stored without pickle (an object array, an
            arbitrary object); the message names its path.
    """
    plan = _plan(tree, ml_dtypes=ml_dtypes)
    _write_npz(Path(file), plan, overwrite=overwrite, compress=compress, progress=None)


def load(file: PathLike, /, *, ml_dtypes: bool = False, unsafe_load: bool = False) -> Any:
    """Read a file into a tree of NumPy arrays, without unpickling anything by default.

    Reads what [`save`][] writes, plain NumPy ``.npz`` and ``.npy`` files, directories of
    ``.npy`` files, ``.safetensors`` files and ``torch.save`` files (``.pt``, ``.pth``,
    ``.bin``, ``.ckpt``). ``dict``, ``list``, ``tuple``, ``None``, ``str``, ``int``, ``float``
    and ``bool`` come back exactly; every other container comes back as a ``dict``.

    Examples:
        >>> import os, tempfile, numpy as np
        >>> path = os.path.join(tempfile.mkdtemp(), "plain.npz")
        >>> np.savez(path, a=np.arange(3), b=np.ones(2))
        >>> load(path)
        {'a': array([0, 1, 2]), 'b': array([1., 1.])}

    Args:
        file: The file (or directory of ``.npy`` files) to read.
        ml_dtypes: Return bfloat16 and float8 data as ``ml_dtypes`` arrays, bit-exact,
            instead of widened to float32.
        unsafe_load: For ``torch.save`` files only: unpickle with ``weights_only=False``,
            which RUNS any code the file names. Only for files you trust.

    Returns:
        The tree, with NumPy arrays as leaves.

    Raises:
        FileNotFoundError: ``file`` does not exist.
        FileFormatError: The file is truncated, corrupt or of an unknown kind.
        UnsafeFileError: A ``torch.save`` file names code that would run on loading.
    """
    contents = read(file, unsafe_load=unsafe_load)
    return to_numpy(contents.tree, ml_dtypes=ml_dtypes)


def read(file: PathLike, /, *, unsafe_load: bool = False) -> Contents:
    """Read a file as it is stored, for inspection: tensors stay tensors.

    Examples:
        >>> import os, tempfile, torch
        >>> path = os.path.join(tempfile.mkdtemp(), "x.pt")
        >>> torch.save({"w": torch.zeros(2, dtype=torch.bfloat16)}, path)
        >>> contents = read(path)
        >>> contents.format, contents.tree["w"].dtype
        ('torch', torch.bfloat16)

    Args:
        file: The file (or directory of ``.npy`` files) to read.
        unsafe_load: As for [`load`][].

    Returns:
        A [`Contents`][].

    Raises:
        FileNotFoundError: ``file`` does not exist.
        FileFormatError: The file is truncated, corrupt or of an unknown kind.
        UnsafeFileError: A ``torch.save`` file names code that would run on loading.
    """
    path = Path(file)
    if not path.exists():
        raise FileNotFoundError(f"{path}: no such file or directory")
    if path.is_dir():
        return _guard(path, _read_npy_dir)
    kind = _kind_of(path)
    if kind == "torch":
        return _guard(path, lambda p: _read_torch(p, unsafe_load=unsafe_load))
    reader = {"npz": _read_npz, "npy": _read_npy, "safetensors": _read_safetensors}[kind]
    return _guard(path, reader)


def convert(
    src: PathLike,
    dst: PathLike,
    /,
    *,
    overwrite: bool = False,
    ml_dtypes: bool = False,
    unsafe_load: bool = False,
    progress: Progress | None = None,
) -> Contents:
    """Read ``src`` (any kind [`load`][] reads) and write it to ``dst``, atomically.

    The kind of ``dst`` follows its name: ``.npz`` (the structured format of [`save`][]),
    ``.safetensors`` (needs the ``safetensors`` package; bfloat16/float8 stay exact, other
    leaves go into the header metadata), ``.npy`` (a single array), or a name without a
    suffix, or ending in ``/``, for a directory of ``.npy`` files, one per leaf, named after
    sanitised key paths, with the structure in ``__tonumpy__.json``.

    Examples:
        >>> import os, tempfile, torch
        >>> folder = tempfile.mkdtemp()
        >>> src, dst = os.path.join(folder, "a.pt"), os.path.join(folder, "arrays")
        >>> torch.save({"layer.weight": torch.eye(2), "../evil": torch.ones(1)}, src)
        >>> _ = convert(src, dst)
        >>> sorted(os.listdir(dst))
        ['__tonumpy__.json', 'evil.npy', 'layer.weight.npy']

    Args:
        src: The file to read.
        dst: The file or directory to write.
        overwrite: Replace an existing ``dst``. A directory is only ever replaced if it is
            empty or holds a previous ``.npy`` export and nothing else.
        ml_dtypes: Keep bfloat16/float8 bit-exact in ``.npz`` and ``.npy`` output (see
            [`save`][]); otherwise they are widened to float32.
        unsafe_load: As for [`load`][].
        progress: Called as ``progress(bytes_done, bytes_total)`` while writing.

    Returns:
        The [`Contents`][] that were read from ``src``.

    Raises:
        FileExistsError: ``dst`` exists and ``overwrite`` is False.
        FileFormatError: ``src`` cannot be read, or ``dst`` names an unsupported kind.
        UnsafeFileError: As for [`load`][].
    """
    src_path, dst_text = Path(src), os.fspath(dst)
    dst_path = Path(dst_text)
    kind = _output_kind(dst_text)  # before reading: a bad DST fails fast
    if dst_path.exists() and not overwrite:
        raise FileExistsError(f"{dst_path} exists; pass --force (overwrite=True) to replace it")
    if dst_path.exists() and src_path.exists() and os.path.samefile(src_path, dst_path):
        raise FileFormatError(f"{dst_path} is the source file; choose another destination")
    contents = read(src_path, unsafe_load=unsafe_load)
    if kind == "safetensors":
        _write_safetensors(dst_path, contents, overwrite=overwrite, progress=progress)
        return contents
    plan = _plan(contents.tree, ml_dtypes=ml_dtypes, contents=contents)
    if kind == "npz":
        _write_npz(dst_path, plan, overwrite=overwrite, compress=False, progress=progress)
    elif kind == "npy":
        _write_npy(dst_path, plan, overwrite=overwrite)
    else:
        _write_npy_dir(dst_path, plan, overwrite=overwrite, progress=progress)
    return contents


# ------------------------------------------------------------------------ kinds of file


def _output_kind(dst: str) -> str:
    if dst.endswith(("/", os.sep)):
        return "dir"
    suffix = Path(dst).suffix.lower()
    if suffix in {".npz", ".npy", ".safetensors"}:
        return suffix[1:]
    if suffix == "":
        return "dir"
    raise FileFormatError(
        f"{dst}: cannot write {suffix!r} files; the destination must end in .npz, .npy or "
        ".safetensors, or have no suffix (or end in /) for a directory of .npy files"
    )


def _kind_of(path: Path) -> str:
    suffix = path.suffix.lower()
    if suffix in _TORCH_SUFFIXES:
        return "torch"
    if suffix in {".npz", ".npy", ".safetensors"}:
        return suffix[1:]
    kind = _sniff(path)
    if kind is None:
        raise FileFormatError(
            f"{path}: not a file tonumpy reads (.pt/.pth/.bin/.ckpt from torch.save, .npz, "
            ".npy, .safetensors, or a directory of .npy files)"
        )
    return kind


def _sniff(path: Path) -> str | None:
    """Guess a file's kind from its first bytes (for names without a known suffix)."""
    with path.open("rb") as f:
        head = f.read(16)
    if head.startswith(b"\x93NUMPY"):
        return "npy"
    if head.startswith(b"PK"):
        with contextlib.suppress(zipfile.BadZipFile, OSError), zipfile.ZipFile(path) as zf:
            names = zf.namelist()
            if any(n == "data.pkl" or n.endswith("/data.pkl") for n in names):
                return "torch"
            if names and all(n.endswith(".npy") for n in names):
                return "npz"
        return None
    if head[:1] == b"\x80":  # a pickle: the legacy torch.save format
        return "torch"
    if len(head) >= 9 and head[8:9] == b"{":
        return "safetensors"
    return None


def _guard(path: Path, reader: Callable[[Path], Contents]) -> Contents:
    """Run a reader; turn what a corrupt file makes the parsers raise into a FileFormatError.

    MemoryError included: a corrupt size field can ask for a lot.
    """
    try:
        return reader(path)
    except (TonumpyError, FileNotFoundError, PermissionError, IsADirectoryError):
        raise
    except RecursionError:
        raise FileFormatError(f"{path}: the structure is nested too deeply to read") from None
    except Exception as exc:
        raise FileFormatError(f"{path}: cannot read it: {_one_line(exc)}") from exc


def _one_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    first = text[0] if text else ""
    first = first[:300] + ("..." if len(first) > 300 else "")
    return f"{type(exc).__name__}: {first}" if first else type(exc).__name__


# ------------------------------------------------------------------ the structure (JSON)


@dataclasses.dataclass
class _Plan:
    """A tree ready to write: its structure as JSON, and its array leaves, named.

    Leaves are converted one at a time, as they are written (``array``), so a writer holds
    one converted array at once (a widened bfloat16 copy, say), never all of them. Converting a
    leaf completes its node in the structure, which is therefore serialised last.
    """

    structure: dict[str, Any]
    names: list[str]
    leaves: list[Any]
    paths: list[tuple[Any, ...]]
    nodes: list[dict[str, Any]]
    ml_dtypes: bool
    sources: dict[tuple[Any, ...], dict[str, Any]]

    @property
    def nbytes(self) -> int:
        """The bytes of the array leaves as they are in the tree (for progress)."""
        return sum(_nbytes(leaf) for leaf in self.leaves)

    def array(self, index: int) -> tuple[np.ndarray, str | None]:
        """Leaf ``index`` converted for storing, and the ml_dtypes name if it holds bits."""
        leaf, path = self.leaves[index], self.paths[index]
        converted = _leaf_array(leaf, _tree.format_path(path), path, ml_dtypes=self.ml_dtypes)
        if converted is None:  # pragma: no cover - only array leaves are listed
            raise AssertionError(path)
        array, dtype_name = converted
        self._complete(index, dtype_name, dtype_name or str(array.dtype))
        return array, dtype_name

    def write(self, index: int, file: Any) -> None:
        """Write leaf ``index`` to ``file`` in the ``.npy`` format.

        A bfloat16/float8 tensor that is widened to float32 is widened a chunk at a time, as
        it is written: no float32 copy of the whole tensor is ever made.
        """
        leaf = self.leaves[index]
        if (
            not self.ml_dtypes
            and type(leaf) in (torch.Tensor, torch.nn.Parameter)
            and leaf.dtype in _dtypes.ML_DTYPES
            and leaf.layout == torch.strided
            and not leaf.is_meta
        ):
            self._complete(index, None, "float32")
            _write_widened(file, leaf.detach())
            return
        array, _ = self.array(index)
        _write_array(file, array)

    def _complete(self, index: int, dtype_name: str | None, stored: str) -> None:
        node, path = self.nodes[index], self.paths[index]
        if dtype_name is not None:
            node["dtype"] = dtype_name
        source = _source_of(self.leaves[index], stored, self.sources.get(path, {}))
        if source:
            node["from"] = source


_WIDEN_CHUNK = 1 << 18  # elements widened at once: 1 MiB of float32
_WRITE_CHUNK = 1 << 26  # bytes handed to a zip member at once


def _write_array(file: Any, array: np.ndarray) -> None:
    """``np.lib.format.write_array``, without its copies when writing into a zip member.

    NumPy writes a contiguous array to a real file straight from its memory, but into other
    streams (a ``.npz`` member) through 16 MiB ``tobytes`` copies; here the array's own buffer
    is handed over in large slices instead.
    """
    if isinstance(file, FileIO | BufferedWriter | BufferedRandom) or not (
        array.flags.c_contiguous and array.dtype.isbuiltin == 1 and not array.dtype.hasobject
    ):
        np.lib.format.write_array(file, array, allow_pickle=False)
        return
    header = np.lib.format.header_data_from_array_1_0(array)
    try:
        np.lib.format.write_array_header_1_0(file, header)
    except ValueError:  # pragma: no cover - a header over 64 KiB (thousands of dimensions)
        np.lib.format.write_array_header_2_0(file, header)
    raw = array.reshape(-1).view(np.uint8)
    for start in range(0, raw.size, _WRITE_CHUNK):
        file.write(raw[start : start + _WRITE_CHUNK].data)


def _write_widened(file: Any, t: torch.Tensor) -> None:
    """Write ``t`` (bfloat16/float8) as a float32 ``.npy``, widening it a chunk at a time.

    bfloat16 is the upper half of a float32, so it is widened in NumPy by a shift into one
    reused buffer; the float8 types go through torch. Small torch ops are avoided on purpose:
    each one may wake torch's thread pool, which costs milliseconds on a busy machine.
    """
    header = np.lib.format.header_data_from_array_1_0(np.empty(0, dtype="<f4"))
    header["shape"] = tuple(t.shape)
    np.lib.format.write_array_header_1_0(file, header)
    flat = t.reshape(-1)
    if t.dtype == torch.bfloat16:
        bits = flat.view(torch.int16).numpy(force=True).view(np.uint16)
        buffer = np.empty(min(_WIDEN_CHUNK, bits.size), dtype=np.uint32)
        for start in range(0, bits.size, _WIDEN_CHUNK):
            part = bits[start : start + _WIDEN_CHUNK]
            out = buffer[: part.size]
            np.left_shift(part, 16, out=out, dtype=np.uint32)
            file.write(out.data.cast("B"))
        return
    step = _WIDEN_CHUNK * 4
    for start in range(0, flat.numel(), step):
        chunk = flat[start : start + step].to(device="cpu", dtype=torch.float32)
        file.write(chunk.numpy().data.cast("B"))


def _nbytes(leaf: Any) -> int:
    if isinstance(leaf, torch.Tensor):
        return leaf.numel() * leaf.element_size() if leaf.layout == torch.strided else 0
    return int(getattr(leaf, "nbytes", 0))


def _key_text(key: Any) -> str:
    return key if isinstance(key, str) else repr(key)


def _dotted(path: tuple[Any, ...]) -> str:
    """The display name of a key path: keys joined by dots (``output.hidden_states.0``).

    Examples:
        >>> _dotted(("output", "hidden_states", 0))
        'output.hidden_states.0'
    """
    return ".".join(_key_text(k) for k in path)


_UNSAFE_CHARS = re.compile(r"[^A-Za-z0-9._-]+")
_DOTS = re.compile(r"\.{2,}")
_RESERVED = frozenset(
    ["con", "prn", "aux", "nul"] + [f"{p}{i}" for p in ("com", "lpt") for i in range(1, 10)]
)


def _sanitise(text: str) -> str:
    r"""A file name made of ``[A-Za-z0-9._-]`` only, never ``.``/``..``, hidden or too long.

    Examples:
        >>> _sanitise("../../etc/passwd"), _sanitise("/abs/path"), _sanitise("a\x00b")
        ('etc_passwd', 'abs_path', 'a_b')
    """
    name = _UNSAFE_CHARS.sub("_", text)
    name = _DOTS.sub(".", name).strip("._-") or "_"
    if name.split(".", 1)[0].lower() in _RESERVED:  # Windows device names
        name = "_" + name
    if len(name) > _MAX_NAME:
        digest = hashlib.sha1(text.encode("utf-8", "surrogatepass")).hexdigest()[:10]  # noqa: S324 - a name, not security
        name = f"{name[: _MAX_NAME - 11]}~{digest}"
    return name


def _is_safe_name(name: str) -> bool:
    """A name ``_unique_names`` could have made: one plain file inside the directory."""
    return bool(_SAFE_NAME.fullmatch(name)) and ".." not in name and len(name) <= _MAX_NAME + 8


def _unique_names(paths: list[tuple[Any, ...]]) -> list[str]:
    """Sanitised names, unique even on case-insensitive file systems (``~2`` suffixes)."""
    used = {STRUCTURE.casefold()}
    out = []
    for path in paths:
        base = _sanitise(_dotted(path)) if path else "root"
        name, n = base, 1
        while name.casefold() in used:
            n += 1
            name = f"{base}~{n}"
        used.add(name.casefold())
        out.append(name)
    return out


def _encode_value(value: Any) -> Any:
    """A plain Python value as JSON (tagged where JSON has no exact form); None if it has none."""
    if value is None or isinstance(value, bool | str):
        return value
    if isinstance(value, int):
        return int(value)
    if isinstance(value, float):
        return float(value) if math.isfinite(value) else {"float": repr(float(value))}
    if isinstance(value, bytes | bytearray):
        return {"bytes": base64.b64encode(bytes(value)).decode("ascii")}
    if isinstance(value, complex):
        return {"complex": [_encode_value(value.real), _encode_value(value.imag)]}
    if isinstance(value, tuple) and not hasattr(value, "_fields"):
        return {"tuple": [_encode_value(v) for v in value]}
    if isinstance(value, torch.dtype | torch.device):
        return {"repr": str(value)}
    raise TypeError(type(value).__name__)


def _decode_value(data: Any) -> Any:
    if data is None or isinstance(data, bool | str | int | float):
        return data
    if isinstance(data, dict) and len(data) == 1:
        ((tag, inner),) = data.items()
        if tag == "float" and inner in ("nan", "inf", "-inf"):
            return float(inner)
        if tag == "bytes" and isinstance(inner, str):
            return base64.b64decode(inner, validate=True)
        if tag == "complex" and isinstance(inner, list) and len(inner) == 2:
            return complex(_decode_value(inner[0]), _decode_value(inner[1]))
        if tag == "tuple" and isinstance(inner, list):
            return tuple(_decode_value(v) for v in inner)
        if tag == "repr" and isinstance(inner, str):
            return inner
    raise FileFormatError(f"bad value in the structure: {str(data)[:80]}")


def _class_name(cls: type) -> str:
    module = getattr(cls, "__module__", "") or ""
    qualname = getattr(cls, "__qualname__", cls.__name__)
    return qualname if module == "builtins" else f"{module}.{qualname}"


_MISSING = object()


def _children(x: Any) -> tuple[str, list[Any], list[Any], str | None] | None:
    """How a container is stored: (tag, keys, values, class name); None for a leaf.

    Mappings keep insertion order; namedtuples, ``torch.return_types``, dataclasses and
    ``UserDict``s become mappings of their fields. A dataclass that is also a dict (HF
    ``ModelOutput``) adds, after its items, the fields that are not keys.
    """
    cls = type(x)
    name = None if cls in (dict, list, tuple) else _class_name(cls)
    if isinstance(x, dict):
        keys = list(x.keys())
        values = [dict.__getitem__(x, k) for k in keys]
        if dataclasses.is_dataclass(cls):
            for field in dataclasses.fields(cls):
                value = getattr(x, field.name, _MISSING)
                if field.name not in x and value is not _MISSING:
                    keys.append(field.name)
                    values.append(value)
        return "dict", keys, values, name
    if isinstance(x, list | deque):
        return "list", [], list(x), name
    if isinstance(x, tuple):
        fields = getattr(cls, "_fields", None) or getattr(cls, "__match_args__", None)
        if isinstance(fields, tuple) and len(fields) == len(x):
            return "dict", list(fields), list(x), name
        if cls is tuple:
            return "tuple", [], list(x), None
        return None  # torch.Size and other tuple subclasses: stored as values
    if dataclasses.is_dataclass(x) and not isinstance(x, type):
        present = [f.name for f in dataclasses.fields(x) if hasattr(x, f.name)]
        return "dict", present, [getattr(x, n) for n in present], name
    if isinstance(x, UserDict):
        keys = list(x.data.keys())
        return "dict", keys, [x.data[k] for k in keys], name
    return None


def _source_of(leaf: Any, stored: str, known: dict[str, Any]) -> dict[str, Any]:
    """What a leaf was before it was stored, where that differs from how it is stored."""
    source = dict(known)
    if isinstance(leaf, torch.Tensor):
        source.setdefault("dtype", str(leaf.dtype).removeprefix("torch."))
        source.setdefault("device", str(leaf.device))
        if leaf.requires_grad:
            source["requires_grad"] = True
    if source.get("dtype", stored) == stored:
        source.pop("dtype", None)
    if source.get("device") == "cpu":
        source.pop("device")
    return source


def _plan(tree: Any, /, *, ml_dtypes: bool, contents: Contents | None = None) -> _Plan:
    """Walk ``tree``: its JSON structure, and its array leaves, named (converted later)."""
    classes = contents.classes if contents else {}
    leaves: list[Any] = []
    nodes: list[dict[str, Any]] = []
    paths: list[tuple[Any, ...]] = []
    memo: dict[int, int] = {}  # id(leaf) -> array index: a tensor stored twice is stored once
    active: set[int] = set()

    def leaf_node(leaf: Any, path: tuple[Any, ...]) -> Any:
        if id(leaf) in memo:
            return {"t": "array", "i": memo[id(leaf)]}
        if not isinstance(leaf, torch.Tensor | np.ndarray | np.generic):
            return _encode_leaf(leaf, _tree.format_path(path), path)
        if isinstance(leaf, np.ndarray) and leaf.dtype.hasobject:
            raise ConversionError(
                f"cannot store {_tree.format_path(path)}: an object array needs pickle; convert "
                "it to a numeric or string array first",
                path=path,
            )
        memo[id(leaf)] = len(leaves)
        node: dict[str, Any] = {"t": "array", "i": len(leaves)}
        leaves.append(leaf)
        nodes.append(node)
        paths.append(path)
        return node

    def walk(x: Any, path: tuple[Any, ...]) -> Any:
        if x is None:
            return None
        parts = _children(x)
        if parts is None:
            return leaf_node(x, path)
        if id(x) in active:
            raise ConversionError(
                f"the tree contains a cycle: {_tree.format_path(path)} is the same object as "
                "one of its own ancestors; break the cycle before saving",
                path=path,
            )
        tag, keys, values, name = parts
        active.add(id(x))
        try:
            if tag == "dict":
                children = [walk(v, (*path, k)) for k, v in zip(keys, values, strict=True)]
                out: dict[str, Any] = {
                    "t": "dict",
                    "k": [_encode_key(k) for k in keys],
                    "v": children,
                }
            else:
                out = {"t": tag, "v": [walk(v, (*path, i)) for i, v in enumerate(values)]}
        finally:
            active.discard(id(x))
        name = classes.get(path, name)
        if name:
            out["c"] = name
        return out

    try:
        structure = walk(tree, ())
    except RecursionError:
        raise ConversionError(
            "the tree is nested too deeply to save; flatten it first", path=None
        ) from None
    return _Plan(
        structure={"format": "tonumpy", "version": _FORMAT_VERSION, "tree": structure},
        names=_unique_names(paths),
        leaves=leaves,
        paths=paths,
        nodes=nodes,
        ml_dtypes=ml_dtypes,
        sources=contents.sources if contents else {},
    )


def _encode_key(key: Any) -> Any:
    try:
        return _encode_value(key)
    except TypeError:
        return {"repr": repr(key)}


def _encode_leaf(leaf: Any, where: str, path: tuple[Any, ...]) -> Any:
    if isinstance(leaf, set | frozenset):
        try:
            items = [_encode_value(v) for v in leaf]
        except TypeError:
            pass
        else:
            return {"t": "list", "v": [{"t": "value", "v": v} for v in items], "c": "set"}
    try:
        value = _encode_value(leaf)
    except TypeError:
        raise ConversionError(
            f"cannot store {where} ({type(leaf).__name__}) without pickle: only tensors, arrays, "
            "containers and str/int/float/bool/None/bytes/complex values can be saved; convert "
            "it to one of those or drop it first",
            path=path,
        ) from None
    if isinstance(leaf, tuple):  # torch.Size and other plain tuple subclasses
        return {
            "t": "tuple",
            "v": [{"t": "value", "v": v} for v in value["tuple"]],
            "c": _class_name(type(leaf)),
        }
    return {"t": "value", "v": value}


def _leaf_array(
    leaf: Any, where: str, path: tuple[Any, ...], *, ml_dtypes: bool
) -> tuple[np.ndarray, str | None] | None:
    """The array to store for a leaf and the ml_dtypes name when it holds raw bits."""
    if isinstance(leaf, torch.Tensor):
        if ml_dtypes and leaf.dtype in _dtypes.ML_DTYPES and leaf.layout == torch.strided:
            bits = leaf.detach().view(_dtypes.BITS[leaf.dtype.itemsize])
            return bits.numpy(force=True), _dtypes.ML_DTYPES[leaf.dtype]
        try:
            converted = to_numpy(leaf)
        except TonumpyError as exc:
            raise type(exc)(f"{where}: {exc}", path=path) from exc
        if isinstance(converted, list):  # a nested tensor: one array per component
            raise ConversionError(
                f"cannot store {where}: a nested tensor; store its components "
                "(list(t.unbind())) instead",
                path=path,
            )
        return converted, None
    if isinstance(leaf, np.generic):
        leaf = np.asarray(leaf)
    if not isinstance(leaf, np.ndarray):
        return None
    if leaf.dtype.type.__module__.startswith("ml_dtypes"):
        name = leaf.dtype.name
        return leaf.view(f"u{leaf.dtype.itemsize}"), name
    if leaf.dtype.hasobject:
        raise ConversionError(
            f"cannot store {where}: an object array needs pickle; convert it to a numeric or "
            "string array first",
            path=path,
        )
    return leaf, None


def _decode_tree(
    data: Any,
    get_array: Callable[[int, str | None], Any],
    classes: dict[tuple[Any, ...], str],
    sources: dict[tuple[Any, ...], dict[str, Any]],
) -> Any:
    """Rebuild a tree from its JSON structure; ``get_array(i, dtype)`` gives array ``i``."""

    def bad(path: tuple[Any, ...], what: str) -> FileFormatError:
        return FileFormatError(f"the structure is damaged at {_dotted(path) or 'the root'}: {what}")

    def walk(node: Any, path: tuple[Any, ...]) -> Any:
        if node is None:
            return None
        if not isinstance(node, dict):
            raise bad(path, f"expected a node, got {type(node).__name__}")
        tag = node.get("t")
        if tag == "value":
            return _decode_value(node.get("v"))
        if tag == "array":
            index, dtype = node.get("i"), node.get("dtype")
            if not isinstance(index, int) or isinstance(index, bool):
                raise bad(path, "an array without an index")
            if dtype is not None and not isinstance(dtype, str):
                raise bad(path, "an array with a bad dtype")
            source = node.get("from")
            if isinstance(source, dict):
                sources[path] = source
            return get_array(index, dtype)
        values = node.get("v")
        if not isinstance(values, list):
            raise bad(path, "a container without values")
        name = node.get("c")
        if isinstance(name, str):
            classes[path] = name
        if tag in ("list", "tuple"):
            items = [walk(v, (*path, i)) for i, v in enumerate(values)]
            return items if tag == "list" else tuple(items)
        if tag == "dict":
            keys = node.get("k")
            if not isinstance(keys, list) or len(keys) != len(values):
                raise bad(path, "a mapping whose keys and values do not match")
            out: dict[Any, Any] = {}
            for key_data, value in zip(keys, values, strict=True):
                key = _decode_value(key_data)
                try:
                    out[key] = walk(value, (*path, key))
                except TypeError:  # an unhashable key
                    raise bad(path, "a key that cannot be a dict key") from None
            return out
        raise bad(path, f"unknown node type {str(tag)[:40]!r}")

    return walk(data, ())


def _parse_structure(raw: bytes) -> dict[str, Any]:
    try:
        data = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, ValueError) as exc:
        raise FileFormatError(f"the structure is not valid JSON: {_one_line(exc)}") from None
    if not isinstance(data, dict) or data.get("format") != "tonumpy":
        raise FileFormatError("the structure is not a tonumpy structure")
    version = data.get("version")
    if not isinstance(version, int) or version > _FORMAT_VERSION:
        raise FileFormatError(
            f"the structure has format version {version!r}; this tonumpy reads version "
            f"{_FORMAT_VERSION} and older: upgrade tonumpy"
        )
    return data


def _from_bits(bits: np.ndarray, name: str) -> Any:
    """Stored bits back to data: a torch tensor of the exact dtype (or an ml_dtypes array)."""
    torch_dtype = getattr(torch, name, None)
    if isinstance(torch_dtype, torch.dtype) and torch_dtype in _dtypes.ML_DTYPES:
        if bits.dtype.itemsize != torch_dtype.itemsize or bits.dtype.kind not in "iu":
            raise FileFormatError(f"bits of {bits.dtype} cannot hold {name}")
        wide = np.ascontiguousarray(bits).view(f"i{bits.dtype.itemsize}")
        return torch.from_numpy(wide.copy()).view(torch_dtype)
    module = _dtypes.ml_dtypes_module()
    ml_type = getattr(module, name, None) if re.fullmatch(r"[a-z0-9_]+", name) else None
    if ml_type is None:
        raise FileFormatError(f"unknown stored dtype {name[:40]!r}")
    return bits.view(ml_type)


# --------------------------------------------------------------------------- readers


def _read_npz(path: Path) -> Contents:
    with path.open("rb") as file, contextlib.ExitStack() as stack:
        # An open file, not the name: np.load leaks its own handle when a zip is corrupt.
        loaded = np.load(file, allow_pickle=False)
        if not isinstance(loaded, np.lib.npyio.NpzFile):
            raise FileFormatError(f"{path}: not a .npz archive (a .npy with the wrong suffix?)")
        npz = stack.enter_context(loaded)
        names = list(npz.files)
        if STRUCTURE not in names:
            return Contents({name: npz[name] for name in names}, "npz")
        raw = npz[STRUCTURE]
        if not isinstance(raw, np.ndarray) or raw.dtype != np.uint8:
            raise FileFormatError(f"{path}: the {STRUCTURE} member is not JSON bytes")
        data = _parse_structure(raw.tobytes())
        member_names = data.get("arrays")
        if not isinstance(member_names, list) or not all(isinstance(n, str) for n in member_names):
            raise FileFormatError(f"{path}: the structure does not list its arrays")
        available = set(names)

        def get_array(index: int, dtype: str | None) -> Any:
            if not 0 <= index < len(member_names) or member_names[index] not in available:
                raise FileFormatError(f"{path}: the structure names an array that is missing")
            array = npz[member_names[index]]
            return _from_bits(array, dtype) if dtype else array

        classes: dict[tuple[Any, ...], str] = {}
        sources: dict[tuple[Any, ...], dict[str, Any]] = {}
        tree = _decode_tree(data.get("tree"), get_array, classes, sources)
        return Contents(tree, "tonumpy npz", classes, sources)


def _map(path: Path) -> np.ndarray:
    """A ``.npy`` file, memory-mapped copy-on-write: writable in memory, the file untouched."""
    return np.asarray(np.load(path, allow_pickle=False, mmap_mode="c"))


def _read_npy(path: Path) -> Contents:
    return Contents(_map(path), "npy")


def _read_npy_dir(path: Path) -> Contents:
    structure_file = path / f"{STRUCTURE}.json"
    if not structure_file.exists():
        files = sorted(p for p in path.iterdir() if p.suffix == ".npy" and p.is_file())
        if not files:
            raise FileFormatError(f"{path}: a directory without .npy files")
        tree = {p.stem: _map(p) for p in files}
        return Contents(tree, "npy directory")
    data = _parse_structure(structure_file.read_bytes())
    member_names = data.get("arrays")
    if not isinstance(member_names, list) or not all(isinstance(n, str) for n in member_names):
        raise FileFormatError(f"{path}: the structure does not list its arrays")

    def get_array(index: int, dtype: str | None) -> Any:
        if not 0 <= index < len(member_names):
            raise FileFormatError(f"{path}: the structure names an array that is missing")
        name = member_names[index]
        if not _is_safe_name(name):  # never follow a name out of the directory
            raise FileFormatError(f"{path}: the structure names an unsafe file {name[:60]!r}")
        array = _map(path / f"{name}.npy")
        return _from_bits(array, dtype) if dtype else array

    classes: dict[tuple[Any, ...], str] = {}
    sources: dict[tuple[Any, ...], dict[str, Any]] = {}
    tree = _decode_tree(data.get("tree"), get_array, classes, sources)
    return Contents(tree, "tonumpy npy directory", classes, sources)


def _safetensors() -> Any:
    try:
        return importlib.import_module("safetensors.torch")
    except ImportError:
        raise FileFormatError(
            ".safetensors files need the 'safetensors' package: pip install safetensors "
            "(or pip install 'tonumpy[safetensors]')"
        ) from None


def _read_safetensors(path: Path) -> Contents:
    _safetensors()
    safetensors = importlib.import_module("safetensors")
    with safetensors.safe_open(str(path), framework="pt", device="cpu") as f:
        tensors = {key: f.get_tensor(key) for key in f.keys()}  # noqa: SIM118 - not a dict
        metadata = f.metadata() or {}
    raw = metadata.get(STRUCTURE)
    if raw is None:
        return Contents(tensors, "safetensors")
    data = _parse_structure(raw.encode("utf-8"))
    member_names = data.get("arrays")
    if not isinstance(member_names, list):
        raise FileFormatError(f"{path}: the structure does not list its arrays")

    def get_array(index: int, dtype: str | None) -> Any:
        if not 0 <= index < len(member_names) or member_names[index] not in tensors:
            raise FileFormatError(f"{path}: the structure names a tensor that is missing")
        return tensors[member_names[index]]

    classes: dict[tuple[Any, ...], str] = {}
    sources: dict[tuple[Any, ...], dict[str, Any]] = {}
    tree = _decode_tree(data.get("tree"), get_array, classes, sources)
    return Contents(tree, "safetensors", classes, sources)


# ----------------------------------------------------------------- torch.save files


# Modules whose names in a pickle mean code, never data: refused outright, even when the name
# looks like a class. (Nothing named in a file is imported either way; this list decides
# between "refuse the file" and "show a stand-in".)
_CODE_MODULES = frozenset(
    [
        "builtins",
        "os",
        "posix",
        "nt",
        "sys",
        "subprocess",
        "shutil",
        "socket",
        "importlib",
        "runpy",
        "pickle",
        "_pickle",
        "marshal",
        "ctypes",
        "code",
        "codeop",
        "pty",
        "types",
        "functools",
        "operator",
        "io",
        "_io",
        "tempfile",
        "multiprocessing",
        "threading",
        "asyncio",
        "urllib",
        "http",
        "webbrowser",
        "signal",
        "inspect",
        "pdb",
        "bdb",
        "timeit",
        "trace",
        "platform",
        "ftplib",
        "smtplib",
        "telnetlib",
        "zipimport",
        "pkgutil",
        "site",
        "distutils",
        "setuptools",
        "pip",
        "glob",
        "sched",
        "select",
        "selectors",
        "_thread",
        "_posixsubprocess",
        "_winapi",
        "winreg",
        "msvcrt",
        "shelve",
        "dbm",
        "sqlite3",
        "ssl",
        "requests",
        "ensurepip",
        "venv",
        "cProfile",
        "profile",
        # Python 2 names that pickle protocol 2 writes for some of the above
        "__builtin__",
        "commands",
        "copy_reg",
        "cPickle",
        "popen2",
        "urllib2",
        "httplib",
    ]
)
_SAFE_NAME = re.compile(r"[A-Za-z0-9_][A-Za-z0-9._~-]*")
_CLASS_LIKE = re.compile(r"_*[A-Z][A-Za-z0-9_]*")
# Classes whose names are not CapWords but that checkpoints do hold (stand-ins, never imported)
_LOWERCASE_CLASSES = frozenset(
    [
        "collections.defaultdict",
        "collections.deque",
        "datetime.datetime",
        "datetime.date",
        "datetime.time",
        "datetime.timedelta",
        "datetime.timezone",
    ]
)
_UNSUPPORTED_GLOBAL = re.compile(r"GLOBAL ([\w.]+) (?:was not an allowed global|whose module)")


class _StandIn:
    """Replaces a class a pickle names; records its instances as ``OrderedDict``s.

    The weights-only unpickler lets items be set only on dict/OrderedDict/Counter and state be
    set on an OrderedDict's ``__dict__``, so every instance is created as an OrderedDict (a
    list for ``deque``, which the pickle appends to); what the pickle passes in (constructor
    arguments, state, items) is kept, nothing is run.
    """

    qualified_name = ""
    records: dict[int, tuple[str, tuple[Any, ...], Any]]

    def __new__(cls, *args: Any, **kwargs: Any) -> Any:
        instance: Any = [] if cls.qualified_name == "collections.deque" else OrderedDict()
        cls.records[id(instance)] = (cls.qualified_name, args + tuple(kwargs.values()), instance)
        return instance


def _stand_in(name: str, records: dict[int, Any]) -> type:
    return type(
        name.rsplit(".", 1)[-1],
        (_StandIn,),
        {"qualified_name": name, "records": records, "__module__": __name__},
    )


def _numpy_globals() -> list[Any]:
    """The NumPy functions and classes that pickled arrays, scalars and dtypes refer to."""
    reconstruct = np.arange(1).__reduce__()[0]
    scalar = np.float64(1).__reduce__()[0]
    frombuffer = np.arange(2).__reduce_ex__(5)[0]
    # builtin types a pickle may call: they build plain values (a defaultdict's factory)
    found: list[Any] = [np.ndarray, np.dtype, frozenset, slice, range]
    found += [list, dict, tuple, int, float, str, bool, bytes]
    for package in ("numpy.core", "numpy._core"):
        found += [
            (reconstruct, f"{package}.multiarray._reconstruct"),
            (scalar, f"{package}.multiarray.scalar"),
            (frombuffer, f"{package}.numeric._frombuffer"),
        ]
    codes = "?bBhHiIlLqQefdgFDGSUV"
    found += list({type(np.dtype(c)) for c in codes} | {type(np.dtype("M8")), type(np.dtype("m8"))})
    return found


def _classify_global(name: str, path: Path) -> None:
    """Raise [`UnsafeFileError`][] unless ``name`` looks like a data class (not code)."""
    module, _, attr = name.rpartition(".")
    top = module.split(".", 1)[0]
    class_like = (
        _CLASS_LIKE.fullmatch(attr) or module == "torch.return_types" or name in _LOWERCASE_CLASSES
    )
    if top in _CODE_MODULES or not class_like or not module:
        raise UnsafeFileError(
            f"{path}: refused: its pickle calls {name}, which is code, not data; nothing was "
            "run. Load it with --unsafe-load (unsafe_load=True) only if you trust its origin"
        )


def _read_torch(path: Path, *, unsafe_load: bool) -> Contents:
    devices: dict[int, str] = {}

    def map_location(storage: Any, location: str) -> Any:
        devices[storage.data_ptr()] = location
        return storage

    try:
        mmap = zipfile.is_zipfile(path)
    except Exception:  # noqa: BLE001 - a corrupt end record: let torch.load report it
        mmap = False
    records: dict[int, tuple[str, tuple[Any, ...], Any]] = {}
    if unsafe_load:
        try:
            obj = _torch_load(path, map_location, mmap=mmap, weights_only=False)
        except pickle.UnpicklingError as exc:
            raise _torch_error(path, exc) from None
        if isinstance(obj, torch.nn.Module):
            obj = obj.state_dict()
    else:
        allowed = _numpy_globals()
        names: set[str] = set()
        if mmap:
            with torch.serialization.safe_globals(allowed), contextlib.suppress(Exception):
                names = set(torch.serialization.get_unsafe_globals_in_checkpoint(str(path)))
        for _ in range(_MAX_RETRIES):
            for name in names:
                _classify_global(name, path)
            stand_ins = [(_stand_in(n, records), n) for n in sorted(names)]
            try:
                with torch.serialization.safe_globals(allowed + stand_ins):
                    obj = _torch_load(path, map_location, mmap=mmap, weights_only=True)
                break
            except pickle.UnpicklingError as exc:
                found = _UNSUPPORTED_GLOBAL.search(str(exc))
                if found is None or found.group(1) in names:
                    raise _torch_error(path, exc) from None
                names.add(found.group(1))
                records.clear()
        else:
            raise FileFormatError(f"{path}: its pickle names too many classes")
    classes: dict[tuple[Any, ...], str] = {}
    sources: dict[tuple[Any, ...], dict[str, Any]] = {}
    try:
        tree = _unstub(obj, records, classes, sources, devices)
    except RecursionError:
        raise FileFormatError(f"{path}: the structure is nested too deeply to read") from None
    return Contents(tree, "torch", classes, sources)


def _torch_load(path: Path, map_location: Any, *, mmap: bool, weights_only: bool) -> Any:
    """``torch.load``; raises ``pickle.UnpicklingError`` as it is, other failures cleaned up."""
    try:
        with warnings.catch_warnings():
            # torch warns about pickle protocols above 2 before its own loader refuses them
            warnings.filterwarnings("ignore", "Detected pickle protocol", UserWarning)
            return torch.load(path, map_location=map_location, weights_only=weights_only, mmap=mmap)
    except (pickle.UnpicklingError, FileNotFoundError, PermissionError):
        raise
    except RecursionError:
        raise FileFormatError(f"{path}: the structure is nested too deeply to read") from None
    except Exception as exc:
        raise _torch_error(path, exc) from exc


def _torch_error(path: Path, exc: BaseException) -> TonumpyError:
    text = str(exc)
    blocked = re.search(r"GLOBAL ([\w.]+) whose module", text)
    if blocked:
        return UnsafeFileError(
            f"{path}: refused: its pickle calls {blocked.group(1)}, which is code, not data; "
            "nothing was run. Load it with --unsafe-load (unsafe_load=True) only if you trust "
            "its origin"
        )
    operand = re.search(r"Unsupported operand (\d+)", text)
    if operand:
        return FileFormatError(
            f"{path}: cannot read it safely: its pickle uses opcode {operand.group(1)}, which the "
            "weights-only loader does not know (a pickle protocol above 2, or a corrupt file). "
            "--unsafe-load (unsafe_load=True) reads it anyway, only for files you trust"
        )
    if isinstance(exc, pickle.UnpicklingError) and "Weights only load failed" in text:
        after = text.split("WeightsUnpickler error:", 1)[-1]
        detail = [line.strip() for line in after.splitlines() if line.strip()]
        return UnsafeFileError(
            f"{path}: refused: loading it safely failed ({(detail[0] if detail else '')[:200]}); "
            "nothing was run. --unsafe-load (unsafe_load=True) unpickles it anyway, only for "
            "files you trust"
        )
    archive = re.search(r"failed reading zip archive: ([^.]+)", text)
    if archive:
        return FileFormatError(
            f"{path}: a truncated or corrupt torch.save file ({archive.group(1).strip()})"
        )
    return FileFormatError(f"{path}: cannot read it as a torch.save file: {_one_line(exc)}")


def _unstub(
    obj: Any,
    records: dict[int, tuple[str, tuple[Any, ...], Any]],
    classes: dict[tuple[Any, ...], str],
    sources: dict[tuple[Any, ...], dict[str, Any]],
    devices: dict[int, str],
) -> Any:
    """Replace stand-in instances by plain dicts (class names to ``classes``), note devices."""
    active: set[int] = set()

    def walk(x: Any, path: tuple[Any, ...]) -> Any:
        if isinstance(x, torch.Tensor):
            with contextlib.suppress(Exception):
                device = devices.get(x.untyped_storage().data_ptr())
                if device and device != "cpu":
                    sources[path] = {"device": device}
            return x
        if not isinstance(x, dict | list | tuple) or (
            isinstance(x, tuple) and type(x) is not tuple
        ):
            return x
        if id(x) in active:
            raise FileFormatError(f"the pickle contains a cycle at {_dotted(path) or 'the root'}")
        active.add(id(x))
        try:
            record = records.get(id(x))
            if record is not None and record[2] is x:
                name, args, instance = record
                classes[path] = name
                if isinstance(instance, list):  # a deque
                    return [walk(v, (*path, i)) for i, v in enumerate(instance)]
                items = _record_items(name, args, instance)
                return {k: walk(v, (*path, k)) for k, v in items.items()}
            if isinstance(x, dict):
                if type(x) not in (dict,):
                    classes[path] = _class_name(type(x))
                return {k: walk(v, (*path, k)) for k, v in x.items()}
            items_out = [walk(v, (*path, i)) for i, v in enumerate(x)]
            return items_out if isinstance(x, list) else tuple(items_out)
        finally:
            active.discard(id(x))

    return walk(obj, ())


def _record_items(
    name: str, args: tuple[Any, ...], instance: OrderedDict[Any, Any]
) -> dict[Any, Any]:
    """The fields of a stand-in instance: its items, then attributes, else its arguments."""
    state = vars(instance)
    if instance or state:
        items: dict[Any, Any] = dict(instance)
        for key, value in state.items():
            items.setdefault(key, value)
        return items
    if name.startswith("torch.return_types.") and len(args) == 2 and isinstance(args[0], tuple):
        fields = getattr(
            getattr(torch.return_types, name.rsplit(".", 1)[-1], None), "__match_args__", None
        )
        values = args[0]
        if isinstance(fields, tuple) and len(fields) == len(values):
            return dict(zip(fields, values, strict=True))
        return dict(enumerate(values))
    return dict(enumerate(args))


# --------------------------------------------------------------------------- writers


def _parent_of(dst: Path) -> Path:
    parent = dst.parent
    if not parent.is_dir():
        raise FileNotFoundError(f"{parent}: no such directory (create it first)")
    return parent


@contextlib.contextmanager
def _atomic_file(dst: Path, *, overwrite: bool) -> Iterator[Path]:
    """A temporary path next to ``dst``; renamed onto ``dst`` if the block succeeds."""
    if dst.is_dir():
        raise IsADirectoryError(f"{dst} is a directory; choose a file name")
    if dst.exists() and not overwrite:
        raise FileExistsError(f"{dst} exists; pass --force (overwrite=True) to replace it")
    parent = _parent_of(dst)
    fd, tmp_name = tempfile.mkstemp(dir=parent, prefix=f".{dst.name[:80]}.", suffix=".tmp")
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        yield tmp
        if overwrite:
            os.replace(tmp, dst)
        else:
            try:
                os.link(tmp, dst)  # fails if dst appeared meanwhile: never clobbers
            except FileExistsError:
                raise FileExistsError(
                    f"{dst} exists; pass --force (overwrite=True) to replace it"
                ) from None
            except OSError:  # no hard links on this file system
                if dst.exists():
                    raise FileExistsError(f"{dst} exists") from None
                os.replace(tmp, dst)
    finally:
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()


def _structure_bytes(plan: _Plan) -> bytes:
    data = dict(plan.structure, arrays=plan.names)
    return json.dumps(data, allow_nan=False, separators=(",", ":")).encode("utf-8")


def _write_npz(
    dst: Path, plan: _Plan, *, overwrite: bool, compress: bool, progress: Progress | None
) -> None:
    method = zipfile.ZIP_DEFLATED if compress else zipfile.ZIP_STORED
    total, done = plan.nbytes, 0
    with (
        _atomic_file(dst, overwrite=overwrite) as tmp,
        zipfile.ZipFile(tmp, "w", compression=method, allowZip64=True) as zf,
    ):
        for index, name in enumerate(plan.names):
            with zf.open(f"{name}.npy", "w", force_zip64=True) as member:
                plan.write(index, member)
            done += _nbytes(plan.leaves[index])
            if progress is not None:
                progress(done, total)
        structure = np.frombuffer(_structure_bytes(plan), dtype=np.uint8)
        with zf.open(f"{STRUCTURE}.npy", "w") as member:
            _write_array(member, structure)


def _write_npy(dst: Path, plan: _Plan, *, overwrite: bool) -> None:
    if len(plan.leaves) != 1 or plan.structure["tree"].get("t") != "array":
        raise FileFormatError(
            f"{dst}: a .npy file holds one array, and this file holds a tree of "
            f"{len(plan.leaves)} arrays; write a .npz file or a directory instead"
        )
    array, _ = plan.array(0)
    with _atomic_file(dst, overwrite=overwrite) as tmp, tmp.open("wb") as f:
        np.lib.format.write_array(f, array, allow_pickle=False)


def _is_replaceable_dir(path: Path) -> bool:
    """True for an empty directory or one holding a previous export and nothing else."""
    entries = list(path.iterdir())
    if not entries:
        return True
    names = {e.name for e in entries}
    return f"{STRUCTURE}.json" in names and all(
        e.is_file() and not e.is_symlink() and (e.suffix == ".npy" or e.name == f"{STRUCTURE}.json")
        for e in entries
    )


def _write_npy_dir(dst: Path, plan: _Plan, *, overwrite: bool, progress: Progress | None) -> None:
    if dst.exists():
        if not overwrite:
            raise FileExistsError(f"{dst} exists; pass --force (overwrite=True) to replace it")
        if not dst.is_dir() or dst.is_symlink():
            raise FileExistsError(f"{dst} exists and is not a directory; remove it first")
        if not _is_replaceable_dir(dst):
            raise FileExistsError(
                f"{dst} is a directory that holds more than a tonumpy export; not replacing "
                "it even with --force: remove it yourself or choose another name"
            )
    parent = _parent_of(dst)
    tmp = Path(tempfile.mkdtemp(dir=parent, prefix=f".{dst.name[:80]}.", suffix=".tmp"))
    old: Path | None = None
    try:
        total, done = plan.nbytes, 0
        for index, name in enumerate(plan.names):
            target = tmp / f"{name}.npy"
            if target.parent != tmp or not _is_safe_name(name):  # pragma: no cover - defence
                raise FileFormatError(f"unsafe file name {name!r}")
            with target.open("xb") as f:
                plan.write(index, f)
            done += _nbytes(plan.leaves[index])
            if progress is not None:
                progress(done, total)
        (tmp / f"{STRUCTURE}.json").write_bytes(_structure_bytes(plan))
        if dst.exists():
            old = Path(tempfile.mkdtemp(dir=parent, prefix=f".{dst.name[:80]}.", suffix=".old"))
            os.rmdir(old)
            os.rename(dst, old)
        os.rename(tmp, dst)
    except BaseException:
        if old is not None and not dst.exists():
            os.rename(old, dst)
            old = None
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    finally:
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)


def _write_safetensors(
    dst: Path, contents: Contents, *, overwrite: bool, progress: Progress | None
) -> None:
    st = _safetensors()
    tree = contents.tree
    leaves, spec = _tree.flatten(tree)
    # Tensors keep their exact dtype (safetensors has bfloat16 and float8); arrays become tensors.
    as_tensors = [
        _dtypes_to_tensor(leaf) if isinstance(leaf, np.ndarray | np.generic) else leaf
        for leaf in leaves
    ]
    plan = _plan(_tree.unflatten(spec, as_tensors), ml_dtypes=True, contents=contents)
    tensors: dict[str, torch.Tensor] = {}
    seen: set[int] = set()
    for index, name in enumerate(plan.names):
        array, dtype = plan.array(index)
        t = torch.from_numpy(np.asarray(array, order="C"))
        if dtype is not None:
            t = t.view(getattr(torch, dtype))
        if t.untyped_storage().data_ptr() in seen:
            t = t.clone()
        seen.add(t.untyped_storage().data_ptr())
        tensors[name] = t
    metadata = {STRUCTURE: _structure_bytes(plan).decode("utf-8")}
    with _atomic_file(dst, overwrite=overwrite) as tmp:
        st.save_file(tensors, str(tmp), metadata=metadata)
    if progress is not None:
        progress(plan.nbytes, plan.nbytes)


def _dtypes_to_tensor(array: np.ndarray | np.generic) -> Any:
    array = np.asarray(array)
    bits_of = _dtypes.torch_dtype_of(array.dtype)
    if bits_of is not None:
        return torch.from_numpy(array.view(f"i{array.dtype.itemsize}").copy()).view(bits_of)
    if array.dtype.kind in "biufc" and array.dtype.isnative:
        return torch.from_numpy(np.asarray(array, order="C"))
    return array
