"""Device selection and GPU pinning. Pinning happens before torch is imported: the launcher sets
``CUDA_VISIBLE_DEVICES`` so each worker sees exactly one GPU, as ``cuda:0``."""

from __future__ import annotations

import os
import re

from inference_server.errors import ConfigurationError
from inference_server.settings import Settings

DEVICE_RE = re.compile(r"^(cpu|cuda(:\d+)?|mps)$")


def pin_device(device: str) -> str:
    """Validate ``--device`` and pin the process to it. Returns the device torch will use.

    Call before torch is imported anywhere in the process."""
    if not DEVICE_RE.match(device):
        raise ConfigurationError(
            f"--device must be cpu, cuda, cuda:N or mps, got {device!r}", code="invalid_device"
        )
    if device.startswith("cuda:"):
        os.environ["CUDA_VISIBLE_DEVICES"] = device.split(":", 1)[1]
        return "cuda"
    if device == "cpu":
        os.environ.setdefault("CUDA_VISIBLE_DEVICES", "")
    return device


def configure_torch(settings: Settings) -> str:
    """Import torch in the worker child, apply thread settings, and check the device exists."""
    import torch

    if settings.torch_threads:
        torch.set_num_threads(settings.torch_threads)
    device = settings.device
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise ConfigurationError(
            f"--device {device} was asked for but CUDA is not available "
            f"(CUDA_VISIBLE_DEVICES={os.environ.get('CUDA_VISIBLE_DEVICES', '')!r})",
            code="no_gpu",
        )
    return device


def visible_gpus() -> list[tuple[int, int]]:
    """(index, total memory in bytes) of every visible GPU. Only the launcher calls this: its
    workers are new processes, so CUDA initialised here is never inherited by a fork."""
    import torch

    if not torch.cuda.is_available():
        return []
    return [(i, torch.cuda.get_device_properties(i).total_memory) for i in range(torch.cuda.device_count())]
