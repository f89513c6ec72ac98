"""Logging hooks: capture what modules take and return, as NumPy, without stalling the GPU.

[`capture`][] registers forward hooks on the modules of a model chosen by name (patterns over
``named_modules()`` names: ``tonumpy.hooks._module_patterns``; [`module_names`][] is the dry run),
and removes them when its ``with`` block ends, however it ends. Each captured call is detached at
once, so no autograd graph is kept alive, and copied, so later in-place changes made by the
model (``ReLU(inplace=True)``, optimiser steps) cannot reach it:

* CPU tensors are converted to independent arrays inside the hook (nothing to wait for);
* CUDA tensors are handed to tonumpy's transfer engine (the one behind
  [`tonumpy.to_numpy_async`][]): their copies into pinned host memory are enqueued on each
  device's current stream, and the hook returns without waiting for the GPU. The arrays are
  resolved (one wait per device on a recorded event) the first time the call is read, or, once
  their copies have landed, when a later call is captured;
* other devices (MPS, XPU, ...) cannot be copied asynchronously safely and are converted at once.

``reduce`` runs on the tensor's own device before anything moves, so a norm or a histogram
crosses the bus instead of the whole activation.

What was captured is read from an [`Activations`][tonumpy.Activations] mapping
(``tonumpy.hooks._activations``); [`tonumpy.numpy_args`][] (``tonumpy._numpy_args``) is the other
half of logging, a decorator that hands a logging function NumPy wherever it got tensors.
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Callable, Iterable, Iterator
from typing import Any

import torch

from .. import _options, _tree
from .._convert._transfer import CUDA, CudaEngine, PendingTransfer
from ..convert import start
from ..errors import CaptureError
from . import _module_patterns
from ._activations import Activations, open_activations
from ._module_patterns import ModulePattern

__all__ = ["Activations", "capture", "module_names"]

# -1 outside a backward pass; private, but what torch.utils.checkpoint itself relies on.
_graph_task_id: Callable[[], int] = getattr(
    torch._C,  # noqa: SLF001 - no public way to ask
    "_current_graph_task_id",
    lambda: -1,
)


def _in_backward() -> bool:
    """True while autograd runs a backward pass (activation checkpointing re-runs forwards)."""
    return _graph_task_id() != -1


# ------------------------------------------------------------------------------- the hooks


def _chosen(
    module: torch.nn.Module, include: object, exclude: object, *, stacklevel: int
) -> dict[str, torch.nn.Module]:
    """The modules of ``module`` that ``include`` and ``exclude`` choose, by name, in order.

    A pattern that matches nothing is warned about (``stacklevel``: the user's call).
    """
    modules = dict(module.named_modules())
    names = _module_patterns.choose(
        list(modules),
        _module_patterns.patterns(include, "include"),
        _module_patterns.patterns(exclude, "exclude"),
        owner=type(module).__name__,
        stacklevel=stacklevel + 1,
    )
    return {name: modules[name] for name in names}


def module_names(
    module: torch.nn.Module,
    /,
    *,
    include: ModulePattern | Iterable[ModulePattern] = "**",
    exclude: ModulePattern | Iterable[ModulePattern] = (),
) -> list[str]:
    r"""The names of the modules [`capture`][] would hook, with the same patterns: a dry run.

    Nothing is registered and nothing runs: call it to check a pattern before a long run.
    Inside a ``capture`` block, [`Activations.chosen`][tonumpy.Activations.chosen] gives
    the same names.

    Examples:
        >>> import re, torch, tonumpy
        >>> def block():
        ...     return torch.nn.Sequential(torch.nn.Linear(2, 2), torch.nn.ReLU())
        >>> layers = torch.nn.ModuleList(block() for _ in range(11))
        >>> model = torch.nn.ModuleDict({"encoder": layers})
        >>> names = tonumpy.module_names(model, include="encoder.*")  # '*': within a segment
        >>> len(names), names[-1]
        (11, 'encoder.10')
        >>> tonumpy.module_names(model, include="**.10.*")  # '**': any number of segments
        ['encoder.10.0', 'encoder.10.1']
        >>> tonumpy.module_names(model, include=re.compile(r"encoder\.1\d"))  # the whole name
        ['encoder.10']

    Args:
        module: The model.
        include: As for [`capture`][]: a glob pattern or a compiled regular expression over
            module names, or several; a module is chosen if any matches.
        exclude: As for [`capture`][]: patterns of names to leave out of those included.

    Returns:
        The chosen names, in ``module.named_modules()`` order.

    Raises:
        CaptureError: No module is chosen (the message lists the names there are and suggests
            a pattern), or a pattern is malformed.
    """
    if not isinstance(module, torch.nn.Module):
        raise CaptureError(f"module_names() needs a torch.nn.Module, got {type(module).__name__}")
    return list(_chosen(module, include, exclude, stacklevel=2))


class _ThreadState:
    """What the hooks keep per thread: calls of the root in progress, inputs awaiting outputs."""

    __slots__ = ("depth", "pending_inputs", "step")

    def __init__(self) -> None:
        self.depth = 0  # forwards of the root in progress in this thread (nested ones count)
        self.step = -1  # the number of this thread's outermost forward of the root
        self.pending_inputs: dict[str, list[Any]] = {}  # per module: a stack, for re-entry


class _Recorder:
    """The state the hooks share: which forward of the root this is, and how to store a call.

    Safe under threads without relying on the GIL: what belongs to one call (its inputs until
    its outputs arrive, the forward of the root it runs in) is kept per thread, and the counts
    shared by all threads (forwards of the root begun, calls of a module outside them) change
    under a lock. Forwards of the root are numbered across threads in the order they begin.
    """

    def __init__(
        self,
        add: Callable[[str, Any], None],
        *,
        every: int,
        reduce: Callable[[torch.Tensor], Any] | None,
        ml_dtypes: bool,
        scalars: bool,
        is_leaf: Callable[[Any], bool] | None,
        engine: CudaEngine,
    ) -> None:
        self.add = add  # stores one captured call in the Activations the user holds
        self.engine = engine
        self.every = every
        self.reduce = reduce
        self.ml_dtypes = ml_dtypes
        self.scalars = scalars
        self.is_leaf = is_leaf
        self.open = True
        self._lock = threading.Lock()
        self._threads = threading.local()
        self.root_steps = 0  # forwards of the root begun, in all threads
        self.own_calls: dict[str, int] = {}

    def thread_state(self) -> _ThreadState:
        """This thread's ``_ThreadState`` (made on first use)."""
        state: _ThreadState | None = getattr(self._threads, "state", None)
        if state is None:
            state = self._threads.state = _ThreadState()
        return state

    def close(self) -> None:
        """Stop recording; drop every thread's inputs still waiting for outputs."""
        self.open = False
        self._threads = threading.local()

    # -- which calls are captured
    def root_pre(self, _module: torch.nn.Module, _args: tuple[Any, ...]) -> None:
        if _in_backward():
            return
        state = self.thread_state()
        if state.depth == 0:
            with self._lock:
                state.step = self.root_steps
                self.root_steps += 1
        state.depth += 1

    def root_post(self, _module: torch.nn.Module, _args: tuple[Any, ...], _out: Any) -> None:
        if _in_backward():
            return
        state = self.thread_state()
        state.depth = max(state.depth - 1, 0)

    def wanted(self, name: str) -> bool:
        if self.every == 1:
            return True
        state = self.thread_state()
        if state.depth > 0:
            return state.step % self.every == 0
        with self._lock:  # called on its own, outside a forward of the root
            count = self.own_calls.get(name, 0)
            self.own_calls[name] = count + 1
        return count % self.every == 0

    # -- what is stored
    def freeze(self, tree: Any, name: str, what: str) -> PendingTransfer:
        """Reduce ``tree`` and start moving it to the host; never waits for a device.

        The router ([`tonumpy.convert`][]'s, as for every conversion) converts CPU tensors now,
        into arrays of their own (``copy=True``: later in-place changes by the model cannot
        reach them), and enqueues CUDA tensors' copies on their device's current stream, after
        whatever the model did so far and before anything it does later; the engine holds
        only detached tensors, so no autograd graph is kept alive. ``copy=True`` also makes
        the arrays of CUDA tensors compact, so the pinned staging block goes back to the pool
        as soon as the call is read, however long the arrays are kept.
        """
        try:
            leaves, spec, leaf_types = _tree.flatten_typed(tree, is_leaf=self.is_leaf)
            if self.reduce is not None:
                with torch.no_grad():
                    reduced = [
                        self.reduce(leaf.detach()) if isinstance(leaf, torch.Tensor) else leaf
                        for leaf in leaves
                    ]
                tree = _tree.unflatten(spec, reduced)
                leaves, spec, leaf_types = _tree.flatten_typed(tree, is_leaf=self.is_leaf)
            return start(
                leaves,
                spec,
                copy=True,
                ml_dtypes=self.ml_dtypes,
                scalars=self.scalars,
                leaf_types=leaf_types,
                engine=self.engine,
            )
        except Exception as exc:
            if hasattr(exc, "add_note"):
                exc.add_note(f"tonumpy.capture: while capturing the {what} of module {name!r}")
            raise


def _hooks(
    rec: _Recorder, name: str, inputs: bool, outputs: bool
) -> tuple[Callable[..., None] | None, Callable[..., None] | None]:
    """The forward pre-hook and forward hook (either may be None) for module ``name``."""

    def pre(_module: torch.nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        if not rec.open or _in_backward():
            return
        call = rec.freeze(_inputs_tree(args, kwargs), name, "inputs") if rec.wanted(name) else None
        if outputs:  # post_both pops it in this thread, also when forward raises
            rec.thread_state().pending_inputs.setdefault(name, []).append(call)
        elif call is not None:
            rec.add(name, call)

    def post_both(
        _module: torch.nn.Module, _args: tuple[Any, ...], _kwargs: dict[str, Any], out: Any
    ) -> None:
        # Registered with always_call=True: it also runs (with out=None) when forward raised,
        # so the inputs pushed by `pre` are always popped.
        if not rec.open or _in_backward():
            return
        # This thread's stack: a call's hooks run in the thread that makes the call, and a
        # re-entrant call of the same module pushes and pops above the outer call's inputs.
        stack = rec.thread_state().pending_inputs.get(name)
        if not stack:
            return
        taken = stack.pop()
        if taken is None:
            return
        rec.add(name, _Both(taken, rec.freeze(out, name, "outputs")))

    def post(
        _module: torch.nn.Module, _args: tuple[Any, ...], _kwargs: dict[str, Any], out: Any
    ) -> None:
        if not rec.open or _in_backward() or not rec.wanted(name):
            return
        rec.add(name, rec.freeze(out, name, "outputs"))

    if inputs and outputs:
        return pre, post_both
    if inputs:
        return pre, None
    return None, post


def _inputs_tree(args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
    return {"args": args, "kwargs": kwargs} if kwargs else args


class _Both:
    """A call captured with ``inputs=True, outputs=True``: ``{"inputs": ..., "outputs": ...}``."""

    __slots__ = ("inputs", "outputs")

    def __init__(self, inputs: PendingTransfer, outputs: PendingTransfer) -> None:
        self.inputs = inputs
        self.outputs = outputs

    def result(self) -> dict[str, Any]:
        return {"inputs": self.inputs.result(), "outputs": self.outputs.result()}

    def done(self) -> bool:
        return bool(self.inputs.done() and self.outputs.done())


@contextlib.contextmanager
def capture(
    module: torch.nn.Module,
    /,
    *,
    include: ModulePattern | Iterable[ModulePattern] = "**",
    exclude: ModulePattern | Iterable[ModulePattern] = (),
    inputs: bool = False,
    outputs: bool = True,
    every: int = 1,
    max_calls: int | None = None,
    reduce: Callable[[torch.Tensor], Any] | None = None,
    ml_dtypes: bool = False,
    scalars: bool = False,
    is_leaf: Callable[[Any], bool] | None = None,
) -> Iterator[Activations]:
    r"""Capture the outputs (and/or inputs) of chosen submodules as NumPy, inside a ``with`` block.

    Modules are chosen by patterns over the names ``module.named_modules()`` gives
    (``"encoder.layers.10.attn"``; the root is ``""``): glob patterns matched segment by segment
    (``*`` within one dotted segment, ``**`` for any number of segments), or compiled regular
    expressions matched against the whole name. [`module_names`][] lists what a pattern
    chooses without hooking anything. For each captured call the hook detaches every tensor
    (the autograd graph is never kept), applies ``reduce`` on the tensor's device, and starts
    the move to the host without waiting for the GPU; the arrays are ready when read from the
    returned [`Activations`][]. The hooks are removed when the block ends, also when it ends
    with an exception.

    Examples:
        >>> import torch, tonumpy
        >>> model = torch.nn.Sequential(
        ...     torch.nn.Linear(4, 8), torch.nn.ReLU(), torch.nn.Linear(8, 2)
        ... )
        >>> with tonumpy.capture(model, include=["0", "2"]) as acts:
        ...     logits = model(torch.randn(16, 4))
        >>> {name: calls[0].shape for name, calls in acts.items()}
        {'0': (16, 8), '2': (16, 2)}
        >>> with tonumpy.capture(model, exclude="", reduce=torch.linalg.norm) as acts:
        ...     _ = model(torch.randn(16, 4))
        >>> norms = acts["1"]
        >>> list(acts), norms[0].shape
        (['0', '1', '2'], ())

    Args:
        module: The model; its hooks are registered on it and its submodules.
        include: A pattern, or several, over module names; a module is chosen if any
            matches. In a glob pattern (a ``str``) ``*`` matches any characters within one
            dotted segment, ``?`` one character and ``[0-9]`` one of a set (never a dot), and a
            segment ``**`` matches zero or more whole segments: ``"encoder.layer.*"`` chooses
            the layers, ``"**.attention"`` every ``attention`` module at any depth,
            ``"encoder.**"`` ``encoder`` and everything in it, ``""`` the root module. A
            compiled regular expression (``re.compile(r"encoder\.layer\.(1[0-9]|2[0-3])")``)
            must match the whole name. The default ``"**"`` chooses every module, the root
            included.
        exclude: Patterns of names to leave out of those included, as for ``include``.
        inputs: Capture what each call takes. The tree is the tuple of positional arguments,
            or ``{"args": (...), "kwargs": {...}}`` when the call passed keyword arguments.
            Inputs are taken before the forward runs, so an in-place module cannot change them.
        outputs: Capture what each call returns. With both ``inputs`` and ``outputs`` a call
            is ``{"inputs": ..., "outputs": ...}`` (``outputs`` is ``None`` if forward raised),
            the inputs and outputs of one call, also when threads or re-entrant calls of the
            module overlap.
        every: Capture during every ``every``-th forward of ``module``: the 1st, the
            ``every + 1``-th, and so on, with every call of a chosen module made inside it. A
            chosen module called on its own, outside a forward of ``module``, counts its own
            calls instead. Forwards run by several threads at once are numbered in the order
            they begin, and the calls a forward makes in its thread follow its number.
        max_calls: Keep only the most recent ``max_calls`` calls of each module (``None``:
            keep all). Bounds host memory in a long training loop.
        reduce: Called on each captured tensor (detached, on its device, under
            ``torch.no_grad``); its result, a tensor or any tree of tensors, is captured
            instead, e.g. ``torch.linalg.norm`` or ``lambda t: {"mean": t.mean(), "std":
            t.std()}``. On CUDA choose a reduction that does not read values back
            (``torch.histc`` needs explicit ``min``/``max`` for that).
        ml_dtypes: As for [`tonumpy.to_numpy`][]: bfloat16/float8 as ``ml_dtypes`` arrays.
        scalars: As for [`tonumpy.to_numpy`][]: 0-d tensors as Python numbers.
        is_leaf: As for [`tonumpy.to_numpy`][]: nodes to keep whole.

    Yields:
        The [`Activations`][] mapping, filled as the model runs: a module appears in it once a
        call of it is captured ([`Activations.chosen`][tonumpy.Activations.chosen] lists every
        hooked module). Captured arrays never share memory with the model's tensors.

    Raises:
        CaptureError: No module name matches the patterns (the message lists the names and
            suggests a pattern), a pattern is malformed, or an option is out of range.
        OptionError: ``inputs``, ``outputs``, ``ml_dtypes`` or ``scalars`` is not exactly
            ``True`` or ``False``.
    """
    with _capturing(
        module,
        include=include,
        exclude=exclude,
        inputs=inputs,
        outputs=outputs,
        every=every,
        max_calls=max_calls,
        reduce=reduce,
        ml_dtypes=ml_dtypes,
        scalars=scalars,
        is_leaf=is_leaf,
        engine=CUDA,
    ) as acts:
        yield acts


@contextlib.contextmanager
def _capturing(
    module: torch.nn.Module,
    *,
    include: ModulePattern | Iterable[ModulePattern] = "**",
    exclude: ModulePattern | Iterable[ModulePattern] = (),
    inputs: bool = False,
    outputs: bool = True,
    every: int = 1,
    max_calls: int | None = None,
    reduce: Callable[[torch.Tensor], Any] | None = None,
    ml_dtypes: bool = False,
    scalars: bool = False,
    is_leaf: Callable[[Any], bool] | None = None,
    engine: CudaEngine,
) -> Iterator[Activations]:
    """[`capture`][] with the device side of the transfer engine passed in (see ``CudaEngine``)."""
    if not isinstance(module, torch.nn.Module):
        raise CaptureError(
            f"capture() needs a torch.nn.Module, got {type(module).__name__}; "
            "to convert a tree of tensors use tonumpy.to_numpy"
        )
    _options.check_flags(
        "capture", inputs=inputs, outputs=outputs, ml_dtypes=ml_dtypes, scalars=scalars
    )
    if not (inputs or outputs):
        raise CaptureError("inputs=False and outputs=False captures nothing; set one to True")
    if isinstance(every, bool) or not isinstance(every, int) or every < 1:
        raise CaptureError(f"every= must be a positive int, got {every!r}")
    if max_calls is not None and (
        isinstance(max_calls, bool) or not isinstance(max_calls, int) or max_calls < 1
    ):
        raise CaptureError(f"max_calls= must be a positive int or None, got {max_calls!r}")
    chosen = _chosen(module, include, exclude, stacklevel=3)  # under contextlib's __enter__
    acts, add = open_activations(chosen, max_calls, is_leaf=is_leaf)
    rec = _Recorder(
        add,
        every=every,
        reduce=reduce,
        ml_dtypes=ml_dtypes,
        scalars=scalars,
        is_leaf=is_leaf,
        engine=engine,
    )
    handles: list[torch.utils.hooks.RemovableHandle] = []
    try:
        if every > 1:  # count forwards of the root; runs before the chosen modules' hooks
            handles.append(module.register_forward_pre_hook(rec.root_pre, prepend=True))
        for name, sub in chosen.items():
            pre, post = _hooks(rec, name, inputs, outputs)
            if pre is not None:
                handles.append(sub.register_forward_pre_hook(pre, with_kwargs=True))
            if post is not None:
                handles.append(
                    sub.register_forward_hook(
                        post, with_kwargs=True, always_call=inputs and outputs
                    )
                )
        if every > 1:  # after the root's own capture hook, also when forward raises
            handles.append(module.register_forward_hook(rec.root_post, always_call=True))
        yield acts
    finally:
        rec.close()  # copies of the hooks (a deepcopy of the model) go quiet too
        for handle in handles:
            handle.remove()
