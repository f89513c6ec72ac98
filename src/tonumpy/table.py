r"""One batch as a table: a flat ``dict`` of columns, one row per example, and back.

Batch inference engines take columns, not trees: Ray Data's ``map_batches`` and Hugging Face
datasets' ``map(batched=True)`` want a ``dict[str, np.ndarray]`` whose arrays all have one row
per example along their first dimension. [`to_columns`][tonumpy.to_columns] makes one from any
tree tonumpy converts (a ``ModelOutput``, nested ``hidden_states`` tuples, bfloat16, ...);
[`from_columns`][tonumpy.from_columns] rebuilds the tree from such columns, however many
batches they hold, and [`column_structure`][tonumpy.column_structure] gives the structure it
rebuilds. Parquet files written by [`tonumpy.save`][] hold the same columns.

**Rows.** The batch size is the first dimension shared by most array leaves (a tie is an
error; files take the larger), or ``batch_size=``. An array leaf whose first dimension is the
batch size is a column as it is. Anything else is a *per-batch value*: a 0-d loss, an array
whose first dimension is not the batch size, a plain Python number. ``per_batch="error"`` (the
default) refuses it, naming where it is; ``per_batch="broadcast"`` repeats it on every row (a
read-only view, no copy).
``exclude=`` leaves it out; ``reduce=`` turns it into something else first.

**Ragged rows.** A node named in ``per_row=`` (a list or tuple of one value per example, such as
detection outputs or generated sequences of different lengths) gives one column per leaf of its
items, the item of row ``i`` in row ``i``. Rows of different shapes are *ragged*:
``ragged="pad"`` pads them to the largest shape with ``pad_value`` (the forms
[`tonumpy.Accumulator`][] takes), ``ragged="object"`` keeps one array per row in an object
column. Columns of different batches may also have different row shapes (sequences of another
length); engines keep each row as it is, and ``from_columns`` pads (or keeps) them the same way.

**Column names.** A tensor at several places in the tree is one column, named after its first
place (``from_columns`` puts it back at every place). Each column is named after its leaf's key
path (with the field names of
namedtuples and attribute names of dataclasses and ``ModelOutput`` objects), spelled by
[`column_name`][tonumpy.table.column_name] and read back by
[`key_path`][tonumpy.table.key_path]: keys are joined by ``.``; an ``int`` key is written in
decimal (``hidden_states.0``); a ``str`` key is written as it is, with ``\`` and ``.`` escaped
by a backslash (``\\``, ``\.``), and ``\s`` (which stands for nothing) before a key that
would read as an ``int`` or is empty (``"3"`` is ``\s3``, ``""`` is ``\s``). The root of a tree
that is one array is named ``""``. Other keys (``None``, floats, tuples as dict keys) are
refused.

**Structure.** ``column_structure(tree, ...)`` is a JSON string (the structure tonumpy files
hold: containers, keys and their order, plain values, plus the column names) that
``from_columns`` rebuilds the tree from; a structure does not depend on values or the batch
size, so one made from one batch (on the driver, say) rebuilds every batch. Without a
structure, ``from_columns`` rebuilds nested ``dict`` objects keyed by ``key_path``.

Examples:
    >>> import torch, tonumpy
    >>> out = {"logits": torch.ones(2, 3), "hidden": (torch.zeros(2, 4), torch.zeros(2, 4))}
    >>> columns = tonumpy.to_columns(out)
    >>> {name: column.shape for name, column in columns.items()}
    {'logits': (2, 3), 'hidden.0': (2, 4), 'hidden.1': (2, 4)}
    >>> tree = tonumpy.from_columns(columns, tonumpy.column_structure(out))
    >>> type(tree["hidden"]), tree["logits"].shape
    (<class 'tuple'>, (2, 3))
"""

from __future__ import annotations

import json
import re
from collections import Counter
from collections.abc import Callable, Iterable, Mapping
from typing import Any, Literal, NamedTuple

import numpy as np
import optree

from . import _options, _tree
from ._combine._columns import copy_padded
from ._combine._pad import PadValue, check_pad_option, pad_value_for
from ._combine._select import Selection, as_path
from ._format import _structure
from ._format._fs import short
from .convert import to_numpy
from .errors import ConversionError, FileFormatError, OptionError

