"""The engine: model registry, pipeline loading and caching, LoRA, DFloat11, generation.

Only :mod:`inference_server.engine.registry` is light (no torch); the API imports it. The worker
imports :mod:`inference_server.engine.runner`, which brings in torch and diffusers.
"""

from inference_server.engine.registry import FamilySpec, LoraSpec, ModelSpec, Registry, load_registry

__all__ = ["FamilySpec", "LoraSpec", "ModelSpec", "Registry", "load_registry"]
