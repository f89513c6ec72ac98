"""``to_numpy``, ``to_torch`` and ``apply``: flatten once, convert the leaves, rebuild once.

Each call is three steps. The tree is flattened by optree's C++ walker (see ``_tree``); the
flat list of leaves is converted in one Python loop, with a fast path for plain CPU tensors;
the converted leaves are put back into a tree of exactly the input's structure. Anything
that is not a tensor (or, for ``to_torch``, an array) is returned as the very same object.
"""

from __future__ import annotations

import operator
from collections.abc import Callable, Iterable
from typing import Any, Literal

import numpy as np
import torch
from optree import PyTreeSpec

from . import _dtypes, _transfer, _tree
from .errors import ConversionError, TonumpyError, UnsupportedLeafError

__all__ = ["apply", "to_numpy", "to_torch"]

Copy = Literal[True, False] | None

# Tensor types whose ``numpy(force=True)`` is the whole conversion when it succeeds.
_PLAIN = (torch.Tensor, torch.nn.Parameter)
_PLAIN_TYPES: frozenset[type] = frozenset(_PLAIN)
# False until the first CUDA tensor exists (always False on CPU-only builds).
_cuda_initialized: Callable[[], bool] = torch.cuda.is_initialized
# isinstance(x, torch.Tensor) as one C call, for filter().
_IS_TENSOR: Callable[[Any], bool] = torch.Tensor.__instancecheck__
_IS_CUDA: Callable[[torch.Tensor], bool] = operator.attrgetter("is_cuda")


class _LeafError(Exception):
    """Raised by per-leaf code that does not know the leaf's path; turned into a TonumpyError."""

    def __init__(self, reason: str, *, unsupported: bool) -> None:
        super().__init__(reason)
        self.reason = reason
        self.unsupported = unsupported


def _needs_copy(copy: Copy, what: str) -> None:
    if copy is False:
        raise _LeafError(f"copy=False, but {what}; pass copy=None to allow it", unsupported=False)


def _describe(leaf: Any) -> str:
    if isinstance(leaf, torch.Tensor):
        try:
            return (
                f"{type(leaf).__name__} of shape {tuple(leaf.shape)}, dtype={leaf.dtype}, "
                f"device={leaf.device}"
            )
        except Exception:  # noqa: BLE001 - a tensor too broken to describe
            return type(leaf).__name__
    if isinstance(leaf, np.ndarray):
        return f"ndarray of shape {leaf.shape}, dtype={leaf.dtype}"
    return type(leaf).__name__


def _leaf_error(
    spec: PyTreeSpec, index: int, leaf: Any, reason: str, *, unsupported: bool
) -> TonumpyError:
    path, where = _tree.leaf_path(spec, index)
    cls = UnsupportedLeafError if unsupported else ConversionError
    return cls(f"cannot convert {where} ({_describe(leaf)}): {reason}", path=path)


def _unwrap_subclass(t: torch.Tensor) -> torch.Tensor:
    """A plain ``torch.Tensor`` sharing ``t``'s data, or an explanation of why there is none."""
    cls = type(t)
    if getattr(cls, "__torch_dispatch__", None) is torch.Tensor.__torch_dispatch__:
        # An ordinary Python subclass (nn.Parameter, user classes): same storage underneath.
        return t.detach().as_subclass(torch.Tensor)
    name = cls.__name__
    if name == "FakeTensor" or "fake" in cls.__module__:
        reason = "fake tensors (torch.compile tracing, FakeTensorMode) carry no data"
    elif name == "DTensor":
        reason = "a DTensor is spread over ranks; call .full_tensor() on every rank first"
    else:
        reason = (
            f"the tensor subclass {cls.__module__}.{name} keeps its data in its own form; "
            "convert it to a plain tensor first"
        )
    raise _LeafError(reason, unsupported=True)