__all__ = ["column_name", "column_structure", "from_columns", "key_path", "to_columns"]
# tabulate, Table, nest, stack_rows and split_rows serve tonumpy._rowfiles._parquet, not users

Ragged = Literal["pad", "object"]
PerBatch = Literal["error", "broadcast", "keep"]

_INT = re.compile(r"(0|-?[1-9][0-9]*)\Z")


# ------------------------------------------------------------------------------ names


def _key_name(key: Any, path: tuple[Any, ...], place: str | None) -> str:
    if isinstance(key, int) and not isinstance(key, bool):
        return str(key)
    if not isinstance(key, str):
        place = _tree.format_path(path) if place is None else place
        raise ConversionError(
            f"{place}: a key of type {type(key).__name__} ({key!r:.40}); "
            "column names spell str and int keys only: rename the key, or leave the node "
            "out with exclude=",
            path=path,
        )
    text = key.replace("\\", "\\\\").replace(".", "\\.")
    return "\\s" + text if not key or _INT.match(key) else text


def column_name(path: tuple[Any, ...], /, *, place: str | None = None) -> str:
    r"""The column name of the leaf at key ``path`` (see the module for the spelling).

    ``place``: how an error names the leaf, where the caller has it rendered from its tree
    (``tree['p'].y``, a namedtuple's field as users read it); by default, from the keys.

    Examples:
        >>> column_name(("hidden_states", 0)), column_name(("a.b", "3")), column_name(())
        ('hidden_states.0', 'a\\.b.\\s3', '')

    Raises:
        ConversionError: A key is neither a ``str`` nor an ``int``.
    """
    return ".".join(_key_name(key, path[: i + 1], place) for i, key in enumerate(path))


def key_path(name: str, /) -> tuple[Any, ...]:
    r"""The key path a column name spells: [`column_name`][tonumpy.table.column_name] undone.

    Examples:
        >>> key_path("hidden_states.0"), key_path("a\\.b.\\s3"), key_path("")
        (('hidden_states', 0), ('a.b', '3'), ())
    """
    if not name:
        return ()
    parts: list[tuple[str, bool]] = []  # (text, escaped anywhere)
    text: list[str] = []
    escaped = False
    chars = iter(name)
    for char in chars:
        if char == "\\":
            escaped = True
            following = next(chars, "")
            text.append("" if following == "s" else following)
        elif char == ".":
            parts.append(("".join(text), escaped))
            text, escaped = [], False
        else:
            text.append(char)
    parts.append(("".join(text), escaped))
    return tuple(int(t) if not esc and _INT.match(t) else t for t, esc in parts)


# ------------------------------------------------------------------------------ tables


class Table(NamedTuple):
    """A tree as a table (what [`tabulate`][tonumpy.table.tabulate] gives).

    Attributes:
        rows: The number of rows (the batch size).
        columns: Column name -> an array with ``rows`` rows (an object array of one array per
            row for ragged columns kept as they are).
        values: Column name -> a per-batch array (with ``per_batch="keep"`` only).
        structure: The JSON structure: ``{"format", "version", "tree", "arrays", "per_row"}``.
        paths: Column name -> the leaf's stored key path.
    """

    rows: int
    columns: dict[str, np.ndarray]
    values: dict[str, np.ndarray]
    structure: dict[str, Any]
    paths: dict[str, tuple[Any, ...]]


def _check_choice(caller: str, option: str, value: Any, choices: tuple[str, ...]) -> None:
    if not isinstance(value, str) or value not in choices:
        listed = ", ".join(repr(c) for c in choices)
        raise OptionError(f"{caller}({option}={value!r}): {option}= takes one of {listed}")


def _per_row_paths(per_row: Any, caller: str) -> list[tuple[Any, ...]]:
    if per_row is None:
        return []
    patterns: Iterable[Any] = [per_row] if isinstance(per_row, str | tuple) else per_row
    if not isinstance(patterns, list | set | frozenset | tuple):
        raise OptionError(
            f"{caller}(per_row={per_row!r}): per_row= takes a key-path pattern or a list of them"
        )
    return [as_path(p) for p in patterns]


