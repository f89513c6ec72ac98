"""``Activations``: what [`tonumpy.capture`][] captured, a read-only mapping of calls.

Captured calls arrive from the hooks (possibly from several threads) as
[`PendingTransfer`][tonumpy.PendingTransfer]s: their device-to-host copies may still be in
flight. The mapping stores them, finishes the oldest ones whose copies have landed (so that
device memory held by captured calls stays bounded), and reads them, waiting where it must.
"""

from __future__ import annotations

import threading
from collections import deque
from collections.abc import Iterable, Iterator, Mapping
from typing import Any

from . import _options, _tree
from ._columns import join
from ._pad import PadValue, check_pad_option
from .errors import ConversionError

__all__ = ["Activations"]


class Activations(Mapping[str, list[Any]]):
    """What [`capture`][] captured: a read-only mapping from module name to calls.

    Keys are the names of the chosen modules, in ``named_modules()`` order (the root module is
    ``""``); each value is a new list of the captured trees, one per captured call, oldest
    first. A tree has the structure of what the module returned (or took), with arrays in place
    of tensors. Reading a call waits for its device-to-host copies if they are still running.

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
    """

    def __init__(self, names: Iterable[str], max_calls: int | None) -> None:
        self._calls: dict[str, deque[Any]] = {name: deque(maxlen=max_calls) for name in names}
        self._inflight: deque[Any] = deque()  # calls whose copies may still be running
        self._lock = threading.Lock()

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

    def __getitem__(self, name: str) -> list[Any]:
        with self._lock:
            calls = list(self._calls[name])
        return [call.result() for call in calls]

    def __iter__(self) -> Iterator[str]:
        return iter(self._calls)

    def __len__(self) -> int:
        return len(self._calls)

    def __contains__(self, name: object) -> bool:
        return name in self._calls

    def num_calls(self, name: str, /) -> int:
        """How many calls of module ``name`` are held (without reading any of them).

        Examples:
            >>> import torch, tonumpy
            >>> model = torch.nn.Linear(2, 2)
            >>> with tonumpy.capture(model) as acts:
            ...     _ = model(torch.ones(1, 2))
            >>> acts.num_calls("")
            1
        """
        with self._lock:
            return len(self._calls[name])

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
            KeyError: ``name`` is not a captured module.
            ConversionError: There is no call to join, or the calls differ in structure, or
                arrays at one place in the tree cannot be joined; the message names the place.
            OptionError: ``axis`` is not an int, or a ``pad_value`` callable cannot take
                ``(path, dtype)``.
        """
        axis = _options.check_axis(axis, "Activations.concat")
        check_pad_option(pad_value, "Activations.concat")
        calls = self[name]
        if not calls:
            raise ConversionError(
                f"module {name!r} has no captured call to concatenate; run a forward pass "
                "inside the capture block first (and check `every`)",
                path=None,
            )
        root = f"acts[{name!r}][i]"
        flat = [_tree.flatten(call) for call in calls]
        spec = flat[0][1]
        for number, (_, other) in enumerate(flat[1:], start=1):
            if not _tree.same_structure(other, spec):
                raise _tree.structure_error(
                    spec,
                    other,
                    "call 0",
                    f"call {number}",
                    hint=f"read the calls one by one with acts[{name!r}]",
                    root=root,
                )
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
            counts = {name: len(queue) for name, queue in self._calls.items()}
        inner = ", ".join(f"{name!r}: {n} call{'s' * (n != 1)}" for name, n in counts.items())
        return f"Activations({{{inner}}})"
