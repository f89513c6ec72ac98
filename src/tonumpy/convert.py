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

from . import _diff, _dtypes, _options, _transfer, _tree
from .errors import ConversionError, OptionError, TonumpyError, UnsupportedLeafError

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


def _tensor_to_numpy(
    t: torch.Tensor, copy: Copy, ml_dtypes: bool, scalars: bool, guarded: bool = False
) -> Any:
    """Convert one tensor of any kind (the careful path). Raises ``_LeafError`` on failure.

    ``guarded``: the tensor is part of one that requires grad (a nested tensor's component),
    so a view of its memory is made read-only, as one of a tensor requiring grad is.
    """
    guarded = guarded or t.requires_grad
    if t.is_nested:  # strided nested tensors and jagged ones (a Python subclass) alike
        parts = t.detach().unbind()
        return [_tensor_to_numpy(c, copy, ml_dtypes, scalars, guarded) for c in parts]
    if type(t) not in _PLAIN:
        t = _unwrap_subclass(t)
    _check_readable(t)
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
    arr, converted = _strided_to_numpy(t, copy, ml_dtypes)
    fresh = fresh or converted
    if copy and not fresh:
        arr = arr.copy()
    elif guarded and not fresh:
        arr.setflags(write=False)  # see _protect
    return arr


def _check_readable(t: torch.Tensor) -> None:
    """Raise ``_LeafError`` for tensors that have no data to read: meta, functorch-wrapped."""
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


def _strided_to_numpy(t: torch.Tensor, copy: Copy, ml_dtypes: bool) -> tuple[np.ndarray, bool]:
    """A detached, strided tensor of any dtype as an array, and whether that is a new copy."""
    fresh = False
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
        return t.numpy(), fresh
    if dtype in _dtypes.ML_DTYPES:
        if t.is_neg():  # neither a bit view nor a float8 widening can read it as it is
            _needs_copy(copy, "its negative bit must be resolved, which copies")
            t, fresh = _dtypes.resolve_neg(t), True
        if not ml_dtypes:
            _needs_copy(
                copy, f"{dtype} is widened to float32, which copies (ml_dtypes=True does not)"
            )
            return t.cpu().float().numpy(), True
        np_dtype = _dtypes.ml_numpy_dtype(dtype)
        bits = t.view(_dtypes.BITS[dtype.itemsize])
        if not on_cpu:
            _needs_copy(copy, f"it must be copied from {t.device} to the host")
            bits, fresh = bits.cpu(), True
        return bits.numpy().view(np_dtype), fresh
    if dtype == _dtypes.FLOAT4_X2:
        _needs_copy(copy, "float4_e2m1fn_x2 values are unpacked, one per element, which copies")
        codes = t.view(torch.uint8).cpu().numpy()
        return _dtypes.unpack_float4(codes, ml_dtypes=ml_dtypes), True
    raise _LeafError(f"{dtype} has no NumPy equivalent and no exact widening", unsupported=True)


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
                    arr = leaf.numpy(force=True)
                except Exception:  # noqa: BLE001, S110 - any refusal: take the careful path
                    pass
                else:
                    if leaf.requires_grad:
                        arr.setflags(False)  # see _protect
                    append(arr)
                    continue
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
        forced = [leaf.numpy(force=True) if type(leaf) in plain else leaf for leaf in leaves]
    except Exception:  # noqa: BLE001, S110 - a dtype NumPy lacks, or another refusal
        pass
    else:
        return _protect(leaves, forced)
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