def _node_at(tree: Any, path: tuple[Any, ...], is_leaf: Callable[[Any], bool] | None) -> Any:
    node = tree
    for depth, key in enumerate(path):
        entries: tuple[Any, ...] = ()
        if not isinstance(node, np.ndarray | np.generic):
            children, _, entries, _ = optree.tree_flatten_one_level(
                node, is_leaf, namespace=_tree.NAMESPACE
            )
        if key not in entries:
            spec = _tree.flatten(tree, is_leaf=is_leaf)[1]
            raise OptionError(
                f"per_row=...: {_tree.place(spec, path)} is not in the tree (there is no "
                f"{_tree.place(spec, path[: depth + 1])})"
            )
        node = children[list(entries).index(key)]
    return node


def _as_arrays(item: Any, is_leaf: Callable[[Any], bool] | None) -> Any:
    """A row's item with its plain numbers as 0-d arrays (they are the row's values)."""
    leaves, spec = _tree.flatten(item, is_leaf=is_leaf)
    plain = (bool, int, float, complex)
    return _tree.unflatten(spec, [np.asarray(x) if isinstance(x, plain) else x for x in leaves])


def _replace(
    node: Any, path: tuple[Any, ...], new: Any, is_leaf: Callable[[Any], bool] | None
) -> Any:
    if not path:
        return new
    children, meta, entries, unflatten = optree.tree_flatten_one_level(
        node, is_leaf, namespace=_tree.NAMESPACE
    )
    children = list(children)
    at = list(entries).index(path[0])
    children[at] = _replace(children[at], path[1:], new, is_leaf)
    return unflatten(meta, children)


def _batch_size(leaves: list[Any], lengths: list[int], caller: str, *, strict: bool) -> int:
    counts = Counter(leaf.shape[0] for leaf in leaves if isinstance(leaf, np.ndarray) and leaf.ndim)
    counts.update(lengths)
    if not counts:
        if caller in ("save", "convert"):
            raise ConversionError(
                f"{caller}: a Parquet file holds one row per example, and this tree has no array "
                "with a first dimension to take rows from; write a .npz file instead"
            )
        raise ConversionError(
            f"{caller}: the tree has no array with a first dimension to take rows from; pass "
            "batch_size= to repeat its values on that many rows (with per_batch='broadcast')"
        )
    best = max(counts.values())
    tied = sorted(size for size, n in counts.items() if n == best)
    if strict and len(tied) > 1:
        raise ConversionError(
            f"{caller}: as many array leaves have {tied[0]} rows as have {tied[-1]} (their first "
            "dimension); pass batch_size= to say which is the batch"
        )
    return int(tied[-1])


def stack_rows(
    rows: list[np.ndarray],
    path: tuple[Any, ...],
    *,
    ragged: str,
    pad_value: PadValue,
    caller: str,
    place: str,
) -> np.ndarray:
    """Rows (arrays) as one column: stacked, padded, or an object array of them.

    ``caller`` starts a message (the function or file), ``place`` names the column in it (the
    walker's rendering of the leaf, ``tree['p'].y``, or the column's name in a file).
    """
    arrays = [np.asarray(row) for row in rows]
    if not arrays:
        return np.empty((0,), dtype=np.float32)
    first = arrays[0]
    dtypes = {a.dtype for a in arrays}
    if len(dtypes) > 1:
        raise ConversionError(
            f"{caller}: the rows of {place} have different dtypes "
            f"({', '.join(sorted(map(str, dtypes)))}); give every row one dtype",
            path=path,
        )
    shapes = {a.shape for a in arrays}
    if len(shapes) == 1:
        return np.stack(arrays)
    if ragged == "object":
        out = np.empty(len(arrays), dtype=object)
        for i, a in enumerate(arrays):
            out[i] = a
        return out
    if len({a.ndim for a in arrays}) > 1:
        raise ConversionError(
            f"{caller}: the rows of {place} have different numbers of "
            f"dimensions ({', '.join(sorted(str(s) for s in shapes))}); they cannot be padded",
            path=path,
        )
    fill = pad_value_for(pad_value, path, first.dtype, place)
    if fill is None:
        raise ConversionError(
            f"{caller}: the rows of {place} have different shapes "
            f"({', '.join(sorted(str(s) for s in shapes)[:4])}...); pass pad_value= to pad "
            "them to the largest, or ragged='object' to keep one array per row",
            path=path,
        )
    full = tuple(max(sizes) for sizes in zip(*shapes, strict=True))
    out = np.empty((len(arrays), *full), dtype=first.dtype)
    for i, a in enumerate(arrays):
        copy_padded(out[i], a, fill)
    return out