def _tensor_to_numpy(t: torch.Tensor, copy: Copy, ml_dtypes: bool, scalars: bool) -> Any:
    """Convert one tensor of any kind (the careful path). Raises ``_LeafError`` on failure."""
    if t.is_nested:  # strided nested tensors and jagged ones (a Python subclass) alike
        return [_tensor_to_numpy(c, copy, ml_dtypes, scalars) for c in t.detach().unbind()]
    if type(t) not in _PLAIN:
        t = _unwrap_subclass(t)
    if t.is_meta:
        raise _LeafError(
            "meta tensors have a shape and dtype but no data; materialise it on a real device "
            "first (for a model: model.to_empty(device='cpu') and load its weights)",
            unsupported=True,
        )
    if torch._C._functorch.is_functorch_wrapped_tensor(t):  # noqa: SLF001 - no public check
        raise _LeafError(
            "the tensor is wrapped by a torch.func transform (vmap, grad, jacrev, ...) and has "
            "no data of its own there; convert the transform's result after it returns",
            unsupported=True,
        )
    t = t.detach()
    fresh = False
    if t.layout != torch.strided:
        _needs_copy(copy, f"{t.layout} tensors are densified, which copies")
        t, fresh = t.to_dense(), True
    if t.is_quantized:
        _needs_copy(copy, "quantized tensors are dequantized, which copies")
        t, fresh = t.dequantize(), True
    if scalars and t.dim() == 0 and t.dtype != _dtypes.FLOAT4_X2:
        return t.item()
    dtype = t.dtype
    on_cpu = t.device.type == "cpu"
    if dtype in _dtypes.NATIVE or dtype == torch.complex32:
        if t.is_conj() or t.is_neg():
            _needs_copy(copy, "its conjugate/negative bit must be resolved, which copies")
            t, fresh = t.resolve_conj().resolve_neg(), True
        if dtype == torch.complex32:
            _needs_copy(copy, "complex32 is widened to complex64, which copies")
            t, fresh = t.to(torch.complex64), True
        if not on_cpu:
            _needs_copy(copy, f"it must be copied from {t.device} to the host")
            t, fresh = t.cpu(), True
        arr = t.numpy()
    elif dtype in _dtypes.ML_DTYPES:
        if ml_dtypes:
            np_dtype = _dtypes.ml_numpy_dtype(dtype)
            bits = t.view(_dtypes.BITS[dtype.itemsize])
            if not on_cpu:
                _needs_copy(copy, f"it must be copied from {t.device} to the host")
                bits, fresh = bits.cpu(), True
            arr = bits.numpy().view(np_dtype)
        else:
            _needs_copy(
                copy, f"{dtype} is widened to float32, which copies (ml_dtypes=True does not)"
            )
            arr, fresh = t.cpu().float().numpy(), True
    elif dtype == _dtypes.FLOAT4_X2:
        _needs_copy(copy, "float4_e2m1fn_x2 values are unpacked, one per element, which copies")
        codes = t.view(torch.uint8).cpu().numpy()
        arr, fresh = _dtypes.unpack_float4(codes, ml_dtypes=ml_dtypes), True
    else:
        raise _LeafError(f"{dtype} has no NumPy equivalent and no exact widening", unsupported=True)
    if copy and not fresh:
        arr = arr.copy()
    return arr


def _convert_one(leaf: Any, copy: Copy, ml_dtypes: bool, scalars: bool) -> Any:
    if isinstance(leaf, torch.Tensor):
        return _tensor_to_numpy(leaf, copy, ml_dtypes, scalars)
    if copy and isinstance(leaf, np.ndarray):
        return leaf.copy()
    return leaf


