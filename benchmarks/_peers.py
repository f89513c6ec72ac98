"""The converters tonumpy is measured against, each called the way its users call it.

Every peer is optional: a peer whose package is missing is reported as "not installed", never a
crash. ``make(tree)`` prepares the input untimed (e.g. builds a TensorDict) and returns the
zero-argument call that is timed, or raises :class:`DoesNotFitError`.
"""

from __future__ import annotations

import importlib.util
import os
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

Call = Callable[[], Any]


class DoesNotFitError(Exception):
    """The peer cannot take this structure at all (not a failure of its output)."""


def _to_np(t: Any) -> Any:
    return t.detach().cpu().numpy()


def _guarded(x: Any) -> Any:
    return x.detach().cpu().numpy() if isinstance(x, torch.Tensor) else x


@dataclass(frozen=True)
class Peer:
    name: str
    package: str  # the importable module that must be present
    call: str  # how it is called, for the docs
    factory: Callable[[], Callable[[Any], Call]]  # imports the peer; returns make(tree)

    def installed(self) -> bool:
        if os.environ.get("TONUMPY_BENCH_NO_PEERS"):  # act as if none were installed (tests)
            return False
        try:
            return importlib.util.find_spec(self.package) is not None
        except (ImportError, ValueError):
            return False


def _transformers() -> Callable[[Any], Call]:
    from transformers.trainer_pt_utils import nested_detach, nested_numpify

    return lambda tree: lambda: nested_numpify(nested_detach(tree))


def _accelerate() -> Callable[[Any], Call]:
    from accelerate.utils import recursively_apply

    return lambda tree: lambda: recursively_apply(_to_np, tree)


def _lightning() -> Callable[[Any], Call]:
    from lightning_utilities.core.apply_func import apply_to_collection

    return lambda tree: lambda: apply_to_collection(tree, torch.Tensor, _to_np)


def _torch_pytree() -> Callable[[Any], Call]:
    from torch.utils._pytree import tree_map_only

    return lambda tree: lambda: tree_map_only(torch.Tensor, _to_np, tree)


def _dm_tree() -> Callable[[Any], Call]:
    import tree as dm_tree

    return lambda tree: lambda: dm_tree.map_structure(_guarded, tree)


def _fastai() -> Callable[[Any], Call]:
    from fastai.torch_core import to_np

    return lambda tree: lambda: to_np(tree)


def _tensordict() -> Callable[[Any], Call]:
    from tensordict import TensorDict

    def fits(node: Any) -> bool:
        if isinstance(node, torch.Tensor):
            return True
        return type(node) is dict and all(isinstance(k, str) and fits(v) for k, v in node.items())

    def make(tree: Any) -> Call:
        if type(tree) is not dict or not fits(tree):
            raise DoesNotFitError("TensorDict holds only string-keyed dicts of tensors")
        td = TensorDict(tree, batch_size=[])
        return td.numpy

    return make


PEERS: tuple[Peer, ...] = (
    Peer("transformers", "transformers", "nested_numpify(nested_detach(tree))", _transformers),
    Peer(
        "accelerate",
        "accelerate",
        "recursively_apply(lambda t: t.detach().cpu().numpy(), tree)",
        _accelerate,
    ),
    Peer(
        "lightning-utilities",
        "lightning_utilities",
        "apply_to_collection(tree, Tensor, lambda t: t.detach().cpu().numpy())",
        _lightning,
    ),
    Peer(
        "torch pytree",
        "torch",
        "torch.utils._pytree.tree_map_only(Tensor, lambda t: t.detach().cpu().numpy(), tree)",
        _torch_pytree,
    ),
    Peer(
        "dm-tree",
        "tree",
        "tree.map_structure(lambda x: x.detach().cpu().numpy() if tensor else x, tree)",
        _dm_tree,
    ),
    Peer("fastai", "fastai", "fastai.torch_core.to_np(tree)", _fastai),
    Peer(
        "tensordict",
        "tensordict",
        "TensorDict(tree, batch_size=[]).numpy() (untimed build)",
        _tensordict,
    ),
)


def load(peer: Peer) -> tuple[Callable[[Any], Call] | None, str | None]:
    """``(make, None)``, or ``(None, why)`` when the peer is missing or does not import."""
    if not peer.installed():
        return None, "not installed"
    try:
        return peer.factory(), None
    except Exception as exc:
        return None, f"does not import: {type(exc).__name__}: {exc}"[:300]
