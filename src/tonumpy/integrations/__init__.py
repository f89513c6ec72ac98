"""Framework knowledge the walker consults: each integration registers itself on import.

``tonumpy.integrations._transformers`` teaches the walker transformers' caches and
``BatchEncoding`` without importing transformers (a class is recognised by the names along its
MRO). The walker (``tonumpy._tree``) never imports this package: importing it registers each
integration through ``_tree._integrations.register_integration``, and the conversion layer
(``tonumpy.convert``), which every feature goes through, imports it.
"""

from __future__ import annotations

from .._tree._integrations import Integration, register_integration
from . import _transformers

__all__: list[str] = []

register_integration(
    Integration(
        "transformers",
        registrar=_transformers.registrar,
        attributes_are_state=_transformers.is_batch_encoding,
    )
)
