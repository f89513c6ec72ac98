"""``Activations``: what [`tonumpy.capture`][] captured, a read-only mapping of calls.

Captured calls arrive from the hooks (possibly from several threads) as
[`PendingTransfer`][tonumpy.PendingTransfer]s: their device-to-host copies may still be in
flight. The mapping stores them, finishes the oldest ones whose copies have landed (so that
device memory held by captured calls stays bounded), and reads them, waiting where it must.
"""

from __future__ import annotations

import threading
from collections import deque
from collections.abc import Callable, ItemsView, Iterable, Iterator, Mapping, ValuesView
from typing import Any

import numpy as np

from .. import _options, _tree
from .._combine._columns import join
from .._combine._pad import PadValue, check_pad_option
from ..errors import ConversionError, OptionError

__all__ = ["Activations", "open_activations"]

# the leaves Activations.arrays gives: arrays and numbers (of scalars=True captures)
_NUMERIC = (np.ndarray, np.number, np.bool_, int, float, complex)


class Activations(Mapping[str, list[Any]]):
    """What [`capture`][] captured: a read-only mapping from module name to calls.

    Keys are the names of the hooked modules that have a captured call, in ``named_modules()``
    order (the root module is ``""``): a module that never ran (a ``ModuleList``, a dropout
    that an attention kernel skips), or whose calls ``every`` skipped or [`clear`][] forgot, is
    not in the mapping, and reading it raises ``KeyError``; [`chosen`][] lists every hooked
    module. Each value is a new list of the captured trees, one per captured call, oldest first.
    A tree has the structure of what the module returned (or took), with arrays in place of
    tensors. Reading a call waits for its device-to-host copies if they are still running.

    The object stays readable after the ``with`` block ends; [`clear`][] forgets what was
    captured so far (the hooks, while the block runs, keep capturing).

    Examples:
        >>> import torch, tonumpy
        >>> model = torch.nn.Sequential(torch.nn.Linear(3, 2), torch.nn.ReLU())
        >>> with tonumpy.capture(model, include="0") as acts:
        ...     _ = model(torch.ones(4, 3))
        ...     _ = model(torch.ones(1, 3))
        >>> calls = acts["0"]
        >>> list(acts), len(calls), calls[0].shape
        (['0'], 2, (4, 2))
        >>> acts.concat("0").shape
        (5, 2)
        >>> unused = torch.nn.ModuleDict({"used": torch.nn.ReLU(), "spare": torch.nn.ReLU()})
        >>> with tonumpy.capture(unused, exclude="") as acts:
        ...     _ = unused["used"](torch.ones(1))
        >>> acts.chosen, list(acts)
        (('used', 'spare'), ['used'])
    """

    def __init__(
        self,
        names: Iterable[str],
        max_calls: int | None,
        *,
        is_leaf: Callable[[Any], bool] | None = None,
    ) -> None:
        self._calls: dict[str, deque[Any]] = {name: deque(maxlen=max_calls) for name in names}
        self._is_leaf = is_leaf  # capture's: the nodes it kept whole stay whole in arrays()
        self._chosen = tuple(self._calls)
        self._inflight: deque[Any] = deque()  # calls whose copies may still be running
        self._lock = threading.Lock()

    @property
    def chosen(self) -> tuple[str, ...]:
        """The names of every hooked module, in ``named_modules()`` order, called or not.

        The names [`module_names`][tonumpy.module_names] gives for the same patterns; the
        mapping itself holds only those with a captured call.
        """
        return self._chosen

    def _add(self, name: str, call: Any) -> None:
        """Store a call; finish the oldest calls whose copies have landed (never waits).

        Finishing lets the engine drop the device tensors it holds until then, so device
        memory held by captured calls stays bounded by what is still in flight.
        """
        landed = []
        with self._lock:
            self._calls[name].append(call)
            if not call.done():
                self._inflight.append(call)
            inflight = self._inflight
            while inflight and inflight[0].done():
                landed.append(inflight.popleft())
        for done in landed:
            done.result()

    def _missing(self, name: object) -> KeyError:
        """The KeyError for ``name``: not hooked, or hooked with no captured call."""
        if name in self._calls:
            return KeyError(
                f"module {name!r} is hooked but has no captured call: it has not run since "
                "the capture began or since clear() (or `every` skipped its calls); "
                "acts.chosen lists every hooked module, list(acts) those with calls"
            )
        return KeyError(
            f"{name!r} is not a hooked module; acts.chosen lists the {len(self._chosen)} that are"
        )

    def _pending(self, name: object) -> list[Any]:
        """The calls held for hooked module ``name``, not yet read (maybe none)."""
        with self._lock:
            queue = self._calls.get(name)  # type: ignore[call-overload]  # any object
            if queue is not None:
                return list(queue)
        raise self._missing(name)

    def __getitem__(self, name: str) -> list[Any]:
        pending = self._pending(name)
        if not pending:
            raise self._missing(name)
        return [call.result() for call in pending]

    def _held(self) -> list[tuple[str, list[Any]]]:
        """Every module with calls, and its calls (not yet read), taken at one instant."""
        with self._lock:
            return [(name, list(queue)) for name, queue in self._calls.items() if queue]

    def __iter__(self) -> Iterator[str]:
        with self._lock:
            names = [name for name, queue in self._calls.items() if queue]
        return iter(names)

    def __len__(self) -> int:
        with self._lock:
            return sum(1 for queue in self._calls.values() if queue)

    def __contains__(self, name: object) -> bool:
        with self._lock:
            return bool(self._calls.get(name))  # type: ignore[call-overload]  # any object

    def items(self) -> ItemsView[str, list[Any]]:
        """Each module with calls and its calls, as one snapshot (threads may add calls)."""
        return _Items(self)

    def values(self) -> ValuesView[list[Any]]:
        """The calls of each module with calls, as one snapshot (threads may add calls)."""
        return _Values(self)

    def arrays(self, *, call: int = -1) -> dict[str, Any]:
        """Every array of one call of each module, flat, by where it is: what loggers take.

        For each module with calls, in mapping order, its call number ``call`` (by default the
        most recent) is flattened to its arrays and numbers; each is keyed by the module name
        followed by its place in the call, written as in tonumpy's error messages: the name
        alone for a call that is one array, ``name[0]`` for the first item of a tuple (an
        attention module's output), ``name['logits']`` for a ``ModelOutput`` field,
        ``name.x`` for a namedtuple or dataclass field. ``None``, strings and other leaves that
        are not numeric (nodes capture's ``is_leaf`` kept whole too) are left out, so a module
        that returned only ``None`` gives nothing.

        Examples:
            >>> import torch, tonumpy
            >>> class Attention(torch.nn.Module):  # returns (output, weights), as HF layers do
            ...     def forward(self, x):
            ...         return x * 2, None
            >>> model = torch.nn.Sequential(torch.nn.Linear(3, 3), Attention())
            >>> with tonumpy.capture(model, exclude="") as acts:
            ...     _ = model(torch.ones(2, 3))
            >>> {key: value.shape for key, value in acts.arrays().items()}
            {'0': (2, 3), '1[0]': (2, 3)}

        Args:
            call: Which call of each module: an index into ``acts[name]`` (``-1``: the last,
                ``0``: the first).

        Returns:
            A new dict from key to array (or number, for ``scalars=True`` captures).

        Raises:
            IndexError: A module has no call number ``call``; the message names it.
            ConversionError: Two arrays would get one key (a namedtuple field named like a
                submodule).
            OptionError: ``call`` is not an int.
        """
        if isinstance(call, bool) or not isinstance(call, int):
            raise OptionError(f"Activations.arrays(call={call!r}): call= takes an int index")
        out: dict[str, Any] = {}
        for name, pending in self._held():
            if not -len(pending) <= call < len(pending):
                raise IndexError(
                    f"Activations.arrays(call={call}): module {name!r} has {len(pending)} "
                    "captured call(s)"
                )
            leaves, spec = _tree.flatten(pending[call].result(), is_leaf=self._is_leaf)
            for leaf, (path, key) in zip(leaves, _tree.leaf_paths(spec, root=name), strict=True):
                if not isinstance(leaf, _NUMERIC):
                    continue
                if key in out:
                    raise ConversionError(
                        f"Activations.arrays(): two arrays would be named {key!r} (module "
                        f"{name!r} and a module before it); read acts[{name!r}] instead",
                        path=path,
                    )
                out[key] = leaf
        return out

    def num_calls(self, name: str, /) -> int:
        """How many calls of module ``name`` are held (without reading any of them).

        ``0`` for a hooked module with no captured call; ``KeyError`` for a name that is not
        hooked.

        Examples:
            >>> import torch, tonumpy
            >>> model = torch.nn.Linear(2, 2)
            >>> with tonumpy.capture(model) as acts:
            ...     _ = model(torch.ones(1, 2))
            >>> acts.num_calls("")
            1
        """
        return len(self._pending(name))

    def done(self) -> bool:
        """True if every captured call can be read without waiting for a device.

        A training loop can poll this to log only once the copies have landed.
        """
        with self._lock:
            calls = [call for queue in self._calls.values() for call in queue]
        return all(call.done() for call in calls)

    def clear(self) -> None:
        """Forget every captured call (the modules stay chosen and hooked).

        Examples:
            >>> import torch, tonumpy
            >>> model = torch.nn.Linear(2, 2)
            >>> with tonumpy.capture(model) as acts:
            ...     _ = model(torch.ones(1, 2))
            ...     acts.clear()
            ...     _ = model(torch.ones(1, 2))
            >>> len(acts[""])
            1
        """
        with self._lock:
            for queue in self._calls.values():
                queue.clear()
            self._inflight.clear()

    def concat(self, name: str, /, *, axis: int = 0, pad_value: PadValue = None) -> Any:
        """One tree for module ``name``: each leaf joined across the captured calls.

        The column policy of [`tonumpy.concat`][], with the same meaning for ``axis`` and
        ``pad_value``: arrays are concatenated along ``axis`` (a smaller last batch is fine),
        and padded with ``pad_value`` where calls differ in another dimension (sequences of
        different lengths); 0-d arrays (a ``reduce`` to a scalar) are stacked into a 1-d array;
        any other leaf (Python numbers from ``scalars=True`` too) becomes the list of its
        values, one per call.

        Examples:
            >>> import torch, tonumpy
            >>> model = torch.nn.Linear(2, 3)
            >>> with tonumpy.capture(model, reduce=lambda t: {"mean": t.mean()}) as acts:
            ...     for _ in range(4):
            ...         _ = model(torch.ones(5, 2))
            >>> acts.concat("")["mean"].shape
            (4,)
            >>> ident = torch.nn.Identity()
            >>> with tonumpy.capture(ident) as acts:
            ...     _ = ident(torch.ones(1, 2))
            ...     _ = ident(torch.ones(1, 3))
            >>> acts.concat("", pad_value=-1.0)
            array([[ 1.,  1., -1.],
                   [ 1.,  1.,  1.]], dtype=float32)

        Args:
            name: A module name (a key of this mapping).
            axis: The axis arrays are joined along.
            pad_value: How to pad leaves whose calls differ in size along another axis, as for
                [`tonumpy.concat`][]: a value, a mapping from key path to value, or a callable
                ``(path, dtype) -> value``. ``None`` makes such leaves an error.

        Returns:
            A tree with the structure of one call.

        Raises:
            KeyError: ``name`` is not a hooked module.
            ConversionError: The module has no captured call to join, or the calls differ in
                structure, or arrays at one place in the tree cannot be joined; the message
                names the place.
            OptionError: ``axis`` is not an int, or a ``pad_value`` callable cannot take
                ``(path, dtype)``.
        """
        axis = _options.check_axis(axis, "Activations.concat")
        check_pad_option(pad_value, "Activations.concat")
        pending = self._pending(name)
        if not pending:
            raise ConversionError(
                f"module {name!r} has no captured call to concatenate; run a forward pass "
                "inside the capture block first (and check `every`)",
                path=None,
            )
        calls = [call.result() for call in pending]
        root = f"acts[{name!r}][i]"
        flat = [_tree.flatten(call) for call in calls]
        spec = flat[0][1]
        hint = f"read the calls one by one with acts[{name!r}]"
        for number, (_, other) in enumerate(flat[1:], start=1):
            _tree.require_same(spec, other, "call 0", f"call {number}", hint=hint, root=root)
        return join(
            [leaves for leaves, _ in flat],
            spec,
            axis=axis,
            pad_value=pad_value,
            name=lambda i: f"call {i}",
            noun="calls",
            root=root,
        )

    def __repr__(self) -> str:
        with self._lock:
            counts = {name: len(queue) for name, queue in self._calls.items() if queue}
        inner = ", ".join(f"{name!r}: {n} call{'s' * (n != 1)}" for name, n in counts.items())
        return f"Activations({{{inner}}})"