def convert_leaves(
    leaves: list[Any],
    spec: PyTreeSpec,
    *,
    copy: Copy = None,
    ml_dtypes: bool = False,
    scalars: bool = False,
    leaf_types: set[type] | None = None,
) -> list[Any]:
    """Convert a flat list of leaves (as ``_tree.flatten`` gives them) to NumPy.

    A leaf object that appears several times is converted once, and the same result object is
    put at each place. Errors name the leaf's path in ``spec``. ``leaf_types``, the set of the
    leaves' types if the caller has it (``_tree.flatten_typed``), saves a pass.
    """
    bulk = copy is None and not scalars  # the only options the bulk paths handle
    kinds: set[type] = set()  # the leaves' types, needed by the bulk paths only
    if bulk:
        kinds = set(map(type, leaves)) if leaf_types is None else leaf_types
    # a repeated tensor must become one array; repeated other leaves ("str", 3) come back as
    # themselves anyway, so only tensors are checked
    tensors = leaves if kinds and kinds <= _PLAIN_TYPES else filter(_IS_TENSOR, leaves)
    unique = _distinct(tensors, many=len(leaves) >= _MANY)
    if bulk and unique:
        # Fastest tier, for trees without CUDA tensors (those go to the transfer engine below)
        host_only = not _cuda_initialized()
        fast = _convert_cpu_fast(leaves, kinds, ml_dtypes=ml_dtypes, host_only=host_only)
        if fast is not None:
            return fast
    out: list[Any] = []
    append = out.append
    if bulk and unique:
        # Hot path: numpy(force=True) is detach + cpu + resolve_conj + resolve_neg + numpy, the
        # whole conversion for plain tensors of native dtypes; everything else raises there and
        # takes the careful path below.
        plain = _PLAIN
        cuda: list[int] = []  # CUDA leaves: set aside, then moved in one batch (_transfer)
        for index, leaf in enumerate(leaves):
            if type(leaf) in plain:
                if leaf.is_cuda:
                    cuda.append(index)
                    append(None)
                    continue
                try:
                    append(leaf.numpy(force=True))
                    continue
                except Exception:  # noqa: BLE001, S110 - any refusal: take the careful path
                    pass
            append(
                _convert_checked(leaf, index, spec, copy=copy, ml_dtypes=ml_dtypes, scalars=scalars)
            )
        if cuda:
            _transfer.resolve_into(
                out, leaves, cuda, spec, copy=copy, ml_dtypes=ml_dtypes, scalars=scalars
            )
        return out
    memo: dict[int, Any] = {}
    cuda = []
    for index, leaf in enumerate(leaves):
        if copy is not False and type(leaf) in _PLAIN and leaf.is_cuda:
            cuda.append(index)
            append(None)
            continue
        key = id(leaf)
        if key in memo:
            append(memo[key])
            continue
        memo[key] = result = _convert_checked(
            leaf, index, spec, copy=copy, ml_dtypes=ml_dtypes, scalars=scalars
        )
        append(result)
    if cuda:
        _transfer.resolve_into(
            out, leaves, cuda, spec, copy=copy, ml_dtypes=ml_dtypes, scalars=scalars
        )
    return out


def _convert_cpu_fast(
    leaves: list[Any], kinds: set[type], *, ml_dtypes: bool, host_only: bool
) -> list[Any] | None:
    """Convert distinct-tensor leaves with ``copy=None, scalars=False`` in bulk; None: not here.

    One list comprehension (no per-leaf try/append) of ``t.numpy()``, which skips the
    ``cpu``/``resolve_conj``/``resolve_neg`` calls ``force=True`` adds (no-ops here, but each
    a dispatcher round trip); if a leaf refuses (it requires grad, say), one of
    ``t.numpy(force=True)``; if a leaf still refuses, one more pass handles bfloat16/float8 in
    bulk. A failed pass costs only the leaves before the refusal. Anything unusual (tensor
    subclasses among ``kinds``, the leaves' types; sparse, meta, ...) returns None, and the
    caller's general loops convert the leaves, with errors that name the path.

    ``host_only`` says that no tensor can be on a GPU (CUDA is not initialised). Without it,
    the passes after the first run only if no tensor is on a CUDA device: they would copy such
    tensors one by one, where the transfer engine moves them together.
    """
    plain = _PLAIN
    if any(cls not in plain and issubclass(cls, torch.Tensor) for cls in kinds):
        return None
    try:  # no tensor requires grad, none has a conj/neg bit (evaluation, logging)
        return _numpy_pass(leaves)
    except Exception:  # noqa: BLE001, S110 - grad, a dtype NumPy lacks, a device, ...
        pass
    if not host_only and any(map(_IS_CUDA, filter(_IS_TENSOR, leaves))):
        return None
    try:  # usually fails at the first leaf, as trees either carry grad everywhere or nowhere
        return [leaf.numpy(force=True) if type(leaf) in plain else leaf for leaf in leaves]
    except Exception:  # noqa: BLE001, S110 - a dtype NumPy lacks, or another refusal
        pass
    try:
        return _convert_low_precision(leaves, ml_dtypes=ml_dtypes)
    except Exception:  # noqa: BLE001 - e.g. float4, sparse, ml_dtypes missing: careful path
        return None


