"""Device figures of a worker child, sampled every few seconds by a side thread: GPU memory
allocated and reserved by this process's PyTorch and each device's capacity (torch.cuda), and the
GPU's utilisation where NVML (``nvidia-ml-py``, the ``gpu`` extra) is present.

On a CPU worker the memory series exist with ``device="cpu"`` and value 0 (the worker is there,
it holds no GPU memory), and there is no utilisation series: NVML has nothing to report. The
busy fraction of any worker, CPU or GPU, is ``rate(inference_worker_busy_seconds_total[5m])``."""

from __future__ import annotations

import contextlib
import logging
import os
import threading
from typing import Any

from workers.metrics import GPU_ALLOCATED, GPU_CAPACITY, GPU_RESERVED, GPU_UTILIZATION

log = logging.getLogger(__name__)


def _nvml_handles(count: int) -> list[Any] | None:
    """NVML handles of this process's visible devices in CUDA order, or None without NVML. NVML
    numbers every GPU of the machine, so CUDA_VISIBLE_DEVICES maps CUDA's index to NVML's."""
    try:
        import pynvml  # nvidia-ml-py
    except ImportError:
        return None
    try:
        pynvml.nvmlInit()
    except Exception as exc:  # no driver, or a container without the NVIDIA runtime
        log.info("NVML unavailable (%s): no GPU utilisation metric", exc)
        return None
    visible = [v.strip() for v in os.environ.get("CUDA_VISIBLE_DEVICES", "").split(",") if v.strip()]
    handles = []
    for i in range(count):
        ref = visible[i] if i < len(visible) else str(i)
        if ref.isdigit():
            handles.append(pynvml.nvmlDeviceGetHandleByIndex(int(ref)))
        else:
            handles.append(pynvml.nvmlDeviceGetHandleByUUID(ref))
    return handles


def sample_once(torch_cuda: Any, nvml: list[Any] | None) -> None:
    """Set every device gauge once from ``torch.cuda`` (None on a CPU worker)."""
    if torch_cuda is None:
        for gauge in (GPU_ALLOCATED, GPU_RESERVED, GPU_CAPACITY):
            gauge.labels("cpu").set(0)
        return
    for i in range(torch_cuda.device_count()):
        device = f"cuda:{i}"
        GPU_ALLOCATED.labels(device).set(torch_cuda.memory_allocated(i))
        GPU_RESERVED.labels(device).set(torch_cuda.memory_reserved(i))
        GPU_CAPACITY.labels(device).set(torch_cuda.get_device_properties(i).total_memory)
        if nvml is not None:
            import pynvml

            with contextlib.suppress(Exception):  # a GPU fallen off the bus: keep sampling the rest
                GPU_UTILIZATION.labels(device).set(pynvml.nvmlDeviceGetUtilizationRates(nvml[i]).gpu / 100)


def start_sampler(device: str, stop: threading.Event, interval: float = 5.0) -> threading.Thread:
    """Sample the device figures every ``interval`` seconds until ``stop`` is set. Call it in the
    worker child, after the device is pinned (CUDA is never initialised in the parent)."""
    cuda = None
    nvml = None
    if device.startswith("cuda"):
        import torch

        if torch.cuda.is_available():
            cuda = torch.cuda
            nvml = _nvml_handles(cuda.device_count())

    def loop() -> None:
        while True:
            try:
                sample_once(cuda, nvml)
            except Exception as exc:  # a metric must never take a worker down
                log.warning("device metrics: %s", exc)
            if stop.wait(interval):
                return

    thread = threading.Thread(target=loop, name="device-metrics", daemon=True)
    thread.start()
    return thread