def _layout_rows(
    tree: Any,
    per_row: Any,
    ml_dtypes: bool,
    is_leaf: Callable[[Any], bool] | None,
    caller: str,
) -> tuple[
    Any,
    list[tuple[tuple[Any, ...], list[Any]]],
    _structure.Layout,
    dict[int, tuple[tuple[Any, ...], list[list[Any]], int]],
]:
    """Plan ``tree`` with each ``per_row`` node replaced by its first item (the template).

    Returns the tree, the per-row nodes (path, items), the plan, and for each flat leaf index
    inside a per-row node: (node path, every item's leaves, the leaf's index in an item).
    """
    # per-row nodes: each is replaced by its first item (the template of every row's item)
    row_nodes: list[tuple[tuple[Any, ...], list[Any]]] = []
    for path in _per_row_paths(per_row, caller):
        node = _node_at(tree, path, is_leaf)
        if not isinstance(node, list | tuple) or not node:
            spec = _tree.flatten(tree, is_leaf=is_leaf)[1]
            raise OptionError(
                f"{caller}(per_row=...): {_tree.place(spec, path)} is "
                f"{type(node).__name__ if not isinstance(node, list | tuple) else 'empty'}; "
                "per_row= names lists or tuples holding one value per row"
            )
        row_nodes.append((path, [_as_arrays(item, is_leaf) for item in node]))
    for path, items in row_nodes:
        tree = _replace(tree, path, items[0], is_leaf)

    layout = _structure.layout(tree, ml_dtypes=ml_dtypes, is_leaf=is_leaf)
    walked = layout.walked
    inside: dict[int, tuple[tuple[Any, ...], list[list[Any]], int]] = {}
    for path, items in row_nodes:
        node = next(n for n in _tree.outline(walked.spec) if n.path == path)
        template_spec = _tree.flatten(items[0], is_leaf=is_leaf)[1]
        per_item = []
        for i, item in enumerate(items):
            item_leaves, item_spec = _tree.flatten(item, is_leaf=is_leaf)
            _tree.require_same(
                template_spec,
                item_spec,
                f"row 0 of {_tree.place(walked.spec, path)}",
                f"row {i}",
                hint=f"{caller}(per_row=...) needs every row's item to have one structure",
            )
            per_item.append(item_leaves)
        for j in range(node.size):
            inside[node.first + j] = (path, per_item, j)

    return tree, row_nodes, layout, inside


def tabulate(
    tree: Any,
    /,
    *,
    caller: str,
    batch_size: int | None = None,
    per_batch: str = "error",
    per_row: Any = None,
    ragged: str = "pad",
    pad_value: PadValue = None,
    reduce: Any = None,
    exclude: Any = None,
    ml_dtypes: bool = False,
    is_leaf: Callable[[Any], bool] | None = None,
) -> Table:
    """``tree`` as a [`Table`][tonumpy.table.Table]; the engine of every public function here.

    ``per_batch="keep"`` (for files) keeps per-batch arrays in ``Table.values`` and plain
    values in the structure, instead of refusing or broadcasting them.
    """
    _check_options(
        caller,
        batch_size=batch_size,
        per_batch=per_batch,
        ragged=ragged,
        pad_value=pad_value,
        ml_dtypes=ml_dtypes,
    )
    selection = Selection(exclude, reduce, caller)
    if selection.active:
        leaves, spec, _ = selection.flatten(tree, is_leaf=is_leaf)
        tree = _tree.unflatten(spec, leaves)
    tree = to_numpy(tree, ml_dtypes=ml_dtypes, is_leaf=is_leaf)

    tree, row_nodes, layout, inside = _layout_rows(tree, per_row, ml_dtypes, is_leaf, caller)
    rows = _count_rows(
        layout.walked,
        row_nodes,
        inside,
        batch_size=batch_size,
        caller=caller,
        per_batch=per_batch,
    )
    columns, values, paths, names = _fill_columns(
        layout,
        inside,
        rows,
        caller=caller,
        per_batch=per_batch,
        ragged=ragged,
        pad_value=pad_value,
    )
    if per_batch != "keep":
        _check_plain_values(
            layout,
            rows=rows,
            per_batch=per_batch,
            caller=caller,
            columns=columns,
            names=names,
            paths=paths,
        )
    structure = dict(layout.structure, arrays=names, per_row=[list(p) for p, _ in row_nodes])
    return Table(rows, columns, values, structure, paths)


