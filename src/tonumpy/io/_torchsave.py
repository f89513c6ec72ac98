"""Writing ``.pt`` files that ``torch.load(weights_only=True)`` reads: back to PyTorch.

A tree that a reader made ([`tonumpy.io._readers`][]: ``dict``, ``list`` and ``tuple`` containers)
is written with ``torch.save``: every array leaf as a tensor of its exact dtype (bfloat16 and
float8 stored as bits come back as those dtypes), ``str``, ``int``, ``float``, ``bool``,
``None``, ``bytes`` and ``complex`` as they are. A tensor at several places in the tree is
stored once, as ``torch.save`` does. Containers that were a class when saved (a namedtuple, a
dataclass, a ``ModelOutput``: the class name recorded in ``Contents.classes``) cannot be rebuilt
by the weights-only unpickler; they are refused, naming the key path, unless the caller asks
for plain containers (they are then written as dicts). An ``OrderedDict`` stays one.

The file is written atomically ([`tonumpy._format._fs.atomic_file`][]) and loaded back with
``torch.load(weights_only=True, mmap=True)`` before it is renamed into place: what cannot be
read that way is never written.
"""

from __future__ import annotations

import collections
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .. import _dtypes
from .._format import _arrays
from .._format._fs import atomic_file, escape, one_line
from .._format._names import dotted
from ..errors import ConversionError

__all__ = ["write"]

Progress = Callable[[int, int], None]
#: The leaves torch.load(weights_only=True) rebuilds as they are, besides tensors.
_VALUES = (str, int, float, bool, bytes, complex, type(None))
_KEPT_CLASSES = {"collections.OrderedDict": collections.OrderedDict}


def write(
    dst: Path,
    tree: Any,
    classes: dict[tuple[Any, ...], str],
    *,
    overwrite: bool,
    plain_containers: bool,
    verify: Callable[[Any], None] | None = None,
    progress: Progress | None = None,
) -> None:
    """Write ``tree`` (plain containers, as a reader made it) to ``dst`` with ``torch.save``.

    Examples:
        >>> import os, tempfile, numpy as np, torch
        >>> path = Path(tempfile.mkdtemp()) / "back.pt"
        >>> write(path, {"w": np.ones(2, np.float32), "step": 3}, {}, overwrite=False,
        ...       plain_containers=False)
        >>> torch.load(path, weights_only=True)
        {'w': tensor([1., 1.]), 'step': 3}

    Args:
        dst: The file to write.
        tree: ``dict``/``list``/``tuple`` containers of array leaves and plain values.
        classes: Key path -> the class a container had (``Contents.classes``).
        overwrite: Replace an existing ``dst``.
        plain_containers: Write containers that were another class as dicts instead of
            refusing them.
        verify: Called on each leaf before its data is used (stored checksums).
        progress: Called as ``progress(bytes_done, bytes_total)``.

    Raises:
        ConversionError: A leaf or container has no form ``torch.load(weights_only=True)``
            reads; the message names its key path.
        FileExistsError: ``dst`` exists and ``overwrite`` is False.
    """
    builder = _Builder(dst, classes, plain_containers=plain_containers, verify=verify)
    obj = builder.build(tree, ())
    total = builder.nbytes
    with atomic_file(dst, overwrite=overwrite) as tmp:
        torch.save(obj, tmp)
        if progress is not None:
            progress(total, total)
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                torch.load(tmp, weights_only=True, mmap=True)
        except Exception as exc:  # noqa: BLE001 - whatever torch says, nothing is written
            raise ConversionError(
                f"{dst}: torch.load(weights_only=True) cannot read what would be written "
                f"({one_line(exc)[:200]}); nothing was written"
            ) from None


