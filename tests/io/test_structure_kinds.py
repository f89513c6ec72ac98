"""The structure a file stores for each container kind, pinned byte for byte.

The file format asks the walker what kind of container a node is; the JSON it writes for the
same tree must not change with where that classification lives. The expected bytes were
written by tonumpy before the classification moved into the walker
(``tests/data/format_v1/kinds.json``).
"""

from __future__ import annotations

import json
import types
from collections import ChainMap, OrderedDict, UserList
from pathlib import Path
from typing import Any

import pytest
import torch

from _helpers.trees import CONTAINERS
from tonumpy._format import _structure

KINDS = Path(__file__).resolve().parents[1] / "data" / "format_v1" / "kinds.json"


def _extra_kinds() -> dict[str, Any]:
    """Containers beside ``CONTAINERS``: the standard library's and torch's."""
    a, b = torch.arange(3.0), torch.ones(2, dtype=torch.int32)
    return {
        "user_list": UserList([a, 2]),
        "namespace": types.SimpleNamespace(a=a, b="s"),
        "chain_map": ChainMap({"a": a}, {"b": b}),
        "mapping_proxy": types.MappingProxyType({"a": a, "b": b}),
        "ordered_dict_nested": OrderedDict(z=[a, (b, None)]),
        "return_type": torch.max(torch.arange(6.0).reshape(2, 3), dim=0),
        "empty": {"d": {}, "l": [], "t": ()},
    }


def _trees() -> dict[str, Any]:
    a, b = torch.arange(3.0), torch.ones(2, dtype=torch.int32)
    trees = {kind: make(a, b) for kind, (make, _) in CONTAINERS.items()}
    trees.update(_extra_kinds())
    return trees


def structure_text(tree: Any) -> str:
    """The JSON structure a file stores for ``tree`` (every array completed as written)."""
    layout = _structure.layout(tree, ml_dtypes=False)
    for index in range(len(layout.names)):
        layout.complete(index, None, str(layout.array(index)[0].dtype))
    return layout.structure_bytes().decode()


@pytest.mark.parametrize("kind", sorted(_trees()))
def test_each_container_kind_stores_the_structure_it_stored_before(kind: str) -> None:
    """Each container kind's stored JSON is byte-identical to what tonumpy wrote before."""
    expected = json.loads(KINDS.read_text())
    assert structure_text(_trees()[kind]) == expected[kind]


def test_a_batch_encoding_stores_the_structure_it_stored_before() -> None:
    """A BatchEncoding (attributes that are tokenizer state) stores the same JSON as before."""
    transformers = pytest.importorskip("transformers")
    import tonumpy.convert  # noqa: F401 - the conversion layer registers the integrations

    encoding = transformers.BatchEncoding({"input_ids": torch.arange(4).reshape(2, 2)})
    expected = json.loads(KINDS.read_text())
    assert structure_text({"inputs": encoding}) == expected["batch_encoding"]
