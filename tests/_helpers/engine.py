"""A test double for the transfer engine's device side: CPU tensors travel as if on a GPU.

[`HostEngine`][] is passed in explicitly (``engine=`` of ``convert.start``/``leaves_to_numpy``,
``hooks._capturing``, an accumulator's ``_engine``) to run the engine's grouping, packing,
staging and unpacking with pageable blocks on a machine without CUDA. Its copies are made at
once but reported in flight until waited for, as a device's are before they land, so that
every caller's asynchronous path runs. It records each copy, for tests of the packing.
"""

from __future__ import annotations

from typing import Any

import torch

from tonumpy import _options, _tree
from tonumpy._convert import _transfer
from tonumpy._convert._transfer import PendingTransfer
from tonumpy.convert import leaves_to_numpy, start


class HostEvent:
    """Done once waited for (the copies themselves were synchronous)."""

    def __init__(self) -> None:
        self.synced = False

    def query(self) -> bool:
        return self.synced

    def synchronize(self) -> None:
        self.synced = True


class HostEngine(_transfer.CudaEngine):
    """Takes CPU tensors; ``devices`` maps ``id(tensor)`` to the device it poses as."""

    __slots__ = ("chunk_bytes", "copies", "devices", "small_bytes")

    takes_cpu = True
    pinned = False

    def __init__(
        self,
        *,
        small_bytes: int = _transfer.SMALL_BYTES,
        chunk_bytes: int = _transfer.CHUNK_BYTES,
        devices: dict[int, torch.device] | None = None,
    ) -> None:
        self.small_bytes = small_bytes
        self.chunk_bytes = chunk_bytes
        self.devices = {} if devices is None else devices
        #: Each copy made, as ``(source device, nbytes)``.
        self.copies: list[tuple[str, int]] = []

    def takes(self, t: torch.Tensor) -> bool:  # type: ignore[override]
        return t.device.type == "cpu"

    def device_of(self, t: torch.Tensor) -> torch.device:  # type: ignore[override]
        return self.devices.get(id(t), t.device)

    def active(self) -> bool:  # type: ignore[override]
        return True

    def copy(self, dst: torch.Tensor, src: torch.Tensor, device: torch.device) -> None:  # type: ignore[override]
        self.copies.append((str(device), dst.numel()))
        dst.copy_(src)

    def record(self, device: torch.device) -> Any:  # type: ignore[override]
        return HostEvent()


def pending_through(engine: HostEngine, tree: Any, **options: Any) -> PendingTransfer:
    """``tonumpy.to_numpy_async(tree, **options)`` with ``engine`` as the device side."""
    _options.check_copy(options.get("copy"), "to_numpy_async")
    leaves, spec, leaf_types = _tree.flatten_typed(tree, is_leaf=options.pop("is_leaf", None))
    return start(leaves, spec, leaf_types=leaf_types, engine=engine, **options)


def convert_through(engine: HostEngine, tree: Any, **options: Any) -> Any:
    """``tonumpy.to_numpy(tree, **options)`` with ``engine`` as the device side."""
    leaves, spec, leaf_types = _tree.flatten_typed(tree, is_leaf=options.pop("is_leaf", None))
    return _tree.unflatten(
        spec, leaves_to_numpy(leaves, spec, leaf_types=leaf_types, engine=engine, **options)
    )


class CudaSpy(_transfer.CudaEngine):
    """The production CUDA engine, in use (as once any CUDA tensor exists), recording each
    copy as ``(source device, nbytes)``."""

    __slots__ = ("copies",)

    def __init__(self) -> None:
        self.copies: list[tuple[str, int]] = []

    def active(self) -> bool:  # type: ignore[override]
        return True

    def copy(self, dst: torch.Tensor, src: torch.Tensor, device: torch.device) -> None:  # type: ignore[override]
        self.copies.append((str(device), dst.numel()))
        super().copy(dst, src, device)


def accumulating(acc: Any, engine: HostEngine) -> Any:
    """``acc`` (an ``Accumulator``), with ``engine`` as the device side of its transfers."""
    acc._engine = engine
    return acc