class _Builder:
    """Turns a reader's tree into what ``torch.save`` writes, one leaf at a time."""

    def __init__(
        self,
        dst: Path,
        classes: dict[tuple[Any, ...], str],
        *,
        plain_containers: bool,
        verify: Callable[[Any], None] | None,
    ) -> None:
        self.dst = dst
        self.classes = classes
        self.plain = plain_containers
        self.verify = verify
        self.done: dict[int, torch.Tensor] = {}
        self.keep: list[Any] = []  # the sources of ``done``: their ids stay theirs
        self.nbytes = 0

    def refuse(
        self, path: tuple[Any, ...], what: str, fix: str, option: str | None = None, then: str = ""
    ) -> ConversionError:
        """The error for the leaf or node at ``path``; a ``fix`` that names ``option`` ends so."""
        place = dotted(path) or "the root"
        message = f"{self.dst}: {place} is {what}; {fix}"
        if option is None:
            return ConversionError(message, path=path)
        return ConversionError.naming(message, option, then, path=path)

    def build(self, x: Any, path: tuple[Any, ...]) -> Any:
        if type(x) in (dict, list, tuple):
            return self.container(x, path)
        if _arrays.is_array(x):  # NumPy scalars (np.float64 is a float) included
            return self.tensor(x, path)
        if type(x) in _VALUES:  # exactly: a subclass (an enum, say) is pickled as its class
            return x
        raise self.refuse(
            path,
            f"a {escape(type(x).__name__)[:80]}",
            "a .pt file for torch.load(weights_only=True) holds tensors, dicts, lists, tuples, "
            "str, int, float, bool, None, bytes and complex only",
        )

    def container(self, x: Any, path: tuple[Any, ...]) -> Any:
        name = self.classes.get(path)
        if isinstance(x, dict):
            items = {k: self.build(v, (*path, k)) for k, v in x.items()}
            kept = _KEPT_CLASSES.get(name or "")
            if name and kept is None and not self.plain:
                raise self.refuse(
                    path,
                    f"a {escape(name)[:80]} in the source",
                    "torch.load(weights_only=True) cannot rebuild that class: pass ",
                    "plain_containers",
                    " to write it as a dict, or write .npz, which records the class name",
                )
            return kept(items) if kept is not None else items
        items_out = [self.build(v, (*path, i)) for i, v in enumerate(x)]
        return items_out if isinstance(x, list) else tuple(items_out)

    def tensor(self, x: Any, path: tuple[Any, ...]) -> torch.Tensor:
        done = self.done.get(id(x))
        if done is not None:
            return done
        if self.verify is not None:
            self.verify(x)
        if isinstance(x, _arrays.LazyArray):
            data: Any = x.array()
            if x.bits:
                data = _arrays.from_bits(data, x.bits)
        else:
            data = x
        result = data if isinstance(data, torch.Tensor) else self.from_numpy(data, path)
        self.done[id(x)] = result
        self.keep.append(x)
        self.nbytes += _arrays.nbytes(result)
        return result

    def from_numpy(self, data: Any, path: tuple[Any, ...]) -> torch.Tensor:
        array = np.asarray(data)
        name = array.dtype.name
        torch_dtype = getattr(torch, name, None) if array.dtype.kind == "V" else None
        if isinstance(torch_dtype, torch.dtype) and torch_dtype in _dtypes.ML_DTYPES:
            bits = np.ascontiguousarray(array).view(f"i{array.dtype.itemsize}")
            return self.from_numpy(bits, path).view(torch_dtype)
        if array.dtype.kind not in "biufc" or array.dtype.hasobject:
            raise self.refuse(
                path,
                f"an array of dtype {escape(str(array.dtype))}, which torch has no dtype for",
                "write .npz or .npy instead",
            )
        if not array.dtype.isnative:
            array = array.astype(array.dtype.newbyteorder("="))
        if any(s < 0 for s in array.strides):
            array = np.ascontiguousarray(array)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # read-only data: torch.save only reads it
            try:
                return torch.from_numpy(array)
            except TypeError as exc:  # a NumPy dtype torch has none for (longdouble)
                raise self.refuse(
                    path,
                    f"an array of dtype {escape(str(array.dtype))} ({exc})",
                    "write .npz or .npy instead",
                ) from None
