"""``to_numpy``, ``to_torch`` and ``apply``, and the router every conversion goes through.

Each call is three steps: the tree is flattened by the walker (``tonumpy._tree``), the flat
list of leaves is converted, and the converted leaves are put back into a tree of exactly the
input's structure. Anything that is not a tensor (or, for ``to_torch``, an array) is returned
as the very same object.

The middle step is the router, one function for every caller: [`to_numpy`][],
[`tonumpy.to_numpy_async`][], [`tonumpy.capture`][], [`tonumpy.Accumulator`][], ``concat``,
``gather`` and the file writers. It decides, once per tree, how each leaf travels (the CPU
routes are counted, and each one's speed-up measured, in ``tonumpy._convert._bulk``):

1. **lone tensor** (``to_numpy`` only): a CPU tensor that is the whole tree, converted
   without a walk (W5: about 1 µs, whatever its size);
2. **bulk** (``tonumpy._convert._bulk``): distinct plain CPU tensors, converted in one
   comprehension or ``map``, bfloat16 widened in stacked blocks (W1-W4, W6);
3. **per leaf**: anything else (repeated tensors, subclasses, sparse, quantized, nested,
   float4, meta, ``scalars=True``, ``copy=False``) through the careful converter
   (``tonumpy._convert._leaf``), each refusal an error naming the path;
4. **engine** (``tonumpy._convert._transfer``): CUDA tensors, set aside by the per-leaf loop and
   copied together, one wait per device; ``to_numpy`` waits, the asynchronous callers get a
   [`PendingTransfer`][tonumpy.PendingTransfer] and wait later (a tree with nothing in flight
   gives one that is already done). A lone small CUDA leaf that is waited for at once takes
   one blocking copy instead (the engine's fixed cost would make it slower than naive).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np
import torch
from optree import PyTreeSpec

from . import _dtypes, _options, _tree
from . import integrations as _integrations  # noqa: F401 - registers each with the walker
from ._convert import _bulk, _transfer
from ._convert._leaf import LeafError, array_to_tensor, leaf_error, leaf_to_numpy, move, read_only
from ._convert._transfer import PendingTransfer
from ._dtypes import PLAIN
from ._options import Copy
from .errors import OptionError, TonumpyError

__all__ = ["apply", "leaves_to_numpy", "start", "to_numpy", "to_torch"]

# isinstance(x, torch.Tensor) as one C call, for filter()
_IS_TENSOR: Callable[[Any], bool] = torch.Tensor.__instancecheck__
# below this many tensors a set of their ids is the cheaper duplicate check, from it on their
# ids sorted (per tensor, CPU time, set vs sorted: 43 vs 59 ns at 1,000 tensors, about equal at
# 10,000, 60 vs 37 ns at 75,000, where the set outgrows the cache)
_MANY = 10_000
# A lone CUDA leaf of at most this size, when waited for at once, takes one blocking .cpu():
# that is one sync as well, and skips the engine's fixed host-side work (event, staging
# lease), which would otherwise make a single tiny leaf slower than naive.
_LONE_BYTES = 64 << 10


def _route(
    leaves: list[Any],
    spec: PyTreeSpec,
    *,
    copy: Copy,
    ml_dtypes: bool,
    scalars: bool,
    types: set[type] | None,
    wait: bool,
    engine: _transfer.CudaEngine,
) -> tuple[list[Any], Any]:
    """Convert ``leaves`` now, or enqueue their device copies: ``(out, batch or None)``.

    ``out`` holds every converted leaf except those of the engine's ``batch`` (placeholders
    until [`_transfer.finish`][tonumpy._convert._transfer.finish] fills them). ``types`` is the set
    of the leaves' types, if the caller has it. The one place that decides how each leaf travels
    (the routes are listed in this module's docstring).
    """
    engine_on = engine.active()
    if copy is not False and not scalars and not engine.takes_cpu:
        if types is None:
            types = set(map(type, leaves))
        if _distinct_tensors(leaves, types):
            out = _bulk.to_arrays(
                leaves, types, copy=bool(copy), ml_dtypes=ml_dtypes, cuda_possible=engine_on
            )
            if out is not None:
                return out, None
    out, moved = _per_leaf(
        leaves,
        spec,
        copy=copy,
        ml_dtypes=ml_dtypes,
        scalars=scalars,
        takes=engine.takes if engine_on else None,
    )
    if not moved:
        return out, None
    if wait and len(moved) == 1:
        lone = leaves[moved[0]]
        if lone.nbytes <= _LONE_BYTES or not lone.is_cuda:
            out[moved[0]] = leaf_to_numpy(
                lone, moved[0], spec, copy=copy, ml_dtypes=ml_dtypes, scalars=scalars
            )
            return out, None
    batch = _transfer.enqueue(leaves, moved, engine)
    memo: dict[int, Any] = {}
    for position in batch.careful:
        leaf = leaves[position]
        if id(leaf) not in memo:
            memo[id(leaf)] = leaf_to_numpy(
                leaf, position, spec, copy=copy, ml_dtypes=ml_dtypes, scalars=scalars
            )
        out[position] = memo[id(leaf)]
    return out, batch


def _distinct_tensors(leaves: list[Any], leaf_types: set[type]) -> bool:
    """Whether no tensor occurs twice among ``leaves``.

    Other repeated leaves (``"str"``, ``3``) do not matter: they come back as themselves.
    """
    tensors = leaves if leaf_types <= PLAIN else list(filter(_IS_TENSOR, leaves))
    if len(tensors) < _MANY:
        return len(set(map(id, tensors))) == len(tensors)
    # many tensors: the ids sorted in C, neighbours compared
    ids = np.fromiter(map(id, tensors), dtype=np.uintp)
    ids.sort()
    return not bool((ids[1:] == ids[:-1]).any())


def _per_leaf(
    leaves: list[Any],
    spec: PyTreeSpec,
    *,
    copy: Copy,
    ml_dtypes: bool,
    scalars: bool,
    takes: Callable[[torch.Tensor], bool] | None,
) -> tuple[list[Any], list[int]]:
    """Convert leaf by leaf; set CUDA tensors aside for the engine: ``(out, their positions)``.

    A leaf met twice is converted once and the same result put at each place. With the
    default options a plain tensor first tries ``numpy(force=True)``, the whole conversion
    when it succeeds; everything else takes the careful converter.
    """
    out: list[Any] = []
    append = out.append
    moved: list[int] = []
    memo: dict[int, Any] = {}
    plain = PLAIN
    quick = copy is None and not scalars
    if copy is False:  # the careful path raises for the engine's leaves
        takes = None
    for index, leaf in enumerate(leaves):
        key = id(leaf)
        if key in memo:
            append(memo[key])
            continue
        if type(leaf) in plain:
            if takes is not None and takes(leaf):
                moved.append(index)
                append(None)
                continue
            if quick:
                try:
                    arr = leaf.numpy(force=True)
                except Exception:  # noqa: BLE001, S110 - any refusal: the careful converter
                    pass
                else:
                    if leaf.requires_grad:
                        read_only(arr)
                    memo[key] = arr
                    append(arr)
                    continue
        memo[key] = result = leaf_to_numpy(
            leaf, index, spec, copy=copy, ml_dtypes=ml_dtypes, scalars=scalars
        )
        append(result)
    return out, moved


def leaves_to_numpy(
    leaves: list[Any],
    spec: PyTreeSpec,
    *,
    copy: Copy = None,
    ml_dtypes: bool = False,
    scalars: bool = False,
    leaf_types: set[type] | None = None,
    engine: _transfer.CudaEngine = _transfer.CUDA,
) -> list[Any]:
    """Convert a flat list of leaves (as ``_tree.flatten`` gives them) to NumPy, now.

    Errors name the leaf's path in ``spec``. ``leaf_types``, the set of the leaves' types if the
    caller has it (``_tree.flatten_typed``), saves a pass.
    """
    out, batch = _route(
        leaves,
        spec,
        copy=copy,
        ml_dtypes=ml_dtypes,
        scalars=scalars,
        types=leaf_types,
        wait=True,
        engine=engine,
    )
    if batch is not None:
        _transfer.finish(batch, out, copy=copy, ml_dtypes=ml_dtypes, scalars=scalars)
    return out


def start(
    leaves: list[Any],
    spec: PyTreeSpec,
    *,
    copy: Copy = None,
    ml_dtypes: bool = False,
    scalars: bool = False,
    leaf_types: set[type] | None = None,
    engine: _transfer.CudaEngine = _transfer.CUDA,
) -> PendingTransfer:
    """Start converting a flat list of leaves: CUDA tensors' copies are enqueued, not waited for.

    Everything else is converted now (errors raised here, naming the path). The handle's
    ``result()`` rebuilds the tree of ``spec``; ``result_leaves()`` gives the flat list.
    """
    out, batch = _route(
        leaves,
        spec,
        copy=copy,
        ml_dtypes=ml_dtypes,
        scalars=scalars,
        types=leaf_types,
        wait=False,
        engine=engine,
    )
    return PendingTransfer(out, spec, batch, copy=copy, ml_dtypes=ml_dtypes, scalars=scalars)


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
        type(tree) in PLAIN
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
    leaves, spec, leaf_types = _tree.flatten_typed(tree, is_leaf=is_leaf)
    converted = leaves_to_numpy(
        leaves, spec, copy=copy, ml_dtypes=ml_dtypes, scalars=scalars, leaf_types=leaf_types
    )
    return _tree.unflatten(spec, converted)


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
                out.append(array_to_tensor(leaf, device, dtype, copy))
            elif isinstance(leaf, torch.Tensor):
                out.append(move(leaf, device, dtype, copy))
            else:
                out.append(leaf)
        except LeafError as issue:
            raise leaf_error(
                spec, index, leaf, issue.reason, unsupported=issue.unsupported
            ) from None
        except TonumpyError:
            raise
        except Exception as exc:
            reason = f"{type(exc).__name__}: {exc}"
            raise leaf_error(spec, index, leaf, reason, unsupported=True) from exc
    return _tree.unflatten(spec, out)


_SAME_STRUCTURE = (
    "apply() maps over trees of one structure (the same keys, fields and lengths at every level)"
)

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
        _tree.require_same(spec, rest_spec, "tree", f"rests[{number}]", hint=_SAME_STRUCTURE)
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