def _numpy_pass(leaves: list[Any]) -> list[Any]:
    """``t.numpy()`` for each plain tensor, other leaves kept; raises at the first refusal.

    ``Tensor.numpy()`` without ``force`` refuses tensors that require grad, carry a conj/neg
    bit, have a dtype NumPy lacks, or live on a device: it never copies.
    """
    plain = _PLAIN
    return [leaf.numpy() if type(leaf) in plain else leaf for leaf in leaves]


_MANY = 256  # from about this many leaves on, sorting ids beats a set of them


def _distinct(objects: Iterable[Any], *, many: bool) -> bool:
    """Whether no object occurs twice in ``objects``.

    For ``many`` objects the ids are sorted in C and neighbours compared: for thousands of
    leaves that is about half the cost of a set of them (no hashing, no table that outgrows
    the cache), but its fixed cost (~2 µs) is more than a small set costs.
    """
    if not many:
        items = list(objects)
        return len(set(map(id, items))) == len(items)
    ids = np.fromiter(map(id, objects), dtype=np.uintp)
    if len(ids) < 2:
        return True
    ids.sort()
    return not bool((ids[1:] == ids[:-1]).any())


_PENDING = object()  # a bf16 leaf whose float32 array is made after the first pass


def _convert_low_precision(leaves: list[Any], *, ml_dtypes: bool) -> list[Any]:
    """Plain CPU leaves, some bfloat16/float8: ``ml_dtypes`` bit views, or a bulk bf16 upcast.

    One comprehension dispatches on the dtype; bfloat16 leaves are set aside and widened to
    float32 together by ``_upcast_bf16``. Anything else raises, and the caller takes the
    careful path.
    """
    if ml_dtypes:
        return _bit_views(leaves)
    plain = _PLAIN
    pending: list[torch.Tensor] = []
    wrapped = torch._C._functorch.is_functorch_wrapped_tensor  # noqa: SLF001 - no public check

    def force(t: torch.Tensor) -> Any:
        return t.numpy(force=True)

    def upcast(t: torch.Tensor) -> Any:
        if wrapped(t) or not t.is_contiguous():  # keep .float()'s strides: careful path
            raise _LeafError("not for the bulk upcast", unsupported=False)
        pending.append(t)
        return _PENDING

    table: dict[torch.dtype, Callable[[torch.Tensor], Any]] = dict.fromkeys(_dtypes.NATIVE, force)
    table[torch.bfloat16] = upcast
    out = [table[leaf.dtype](leaf) if type(leaf) in plain else leaf for leaf in leaves]
    if not pending:
        return out
    widened = iter(_upcast_bf16(pending))
    return [next(widened) if item is _PENDING else item for item in out]


