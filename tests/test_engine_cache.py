"""The pipeline cache: LRU eviction at its byte budget, shared task variants, counters and metrics."""

from __future__ import annotations

from pathlib import Path

import torch
from PIL import Image
from prometheus_client import REGISTRY

from inference_server.engine.runner import Engine, GenerationRequest
from inference_server.registry import load_registry
from tests.support.engine import tiny_request

torch.set_num_threads(1)


def txt2img(family: str, task: str = "txt2img") -> GenerationRequest:
    image = Image.new("RGB", (64, 64), (10, 20, 30)) if task != "txt2img" else None
    return tiny_request(family, task, seeds=[0], prompt="x", steps=2, image=image)


def metric(name: str, family: str, model: str) -> float:
    return REGISTRY.get_sample_value(name, {"family": family, "model": model}) or 0.0


def test_lru_eviction_at_budget(tiny_models: Path) -> None:
    registry = load_registry(tiny_models)
    probe = Engine(registry)
    probe.warm("sd15")
    probe.warm("sdxl")
    sd15, sdxl = (e.size for e in probe.cache.entries())
    # Room for the two largest models, not three.
    budget = sd15 + sdxl + 1
    engine = Engine(registry, cache_bytes=budget)
    loads0 = metric("engine_pipeline_loads_total", "sd15", "tiny-sd15")
    evictions0 = metric("engine_pipeline_evictions_total", "sd15", "tiny-sd15")
    hits0 = metric("engine_pipeline_cache_hits_total", "sd15", "tiny-sd15")

    engine.generate(txt2img("sd15"))
    engine.generate(txt2img("sd15", "img2img"))  # another task of the same model: a hit, no new weights
    assert engine.cache.loads == 1 and engine.cache.hits == 1
    assert engine.cache.used == sd15  # the img2img variant shares the txt2img weights
    engine.generate(txt2img("sdxl"))
    engine.generate(txt2img("sd15"))  # sd15 becomes most recently used
    assert engine.cache.keys() == [("sdxl", "tiny-sdxl"), ("sd15", "tiny-sd15")]
    engine.generate(txt2img("flux"))  # does not fit: evicts the least recently used, sdxl
    assert engine.cache.keys() == [("sd15", "tiny-sd15"), ("flux", "tiny-flux")]
    assert engine.cache.evictions == 1 and engine.cache.used <= budget
    engine.generate(txt2img("sdxl"))  # reload: evicts sd15 now
    assert engine.cache.keys() == [("flux", "tiny-flux"), ("sdxl", "tiny-sdxl")]
    assert (engine.cache.loads, engine.cache.hits, engine.cache.evictions) == (4, 2, 2)

    assert metric("engine_pipeline_loads_total", "sd15", "tiny-sd15") - loads0 == 1
    assert metric("engine_pipeline_cache_hits_total", "sd15", "tiny-sd15") - hits0 == 2
    assert metric("engine_pipeline_evictions_total", "sd15", "tiny-sd15") - evictions0 == 1
    assert REGISTRY.get_sample_value("engine_pipeline_cache_bytes") == engine.cache.used


def test_model_larger_than_budget_still_runs(tiny_models: Path) -> None:
    engine = Engine(load_registry(tiny_models), cache_bytes=1)
    assert len(engine.generate(txt2img("sd15"))) == 1
    assert len(engine.generate(txt2img("sdxl"))) == 1
    assert engine.cache.keys() == [("sdxl", "tiny-sdxl")]  # only ever one, the newest
