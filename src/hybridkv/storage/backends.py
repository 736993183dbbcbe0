"""Pool buffers: the bytes behind one pool group on one tier.

Every buffer is a 2-D array of ``num_slots x slot_bytes`` uint8 (slot-major, see pages.py):

- ``NumpyBuffer``: host memory (the stand-in device in CPU tests, and the host tier);
- ``DiskBuffer``: a file-backed NumPy memmap (the disk tier);
- ``TorchBuffer`` (storage/torch_backend.py): a torch tensor on CPU, pinned CPU or CUDA.

Slots are read and written in bulk; the copy engine (copy.py) moves them between buffers.

Backends are found by name in a registry (``register_backend``), so a new tier is a new file
that registers its factory: "numpy" and "disk" are registered here, "torch" too but lazily (its
module, and torch, are imported only when a torch buffer is made: the core needs NumPy only).
A backend whose transfers complete later also implements ``storage.jobs.AsyncTier``.
"""

from __future__ import annotations

import importlib
import os
import tempfile
from collections.abc import Callable
from typing import Any, Protocol

import numpy as np
import numpy.typing as npt

from hybridkv.core.errors import ConfigError

ByteArray = npt.NDArray[np.uint8]


class PoolBuffer(Protocol):
    """``num_slots x slot_bytes`` bytes; ``kind`` says where ("numpy", "disk", "torch:cuda"...)."""

    kind: str
    num_slots: int
    slot_bytes: int

    def read(self, slots: npt.NDArray[np.int32]) -> ByteArray:
        """A host copy of these slots, shape (len(slots), slot_bytes)."""

    def write(self, slots: npt.NDArray[np.int32], data: ByteArray) -> None:
        """Store ``data`` (len(slots), slot_bytes) into these slots."""

    def close(self) -> None:
        """Release the memory (and the file, for disk)."""


class NumpyBuffer:
    """Host memory as a NumPy array."""

    kind = "numpy"

    def __init__(self, num_slots: int, slot_bytes: int) -> None:
        self.num_slots, self.slot_bytes = num_slots, slot_bytes
        self.array: ByteArray = np.zeros((num_slots, slot_bytes), dtype=np.uint8)

    def read(self, slots: npt.NDArray[np.int32]) -> ByteArray:
        return self.array[slots]

    def write(self, slots: npt.NDArray[np.int32], data: ByteArray) -> None:
        self.array[slots] = data

    def close(self) -> None:
        self.array = np.zeros((0, self.slot_bytes), dtype=np.uint8)


class DiskBuffer(NumpyBuffer):
    """A file-backed pool (np.memmap) in ``directory`` (a fresh temp dir when None)."""

    kind = "disk"

    def __init__(self, num_slots: int, slot_bytes: int, directory: str | None = None) -> None:
        self.num_slots, self.slot_bytes = num_slots, slot_bytes
        try:
            fd, self.path = tempfile.mkstemp(prefix="hybridkv-pool-", suffix=".bin", dir=directory)
        except OSError as e:
            raise ConfigError(f"disk tier: cannot create a pool file in {directory!r}: {e.strerror}") from None
        os.close(fd)
        shape = (max(num_slots, 1), slot_bytes)
        self.array = np.memmap(self.path, dtype=np.uint8, mode="w+", shape=shape)[:num_slots]

    def close(self) -> None:
        self.array = np.zeros((0, self.slot_bytes), dtype=np.uint8)
        if os.path.exists(self.path):
            os.remove(self.path)


BackendFactory = Callable[..., PoolBuffer]
"""``factory(num_slots, slot_bytes, **options)`` -> a buffer; options come from the tier's config."""

_BACKENDS: dict[str, BackendFactory] = {}


def register_backend(name: str, factory: BackendFactory) -> None:
    """Make ``name`` usable as a tier's backend. A module registers its own backends when it
    is imported; registering a name twice is a bug (two modules would fight over it)."""
    if name in _BACKENDS and _BACKENDS[name] is not factory:
        raise ConfigError(f"storage backend {name!r} is registered already")
    _BACKENDS[name] = factory


def registered_backends() -> list[str]:
    return sorted(_BACKENDS)


def check_backend(name: str, setting: str) -> None:
    """ConfigError naming ``setting`` unless ``name`` is a registered backend."""
    if name not in _BACKENDS:
        raise ConfigError(f"{setting}: unknown storage backend {name!r}; registered: "
                          f"{', '.join(registered_backends())} (import the module that registers it)")


def make_buffer(kind: str, num_slots: int, slot_bytes: int, **options: Any) -> PoolBuffer:
    """A buffer from the backend registered as ``kind`` ("numpy", "disk" (option: directory),
    "torch" (options: device, pin_memory), or any registered since)."""
    check_backend(kind, "make_buffer")
    return _BACKENDS[kind](num_slots, slot_bytes, **options)


def register_lazy_backend(name: str, module: str, factory: str) -> None:
    """Register ``name`` by where its factory lives: the module (an optional extra such as
    torch) is imported only when a buffer of that backend is first made."""
    def load(num_slots: int, slot_bytes: int, **options: Any) -> PoolBuffer:
        made: PoolBuffer = getattr(importlib.import_module(module), factory)(num_slots, slot_bytes, **options)
        return made

    register_backend(name, load)


def _disk_buffer(num_slots: int, slot_bytes: int, directory: str | None = None) -> PoolBuffer:
    return DiskBuffer(num_slots, slot_bytes, directory)


register_backend("numpy", NumpyBuffer)
register_backend("disk", _disk_buffer)
register_lazy_backend("torch", "hybridkv.storage.torch_backend", "TorchBuffer")  # torch: an optional extra