def _bit_views(leaves: list[Any]) -> list[Any]:
    """bfloat16/float8 leaves as ``ml_dtypes`` arrays over the same bytes, others as usual.

    The dtype dispatch is inlined in the comprehension (a function call per leaf costs ~10%
    here). Leaves ``numpy(force=True)`` refuses (float4, complex32, ...) raise, and the caller
    takes the careful path.
    """
    plain = _PLAIN
    views = {
        dtype: (_dtypes.BITS[dtype.itemsize], _dtypes.ml_numpy_dtype(dtype))
        for dtype in _dtypes.ML_DTYPES
    }
    return [
        (
            leaf.numpy(force=True)
            if (pair := views.get(leaf.dtype)) is None
            else leaf.view(pair[0]).numpy().view(pair[1])
        )
        if type(leaf) in plain
        else leaf
        for leaf in leaves
    ]


# bf16 leaves of one shape are stacked, widened and split in blocks of at most this many
# elements: torch's grain size, so each block is cast on one thread (no OpenMP wake-ups, which
# cost milliseconds on a busy machine), and the temporaries (128 KiB) stay in the cache
_STACK_BLOCK = 32_768


def _upcast_bf16(tensors: list[torch.Tensor]) -> list[np.ndarray]:
    """Widen contiguous CPU bfloat16 tensors to float32 arrays, each owning its memory.

    Per leaf, ``t.float().numpy()`` costs two torch calls and a torch allocation. Here leaves
    that share a shape are stacked into one block (``torch.stack``), widened with one cast and
    split into rows that are copied into arrays of their own (``ndarray.copy``: a NumPy
    allocation, cheap to fill), so a block of k leaves costs three torch calls in all. The
    remaining leaves (a shape seen once, 0-d, or more than a block) get NumPy-allocated float32
    arrays filled by one ``torch._foreach_copy_``. Values are those of ``t.float()``, bit for
    bit (the same widening kernel).
    """
    out: list[Any] = [None] * len(tensors)
    by_shape: dict[torch.Size, list[int]] = {}
    for index, t in enumerate(tensors):
        shape = t.shape
        group = by_shape.get(shape)
        if group is None:
            by_shape[shape] = [index]
        else:
            group.append(index)
    singles: list[int] = []
    for shape, indices in by_shape.items():
        numel = shape.numel()
        if len(indices) < 2 or not shape or numel > _STACK_BLOCK // 2:
            singles += indices
            continue
        step = _STACK_BLOCK // max(numel, 1)
        for start in range(0, len(indices), step):
            part = indices[start : start + step]
            block = torch.stack([tensors[i] for i in part]).float().numpy()
            for i, row in zip(part, block, strict=True):
                out[i] = row.copy()
    if singles:
        targets = []
        for i in singles:
            arr = out[i] = np.empty(tensors[i].shape, np.float32)
            targets.append(torch.from_numpy(arr))
        with torch.no_grad():
            torch._foreach_copy_(targets, [tensors[i] for i in singles])
    return out


def _convert_checked(
    leaf: Any, index: int, spec: PyTreeSpec, *, copy: Copy, ml_dtypes: bool, scalars: bool
) -> Any:
    try:
        return _convert_one(leaf, copy, ml_dtypes, scalars)
    except _LeafError as issue:
        raise _leaf_error(spec, index, leaf, issue.reason, unsupported=issue.unsupported) from None
    except TonumpyError as exc:
        raise _leaf_error(spec, index, leaf, str(exc), unsupported=True) from exc
    except Exception as exc:  # torch's own refusals: never let a raw TypeError escape
        reason = f"{type(exc).__name__}: {exc}".strip()
        raise _leaf_error(spec, index, leaf, reason, unsupported=True) from exc