def _protect(leaves: list[Any], out: list[Any]) -> list[Any]:
    """Make the arrays of the tensors among ``leaves`` that require grad read-only; ``out``.

    ``numpy(force=True)`` of such a tensor is a view of memory autograd may have saved for the
    backward pass (``y = x.exp()`` saves ``y``): writing to it would change the gradient
    silently, which is why ``Tensor.numpy()`` refuses them. The view stays zero-copy but
    read-only; ``copy=True`` gives a writable copy. ``out[i]`` must be the array of
    ``leaves[i]`` wherever that is a plain tensor.
    """
    plain = _PLAIN
    for leaf, arr in zip(leaves, out, strict=True):
        if type(leaf) in plain and leaf.requires_grad:
            arr.setflags(False)  # write=False; positional: half the cost of the keyword
    return out


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
        arr = t.numpy(force=True)
        if t.requires_grad:
            arr.setflags(write=False)  # see _protect
        return arr

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
    out = [
        (
            leaf.numpy(force=True)
            if (pair := views.get(leaf.dtype)) is None
            else leaf.view(pair[0]).numpy().view(pair[1])
        )
        if type(leaf) in plain
        else leaf
        for leaf in leaves
    ]
    return _protect(leaves, out)


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

    The array of a tensor that requires grad is a read-only view (with the default
    ``copy=None``): autograd may have saved that very memory for the backward pass (``y =
    x.exp()`` saves ``y``), so writing to the array would silently change the gradients, the
    reason why ``Tensor.numpy()`` refuses such tensors. ``copy=True`` gives a writable copy.

    Examples:
        >>> import torch
        >>> out = to_numpy({"logits": torch.ones(2, requires_grad=True), "step": 3})
        >>> out["logits"], out["step"]
        (array([1., 1.], dtype=float32), 3)
        >>> out["logits"].flags.writeable, to_numpy(torch.ones(2)).flags.writeable
        (False, True)
        >>> to_numpy(torch.tensor([1.5], dtype=torch.bfloat16))
        array([1.5], dtype=float32)
        >>> to_numpy(torch.tensor(2.0), scalars=True)
        2.0

    Args:
        tree: A tensor, or any nesting of dict (and subclasses), list, tuple, namedtuple,
            deque, dataclass, ``ModelOutput`` and ``torch.return_types`` holding tensors.
        copy: ``None`` shares memory with CPU tensors whenever no conversion is needed (the
            array is a view: writing to one changes the other; read-only if the tensor
            requires grad); ``True`` returns writable arrays that share memory with nothing in
            the input; ``False`` never copies and raises [`ConversionError`][] for the
            first leaf that would need a copy. Exactly ``None``, ``True`` or ``False``.
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
        OptionError: ``copy`` is not exactly ``None``/``True``/``False``, or ``ml_dtypes`` or
            ``scalars`` is not exactly ``True``/``False``.
    """
    if (
        (copy is not None and copy is not True and copy is not False)
        or (ml_dtypes is not False and ml_dtypes is not True)
        or (scalars is not False and scalars is not True)
    ):
        _options.bad_flags("to_numpy", copy=copy, ml_dtypes=ml_dtypes, scalars=scalars)
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

    Raises:
        ConversionError: ``copy=False`` and an array needs a copy; the message names it.
        OptionError: ``copy`` is not exactly ``None``, ``True`` or ``False``.
    """
    _options.check_copy(copy, "to_torch")
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


#: Types whose instances are never containers: ``types=`` of these needs no node test.
_NEVER_CONTAINERS = (torch.Tensor, np.ndarray, np.generic, str, bytes, int, float, complex)


def _types_tuple(types: Any) -> tuple[type, ...]:
    wanted = types if isinstance(types, tuple) else (types,)
    if not wanted or not all(isinstance(t, type) for t in wanted):
        raise OptionError(
            f"apply(types={types!r}): types= takes a type or a tuple of types (as isinstance "
            "does), e.g. torch.Tensor, dict or (torch.Tensor, np.ndarray)"
        )
    return wanted


def _whole(
    wanted: tuple[type, ...], is_leaf: Callable[[Any], bool] | None
) -> Callable[[Any], bool]:
    """The node test that makes instances of ``wanted`` leaves, so they reach ``fn`` whole."""
    if is_leaf is None:
        return lambda node: isinstance(node, wanted)
    return lambda node: isinstance(node, wanted) or is_leaf(node)


