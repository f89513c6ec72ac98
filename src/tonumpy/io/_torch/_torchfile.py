"""``torch.save`` files, read safely: nothing the file names runs, nothing it declares is trusted.

The file is checked before ``torch.load`` sees it: a zip whose members are stored (as torch
writes them), inside the file and not overlapping; a pickle that :mod:`._pickle_scan` has run
dry (no call allocates from a size, no tensor reaches past its storage) and whose storages are
exactly the size of their records (or, in the legacy format, fit in the file). It is then loaded
with ``torch.load(weights_only=True)``, memory-mapped, with an allow-list no wider than torch's
own plus the NumPy functions pickled arrays need, each wrapped so that it cannot allocate more
than the data it is given. Classes the file names are never imported: a stand-in records what
the pickle puts into each instance, which comes back as a ``dict`` (its class name kept for
display). The tree that comes back is checked too: no shared container visited more often than
the pickle has bytes (a "billion laughs" of references), no tensor data beyond
``EXPANSION`` times the file, no NumPy object arrays. The CRC-32 of each storage record is
checked before its data is first used (``Checksums.verify``), so a member is read once.
"""

from __future__ import annotations

import contextlib
import math
import mmap
import os
import pickle
import threading
import warnings
import weakref
import zipfile
import zlib
from collections import OrderedDict
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..._format._fs import open_regular, short
from ..._format._names import dotted
from ..._format._npyzip import check_members
from ...errors import FileFormatError, TonumpyError, UnsafeFileError
from . import _allowlist, _pickle_scan

__all__ = ["Checksums", "read_torch"]

#: The tensors of a ``.pt`` file may hold, together, at most this many times the file's size
#: (plus 64 MiB): tied weights and views count each time they appear, a sparse tensor counts
#: dense, as it is converted.
EXPANSION = 4
_EXPANSION_SLACK = 64 << 20
_REGISTRY = threading.Lock()

# ------------------------------------------------------------------------------- checks


class Checksums:
    """The CRC-32 of each storage record of a zip ``.pt``, checked before its data is used.

    ``torch.load`` memory-maps the records without checking them. Each tensor's storage is
    matched to its record by address (the map of the whole file starts at one base), and a
    record is checked, once, the first time a tensor over it is about to be used: reading it
    here brings it into the page cache, from which the conversion then reads it.
    """

    def __init__(self, path: Path, records: dict[str, tuple[zipfile.ZipInfo, int]]) -> None:
        self.path = path
        self.records = records
        self.loaded: list[tuple[int, int]] = []  # (address, bytes) of each storage, in order
        self.by_address: dict[int, str] = {}
        self.checked: set[str] = set()
        self._file = open_regular(path)
        self._closer = weakref.finalize(self, self._file.close)

    def bind(self, keys: list[str]) -> None:
        """Match the storages torch loaded (in order) to the records the scan listed."""
        if len(keys) != len(self.loaded):
            return
        base = None
        for key, (address, nbytes) in zip(keys, self.loaded, strict=True):
            info, start = self.records[key]
            if nbytes == 0:
                continue
            if base is None:
                base = address - start
            if address - start != base or nbytes != info.file_size:
                self.by_address.clear()
                return
            self.by_address[address] = key

    def verify(self, leaf: Any) -> None:
        """Check the records behind ``leaf`` (all of them if they cannot be told apart)."""
        if not isinstance(leaf, torch.Tensor) or leaf.is_meta:
            return
        key = None
        if leaf.layout == torch.strided and not leaf.is_nested:
            with contextlib.suppress(RuntimeError):
                key = self.by_address.get(leaf.untyped_storage().data_ptr())
        if key is not None:
            self._check(key)
        elif len(self.checked) < len(self.records):
            self.verify_all()

    def verify_all(self) -> None:
        """Check every storage record."""
        for key in self.records:
            self._check(key)

    def _check(self, key: str) -> None:
        if key in self.checked:
            return
        info, start = self.records[key]
        if (
            _crc32(self._file, start, info.file_size, f"{self.path}: storage {short(key)}")
            != info.CRC
        ):
            raise FileFormatError(
                f"{self.path}: storage {short(key)} is corrupt: its CRC-32 does not match "
                "(damaged bytes in the file); its values cannot be trusted, refused"
            )
        self.checked.add(key)