def to_numpy(
    tree: Any,
    /,
    *,
    copy: Copy = None,
    ml_dtypes: bool = False,
    scalars: bool = False,
    is_leaf: Callable[[Any], bool] | None = None,
) -> Any:
    """Convert every tensor in a nested structure to a NumPy array.

    Tensors are detached, brought to the host from any device, and have their conjugate and
    negative bits resolved; sparse tensors are densified, quantized ones dequantized, nested
    tensors become a list of arrays. Containers keep their exact type, keys, key order and
    extra state; every other leaf is returned as the very same object.

    Examples:
        >>> import torch
        >>> out = to_numpy({"logits": torch.ones(2, requires_grad=True), "step": 3})
        >>> out["logits"], out["step"]
        (array([1., 1.], dtype=float32), 3)
        >>> to_numpy(torch.tensor([1.5], dtype=torch.bfloat16))
        array([1.5], dtype=float32)
        >>> to_numpy(torch.tensor(2.0), scalars=True)
        2.0

    Args:
        tree: A tensor, or any nesting of dict (and subclasses), list, tuple, namedtuple,
            deque, dataclass, ``ModelOutput`` and ``torch.return_types`` holding tensors.
        copy: ``None`` shares memory with CPU tensors whenever no conversion is needed (the
            array is a view: writing to one changes the other); ``True`` returns arrays that
            share memory with nothing in the input; ``False`` never copies and raises
            [`ConversionError`][] for the first leaf that would need a copy.
        ml_dtypes: Return bfloat16 and float8 tensors as the matching ``ml_dtypes`` arrays,
            bit-exact (and zero-copy on the CPU), instead of widening them to float32.
        scalars: Return 0-d tensors as Python ``bool``/``int``/``float``/``complex``.
        is_leaf: Called on each node; a node it returns True for is treated as a leaf.

    Returns:
        A tree of the same structure, every tensor replaced by its NumPy form.

    Raises:
        ConversionError: ``copy=False`` and a leaf needs a copy; or the tree has a cycle or is
            too deep. The message and ``.path`` name the place.
        UnsupportedLeafError: A tensor's data cannot be read (meta, fake, functorch-wrapped)
            or its dtype has no NumPy form.
    """
    if (
        type(tree) in _PLAIN
        and copy is None
        and not scalars
        and not tree.requires_grad
        and not tree.is_cuda
        and tree.dtype in _dtypes.NATIVE
    ):  # a lone CPU tensor (W5): skip the walk; conj/neg bits and meta refuse and go on below
        try:
            return tree.numpy()
        except Exception:  # noqa: BLE001, S110 - the general path gives the proper error
            pass
    leaves, spec, kinds = _tree.flatten_typed(tree, is_leaf=is_leaf)
    converted = convert_leaves(
        leaves, spec, copy=copy, ml_dtypes=ml_dtypes, scalars=scalars, leaf_types=kinds
    )
    return _tree.unflatten(spec, converted)


_NOT_TENSORS = frozenset("OUSMmV")  # object, str, bytes, datetime, timedelta, void


def _array_to_tensor(
    arr: np.ndarray | np.generic,
    device: torch.device | str | None,
    dtype: torch.dtype | None,
    copy: Copy,
) -> Any:
    if isinstance(arr, np.generic):
        arr, copy = np.asarray(arr), None  # a fresh 0-d array: nothing to share
    torch_bits_of = _dtypes.torch_dtype_of(arr.dtype)
    if torch_bits_of is None and arr.dtype.kind in _NOT_TENSORS:
        return arr
    shared = True
    if not arr.flags.writeable or any(s < 0 for s in arr.strides) or not arr.dtype.isnative:
        _needs_copy(copy, "the array is read-only, has negative strides or is byte-swapped")
        arr = np.array(arr, dtype=arr.dtype.newbyteorder("="), order="C", copy=True)
        shared = False
    elif copy:
        arr, shared = arr.copy(), False
    if torch_bits_of is not None:
        t = torch.from_numpy(arr.view(f"u{arr.dtype.itemsize}")).view(torch_bits_of)
    else:
        t = torch.from_numpy(arr)
    return _move(t, device, dtype, copy if shared else None)


