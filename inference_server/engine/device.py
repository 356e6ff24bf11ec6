"""Device facts the engine needs: the cache budget and torch dtypes by name."""

from __future__ import annotations

import os

import torch

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def default_cache_bytes(device: str) -> int:
    """Total memory of a CUDA device, or half of the machine's RAM on CPU."""
    if device.startswith("cuda") and torch.cuda.is_available():
        index = torch.device(device).index or 0
        return int(torch.cuda.get_device_properties(index).total_memory)
    try:
        return int(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")) // 2
    except (ValueError, OSError, AttributeError):
        return 8 * 1024**3


def module_bytes(module: torch.nn.Module) -> int:
    """Bytes of a module's parameters and buffers (shared tensors counted once)."""
    seen: set[int] = set()
    total = 0
    for t in list(module.parameters()) + list(module.buffers()):
        key = t.data_ptr() if t.device.type != "meta" else id(t)
        if key in seen:
            continue
        seen.add(key)
        total += t.numel() * t.element_size()
    return total


def pipeline_bytes(pipe) -> int:
    """Bytes of every torch module of a diffusers pipeline, of a module, or of the modules an
    object holds (a detector and its processor, say)."""
    if isinstance(pipe, torch.nn.Module):
        return module_bytes(pipe)
    if hasattr(pipe, "components"):
        parts = list(pipe.components.values())
    elif isinstance(pipe, tuple | list):
        parts = list(pipe)
    else:
        parts = list(getattr(pipe, "__dict__", {}).values())
    return sum(module_bytes(c) for c in parts if isinstance(c, torch.nn.Module))


def release_memory(device: str) -> None:
    """Give freed memory back after an eviction."""
    import gc

    gc.collect()
    if device.startswith("cuda") and torch.cuda.is_available():
        torch.cuda.empty_cache()