def _check_options(
    caller: str,
    /,
    *,
    batch_size: Any,
    per_batch: Any,
    ragged: Any,
    pad_value: PadValue,
    ml_dtypes: Any,
) -> None:
    """Refuse [`tabulate`][tonumpy.table.tabulate]'s options that are not what they must be."""
    _check_choice(caller, "per_batch", per_batch, ("error", "broadcast", "keep"))
    _check_choice(caller, "ragged", ragged, ("pad", "object"))
    _options.check_flags(caller, ml_dtypes=ml_dtypes)
    check_pad_option(pad_value, caller)
    if batch_size is not None and (
        not isinstance(batch_size, int) or isinstance(batch_size, bool) or batch_size < 0
    ):
        raise OptionError(f"{caller}(batch_size={batch_size!r}): a number of rows, 0 or more")


def _count_rows(
    walked: _structure.Walk,
    row_nodes: list[tuple[tuple[Any, ...], list[Any]]],
    inside: dict[int, Any],
    *,
    batch_size: int | None,
    caller: str,
    per_batch: str,
) -> int:
    """The batch's number of rows: ``batch_size``, or what the leaves and ``per_row=`` agree on.

    A ``per_row=`` node must hold one item per row.
    """
    lengths = [len(items) for _, items in row_nodes]
    outside = [leaf for i, leaf in enumerate(walked.leaves) if i not in inside]
    rows = (
        batch_size
        if batch_size is not None
        else _batch_size(outside, lengths, caller, strict=per_batch != "keep")
    )
    for path, items in row_nodes:
        if len(items) != rows:
            raise ConversionError(
                f"{caller}: {_tree.place(walked.spec, path)} (per_row=) holds {len(items)} "
                f"items for {rows} rows; it must hold one per row",
                path=path,
            )
    return rows


def _fill_columns(
    layout: _structure.Layout,
    inside: dict[int, Any],
    rows: int,
    *,
    caller: str,
    per_batch: str,
    ragged: str,
    pad_value: PadValue,
) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray], dict[str, tuple[Any, ...]], list[str]]:
    """Each leaf of ``layout`` as a column of ``rows`` rows: ``(columns, values, paths, names)``.

    ``per_row=`` items are stacked; a per-batch leaf is kept in ``values``, broadcast, or
    refused, as ``per_batch`` says.
    """
    columns: dict[str, np.ndarray] = {}
    values: dict[str, np.ndarray] = {}
    paths: dict[str, tuple[Any, ...]] = {}
    names: list[str] = []
    for index, (leaf, path, flat) in enumerate(
        zip(layout.leaves, layout.paths, layout.flat, strict=True)
    ):
        name = column_name(path, place=layout.place(index))
        names.append(name)
        paths[name] = path
        layout.complete(index, None, str(np.asarray(leaf).dtype))
        if flat in inside:
            _, per_item, j = inside[flat]
            columns[name] = stack_rows(
                [item[j] for item in per_item],
                path,
                ragged=ragged,
                pad_value=pad_value,
                caller=caller,
                place=layout.walked.place(flat),
            )
            continue
        array = np.asarray(leaf)
        if array.ndim and array.shape[0] == rows:
            columns[name] = array
        elif per_batch == "keep":
            values[name] = array
        elif per_batch == "broadcast":
            columns[name] = np.broadcast_to(array, (rows, *array.shape))
        else:
            raise _per_batch_error(caller, layout.place(index), array, rows, path)
    return columns, values, paths, names


def _per_batch_error(
    caller: str, place: str, array: np.ndarray, rows: int, path: tuple[Any, ...]
) -> ConversionError:
    what = "a 0-d value" if array.ndim == 0 else f"an array of shape {array.shape}"
    return ConversionError(
        f"{caller}: {place} is {what}, not one row per example ({rows} rows): a per-batch "
        "value (a loss, say). Leave it out with exclude=, or pass per_batch='broadcast' to "
        "repeat it on every row",
        path=path,
    )


