"""What a ``torch.save`` pickle may name, beyond torch's own weights-only allow-list.

* NumPy's pickling functions, each wrapped so that it cannot allocate more than the data it is
  given (``_reconstruct`` only an empty array, ``scalar`` exactly its item's bytes,
  ``_frombuffer`` exactly its buffer, ``dtype`` never an object dtype), and NumPy's dtype
  classes. ``np.ndarray`` itself is listed under a name no pickle can spell, only so that the
  state of an array ``_reconstruct`` made can be set.
* Builtin types (``list``, ``dict``, ...) as inert names, as a ``defaultdict`` holds its
  factory: calling one refuses the file.
* Classes the file names, as stand-ins that record what the pickle puts into each instance
  (nothing is imported, nothing runs); names of functions, and anything from modules such as
  ``os`` or ``builtins``, are refused (``classify``).
"""

from __future__ import annotations

import contextlib
import math
import pickle
import re
from collections import OrderedDict
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..._format._fs import short
from ...errors import UnsafeFileError

__all__ = ["Name", "Refused", "allowed", "allowed_names", "classify", "qualified", "stand_in"]

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


class StandIn:
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


def stand_in(name: str, records: dict[int, Any]) -> type:
    return type(
        name.rsplit(".", 1)[-1],
        (StandIn,),
        {"qualified_name": name, "records": records, "__module__": __name__},
    )


def classify(name: str, path: Path) -> None:
    """Raise [`UnsafeFileError`][] unless ``name`` looks like a data class (not code)."""
    module, _, attr = name.rpartition(".")
    top = module.split(".", 1)[0]
    class_like = (
        _CLASS_LIKE.fullmatch(attr) or module == "torch.return_types" or name in _LOWERCASE_CLASSES
    )
    if top in _CODE_MODULES or not class_like or not module:
        raise UnsafeFileError.naming(
            f"{path}: refused: its pickle calls {name}, which is code, not data; nothing was "
            "run. Load it with ",
            "unsafe_load",
            " only if you trust its origin",
        )


class Refused(pickle.UnpicklingError):
    """Raised by an allow-listed wrapper: the pickle asked for something it may not have."""


class Name:
    """A builtin type a pickle names as data (a ``defaultdict``'s factory): never called."""

    def __init__(self, name: str) -> None:
        self.name = name

    def __call__(self, *args: Any) -> Any:
        raise Refused(f"its pickle calls {self.name}, which is code, not data")

    def __repr__(self) -> str:
        return self.name


_BUILTIN_NAMES = ("list", "dict", "tuple", "frozenset", "int", "float", "str", "bool", "bytes")
_NDARRAY = Name("numpy.ndarray")
_real_reconstruct: Any = np.arange(1).__reduce__()[0]
_real_scalar: Any = np.float64(1).__reduce__()[0]
_real_frombuffer: Any = np.arange(2).__reduce_ex__(5)[0]


def _size_of(shape: Any) -> int:
    if not isinstance(shape, tuple) or not all(type(n) is int and n >= 0 for n in shape):
        raise Refused(f"an array with a bad shape {short(shape)}")
    return math.prod(shape)


def _checked_dtype(dtype: Any) -> np.dtype[Any]:
    if not isinstance(dtype, np.dtype) or dtype.hasobject:
        raise Refused(f"an array of Python objects ({short(dtype)}), which needs pickle")
    return dtype


def _reconstruct(subtype: Any, shape: Any, dtype: Any) -> Any:
    """NumPy's ``_reconstruct``, for the empty array a pickled array's state then fills."""
    if subtype is not _NDARRAY or _size_of(shape) != 0:
        raise Refused(f"numpy's _reconstruct with {short(subtype)}, {short(shape)}")
    return _real_reconstruct(np.ndarray, shape, dtype)


def _scalar(dtype: Any, *data: Any) -> Any:
    """NumPy's ``scalar``: a scalar from exactly its item's bytes."""
    dtype = _checked_dtype(dtype)
    if len(data) != 1 or not isinstance(data[0], bytes) or len(data[0]) != dtype.itemsize:
        raise Refused(f"a numpy {dtype} scalar from {short(data)}")
    return _real_scalar(dtype, *data)


def _frombuffer(buffer: Any, dtype: Any, shape: Any, order: Any) -> Any:
    """NumPy's ``_frombuffer``: an array over exactly the bytes the pickle holds."""
    dtype = _checked_dtype(dtype)
    if not isinstance(buffer, bytes | bytearray) or _size_of(shape) * dtype.itemsize != len(buffer):
        raise Refused(f"a numpy array of shape {short(shape)} from {len(buffer)} bytes")
    return _real_frombuffer(buffer, dtype, shape, order)


def _dtype(spec: Any, *flags: Any) -> np.dtype[Any]:
    """``np.dtype``, refusing object dtypes (their data would need pickle)."""
    if not all(isinstance(flag, bool) for flag in flags) or len(flags) > 2:
        raise Refused(f"np.dtype with {short(flags)}")
    return _checked_dtype(np.dtype(spec, *flags))


def allowed() -> list[Any]:
    """What a pickle may name beyond torch's own allow-list.

    NumPy's pickling functions, each wrapped so that it cannot allocate more than the data it
    is given; dtype classes; builtin types as inert names. ``np.ndarray`` is listed under a
    name no pickle can spell (it has a newline), only so that the state of an array
    ``_reconstruct`` made can be set.
    """
    found: list[Any] = [(_dtype, "numpy.dtype"), (_NDARRAY, "numpy.ndarray")]
    found.append((np.ndarray, "\nnumpy.ndarray (set state only)"))
    for package in ("numpy.core", "numpy._core"):
        found += [
            (_reconstruct, f"{package}.multiarray._reconstruct"),
            (_scalar, f"{package}.multiarray.scalar"),
            (_frombuffer, f"{package}.numeric._frombuffer"),
        ]
    codes = "?bBhHiIlLqQefdgFDGSUV"
    found += list({type(np.dtype(c)) for c in codes} | {type(np.dtype("M8")), type(np.dtype("m8"))})
    found += [(Name(f"builtins.{n}"), f"builtins.{n}") for n in _BUILTIN_NAMES]
    return found


def allowed_names(allowed: list[Any]) -> set[str]:
    names = {entry[1] if isinstance(entry, tuple) else qualified(entry) for entry in allowed}
    table = getattr(torch, "_weights_only_unpickler", None)
    with contextlib.suppress(Exception):  # torch's own table (a private function)
        names |= set(table._get_allowed_globals())  # type: ignore[union-attr] # noqa: SLF001
    return names


def qualified(obj: Any) -> str:
    return f"{obj.__module__}.{obj.__qualname__}"