def apply(
    fn: Callable[..., Any],
    tree: Any,
    /,
    *rests: Any,
    types: type | tuple[type, ...] = torch.Tensor,
    is_leaf: Callable[[Any], bool] | None = None,
    with_path: bool = False,
) -> Any:
    """Map ``fn`` over the parts of ``tree`` that are instances of ``types``; keep the rest.

    Uses the same walker as [`to_numpy`][], so dataclasses, ``ModelOutput``, namedtuples and
    the rest are rebuilt with their exact types. Containers are matched too: with
    ``types=dict`` each outermost dict (``tree`` itself, if it is one) is handed to ``fn``
    whole, as Lightning's ``apply_to_collection(data, dict, fn)`` does; nothing inside a
    matched container is visited. An exception raised by ``fn`` propagates unchanged, with a
    note naming the path of the part it was called on.

    With several trees (``apply(fn, tree, *rests)``, like optree's ``tree_map`` and
    Lightning's ``apply_to_collections``) every tree must have ``tree``'s structure, and
    ``fn`` is called with the parts at one place in all of them; places where ``tree``'s part
    does not match ``types`` keep ``tree``'s. ``with_path=True`` passes each part's key path
    first, as optree's ``tree_map_with_path`` does: the tuple of keys, indices and field names
    that errors, ``pad_value`` mappings and ``optree.tree_paths`` use.

    Examples:
        >>> import torch
        >>> apply(lambda t: t * 2, {"a": torch.tensor([1, 2]), "b": "text"})
        {'a': tensor([2, 4]), 'b': 'text'}
        >>> apply(len, [{"a": 1}, {"b": 2, "c": 3}, "text"], types=dict)  # containers, whole
        [1, 2, 'text']
        >>> apply(torch.add, {"x": torch.ones(2)}, {"x": torch.tensor([1.0, 2.0])})
        {'x': tensor([2., 3.])}
        >>> apply(lambda path, t: ".".join(map(str, path)), {"h": [torch.ones(1)] * 2},
        ...       with_path=True)
        {'h': ['h.0', 'h.1']}
        >>> apply(torch.add, {"x": torch.ones(1)}, {"y": torch.ones(1)})
        Traceback (most recent call last):
        ...
        tonumpy.errors.ConversionError: rests[0] does not have the structure of tree: ...

    Args:
        fn: Called once per matching part, as ``fn(part, *parts_of_rests)`` (with
            ``with_path=True``: ``fn(path, part, *parts_of_rests)``); its result takes the
            part's place.
        tree: Any nesting of containers.
        *rests: More trees of ``tree``'s structure, mapped over together with it.
        types: A type or tuple of types, as for ``isinstance``; tensors by default.
            Parts of other types are left unchanged (and walked into, if containers).
        is_leaf: Called on each node; a node it returns True for is not walked into (it
            reaches ``fn`` if it matches ``types``).
        with_path: Pass each part's key path to ``fn`` as its first argument.

    Returns:
        A tree of ``tree``'s structure.

    Raises:
        ConversionError: A tree of ``rests`` differs in structure from ``tree``; the message
            and ``.path`` name the first place where they differ.
        OptionError: ``fn`` is not callable, ``types`` is not a type or tuple of types, or
            ``with_path`` is not a bool.
    """
    if not callable(fn):
        raise OptionError(f"apply(): fn must be callable, got {type(fn).__name__}: {fn!r}")
    wanted = _types_tuple(types)
    _options.check_flag(with_path, "with_path", "apply")
    node_test = is_leaf
    if not all(issubclass(t, _NEVER_CONTAINERS) for t in wanted):
        node_test = _whole(wanted, is_leaf)
    leaves, spec = _tree.flatten(tree, is_leaf=node_test)
    columns = [leaves]
    for number, rest in enumerate(rests):
        rest_leaves, rest_spec = _tree.flatten(rest, is_leaf=node_test)
        if not _tree.same_structure(rest_spec, spec):
            raise _diff.structure_error(
                spec,
                rest_spec,
                "tree",
                f"rests[{number}]",
                hint="apply() maps over trees of one structure (the same keys, fields and "
                "lengths at every level)",
            )
        columns.append(rest_leaves)
    paths = spec.paths() if with_path else None
    out = []
    for index, leaf in enumerate(leaves):
        if not isinstance(leaf, wanted):
            out.append(leaf)
            continue
        args = [column[index] for column in columns]
        if paths is not None:
            args.insert(0, paths[index])
        try:
            out.append(fn(*args))
        except Exception as exc:
            if hasattr(exc, "add_note"):
                exc.add_note(
                    f"tonumpy.apply: raised for the leaf at {_tree.leaf_path(spec, index)[1]}"
                )
            raise
    return _tree.unflatten(spec, out)
