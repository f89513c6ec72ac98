"""numpy_args skips ``self`` by how the wrapper is bound, never by a parameter's name (12.8)."""

from __future__ import annotations

import functools
import inspect
import pickle
import warnings
from typing import Any

import numpy as np
import pytest
import torch

import tonumpy
from tonumpy import numpy_args


def kinds(*values: Any) -> tuple[str, ...]:
    return tuple(type(v).__name__ for v in values)


@numpy_args
def module_level(self: Any, value: Any) -> tuple[str, ...]:
    """A plain function whose first parameter happens to be called ``self``."""
    return kinds(self, value)


class Logger:
    """Methods of every kind, decorated in the class body, in both decorator orders."""

    def __init__(self) -> None:
        self.weights = torch.ones(2)  # an instance that holds a tensor: must not be converted

    def log(self, value: Any, step: Any = None) -> tuple[str, ...]:
        return kinds(self, value, step)

    @numpy_args
    def method(self, value: Any, step: Any = None) -> tuple[str, ...]:
        return kinds(self, value, step)

    @staticmethod
    @numpy_args
    def static_inner(self: Any, value: Any) -> tuple[str, ...]:  # noqa: PLW0211 - the point
        return kinds(self, value)

    @numpy_args
    @staticmethod
    def static_outer(self: Any, value: Any) -> tuple[str, ...]:  # noqa: PLW0211 - the point
        return kinds(self, value)

    @classmethod
    @numpy_args
    def class_inner(cls, value: Any) -> tuple[str, ...]:
        return (cls.__name__, *kinds(value))

    @numpy_args
    @classmethod
    def class_outer(cls, value: Any) -> tuple[str, ...]:
        return (cls.__name__, *kinds(value))


t = torch.ones(2)
T, A = "Tensor", "ndarray"


def test_a_bound_method_passed_in_converts_its_first_argument() -> None:
    """The repro: numpy_args(logger.log) converted nothing in the first real argument."""
    log = numpy_args(Logger().log)
    assert log(t) == ("Logger", A, "NoneType")
    assert log(t, step=t) == ("Logger", A, A)


def test_a_plain_function_with_a_first_parameter_named_self() -> None:
    """A plain function whose first parameter is named self converts that argument too."""
    assert module_level(t, t) == (A, A)


def test_methods_decorated_in_the_class_body_keep_their_instance() -> None:
    """A method decorated in its class keeps self unconverted, bound or called on the class."""
    logger = Logger()
    assert logger.method(t, t) == ("Logger", A, A)
    assert Logger.method(logger, t) == ("Logger", A, "NoneType")  # the unbound call
    assert isinstance(logger.weights, torch.Tensor)


def test_a_method_called_on_the_class_with_something_else_converts_it() -> None:
    """A method called on the class with a tensor in place of self converts that tensor."""
    assert Logger.method(t, t) == (A, A, "NoneType")


@pytest.mark.parametrize("name", ["static_inner", "static_outer"])
def test_staticmethods_convert_every_argument(name: str) -> None:
    """A staticmethod converts every argument, called on the class or an instance."""
    for owner in (Logger, Logger()):
        assert getattr(owner, name)(t, t) == (A, A)


@pytest.mark.parametrize("name", ["class_inner", "class_outer"])
def test_classmethods_keep_their_class(name: str) -> None:
    """A classmethod keeps its class argument and converts the others."""
    for owner in (Logger, Logger()):
        assert getattr(owner, name)(t) == ("Logger", A)


def test_partials() -> None:
    """A partial converts the arguments of the call, not the ones it already holds."""
    logger = Logger()
    assert numpy_args(functools.partial(Logger.log, logger))(t) == ("Logger", A, "NoneType")
    # what the partial itself holds is not an argument of the call: it stays as it is
    assert numpy_args(functools.partial(Logger.log, logger, t))(step=t) == ("Logger", T, A)