def _check_plain_values(
    layout: _structure.Layout,
    *,
    rows: int,
    per_batch: str,
    caller: str,
    columns: dict[str, np.ndarray],
    names: list[str],
    paths: dict[str, tuple[Any, ...]],
) -> None:
    """Plain values (numbers, strings) are per-batch values: refused, or broadcast as columns."""
    walked = layout.walked
    first_leaf: dict[tuple[Any, ...], int] = {}  # stored path -> flat leaf index, made once

    def visit(node: Any, path: tuple[Any, ...]) -> None:
        if not isinstance(node, dict):
            return
        tag = node.get("t")
        if tag == "value" and node.get("v") is not None:
            if not first_leaf:
                first_leaf.update((n.path, n.first) for n in walked.nodes)
            place = walked.place(first_leaf[path])
            value = walked.leaves[first_leaf[path]]
            if per_batch == "error":
                raise ConversionError(
                    f"{caller}: {place} is a plain value ({type(value).__name__}), not one row "
                    "per example: a per-batch value. Leave it out with exclude=, or pass "
                    "per_batch='broadcast' to repeat it on every row",
                    path=path,
                )
            array = np.asarray(value)
            if array.dtype.hasobject:
                raise ConversionError(f"{caller}: {place} cannot be a column", path=path)
            name = column_name(path, place=place)
            columns[name] = np.broadcast_to(array, (rows,))
            paths[name] = path
            node.clear()
            node.update({"t": "array", "i": len(names)})
            names.append(name)
            return
        children = node.get("v")
        if tag in ("list", "tuple") and isinstance(children, list):
            for i, child in enumerate(children):
                visit(child, (*path, i))
        elif tag == "dict" and isinstance(children, list):
            for key, child in zip(node.get("k", []), children, strict=False):
                visit(child, (*path, _structure.decode_value(key)))

    visit(layout.structure["tree"], ())


# ------------------------------------------------------------------------------ public API


def to_columns(
    tree: Any,
    /,
    *,
    batch_size: int | None = None,
    per_batch: Literal["error", "broadcast"] = "error",
    per_row: Any = None,
    ragged: Ragged = "pad",
    pad_value: PadValue = None,
    reduce: Any = None,
    exclude: Any = None,
    ml_dtypes: bool = False,
    is_leaf: Callable[[Any], bool] | None = None,
) -> dict[str, np.ndarray]:
    """One batch as columns: ``{column name: array with one row per example}``.

    The UDF of Ray Data's ``map_batches`` and of Hugging Face datasets' ``map(batched=True)``
    returns this. The guide "Predictions at scale" explains rows, names and ragged rows.

    Examples:
        >>> import torch
        >>> out = {"logits": torch.ones(2, 3), "loss": torch.tensor(0.5)}
        >>> sorted(to_columns(out, exclude="loss"))
        ['logits']
        >>> to_columns(out, per_batch="broadcast")["loss"]
        array([0.5, 0.5], dtype=float32)
        >>> to_columns({"ids": [torch.arange(3), torch.arange(1)]}, per_row="ids", pad_value=-1)
        {'ids': array([[ 0,  1,  2],
               [ 0, -1, -1]])}

    Args:
        tree: One batch: any tree [`tonumpy.to_numpy`][] converts.
        batch_size: The number of rows; by default the first dimension most array leaves share.
        per_batch: ``"error"`` refuses a value that is not one row per example (a 0-d loss,
            an array whose first dimension is not the batch size, a plain number);
            ``"broadcast"`` repeats it on every row.
        per_row: A key-path pattern, or a list of them, naming lists or tuples that hold one
            value (an array, or a tree of them) per example.
        ragged: For ``per_row`` rows of different shapes: ``"pad"`` pads them to the largest
            with ``pad_value``, ``"object"`` keeps one array per row in an object column.
        pad_value: As [`tonumpy.Accumulator`][] takes it: a value, a mapping from key-path
            pattern to value, or a callable ``(path, dtype) -> value``.
        reduce: As [`tonumpy.Accumulator`][]: a mapping from key-path pattern to a function
            run on each tensor it covers, before anything is converted.
        exclude: As [`tonumpy.Accumulator`][]: key-path patterns of nodes to leave out.
        ml_dtypes: Keep bfloat16/float8 as ``ml_dtypes`` arrays instead of float32.
        is_leaf: As for [`tonumpy.to_numpy`][].

    Returns:
        A dict of arrays, each with the batch size as its first dimension, in tree order.

    Raises:
        ConversionError: A per-batch value with ``per_batch="error"``, rows of different
            shapes without a pad value, or a key that is not a ``str`` or ``int``; the
            message names where.
        OptionError: An option is not one this function takes.
    """
    _check_choice("to_columns", "per_batch", per_batch, ("error", "broadcast"))
    return tabulate(
        tree,
        caller="to_columns",
        batch_size=batch_size,
        per_batch=per_batch,
        per_row=per_row,
        ragged=ragged,
        pad_value=pad_value,
        reduce=reduce,
        exclude=exclude,
        ml_dtypes=ml_dtypes,
        is_leaf=is_leaf,
    ).columns


