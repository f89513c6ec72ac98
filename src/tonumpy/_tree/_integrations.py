"""How framework knowledge reaches the walker: integrations register here, the walker asks.

The walker knows Python's and optree's containers, and rebuilds other containers generically
(``_containers``). A framework whose objects need more (transformers' caches and
``BatchEncoding``) describes them in an [`Integration`][tonumpy._tree._integrations.Integration]
from ``tonumpy.integrations``, which registers it when the conversion layer is imported. The
walker never imports an integration: it consults whatever is registered, in registration order.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import Any, NamedTuple

__all__ = ["Integration", "attributes_are_state", "register_integration", "registrar"]

Register = Callable[[type[Any]], None]


class Integration(NamedTuple):
    """One framework's containers, as the walker needs to know them.

    Attributes:
        name: The framework (``"transformers"``), for messages and for registering once.
        registrar: For a class, how to register it with the walker (a function of the class),
            or ``None`` when the class is not this framework's special container.
        attributes_are_state: Whether a class's attribute children are the object's own state
            (kept with the rows in memory, never written to files) rather than data.
    """

    name: str
    registrar: Callable[[type[Any]], Register | None]
    attributes_are_state: Callable[[type[Any]], bool]


_lock = threading.Lock()
_registered: tuple[Integration, ...] = ()  # replaced under _lock, read anywhere


def register_integration(integration: Integration) -> None:
    """Make ``integration`` known to the walker (registering one name again replaces it)."""
    global _registered  # noqa: PLW0603 - replaced whole under the lock, never mutated
    with _lock:
        others = tuple(i for i in _registered if i.name != integration.name)
        _registered = (*others, integration)


def registrar(cls: type[Any]) -> Register | None:
    """How the first integration that knows ``cls`` registers it, or ``None``."""
    for integration in _registered:
        register = integration.registrar(cls)
        if register is not None:
            return register
    return None


def attributes_are_state(cls: type[Any]) -> bool:
    """Whether an integration says the attribute children of ``cls`` are state, not data.

    Examples:
        >>> import tonumpy.convert  # the conversion layer registers the integrations
        >>> from transformers import BatchEncoding
        >>> attributes_are_state(BatchEncoding), attributes_are_state(dict)
        (True, False)
    """
    return any(integration.attributes_are_state(cls) for integration in _registered)