def _crc32(f: Any, start: int, size: int, source: str) -> int:
    """The CRC-32 of ``size`` bytes of ``f`` from ``start``, read 16 MiB at a time.

    Read, not mapped: the bytes pass through the page cache without becoming part of this
    process's resident memory.

    Raises:
        FileFormatError: The file ends first.
    """
    crc, at, end = 0, start, start + size
    while at < end:
        chunk = os.pread(f.fileno(), min(1 << 24, end - at), at)
        if not chunk:
            raise FileFormatError(f"{source}: truncated")
        crc = zlib.crc32(chunk, crc)
        at += len(chunk)
    return crc


def _check_zip(
    path: Path, f: Any, whole: Any
) -> tuple[memoryview, dict[str, tuple[zipfile.ZipInfo, int]]]:
    """(data.pkl, storage records by key) of a zip ``torch.save`` file, all checked.

    ``whole`` is the file, memory-mapped: the pickle is a view of it (stored, never copied),
    its CRC-32 checked first.
    """
    try:
        zf = zipfile.ZipFile(f)
    except (zipfile.BadZipFile, EOFError, OSError, ValueError, UnicodeError) as exc:
        raise FileFormatError(f"{path}: a truncated or corrupt torch.save file ({exc})") from None
    members = check_members(zf, f, str(path), stored_only=True)
    pickles = [name for name in members if name.endswith("/data.pkl") and name.count("/") == 1]
    if len(pickles) != 1:
        raise FileFormatError(f"{path}: not a torch.save file (no single data.pkl record)")
    prefix = pickles[0].removesuffix("data.pkl")
    info, start = members[pickles[0]]
    if _crc32(f, start, info.file_size, str(path)) != info.CRC:
        raise FileFormatError(f"{path}: its pickle is corrupt (its CRC-32 does not match)")
    data = memoryview(whole)[start : start + info.file_size]
    records = {
        name.removeprefix(f"{prefix}data/"): member
        for name, member in members.items()
        if name.startswith(f"{prefix}data/")
    }
    return data, records


def _reopenable(path: Path, f: Any) -> Path:
    """A name for the file already opened (and checked) as ``f``, for torch to open again.

    On Linux, ``/proc/self/fd/N`` names the very file behind the descriptor, so that a path
    swapped for a FIFO or another file after the checks is not what torch reads.
    """
    alias = Path(f"/proc/self/fd/{f.fileno()}")
    return alias if alias.exists() else path


@contextlib.contextmanager
def _mapped(f: Any, size: int) -> Any:
    """The file, memory-mapped read-only (b"" when empty); closed when the scan is done."""
    if not size:
        yield b""
        return
    whole = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
    try:
        yield whole
    finally:
        with contextlib.suppress(BufferError):  # a view still held by a traceback
            whole.close()


def _check_storages(
    path: Path, storages: list[_pickle_scan.Storage], sizes: dict[str, int]
) -> None:
    for storage in storages:
        held = sizes.get(storage.key)
        if held is None:
            raise FileFormatError(f"{path}: storage {short(storage.key)} is missing: truncated")
        if held != storage.nbytes:
            raise UnsafeFileError(
                f"{path}: refused: storage {short(storage.key)} declares {storage.nbytes:,} "
                f"bytes, the file holds {held:,}; nothing was run"
            )


def _scan_legacy(path: Path, data: Any, size: int) -> _pickle_scan.Scan:
    """Scan the pickles of the legacy format: magic, protocol, system info, the data, keys."""
    source = str(path)
    magic = _pickle_scan.scan(data, source)
    protocol = _pickle_scan.scan(data, source, start=magic.end)
    info = _pickle_scan.scan(data, source, start=protocol.end)
    main = _pickle_scan.scan(data, source, start=info.end)
    keys = _pickle_scan.scan(data, source, start=main.end)
    need = sum(s.nbytes + 8 for s in main.storages)
    if need > size - keys.end:
        raise UnsafeFileError(
            f"{path}: refused: its storages declare {need:,} bytes, the file holds "
            f"{size - keys.end:,} after its pickles; nothing was run"
        )
    main.end -= info.end  # the size of the data pickle
    return main


Classes = dict[tuple[Any, ...], str]
Sources = dict[tuple[Any, ...], dict[str, Any]]