def _move(
    t: torch.Tensor, device: torch.device | str | None, dtype: torch.dtype | None, copy: Copy
) -> torch.Tensor:
    if device is None and dtype is None:
        return t.clone() if copy else t
    moved = t.to(device=device, dtype=dtype, copy=bool(copy))
    if copy is False and moved is not t:
        raise _LeafError(
            f"copy=False, but moving to device={device}, dtype={dtype} copies", unsupported=False
        )
    return moved


def to_torch(
    tree: Any,
    /,
    *,
    device: torch.device | str | None = None,
    dtype: torch.dtype | None = None,
    copy: Copy = None,
) -> Any:
    """Convert every NumPy array (and NumPy scalar) in a nested structure to a tensor.

    The inverse of [`to_numpy`][]. ``ml_dtypes`` bfloat16/float8 arrays become the exact
    torch dtype. Arrays torch cannot hold (object, str, bytes, datetime) stay as they are, and
    so does every other non-array leaf. Tensors already in the tree are moved and cast too.

    Examples:
        >>> import numpy as np
        >>> to_torch({"x": np.arange(3), "name": "a"})
        {'x': tensor([0, 1, 2]), 'name': 'a'}

    Args:
        tree: Any nesting of containers, as for [`to_numpy`][].
        device: Move every tensor to this device.
        dtype: Cast every tensor to this dtype.
        copy: ``None`` shares memory with the arrays where it can (``torch.from_numpy``) and
            copies, silently, read-only, negatively strided or byte-swapped arrays; ``True``
            always copies; ``False`` raises [`ConversionError`][] instead of copying.

    Returns:
        A tree of the same structure with tensors in place of arrays.
    """
    leaves, spec = _tree.flatten(tree)
    out = []
    for index, leaf in enumerate(leaves):
        try:
            if isinstance(leaf, np.ndarray | np.generic):
                out.append(_array_to_tensor(leaf, device, dtype, copy))
            elif isinstance(leaf, torch.Tensor):
                out.append(_move(leaf, device, dtype, copy))
            else:
                out.append(leaf)
        except _LeafError as issue:
            raise _leaf_error(
                spec, index, leaf, issue.reason, unsupported=issue.unsupported
            ) from None
        except TonumpyError:
            raise
        except Exception as exc:
            reason = f"{type(exc).__name__}: {exc}"
            raise _leaf_error(spec, index, leaf, reason, unsupported=True) from exc
    return _tree.unflatten(spec, out)


def apply(
    fn: Callable[[Any], Any],
    tree: Any,
    /,
    *,
    types: type | tuple[type, ...] = torch.Tensor,
    is_leaf: Callable[[Any], bool] | None = None,
) -> Any:
    """Map ``fn`` over the leaves that are instances of ``types``; keep everything else.

    Uses the same walker as [`to_numpy`][], so dataclasses, ``ModelOutput``, namedtuples and
    the rest are rebuilt with their exact types. An exception raised by ``fn`` propagates
    unchanged, with a note naming the leaf's path.

    Examples:
        >>> import torch
        >>> apply(lambda t: t * 2, {"a": torch.tensor([1, 2]), "b": "text"})
        {'a': tensor([2, 4]), 'b': 'text'}

    Args:
        fn: Called once per matching leaf; its result takes the leaf's place.
        tree: Any nesting of containers.
        types: A type or tuple of types; leaves of other types are left unchanged.
        is_leaf: Called on each node; a node it returns True for is treated as a leaf.

    Returns:
        A tree of the same structure.
    """
    leaves, spec = _tree.flatten(tree, is_leaf=is_leaf)
    out = []
    for index, leaf in enumerate(leaves):
        if isinstance(leaf, types):
            try:
                out.append(fn(leaf))
            except Exception as exc:
                if hasattr(exc, "add_note"):
                    exc.add_note(
                        f"tonumpy.apply: raised for the leaf at {_tree.leaf_path(spec, index)[1]}"
                    )
                raise
        else:
            out.append(leaf)
    return _tree.unflatten(spec, out)