def test_a_callable_object() -> None:
    """A callable object is decorated like a function: its call's arguments convert."""

    class Sink:
        def __call__(self, value: Any) -> str:
            return type(value).__name__

    assert numpy_args(Sink())(t) == A


def test_options_apply_on_every_binding() -> None:
    """The decorator's options (scalars=True) hold for methods and bound methods alike."""

    class Metrics:
        @numpy_args(scalars=True)
        def record(self, loss: Any) -> Any:
            return loss

    assert Metrics().record(torch.tensor(0.5)) == 0.5
    assert numpy_args(scalars=True)(Metrics().record)(torch.tensor(0.5)) == 0.5


def test_the_wrapper_looks_like_the_function() -> None:
    """The wrapper keeps the function's name, docstring, signature and bound instance."""
    logger = Logger()
    assert Logger.method.__name__ == "method"
    assert logger.method.__name__ == "method"
    assert Logger.method.__doc__ == Logger.__dict__["method"].__doc__
    assert list(inspect.signature(logger.method).parameters) == ["value", "step"]
    assert list(inspect.signature(module_level).parameters) == ["self", "value"]
    assert logger.method.__self__ is logger


def test_module_level_wrappers_pickle_by_reference() -> None:
    """A decorated module-level function pickles by reference, as the function would."""
    assert pickle.loads(pickle.dumps(module_level)) is module_level


def test_arrays_and_other_arguments_pass_as_they_are() -> None:
    """Arrays and non-tensor arguments are passed through as the same objects."""
    arr = np.ones(2)
    meta = {"name": "run"}
    out = numpy_args(lambda a, b: (a, b))(arr, meta)
    assert out[0] is arr
    assert out[1] is meta


def test_not_a_callable() -> None:
    """Decorating something that is not callable is an OptionError."""
    with pytest.raises(tonumpy.OptionError, match="decorates a callable"):
        numpy_args(3)  # type: ignore[call-overload]


def test_decorating_twice_applies_both_options() -> None:
    """Two stacked numpy_args decorators apply both their options, on every call."""

    class Metrics:
        @numpy_args(copy=True)
        @numpy_args(scalars=True)
        def record(self, loss: Any, values: Any) -> Any:
            return loss, values

    metrics = Metrics()
    for _ in range(2):  # the second call reuses the cached bound form
        loss, values = metrics.record(torch.tensor(0.5), torch.ones(2))
        assert loss == 0.5
        assert isinstance(values, np.ndarray)


class GrowingLogger:
    """A logger whose history grows with training (every call adds an entry)."""

    def __init__(self, entries: int) -> None:
        self.history: list[dict[str, Any]] = [{"value": 0.1, "step": i} for i in range(entries)]
        self.weights = torch.ones(2)  # a tensor of its own: not an argument's data

    def add_scalar(self, tag: str, value: Any, step: int) -> str:
        self.history.append({"tag": tag, "value": value, "step": step})
        return type(value).__name__


@pytest.mark.parametrize("entries", [10, 200_000], ids=["small", "large"])
def test_a_logger_argument_is_passed_on_unsearched(entries: int) -> None:
    """A logger, a module and an optimizer are passed on as themselves, never searched: a
    history of 200,000 entries (past the to_numpy search budget) changes nothing (issue 20.5)."""
    logger = GrowingLogger(entries)
    model = torch.nn.Linear(2, 2)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)

    @numpy_args(scalars=True)
    def log(writer: Any, module: Any, opt: Any, step: int, metrics: dict[str, Any]) -> Any:
        assert writer is logger
        assert module is model
        assert opt is optimizer
        return [writer.add_scalar(k, v, step) for k, v in metrics.items()]

    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no UncheckedObjectWarning either: nothing is searched
        assert log(logger, model, optimizer, 3, {"loss": torch.tensor(0.5)}) == ["float"]
    assert isinstance(logger.weights, torch.Tensor)
    assert logger.history[-1]["value"] == 0.5