def read_torch(path: Path, *, unsafe_load: bool) -> tuple[Any, Classes, Sources, Checksums | None]:
    """Read a ``torch.save`` file: (tree, classes, sources, checksums of its records).

    Raises:
        UnsafeFileError: The pickle names code, or would allocate more than the file holds.
        FileFormatError: The file is truncated, corrupt, or not a ``torch.save`` file.
    """
    with contextlib.ExitStack() as stack:
        f = stack.enter_context(open_regular(path))
        size = os.fstat(f.fileno()).st_size
        checksums, found = None, None
        whole = stack.enter_context(_mapped(f, size))
        if zipfile.is_zipfile(f):
            data, records = _check_zip(path, f, whole)
            checksums = Checksums(path, records)
            budget = len(data)
            try:
                if not unsafe_load:
                    found = _pickle_scan.scan(data, str(path))
                    sizes = {key: info.file_size for key, (info, _) in records.items()}
                    _check_storages(path, found.storages, sizes)
            finally:
                data.release()
            source: Any = _reopenable(path, f)
        else:
            if whole[:4] == b"PK\x03\x04":
                raise FileFormatError(
                    f"{path}: a truncated or corrupt torch.save file (a zip archive without its "
                    "central directory)"
                )
            if not size or (not unsafe_load and whole[:1] != b"\x80"):
                # torch.save writes a zip archive, or (legacy) a pickle of protocol 2 or more
                detail = (
                    f"neither a zip archive nor a pickle: it starts with {short(bytes(whole[:8]))}"
                    if size
                    else "an empty file"
                )
                raise FileFormatError(f"{path}: not a torch.save file ({detail})")
            if not unsafe_load and size:
                found = _scan_legacy(path, whole, size)
            budget = found.end if found is not None else size
            f.seek(0)
            source = f
        records_of: dict[int, tuple[str, tuple[Any, ...], Any]] = {}
        devices: dict[int, str] = {}
        obj = _load(
            path,
            source,
            found=found,
            records=records_of,
            devices=devices,
            checksums=checksums,
            unsafe_load=unsafe_load,
        )
    if checksums is not None and found is not None:
        checksums.bind([storage.key for storage in found.storages])
    classes: dict[tuple[Any, ...], str] = {}
    sources: dict[tuple[Any, ...], dict[str, Any]] = {}
    limits = (max(budget, 1024), EXPANSION * size + _EXPANSION_SLACK)
    try:
        tree = _unstub(
            obj, records_of, devices, classes=classes, sources=sources, limits=limits, file=path
        )
    except RecursionError:
        raise FileFormatError(f"{path}: the structure is nested too deeply to read") from None
    return tree, classes, sources, checksums


def _load(
    path: Path,
    source: Any,
    *,
    found: _pickle_scan.Scan | None,
    records: dict[int, tuple[str, tuple[Any, ...], Any]],
    devices: dict[int, str],
    checksums: Checksums | None,
    unsafe_load: bool,
) -> Any:
    """``torch.load`` with stand-ins for the classes the pickle names (found by the scan)."""
    mmap = isinstance(source, Path)

    def map_location(storage: Any, location: str) -> Any:
        devices[storage.data_ptr()] = location
        if checksums is not None:
            checksums.loaded.append((storage.data_ptr(), storage.nbytes()))
        return storage

    if unsafe_load:
        try:
            obj = _torch_load(path, source, map_location, mmap=mmap, weights_only=False)
        except pickle.UnpicklingError as exc:
            raise _torch_error(path, exc, source) from None
        return obj.state_dict() if isinstance(obj, torch.nn.Module) else obj
    allowed = _allowlist.allowed()
    known = _allowlist.allowed_names(allowed)
    names = {name for name in found.globals if name not in known} if found else set()
    for name in names:  # every global the pickle names was listed by the scan, before torch
        _allowlist.classify(name, path)
    stand_ins = [(_allowlist.stand_in(n, records), n) for n in sorted(names)]
    try:
        if not isinstance(source, Path):
            source.seek(0)
        # torch keeps safe globals in one process-wide set, which a concurrent load's exit
        # would take ours out of: one tonumpy load registers at a time
        with _REGISTRY, torch.serialization.safe_globals(allowed + stand_ins):
            return _torch_load(path, source, map_location, mmap=mmap, weights_only=True)
    except pickle.UnpicklingError as exc:
        raise _torch_error(path, exc, source) from None


def _torch_load(
    path: Path, source: Any, map_location: Any, *, mmap: bool, weights_only: bool
) -> Any:
    """``torch.load``; raises ``pickle.UnpicklingError`` as it is, other failures cleaned up."""
    try:
        with warnings.catch_warnings():
            # torch warns about pickle protocols above 2 before its own loader refuses them,
            # and about TypedStorage (legacy files) as it reads them: none of it is the user's
            warnings.simplefilter("ignore")
            return torch.load(
                source, map_location=map_location, weights_only=weights_only, mmap=mmap
            )
    except (pickle.UnpicklingError, FileNotFoundError, PermissionError, TonumpyError):
        raise
    except RecursionError:
        raise FileFormatError(f"{path}: the structure is nested too deeply to read") from None
    except Exception as exc:
        raise _torch_error(path, exc, source) from exc


