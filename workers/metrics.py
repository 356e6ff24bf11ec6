"""Job metrics of a worker. The worker child records them; with ``WORKER_METRICS_PORT`` set, the
worker's main process serves every child's values (prometheus-client's multiprocess mode)."""

from __future__ import annotations

from prometheus_client import Counter, Gauge, Histogram

JOBS_FINISHED = Counter(
    "inference_jobs_finished_total",
    "Jobs that reached a terminal status in this worker",
    ["family", "status"],
)
JOB_DURATION = Histogram(
    "inference_job_duration_seconds",
    "Run time of a job in the worker, from claim to recorded outcome",
    ["family", "task"],
    buckets=(0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600, 1800, 3600),
)
JOB_WAIT = Histogram(
    "inference_job_queue_seconds",
    "Time a job waited between submit and its first start",
    ["family"],
    buckets=(0.01, 0.05, 0.1, 0.5, 1, 5, 15, 60, 300, 900, 3600),
)
BATCH_JOBS = Histogram(
    "inference_batch_jobs",
    "Jobs that shared one pipeline call (cross-request batching; jobs run alone are not counted)",
    buckets=(2, 3, 4, 6, 8, 12, 16, 32, 64),
)
BATCH_RETRIED = Counter(
    "inference_batches_retried_total",
    "Batched pipeline calls that failed, whose jobs were then run one by one",
)
LORA_SWITCH = Histogram(
    "inference_lora_switch_seconds",
    "Time a job with LoRAs spent putting them in place and turning them off, outside the pipeline call",
    ["family"],
    buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10),
)

DEAD_LETTERS = Counter(
    "inference_dead_letters_total",
    "Messages this worker could not use, sent to the jobs.dead queue",
    ["reason"],
)
REQUEUED_MESSAGES = Counter(
    "inference_messages_requeued_total",
    "Job messages this worker sent back to their queue (database or engine unavailable)",
    ["reason"],
)

# Duty: busy-fraction = rate(inference_worker_busy_seconds_total[5m]). Added when a run ends, so a
# window shorter than the longest job sees that job's time all at once.
BUSY_SECONDS = Counter("inference_worker_busy_seconds", "Seconds this worker spent running jobs")
# One series per family the worker consumes; `sum by (family)` counts the workers of a family.
WORKER_FAMILIES = Gauge(
    "inference_worker_families",
    "1 for each family this worker consumes",
    ["family"],
    multiprocess_mode="livemax",
)
# Device figures, sampled by the worker child (workers/device_metrics.py).
GPU_ALLOCATED = Gauge(
    "inference_gpu_memory_allocated_bytes",
    "GPU memory held by this worker's tensors (torch.cuda.memory_allocated); 0 on a CPU worker",
    ["device"],
    multiprocess_mode="livemax",
)
GPU_RESERVED = Gauge(
    "inference_gpu_memory_reserved_bytes",
    "GPU memory reserved by this worker's PyTorch allocator (torch.cuda.memory_reserved); 0 on CPU",
    ["device"],
    multiprocess_mode="livemax",
)
GPU_CAPACITY = Gauge(
    "inference_gpu_memory_capacity_bytes",
    "Total memory of the GPU; 0 on a CPU worker",
    ["device"],
    multiprocess_mode="livemax",
)
GPU_UTILIZATION = Gauge(
    "inference_gpu_utilization_ratio",
    "GPU busy share over NVML's last sample period (0-1); only where NVML is present",
    ["device"],
    multiprocess_mode="livemax",
)


def serve(port: int) -> None:
    """Serve the metrics of every process of this worker on ``port``."""
    from prometheus_client import CollectorRegistry, multiprocess, start_http_server

    registry = CollectorRegistry()
    multiprocess.MultiProcessCollector(registry)
    start_http_server(port, registry=registry)
