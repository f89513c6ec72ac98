"""A dry run of a ``torch.save`` pickle: what it names and stores, refused if it would allocate.

torch's weights-only unpickler lets a pickle call a fixed set of functions, and some of them
allocate whatever size they are given: ``bytearray(10**9)``, ``torch.FloatTensor(10**9)``,
``UntypedStorage(n)``, a quantized tensor's ``_empty_affine_quantized(size)``. A 900-byte file
can so ask for gigabytes before any of its data is read. ``scan`` runs the same opcodes
without calling anything: it lists the globals the pickle names and the storages it loads, and
refuses, before ``torch.load`` runs, every call that would allocate from a size (an int or a
``torch.Size``) rather than from data the file holds, every tensor that reaches outside its
storage, and a storage record named with two sizes (each use is checked, not only the first).
Opcodes the weights-only unpickler does not know are refused too. Each opcode it knows has one
handler in ``_OPS``, which reads the opcode's argument and changes the stack as the real
unpickler would, with calls recorded instead of made.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import pickle
import struct
import warnings
from collections.abc import Callable
from typing import Any

import torch

from ..._format._fs import short
from ...errors import FileFormatError, UnsafeFileError

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
_DOUBLE = struct.Struct(">d")


def scan(data: Any, source: str, *, start: int = 0) -> Scan:
    """Run the pickle that starts at ``data[start]`` without calling anything.

    ``data`` is any buffer (bytes, a memory map): it is read in place, and only short strings
    are decoded, so the dry run holds the pickle's structure, never a copy of its data.

    Raises:
        UnsafeFileError: A call would allocate from a size, or a tensor reaches outside its
            storage.
        FileFormatError: The pickle is truncated or uses an opcode the weights-only unpickler
            does not know.
    """
    machine = _Machine(memoryview(data), source, start)
    try:
        return machine.run()
    finally:
        with contextlib.suppress(BufferError):
            machine.data.release()


class _Machine:
    def __init__(self, data: memoryview, source: str, start: int) -> None:
        self.data, self.source, self.pos = data, source, start
        self.stack: list[Any] = []
        self.marks: list[list[Any]] = []
        self.memo: dict[int, Any] = {}
        self.result = Scan(set(), [], start)
        self.keys: dict[str, Storage] = {}  # the first use of each record

    # reading ----------------------------------------------------------------------------

    def take(self, n: int) -> memoryview:
        if n < 0 or self.pos + n > len(self.data):
            raise FileFormatError(f"{self.source}: a truncated pickle")
        out = self.data[self.pos : self.pos + n]
        self.pos += n
        return out

    def line(self) -> str:
        window = bytes(self.data[self.pos : self.pos + _SHORT])
        end = window.find(b"\n")
        if end < 0:
            raise FileFormatError(f"{self.source}: a damaged pickle (a name without its end)")
        self.pos += end + 1
        try:
            return window[:end].decode("utf-8")
        except UnicodeDecodeError:
            raise FileFormatError(f"{self.source}: a damaged pickle") from None

    def text(self, n: int) -> Any:
        raw = self.take(n)
        if n > _SHORT:
            return _Blob(n)
        try:
            return bytes(raw).decode("utf-8", "surrogatepass")
        except UnicodeDecodeError:
            raise FileFormatError(f"{self.source}: a damaged pickle (bad UTF-8)") from None

    def pop(self) -> Any:
        if not self.stack:
            raise FileFormatError(f"{self.source}: a damaged pickle (its stack runs empty)")
        return self.stack.pop()

    def pop_mark(self) -> list[Any]:
        if not self.marks:
            raise FileFormatError(f"{self.source}: a damaged pickle (a missing mark)")
        items, self.stack = self.stack, self.marks.pop()
        return items

    def top(self) -> Any:
        if not self.stack:
            raise FileFormatError(f"{self.source}: a damaged pickle (its stack runs empty)")
        return self.stack[-1]

    # running ----------------------------------------------------------------------------

    def run(self) -> Scan:
        while True:
            op = self.take(1)[0]
            handler = _OPS.get(op)
            if handler is None:
                raise FileFormatError.naming(
                    f"{self.source}: cannot read it safely: its pickle uses opcode {op}, which "
                    "the weights-only loader does not know (a pickle protocol above 2, or a "
                    "corrupt file). ",
                    "unsafe_load",
                    " reads it anyway, only for files you trust",
                )
            if handler(self):
                self.result.end = self.pos
                return self.result

    def push(self, value: Any) -> None:
        self.stack.append(value)

    def skip(self, size: int) -> None:
        self.take(size)

    def uint(self, size: int) -> int:
        return int.from_bytes(self.take(size), "little")

    # the opcodes torch's weights-only unpickler knows: see _OPS

    def op_global(self) -> None:
        module, name = self.line(), self.line()
        module, name = _NAME_FIXES.get((module, name), (module, name))
        module = _MODULE_FIXES.get(module, module)
        self.result.globals.add(f"{module}.{name}")
        self.push(_Global(f"{module}.{name}"))

    def op_newobj(self) -> None:
        args = self.pop()
        self.push(self.call(self.pop(), args))

    def op_reduce(self) -> None:
        args = self.pop()
        self.stack[-1] = self.call(self.top(), args)

    def op_build(self) -> None:
        self.pop()
        self.top()

    def op_append(self) -> None:
        item = self.pop()
        if isinstance(self.top(), list):
            self.top().append(item)

    def op_appends(self) -> None:
        items = self.pop_mark()
        if isinstance(self.top(), list):
            self.top().extend(items)

    def op_setitem(self) -> None:
        self.pop()
        self.pop()
        self.top()

    def op_setitems(self) -> None:
        self.pop_mark()
        self.top()

    def op_mark(self) -> None:
        self.marks.append(self.stack)
        self.stack = []

    def op_tuple(self) -> None:
        items = self.pop_mark()
        self.push(tuple(items))

    def tuple_of(self, n: int) -> None:
        if len(self.stack) < n:
            raise FileFormatError(f"{self.source}: a damaged pickle (its stack runs empty)")
        group = tuple(self.stack[-n:])
        del self.stack[-n:]
        self.push(group)

    def op_binpersid(self) -> None:
        self.push(self.storage(self.pop()))

    def get(self, index: int) -> None:
        if index not in self.memo:
            raise FileFormatError(f"{self.source}: a damaged pickle (a missing memo)")
        self.push(self.memo[index])

    def put(self, index: int) -> None:
        self.memo[index] = self.top()

    def op_stop(self) -> bool:
        return True

    def storage(self, pid: Any) -> Any:
        """A persistent id: a storage record, with its dtype and declared size."""
        if not isinstance(pid, tuple) or len(pid) < 5 or pid[0] not in ("storage", b"storage"):
            return _Call("persistent_load", pid)
        storage_type, key, numel = pid[1], pid[2], pid[4]
        dtype = _STORAGES.get(storage_type.name) if isinstance(storage_type, _Global) else None
        if dtype is None or not isinstance(key, str) or type(numel) is not int or numel < 0:
            raise FileFormatError(f"{self.source}: a damaged pickle (a bad storage {short(pid)})")
        storage = Storage(key, dtype, numel)
        first = self.keys.setdefault(key, storage)
        if first is storage:
            self.result.storages.append(storage)
        elif first.nbytes != storage.nbytes:  # torch never writes this: one size per record
            raise UnsafeFileError(
                f"{self.source}: refused: its pickle names storage {short(key)} with two sizes, "
                f"{first.nbytes:,} and {storage.nbytes:,} bytes; nothing was run"
            )
        return storage

    def call(self, func: Any, args: Any) -> _Call:
        """A REDUCE or NEWOBJ: refused if it would allocate from a size."""
        name = func.name if isinstance(func, _Global) else None
        if not isinstance(args, tuple):
            return _Call(name, args)
        if name in _SIZED and any(_is_size(a) for a in args):
            raise UnsafeFileError(
                f"{self.source}: refused: its pickle calls {name} with a size "
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
                f"{self.source}: refused: its pickle builds a tensor whose data is not stored in "
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
            raise FileFormatError(f"{self.source}: a damaged pickle (a tensor with a bad shape)")
        numel = math.prod(size)
        if numel == 0:
            return
        extent = offset + sum((n - 1) * s for n, s in zip(size, stride, strict=True)) + 1
        held = storage.nbytes // itemsize
        # a quantized tensor is allocated at its full size before its storage is attached
        allocated = numel if name == "torch._utils._rebuild_qtensor" else 0
        if extent > held or allocated > held:
            raise UnsafeFileError(
                f"{self.source}: refused: its pickle builds a {size} tensor over a storage of "
                f"{held:,} items, reaching past the data the file holds; nothing was run"
            )


# each opcode's handler: it reads the opcode's argument and changes the stack (True: the end)
def _constant(value: Any) -> Callable[[_Machine], None]:
    return lambda machine: machine.push(value)


def _number(size: int, unpack: Callable[[bytes], Any]) -> Callable[[_Machine], None]:
    return lambda machine: machine.push(unpack(bytes(machine.take(size))))


_OPS: dict[int, Callable[[_Machine], bool | None]] = {
    pickle.GLOBAL[0]: _Machine.op_global,
    pickle.NEWOBJ[0]: _Machine.op_newobj,
    pickle.REDUCE[0]: _Machine.op_reduce,
    pickle.BUILD[0]: _Machine.op_build,
    pickle.APPEND[0]: _Machine.op_append,
    pickle.APPENDS[0]: _Machine.op_appends,
    pickle.SETITEM[0]: _Machine.op_setitem,
    pickle.SETITEMS[0]: _Machine.op_setitems,
    pickle.MARK[0]: _Machine.op_mark,
    pickle.TUPLE[0]: _Machine.op_tuple,
    pickle.TUPLE1[0]: lambda m: m.tuple_of(1),
    pickle.TUPLE2[0]: lambda m: m.tuple_of(2),
    pickle.TUPLE3[0]: lambda m: m.tuple_of(3),
    pickle.NONE[0]: _constant(None),
    pickle.NEWTRUE[0]: _constant(True),
    pickle.NEWFALSE[0]: _constant(False),
    pickle.EMPTY_TUPLE[0]: _constant(()),
    pickle.EMPTY_LIST[0]: lambda m: m.push([]),
    pickle.EMPTY_DICT[0]: lambda m: m.push(_Dict()),
    pickle.EMPTY_SET[0]: lambda m: m.push(_Dict()),
    pickle.BININT[0]: _number(4, lambda raw: _INT.unpack(raw)[0]),
    pickle.BININT1[0]: _number(1, lambda raw: raw[0]),
    pickle.BININT2[0]: _number(2, lambda raw: int.from_bytes(raw, "little")),
    pickle.BINFLOAT[0]: _number(8, lambda raw: _DOUBLE.unpack(raw)[0]),
    pickle.LONG1[0]: lambda m: m.push(int.from_bytes(m.take(m.uint(1)), "little", signed=True)),
    pickle.BINUNICODE[0]: lambda m: m.push(m.text(m.uint(4))),
    pickle.SHORT_BINSTRING[0]: lambda m: m.push(bytes(m.take(m.uint(1)))),
    pickle.BINPERSID[0]: _Machine.op_binpersid,
    pickle.BINGET[0]: lambda m: m.get(m.uint(1)),
    pickle.LONG_BINGET[0]: lambda m: m.get(m.uint(4)),
    pickle.BINPUT[0]: lambda m: m.put(m.uint(1)),
    pickle.LONG_BINPUT[0]: lambda m: m.put(m.uint(4)),
    pickle.PROTO[0]: lambda m: m.skip(1),
    pickle.STOP[0]: _Machine.op_stop,
}


def _is_size(value: Any) -> bool:
    return (isinstance(value, int) and not isinstance(value, bool)) or (
        isinstance(value, _Call) and value.name == "torch.Size"
    )
