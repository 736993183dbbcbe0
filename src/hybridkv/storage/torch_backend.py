"""torch pool buffers (CPU, pinned CPU, CUDA) and a copy engine between them.

Imported lazily: only ``make_buffer("torch", ...)`` or a direct import pulls in torch.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import numpy.typing as npt

from hybridkv.core.errors import ConfigError
from hybridkv.storage.backends import ByteArray, PoolBuffer
from hybridkv.storage.copy import check_copy_args

try:
    import torch
except ImportError as e:  # pragma: no cover - exercised only without the extra
    raise ConfigError("the torch backend needs torch: pip install 'hybridkv[torch]'") from e


class TorchBuffer:
    """``num_slots x slot_bytes`` uint8 tensor on ``device``; pinned when asked (host tier)."""

    def __init__(self, num_slots: int, slot_bytes: int, device: str = "cpu", pin_memory: bool = False) -> None:
        self.num_slots, self.slot_bytes = num_slots, slot_bytes
        self.device = torch.device(device)
        pin = pin_memory and self.device.type == "cpu" and torch.cuda.is_available()
        self.tensor: Any = torch.zeros((num_slots, slot_bytes), dtype=torch.uint8, device=self.device,
                                       pin_memory=pin)
        self.kind = f"torch:{self.device.type}" + (":pinned" if pin else "")

    def index(self, slots: npt.NDArray[np.int32]) -> Any:
        return torch.from_numpy(np.ascontiguousarray(slots, dtype=np.int64)).to(self.device)

    def read(self, slots: npt.NDArray[np.int32]) -> ByteArray:
        out: ByteArray = self.tensor[self.index(slots)].cpu().numpy()
        return out

    def write(self, slots: npt.NDArray[np.int32], data: ByteArray) -> None:
        self.tensor[self.index(slots)] = torch.from_numpy(np.ascontiguousarray(data)).to(self.device)

    def close(self) -> None:
        self.tensor = torch.zeros((0, self.slot_bytes), dtype=torch.uint8, device=self.device)


class TorchCopyEngine:
    """Gather / scatter between torch buffers (any devices); other buffers via read/write."""

    def copy(self, src: PoolBuffer, src_slots: npt.NDArray[np.int32], dst: PoolBuffer,
             dst_slots: npt.NDArray[np.int32]) -> None:
        check_copy_args(src, src_slots, dst, dst_slots)
        if src_slots.size == 0:
            return
        if isinstance(src, TorchBuffer) and isinstance(dst, TorchBuffer):
            # device -> host must complete before the host-side scatter reads it: blocking then
            moved = src.tensor[src.index(src_slots)].to(dst.device, non_blocking=dst.device.type != "cpu")
            dst.tensor[dst.index(dst_slots)] = moved
            return
        dst.write(dst_slots, src.read(src_slots))

    def synchronize(self) -> None:
        if torch.cuda.is_available():
            torch.cuda.synchronize()

    def wait_for_copies(self) -> None:
        return None  # copies run on the current stream: already ordered