def column_structure(
    tree: Any,
    /,
    *,
    batch_size: int | None = None,
    per_batch: Literal["error", "broadcast"] = "error",
    per_row: Any = None,
    ragged: Ragged = "pad",
    pad_value: PadValue = None,
    reduce: Any = None,
    exclude: Any = None,
    ml_dtypes: bool = False,
    is_leaf: Callable[[Any], bool] | None = None,
) -> str:
    """The structure [`from_columns`][tonumpy.from_columns] rebuilds ``to_columns(tree, ...)`` with.

    Takes the options of [`tonumpy.to_columns`][] (``reduce=`` and ``exclude=`` change the
    structure). The structure is JSON text: it pickles, travels to and from workers, and fits in
    a file's metadata; it does not depend on the batch size or on the values.

    Examples:
        >>> import json, torch
        >>> structure = column_structure({"x": torch.ones(2), "h": [torch.ones(2, 3)]})
        >>> json.loads(structure)["arrays"]
        ['x', 'h.0']
    """
    table = tabulate(
        tree,
        caller="column_structure",
        batch_size=batch_size,
        per_batch=per_batch,
        per_row=per_row,
        ragged=ragged,
        pad_value=pad_value,
        reduce=reduce,
        exclude=exclude,
        ml_dtypes=ml_dtypes,
        is_leaf=is_leaf,
    )
    return json.dumps(table.structure, allow_nan=False, separators=(",", ":"))


def _column_array(value: Any) -> Any:
    """What an engine gives for a column, as a NumPy array or a list of per-row arrays."""
    if hasattr(value, "to_numpy") and not isinstance(value, np.ndarray):
        value = value.to_numpy()  # pandas and polars series, pyarrow arrays
    if isinstance(value, np.ndarray) and not value.dtype.hasobject:
        return value
    return [_row_array(row) for row in value]


def _row_array(row: Any) -> np.ndarray:
    if isinstance(row, np.ndarray) and row.dtype.hasobject:
        return np.stack([_row_array(r) for r in row]) if len(row) else np.empty(0)
    if isinstance(row, list):
        return np.asarray([_row_array(r) for r in row]) if row else np.empty(0)
    return np.asarray(row)


