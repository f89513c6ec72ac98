"""``numpy_args``: a decorator that hands a function NumPy wherever it was passed tensors.

The other half of logging (with [`tonumpy.capture`][]): a logging function decorated with it
receives arrays (or, with ``scalars=True``, Python numbers) at any depth of any argument, while
``self`` of a decorated method is passed on as it is, decided by how the wrapper is bound.
"""

from __future__ import annotations

import functools
import types
from collections.abc import Callable
from typing import Any, Generic, TypeVar, cast, overload

import torch

from . import _options, _tree
from .convert import leaves_to_numpy
from .errors import OptionError

__all__ = ["numpy_args"]

R = TypeVar("R")


class _NumpyArgs(Generic[R]):
    """What [`numpy_args`][] returns: converts every argument, then calls the function.

    A descriptor, like a function: looked up on an instance (a method decorated in a class
    body), it binds that instance and passes it on as it is; looked up on the class
    (``Class.method(obj, ...)``), it passes a first argument that is an instance of the class
    as it is. Called directly (a plain function, a bound method or a ``functools.partial``
    that was decorated, a staticmethod), it converts every argument. Whether ``self`` is
    skipped is decided by that binding, never by a parameter's name.
    """

    def __init__(
        self,
        func: Callable[..., R],
        arg_to_numpy: Callable[[Any], Any],
        *,
        keep_first: bool = False,
    ) -> None:
        functools.update_wrapper(self, func)
        self.__dict__.pop("_bound_form", None)  # copied from func if func is one of us
        self._func = func
        self._arg_to_numpy = arg_to_numpy
        self._keep_first = keep_first  # the first argument is the bound instance (or class)

    def __call__(self, *args: Any, **kwargs: Any) -> R:
        arg_to_numpy = self._arg_to_numpy
        kept = args[:1] if self._keep_first else ()
        new_args = (*kept, *map(arg_to_numpy, args[len(kept) :]))
        return self._func(*new_args, **{key: arg_to_numpy(value) for key, value in kwargs.items()})

    def __get__(self, instance: Any, owner: type | None = None) -> Any:
        if instance is None:
            if owner is None:
                return self
            return _OnClass(self, owner)
        return types.MethodType(self._bound(), instance)

    def _bound(self) -> _NumpyArgs[R]:
        bound: _NumpyArgs[R] | None = self.__dict__.get("_bound_form")
        if bound is None:
            bound = _NumpyArgs(self._func, self._arg_to_numpy, keep_first=True)
            self.__dict__["_bound_form"] = bound
        return bound

    def __reduce__(self) -> str:
        # Pickled by reference, as the function it replaces was (a module-level name).
        name = self.__dict__.get("__qualname__")
        if not isinstance(name, str):
            msg = f"cannot pickle {self!r}: it has no qualified name to be found by"
            raise TypeError(msg)
        return name

    def __repr__(self) -> str:
        return f"<numpy_args wrapper of {self._func!r}>"


class _OnClass(Generic[R]):
    """``Class.method`` of a decorated method: ``Class.method(obj, x)`` as ``obj.method(x)``."""

    def __init__(self, wrapper: _NumpyArgs[R], owner: type) -> None:
        functools.update_wrapper(self, wrapper._func)  # noqa: SLF001 - the same module
        self._wrapper = wrapper
        self._owner = owner

    def __call__(self, *args: Any, **kwargs: Any) -> R:
        if args and isinstance(args[0], self._owner):
            return self._wrapper._bound()(*args, **kwargs)  # noqa: SLF001 - the same module
        return self._wrapper(*args, **kwargs)


@overload
def numpy_args(fn: Callable[..., R], /) -> Callable[..., R]: ...


@overload
def numpy_args(
    fn: None = None,
    /,
    *,
    copy: bool | None = None,
    ml_dtypes: bool = False,
    scalars: bool = False,
    is_leaf: Callable[[Any], bool] | None = None,
) -> Callable[[Callable[..., R]], Callable[..., R]]: ...