class _Items(ItemsView[str, list[Any]]):
    """``Activations.items()``: the modules with calls and their calls, taken at one instant."""

    def __init__(self, acts: Activations) -> None:
        super().__init__(acts)
        self._acts = acts

    def __iter__(self) -> Iterator[tuple[str, list[Any]]]:
        for name, pending in self._acts._held():  # noqa: SLF001 - the mapping's own view
            yield name, [call.result() for call in pending]


class _Values(ValuesView[list[Any]]):
    """``Activations.values()``: the calls of each module with calls, taken at one instant."""

    def __init__(self, acts: Activations) -> None:
        super().__init__(acts)
        self._acts = acts

    def __iter__(self) -> Iterator[list[Any]]:
        for _, pending in self._acts._held():  # noqa: SLF001 - the mapping's own view
            yield [call.result() for call in pending]


def open_activations(
    names: Iterable[str],
    max_calls: int | None,
    *,
    is_leaf: Callable[[Any], bool] | None = None,
) -> tuple[Activations, Callable[[str, Any], None]]:
    """A new, empty mapping for ``capture``, and the one function that stores calls in it.

    The mapping is read-only for its users; whoever opens it holds its writer,
    ``add(name, call)`` (store one captured call of module ``name``), and hands it to the hooks.
    """
    acts = Activations(names, max_calls, is_leaf=is_leaf)
    return acts, acts._add  # noqa: SLF001 - the class is this module's own