def from_columns(
    columns: Mapping[str, Any],
    structure: str | bytes | None = None,
    /,
    *,
    ragged: Ragged = "pad",
    pad_value: PadValue = None,
) -> Any:
    """Rebuild a tree from columns: those of one batch, or the rows of many.

    ``columns`` maps column names to arrays (or lists of per-row arrays, as engines return
    columns whose rows differ in shape between batches: Ray's ``take_batch``, a datasets
    ``Dataset[:]``, a pandas ``DataFrame``). Rows of one shape are stacked; rows of different
    shapes are padded to the largest with ``pad_value`` (``ragged="pad"``) or kept in an object
    array (``ragged="object"``), as [`tonumpy.Accumulator`][] would have joined the batches.
    Columns the structure does not name (a dataset's own columns) are left out.

    Examples:
        >>> import numpy as np
        >>> from_columns({"out.logits": np.ones((2, 3)), "out.hidden.0": np.zeros((2, 1))})
        {'out': {'logits': array([[1., 1., 1.],
               [1., 1., 1.]]), 'hidden': {0: array([[0.],
               [0.]])}}}
        >>> rows = [np.arange(3), np.arange(1)]  # two batches of other lengths
        >>> from_columns({"ids": rows}, pad_value=-1)
        {'ids': array([[ 0,  1,  2],
               [ 0, -1, -1]])}

    Args:
        columns: Column name -> column.
        structure: What [`column_structure`][tonumpy.column_structure] gives; without it, the
            tree is nested dicts keyed by [`key_path`][tonumpy.table.key_path].
        ragged: ``"pad"`` or ``"object"``, for columns whose rows differ in shape.
        pad_value: As [`tonumpy.Accumulator`][] takes it (its patterns are key paths).

    Raises:
        FileFormatError: The structure is not one ``column_structure`` made, or names a
            column that is missing, or the columns have different numbers of rows.
        ConversionError: Rows of different shapes without a pad value.
    """
    _check_choice("from_columns", "ragged", ragged, ("pad", "object"))
    check_pad_option(pad_value, "from_columns")
    lengths: dict[str, int] = {}

    def column(name: str) -> np.ndarray:
        if name not in columns:
            raise FileFormatError(f"the structure names a column {name!r} that is missing")
        value: Any = _column_array(columns[name])
        path = key_path(name)
        if isinstance(value, list):
            value = stack_rows(
                value,
                path,
                ragged=ragged,
                pad_value=pad_value,
                caller="from_columns",
                place=f"column {short(name, 60)}",
            )
        lengths[name] = len(value)
        if len(set(lengths.values())) > 1:
            raise FileFormatError(
                f"from_columns: the columns have different numbers of rows ({lengths})"
            )
        result: np.ndarray = value
        return result

    if structure is None:
        return nest({name: column(name) for name in columns})
    raw = structure.encode("utf-8") if isinstance(structure, str) else bytes(structure)
    tree, _, _ = _structure.decode(  # columns it does not name are left out: no members
        raw, "from_columns", lambda name, _dtype: column(name), (), "the structure"
    )
    data = json.loads(raw)
    per_row = data.get("per_row", [])
    if not isinstance(per_row, list):
        raise FileFormatError("from_columns: the structure's per_row is not a list")
    for stored in per_row:
        tree = split_rows(tree, tuple(stored) if isinstance(stored, list) else ())
    return tree


def nest(columns: Mapping[str, Any]) -> Any:
    """Columns as nested dicts keyed by [`key_path`][tonumpy.table.key_path] of their names.

    Examples:
        >>> nest({"a.0": 1, "a.b": 2, "c": 3})
        {'a': {0: 1, 'b': 2}, 'c': 3}
    """
    out: dict[Any, Any] = {}
    for name, value in columns.items():
        path = key_path(name)
        if not path:
            if len(columns) > 1:
                raise FileFormatError("a column named '' (the root) beside other columns")
            return value
        node = out
        for depth, key in enumerate(path[:-1]):
            child = node.setdefault(key, {})
            if not isinstance(child, dict):
                raise FileFormatError(
                    f"column {name!r} is inside column {column_name(path[: depth + 1])!r}"
                )
            node = child
        if path[-1] in node:
            raise FileFormatError(f"column {name!r} holds columns inside it")
        node[path[-1]] = value
    return out


def split_rows(tree: Any, path: tuple[Any, ...]) -> Any:
    """Replace the template at ``path`` (its leaves columns) by the list of each row's item."""
    if not path:
        return _rows_of(tree)
    if isinstance(tree, dict) and path[0] in tree:
        out = dict(tree)
        out[path[0]] = split_rows(tree[path[0]], path[1:])
        return out
    if isinstance(tree, list | tuple) and isinstance(path[0], int) and path[0] < len(tree):
        items = list(tree)
        items[path[0]] = split_rows(items[path[0]], path[1:])
        return type(tree)(items)
    raise FileFormatError(f"from_columns: the structure's per_row names a missing node {path}")


def _rows_of(template: Any) -> list[Any]:
    leaves, spec = _tree.flatten(template)
    n = len(leaves[0]) if leaves else 0
    return [_tree.unflatten(spec, [leaf[i] for leaf in leaves]) for i in range(n)]
