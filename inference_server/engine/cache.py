"""An LRU cache of loaded pipelines, bounded by a byte budget.

A model is held once (its base pipeline); task variants made with ``from_pipe`` share its modules and
are not counted again. When a new model does not fit, the least recently used ones are evicted first.
A single model larger than the whole budget is still loaded (alone): refusing would fail every job.
"""

from __future__ import annotations

import logging
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from inference_server.engine import metrics
from inference_server.engine.device import pipeline_bytes, release_memory

log = logging.getLogger(__name__)


@dataclass
class CachedModel:
    """A loaded model: its base pipeline, task variants sharing its weights, and loaded LoRA adapters."""

    family: str
    model: str
    pipe: Any
    size: int
    variants: dict[str, Any] = field(default_factory=dict)
    adapters: dict[str, str] = field(default_factory=dict)  # LoRA source key -> adapter name
    source: str = ""  # what it was loaded from: a registry change of source means a reload
    # Hotswap mode: the adapter slots (slot i holds the job's i-th LoRA) and which LoRA each holds,
    # and the resident LoRAs' weights in host memory, by source key (most recently used last).
    slots: list[str] = field(default_factory=list)
    resident: dict[str, Any] = field(default_factory=dict)
    lora_layers: list[Any] | None = None  # peft's LoRA layers of the pipeline, found once per change
    tool: bool = False  # a composition component (engine/compose.py), not a model of the registry


class PipelineCache:
    """LRU over :class:`CachedModel`, keyed by (family, model id)."""

    def __init__(self, budget_bytes: int, device: str = "cpu") -> None:
        self.budget = budget_bytes
        self.device = device
        self._entries: OrderedDict[tuple[str, str], CachedModel] = OrderedDict()
        self.hits = 0
        self.loads = 0
        self.evictions = 0
        metrics.CACHE_BYTES.set(0)  # an empty cache is a value too: the series exists from the start

    @property
    def used(self) -> int:
        return sum(e.size for e in self._entries.values())

    def keys(self) -> list[tuple[str, str]]:
        """Cached keys, least recently used first."""
        return list(self._entries)

    def entries(self) -> list[CachedModel]:
        """Cached models, least recently used first; looking does not count as a use."""
        return list(self._entries.values())

    def get(
        self,
        family: str,
        model: str,
        load: Callable[[], Any],
        estimate: int = 0,
        source: str = "",
        *,
        tool: bool = False,
    ) -> CachedModel:
        """The cached model, or ``load()`` it after making room for ``estimate`` bytes (0: unknown)."""
        key = (family, model)
        entry = self._entries.get(key)
        if entry is not None:
            self._entries.move_to_end(key)
            self.hits += 1
            metrics.PIPELINE_HITS.labels(family, model).inc()
            return entry
        if estimate:
            self._make_room(estimate)
        started = time.perf_counter()
        pipe = load()
        elapsed = time.perf_counter() - started
        size = pipeline_bytes(pipe)
        self._make_room(size)
        entry = CachedModel(family, model, pipe, size, source=source, tool=tool)
        self._entries[key] = entry
        self.loads += 1
        metrics.PIPELINE_LOADS.labels(family, model).inc()
        metrics.PIPELINE_LOAD_SECONDS.labels(family, model).observe(elapsed)
        metrics.CACHE_BYTES.set(self.used)
        log.info("loaded %s/%s: %.1f MB in %.2f s", family, model, size / 1e6, elapsed)
        return entry

    def evict(self, family: str, model: str) -> bool:
        """Drop one model (deleted from the registry, or unloaded on request); whether it was cached."""
        old = self._entries.pop((family, model), None)
        if old is None:
            return False
        self.evictions += 1
        metrics.PIPELINE_EVICTIONS.labels(family, model).inc()
        log.info("evicted %s/%s (%.1f MB) on request", family, model, old.size / 1e6)
        del old
        release_memory(self.device)
        metrics.CACHE_BYTES.set(self.used)
        return True

    def _make_room(self, size: int) -> None:
        while self._entries and self.used + size > self.budget:
            (family, model), old = self._entries.popitem(last=False)
            self.evictions += 1
            metrics.PIPELINE_EVICTIONS.labels(family, model).inc()
            log.info("evicted %s/%s (%.1f MB) to make room", family, model, old.size / 1e6)
            del old
            release_memory(self.device)
        metrics.CACHE_BYTES.set(self.used)

    def clear(self) -> None:
        """Drop every cached pipeline."""
        self._entries.clear()
        release_memory(self.device)
        metrics.CACHE_BYTES.set(0)