def numpy_args(
    fn: Callable[..., R] | None = None,
    /,
    *,
    copy: bool | None = None,
    ml_dtypes: bool = False,
    scalars: bool = False,
    is_leaf: Callable[[Any], bool] | None = None,
) -> Callable[..., R] | Callable[[Callable[..., R]], Callable[..., R]]:
    """Decorate a logging function so that it receives NumPy wherever it was passed tensors.

    Every argument, positional or keyword, is converted with [`tonumpy.to_numpy`][] at any
    depth of the containers tonumpy rebuilds (a dict of metrics, a list of tensors, a
    dataclass). An argument that holds no tensor is passed as the very same object. Any other
    object (a logger, a ``SummaryWriter``, a module, an optimizer) is passed on untouched and
    unsearched, at a cost independent of its size, unlike ``to_numpy``, which refuses such
    an object when it holds a tensor: here it is the logging function's own argument, not data
    leaving tonumpy. Use it bare (``@numpy_args``) or with options.

    Which arguments are "the function's own" follows how it is bound, not parameter names:

    * a method decorated in a class body gets its instance (``self``) unconverted, also when
      called as ``Class.method(obj, ...)``; so does a classmethod its class, in either
      decorator order;
    * a bound method (``numpy_args(logger.log)``), a ``functools.partial``, a staticmethod and
      a plain function get every argument they are called with converted, whatever the first
      parameter's name.

    Examples:
        >>> import torch
        >>> @numpy_args(scalars=True)
        ... def log(step, metrics, *, extra=None):
        ...     return step, metrics, extra
        >>> log(torch.tensor(3), {"loss": torch.tensor(0.5)}, extra=[torch.ones(2)])
        (3, {'loss': 0.5}, [array([1., 1.], dtype=float32)])
        >>> class Logger:
        ...     def log(self, value):
        ...         return type(value).__name__
        >>> numpy_args(Logger().log)(torch.ones(2))   # an existing bound method
        'ndarray'

    Args:
        fn: The function, when used bare as ``@numpy_args``.
        copy: As for [`tonumpy.to_numpy`][] (``True``: arrays that share no memory).
        ml_dtypes: As for [`tonumpy.to_numpy`][].
        scalars: Pass 0-d tensors as Python numbers (``metrics["loss"]`` becomes a float).
        is_leaf: As for [`tonumpy.to_numpy`][].

    Returns:
        The wrapped function (or, with options, a decorator that makes it).

    Raises:
        OptionError: ``copy``, ``ml_dtypes`` or ``scalars`` is not one of the values it takes
            (raised when decorating, before any call).
    """
    _options.check_copy(copy, "numpy_args")
    _options.check_flags("numpy_args", ml_dtypes=ml_dtypes, scalars=scalars)

    def arg_to_numpy(value: Any) -> Any:
        if _tree.is_opaque_type(type(value)):
            return value  # a logger, a writer, a module, a step number: a leaf, as it is
        leaves, spec = _tree.flatten(value, is_leaf=is_leaf, search=False)
        if not any(isinstance(leaf, torch.Tensor) for leaf in leaves):
            return value
        converted = leaves_to_numpy(leaves, spec, copy=copy, ml_dtypes=ml_dtypes, scalars=scalars)
        return _tree.unflatten(spec, converted)

    def decorate(func: Callable[..., R]) -> Callable[..., R]:
        given: Any = func  # may also be a staticmethod or classmethod object
        if isinstance(given, staticmethod):  # @numpy_args above @staticmethod
            wrapped: Any = staticmethod(_NumpyArgs(given.__func__, arg_to_numpy))
            return cast("Callable[..., R]", wrapped)
        if isinstance(given, classmethod):  # @numpy_args above @classmethod: cls stays as is
            wrapped = classmethod(_NumpyArgs(given.__func__, arg_to_numpy, keep_first=True))
            return cast("Callable[..., R]", wrapped)
        if not callable(given):
            raise OptionError(
                f"numpy_args() decorates a callable, got {type(given).__name__}: {given!r}"
            )
        return _NumpyArgs(func, arg_to_numpy)

    if fn is not None:
        return decorate(fn)
    return decorate
