"""Prometheus metrics of the engine's pipeline cache, labelled by family and model.

Registered once in prometheus-client's default registry when this module is first imported
(only the worker imports it); the worker's metrics endpoint exposes them.
"""

from __future__ import annotations

from prometheus_client import Counter, Gauge, Histogram

PIPELINE_LOADS = Counter(
    "engine_pipeline_loads_total", "Pipelines loaded from disk or remote storage", ["family", "model"]
)
PIPELINE_HITS = Counter(
    "engine_pipeline_cache_hits_total", "Jobs served by an already loaded pipeline", ["family", "model"]
)
PIPELINE_EVICTIONS = Counter(
    "engine_pipeline_evictions_total", "Pipelines evicted from the cache to make room", ["family", "model"]
)
PIPELINE_LOAD_SECONDS = Histogram(
    "engine_pipeline_load_seconds",
    "Time to load a pipeline",
    ["family", "model"],
    buckets=(0.1, 0.5, 1, 2, 5, 10, 30, 60, 120, 300),
)
CACHE_BYTES = Gauge(
    "engine_pipeline_cache_bytes",
    "Bytes of parameters and buffers held by cached pipelines",
    multiprocess_mode="livesum",  # a worker's children, summed (one child per GPU worker)
)
LORA_LOADS = Counter("engine_lora_loads_total", "LoRA adapters loaded into a pipeline", ["family"])
