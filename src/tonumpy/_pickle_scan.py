"""A dry run of a ``torch.save`` pickle: what it names and stores, refused if it would allocate.

torch's weights-only unpickler lets a pickle call a fixed set of functions, and some of them
allocate whatever size they are given: ``bytearray(10**9)``, ``torch.FloatTensor(10**9)``,
``UntypedStorage(n)``, a quantized tensor's ``_empty_affine_quantized(size)``. A 900-byte file
can so ask for gigabytes before any of its data is read. ``scan`` runs the same opcodes
without calling anything: it lists the globals the pickle names and the storages it loads, and
refuses, before ``torch.load`` runs, every call that would allocate from a size (an int or a
``torch.Size``) rather than from data the file holds, and every tensor that reaches outside its
storage. Opcodes the weights-only unpickler does not know are refused too.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import struct
import warnings
from typing import Any

import torch

from ._fs import short
from .errors import FileFormatError, UnsafeFileError

__all__ = ["Scan", "Storage", "scan"]


@dataclasses.dataclass(frozen=True)
class Storage:
    """A storage the pickle loads: record ``key`` of ``numel`` items of ``dtype``."""

    key: str
    dtype: torch.dtype
    numel: int

    @property
    def nbytes(self) -> int:
        """Bytes of the record."""
        return self.numel * self.dtype.itemsize


@dataclasses.dataclass
class Scan:
    """What a pickle names (``globals``), the storages it loads in order, where it ends."""

    globals: set[str]
    storages: list[Storage]
    end: int


@dataclasses.dataclass(frozen=True)
class _Global:
    name: str


@dataclasses.dataclass(frozen=True)
class _Call:
    name: str | None
    args: Any


class _Dict:
    """A dict as the dry run sees it: no hashing of keys that may be anything."""


@dataclasses.dataclass(frozen=True)
class _Blob:
    """A string or bytes value too long to matter to the rules: only its length is kept."""

    length: int


_SHORT = 4096  # strings up to this long are decoded (names, keys); longer ones are data


def _storage_dtypes() -> dict[str, torch.dtype]:
    found: dict[str, torch.dtype] = {}
    for cls in torch._storage_classes:  # noqa: SLF001 - no public list
        name = f"{cls.__module__}.{cls.__name__}"
        with warnings.catch_warnings():  # "TypedStorage is deprecated"
            warnings.simplefilter("ignore")
            dtype = getattr(cls, "dtype", None)
        found[name] = dtype if isinstance(dtype, torch.dtype) else torch.uint8
    return found


_STORAGES = _storage_dtypes()
_LEGACY_TENSORS = frozenset(
    f"{c.__module__}.{c.__name__}"
    for c in torch._tensor_classes  # noqa: SLF001 - no public list
)
# callables that allocate whatever size they are given
_SIZED = _LEGACY_TENSORS | set(_STORAGES) | {"builtins.bytearray", "torch.Tensor"}
_VIEWS = {  # rebuild functions: argument positions of (storage, offset, size, stride[, dtype])
    "torch._utils._rebuild_tensor": (0, 1, 2, 3, None),
    "torch._utils._rebuild_tensor_v2": (0, 1, 2, 3, None),
    "torch._utils._rebuild_tensor_v3": (0, 1, 2, 3, 6),
    "torch._utils._rebuild_qtensor": (0, 1, 2, 3, None),
}
_NAME_FIXES: dict[tuple[str, str], tuple[str, str]] = {}
_MODULE_FIXES: dict[str, str] = {}
try:  # the Python 2 names torch maps, as its own unpickler does
    from torch._utils import IMPORT_MAPPING, NAME_MAPPING

    _NAME_FIXES, _MODULE_FIXES = dict(NAME_MAPPING), dict(IMPORT_MAPPING)
except ImportError:  # pragma: no cover - an older torch
    pass

_INT = struct.Struct("<i")
_UINT = struct.Struct("<I")
_USHORT = struct.Struct("<H")
_DOUBLE = struct.Struct(">d")


def scan(data: Any, where: str, *, start: int = 0) -> Scan:
    """Run the pickle that starts at ``data[start]`` without calling anything.

    ``data`` is any buffer (bytes, a memory map): it is read in place, and only short strings
    are decoded, so the dry run holds the pickle's structure, never a copy of its data.

    Raises:
        UnsafeFileError: A call would allocate from a size, or a tensor reaches outside its
            storage.
        FileFormatError: The pickle is truncated or uses an opcode the weights-only unpickler
            does not know.
    """
    machine = _Machine(memoryview(data), where, start)
    try:
        return machine.run()
    finally:
        with contextlib.suppress(BufferError):
            machine.data.release()


class _Machine:
    def __init__(self, data: memoryview, where: str, start: int) -> None:
        self.data, self.where, self.pos = data, where, start
        self.stack: list[Any] = []
        self.marks: list[list[Any]] = []
        self.memo: dict[int, Any] = {}
        self.result = Scan(set(), [], start)
        self.keys: set[str] = set()

    # reading ----------------------------------------------------------------------------

    def take(self, n: int) -> memoryview:
        if n < 0 or self.pos + n > len(self.data):
            raise FileFormatError(f"{self.where}: a truncated pickle")
        out = self.data[self.pos : self.pos + n]
        self.pos += n
        return out

    def line(self) -> str:
        window = bytes(self.data[self.pos : self.pos + _SHORT])
        end = window.find(b"\n")
        if end < 0:
            raise FileFormatError(f"{self.where}: a damaged pickle (a name without its end)")
        self.pos += end + 1
        try:
            return window[:end].decode("utf-8")
        except UnicodeDecodeError:
            raise FileFormatError(f"{self.where}: a damaged pickle") from None

    def text(self, n: int) -> Any:
        raw = self.take(n)
        if n > _SHORT:
            return _Blob(n)
        try:
            return bytes(raw).decode("utf-8", "surrogatepass")
        except UnicodeDecodeError:
            raise FileFormatError(f"{self.where}: a damaged pickle (bad UTF-8)") from None

    def pop(self) -> Any:
        if not self.stack:
            raise FileFormatError(f"{self.where}: a damaged pickle (its stack runs empty)")
        return self.stack.pop()

    def pop_mark(self) -> list[Any]:
        if not self.marks:
            raise FileFormatError(f"{self.where}: a damaged pickle (a missing mark)")
        items, self.stack = self.stack, self.marks.pop()
        return items

    def top(self) -> Any:
        if not self.stack:
            raise FileFormatError(f"{self.where}: a damaged pickle (its stack runs empty)")
        return self.stack[-1]

    # running ----------------------------------------------------------------------------

    def run(self) -> Scan:  # noqa: PLR0915 - one branch per opcode, as in torch's own loop
        while True:
            op = self.take(1)[0]
            push = self.stack.append  # the stack changes at each MARK
            if op == 0x63:  # GLOBAL
                module, name = self.line(), self.line()
                module, name = _NAME_FIXES.get((module, name), (module, name))
                module = _MODULE_FIXES.get(module, module)
                self.result.globals.add(f"{module}.{name}")
                push(_Global(f"{module}.{name}"))
            elif op == 0x81:  # NEWOBJ
                args = self.pop()
                push(self.call(self.pop(), args))
            elif op == 0x52:  # REDUCE
                args = self.pop()
                self.stack[-1] = self.call(self.top(), args)
            elif op == 0x62:  # BUILD
                self.pop()
                self.top()
            elif op == 0x61:  # APPEND
                item = self.pop()
                if isinstance(self.top(), list):
                    self.top().append(item)
            elif op == 0x65:  # APPENDS
                items = self.pop_mark()
                if isinstance(self.top(), list):
                    self.top().extend(items)
            elif op == 0x73:  # SETITEM
                self.pop()
                self.pop()
                self.top()
            elif op == 0x75:  # SETITEMS
                self.pop_mark()
                self.top()
            elif op == 0x28:  # MARK
                self.marks.append(self.stack)
                self.stack = []
            elif op == 0x74:  # TUPLE
                items = self.pop_mark()
                self.stack.append(tuple(items))
            elif op in (0x85, 0x86, 0x87):  # TUPLE1, TUPLE2, TUPLE3
                n = op - 0x84
                if len(self.stack) < n:
                    raise FileFormatError(f"{self.where}: a damaged pickle (its stack runs empty)")
                group = tuple(self.stack[-n:])
                del self.stack[-n:]
                push(group)
            elif op == 0x4E:  # NONE
                push(None)
            elif op in (0x88, 0x89):  # NEWTRUE, NEWFALSE
                push(op == 0x88)
            elif op == 0x29:  # EMPTY_TUPLE
                push(())
            elif op == 0x5D:  # EMPTY_LIST
                push([])
            elif op in (0x7D, 0x8F):  # EMPTY_DICT, EMPTY_SET
                push(_Dict())
            elif op == 0x4A:  # BININT
                push(_INT.unpack(self.take(4))[0])
            elif op == 0x4B:  # BININT1
                push(self.take(1)[0])
            elif op == 0x4D:  # BININT2
                push(_USHORT.unpack(self.take(2))[0])
            elif op == 0x47:  # BINFLOAT
                push(_DOUBLE.unpack(self.take(8))[0])
            elif op == 0x58:  # BINUNICODE
                push(self.text(_UINT.unpack(self.take(4))[0]))
            elif op == 0x55:  # SHORT_BINSTRING
                push(bytes(self.take(self.take(1)[0])))
            elif op == 0x51:  # BINPERSID
                push(self.storage(self.pop()))
            elif op in (0x68, 0x6A):  # BINGET, LONG_BINGET
                index = self.take(1)[0] if op == 0x68 else _UINT.unpack(self.take(4))[0]
                if index not in self.memo:
                    raise FileFormatError(f"{self.where}: a damaged pickle (a missing memo)")
                push(self.memo[index])
            elif op in (0x71, 0x72):  # BINPUT, LONG_BINPUT
                index = self.take(1)[0] if op == 0x71 else _UINT.unpack(self.take(4))[0]
                self.memo[index] = self.top()
            elif op == 0x8A:  # LONG1
                push(int.from_bytes(self.take(self.take(1)[0]), "little", signed=True))
            elif op == 0x80:  # PROTO
                self.take(1)
            elif op == 0x2E:  # STOP
                self.result.end = self.pos
                return self.result
            else:
                raise FileFormatError(
                    f"{self.where}: cannot read it safely: its pickle uses opcode {op}, which "
                    "the weights-only loader does not know (a pickle protocol above 2, or a "
                    "corrupt file). unsafe_load=True reads it anyway, only for "
                    "files you trust"
                )

    def storage(self, pid: Any) -> Any:
        """A persistent id: a storage record, with its dtype and declared size."""
        if not isinstance(pid, tuple) or len(pid) < 5 or pid[0] not in ("storage", b"storage"):
            return _Call("persistent_load", pid)
        kind, key, numel = pid[1], pid[2], pid[4]
        dtype = _STORAGES.get(kind.name) if isinstance(kind, _Global) else None
        if dtype is None or not isinstance(key, str) or type(numel) is not int or numel < 0:
            raise FileFormatError(f"{self.where}: a damaged pickle (a bad storage {short(pid)})")
        storage = Storage(key, dtype, numel)
        if key not in self.keys:
            self.keys.add(key)
            self.result.storages.append(storage)
        return storage

    def call(self, func: Any, args: Any) -> _Call:
        """A REDUCE or NEWOBJ: refused if it would allocate from a size."""
        name = func.name if isinstance(func, _Global) else None
        if not isinstance(args, tuple):
            return _Call(name, args)
        if name in _SIZED and any(_is_size(a) for a in args):
            raise UnsafeFileError(
                f"{self.where}: refused: its pickle calls {name} with a size "
                f"({short(next(a for a in args if _is_size(a)))}), which allocates memory the "
                "file does not hold; nothing was run"
            )
        if name == "torch._tensor._rebuild_from_type_v2" and len(args) >= 3:
            self.call(args[0], args[2])
        elif name in _VIEWS:
            self.view(name, args)
        return _Call(name, args)

    def view(self, name: str, args: tuple[Any, ...]) -> None:
        """A tensor rebuilt over a storage: its elements must lie inside the storage."""
        places = _VIEWS[name]
        if len(args) <= max(p for p in places if p is not None):
            return  # torch refuses the call itself
        storage, offset, size, stride = (args[p] for p in places[:4])
        size = size.args[0] if isinstance(size, _Call) and size.name == "torch.Size" else size
        dtype_arg = args[places[4]] if places[4] is not None else None
        if not isinstance(storage, Storage):
            raise UnsafeFileError(
                f"{self.where}: refused: its pickle builds a tensor whose data is not stored in "
                "the file; nothing was run"
            )
        itemsize = storage.dtype.itemsize
        if isinstance(dtype_arg, _Global):
            dtype = getattr(torch, dtype_arg.name.removeprefix("torch."), None)
            itemsize = dtype.itemsize if isinstance(dtype, torch.dtype) else itemsize
        if not (
            type(offset) is int
            and isinstance(size, tuple)
            and isinstance(stride, tuple)
            and len(size) == len(stride)
            and all(type(n) is int and n >= 0 for n in size + stride)
            and offset >= 0
        ):
            raise FileFormatError(f"{self.where}: a damaged pickle (a tensor with a bad shape)")
        numel = math.prod(size)
        if numel == 0:
            return
        extent = offset + sum((n - 1) * s for n, s in zip(size, stride, strict=True)) + 1
        held = storage.nbytes // itemsize
        # a quantized tensor is allocated at its full size before its storage is attached
        allocated = numel if name == "torch._utils._rebuild_qtensor" else 0
        if extent > held or allocated > held:
            raise UnsafeFileError(
                f"{self.where}: refused: its pickle builds a {size} tensor over a storage of "
                f"{held:,} items, reaching past the data the file holds; nothing was run"
            )


def _is_size(value: Any) -> bool:
    return (isinstance(value, int) and not isinstance(value, bool)) or (
        isinstance(value, _Call) and value.name == "torch.Size"
    )