def _torch_error(path: Path, exc: BaseException, source: Any) -> TonumpyError:
    """``torch.load``'s failure, as a tonumpy error naming the file as the user named it.

    Everything torch's messages used to be read for (code the pickle names, opcodes it does
    not know, a damaged zip, sizes that do not match) is checked before torch runs; what is
    left is only reported, never parsed: the wording changes between torch releases.
    """
    # torch re-raises its unpickler's error with advice around it: the error itself is kept as
    # the context of the one raised
    unpickling = isinstance(exc, pickle.UnpicklingError)
    inner = exc.__context__ if unpickling and isinstance(exc.__context__, Exception) else exc
    text = str(inner)
    if isinstance(source, Path):  # /proc/self/fd/N: the file as the user named it
        text = text.replace(str(source), str(path))
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    first = lines[0][:300] if lines else ""
    if unpickling:
        detail = f" ({first})" if first else ""
        return UnsafeFileError.naming(
            f"{path}: refused: loading it safely failed{detail}; nothing was run. ",
            "unsafe_load",
            " unpickles it anyway, only for files you trust",
        )
    described = f"{type(inner).__name__}: {first}" if first else type(inner).__name__
    return FileFormatError(f"{path}: cannot read it as a torch.save file: {described}")


def _unstub(
    obj: Any,
    records: dict[int, tuple[str, tuple[Any, ...], Any]],
    devices: dict[int, str],
    *,
    classes: Classes,
    sources: Sources,
    limits: tuple[int, int],
    file: Path,
) -> Any:
    """Replace stand-in instances by plain dicts (class names to ``classes``), note devices.

    ``limits`` = (containers visited, bytes of tensor data): a pickle that shares a container
    many times over (each share visited again) or whose tensors repeat the file's data beyond
    ``EXPANSION`` times is refused.
    """
    active: set[int] = set()
    max_visits, max_bytes = limits
    counted: set[int] = set()
    totals = [0, 0]  # containers visited, bytes of data

    def leaf(x: Any, path: tuple[Any, ...]) -> Any:
        if isinstance(x, _allowlist.Name):
            return x.name
        if isinstance(x, np.ndarray | np.generic | np.dtype):
            dtype = x if isinstance(x, np.dtype) else x.dtype
            if dtype.hasobject:
                raise UnsafeFileError(
                    f"{file}: refused: {dotted(path) or 'the root'} holds Python objects "
                    f"(dtype {short(str(dtype))}), which only pickle can read"
                )
        if isinstance(x, torch.Tensor | np.ndarray) and id(x) not in counted:
            counted.add(id(x))
            totals[1] += _data_bytes(x)
            if totals[1] > max_bytes:
                raise UnsafeFileError(
                    f"{file}: refused: its tensors hold more than {EXPANSION} times the file's "
                    f"size (at {dotted(path) or 'the root'}: views that repeat the same data, or "
                    "sparse tensors that would be converted dense); nothing was converted"
                )
        if isinstance(x, torch.Tensor):
            with contextlib.suppress(Exception):
                device = devices.get(x.untyped_storage().data_ptr())
                if device and device != "cpu":
                    sources[path] = {"device": device}
        return x

    def walk(x: Any, path: tuple[Any, ...]) -> Any:
        if not isinstance(x, dict | list | tuple) or (
            isinstance(x, tuple) and type(x) is not tuple
        ):
            return leaf(x, path)
        if id(x) in active:
            raise FileFormatError(
                f"{file}: the pickle contains a cycle at {dotted(path) or 'the root'}"
            )
        totals[0] += 1
        if totals[0] > max_visits:
            raise UnsafeFileError(
                f"{file}: refused: its pickle refers to the same containers over and over (more "
                f"than {max_visits:,} visits for a pickle of that many bytes); nothing was "
                "converted"
            )
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
                    classes[path] = _allowlist.qualified(type(x)).removeprefix("builtins.")
                return {k: walk(v, (*path, k)) for k, v in x.items()}
            items_out = [walk(v, (*path, i)) for i, v in enumerate(x)]
            return items_out if isinstance(x, list) else tuple(items_out)
        finally:
            active.discard(id(x))

    return walk(obj, ())


def _data_bytes(x: torch.Tensor | np.ndarray) -> int:
    """The bytes a leaf becomes once converted: sparse tensors dense, views in full."""
    if isinstance(x, np.ndarray):
        return x.nbytes
    if x.is_meta:
        return 0
    if x.is_nested:
        return sum(c.numel() * c.element_size() for c in x.unbind())
    return math.prod(x.shape) * x.element_size()


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
