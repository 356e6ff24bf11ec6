"""LoRA adapters per job, through peft.

Adapters stay loaded on a cached pipeline (loading is the slow part), keyed by their source. A job
activates the ones it names at its scales; after the job every adapter is disabled, which diffusers
does by turning peft's LoRA layers off: the next job runs on exactly the base weights (the tests
compare bytes).
"""

from __future__ import annotations

import contextlib
import hashlib
import itertools
import logging
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from inference_server.engine import metrics
from inference_server.engine.cache import CachedModel
from inference_server.errors import InvalidRequest, ModelError, public_reason
from inference_server.registry import FamilySpec, Registry

log = logging.getLogger(__name__)

# Adapters kept loaded per pipeline; past this the least recently used one is deleted (each costs
# memory and a little time in every forward of the layers it wraps, even when disabled).
MAX_ADAPTERS = 8
_names = itertools.count()


@dataclass(frozen=True)
class ResolvedLora:
    """A LoRA ready to load: a stable key, a local folder, the weight file name, the job's scale."""

    key: str
    path: Path
    weight_name: str | None
    scale: float


def resolve(
    registry: Registry,
    family: FamilySpec,
    name: str,
    scale: float,
    *,
    fetch: Callable[[str, Path], Path] | None,
    cache_dir: Path | None,
) -> ResolvedLora:
    """Find LoRA ``name`` (registered, or a URI) as a local folder. InvalidRequest ``unknown_lora`` if not."""
    spec = family.lora(name)
    if spec is not None:
        source, weight_name = registry.resolve_source(spec.source), spec.weight_name
    elif "://" in name:
        source, weight_name = name, None
    else:
        others = [f.name for f in registry.families.values() if f.lora(name) is not None]
        hint = f" (registered for {', '.join(others)})" if others else ""
        raise InvalidRequest(f"unknown LoRA {name!r} for family {family.name!r}{hint}", code="unknown_lora")
    path = _local(source, fetch, cache_dir)
    if not path.exists():
        raise InvalidRequest(f"LoRA {name!r} not found at {source}", code="unknown_lora")
    if weight_name is None and path.is_dir():
        files = sorted(p.name for p in path.glob("*.safetensors"))
        if len(files) == 1:
            weight_name = files[0]
    if path.is_file():
        path, weight_name = path.parent, path.name
    return ResolvedLora(key=source, path=path, weight_name=weight_name, scale=float(scale))


def _local(source: str, fetch: Callable[[str, Path], Path] | None, cache_dir: Path | None) -> Path:
    if source.startswith("file://"):
        return Path(source[len("file://") :])
    if "://" not in source:
        return Path(source)
    if fetch is None or cache_dir is None:
        raise InvalidRequest(
            f"LoRA source {source} needs remote storage, which this worker lacks", code="unknown_lora"
        )
    dest = cache_dir / "loras" / hashlib.sha256(source.encode()).hexdigest()[:16]
    marker = dest / ".complete"
    if not marker.exists():
        dest.mkdir(parents=True, exist_ok=True)
        try:
            got = fetch(source, dest)
        except Exception as exc:
            log.error("downloading LoRA %s failed", source, exc_info=exc)
            raise ModelError(f"could not download LoRA {source}: {public_reason(exc)}") from exc
        marker.write_text(str(got))
        return Path(got)
    return Path(marker.read_text())


def apply(entry: CachedModel, loras: list[ResolvedLora], placeholders: Callable[[Any], Any] | None) -> None:
    """Load what is missing and activate exactly ``loras`` at their scales on ``entry``'s pipeline.

    ``placeholders`` (DFloat11 models) is a context manager factory wrapping adapter loading."""
    pipe = entry.pipe
    names: list[str] = []
    for lo in loras:
        adapter = entry.adapters.pop(lo.key, None)
        if adapter is not None:
            entry.adapters[lo.key] = adapter  # most recently used last
        else:
            _evict(entry, keep={x.key for x in loras})
            adapter = f"lora{next(_names)}"
            try:
                if placeholders is None:
                    pipe.load_lora_weights(str(lo.path), weight_name=lo.weight_name, adapter_name=adapter)
                else:
                    with placeholders(_denoiser(pipe)):
                        _load_into_denoiser(pipe, lo, adapter)
            except Exception as exc:
                with contextlib.suppress(Exception):
                    pipe.delete_adapters(adapter)
                where = f"{entry.family}/{entry.model}"
                log.error("loading LoRA %s into %s failed", lo.key, where, exc_info=exc)
                raise ModelError(f"could not load LoRA {lo.key} into {where} ({type(exc).__name__})") from exc
            entry.adapters[lo.key] = adapter
            metrics.LORA_LOADS.labels(entry.family).inc()
            log.info("loaded LoRA %s as %s on %s/%s", lo.key, adapter, entry.family, entry.model)
        names.append(adapter)
    pipe.enable_lora()
    pipe.set_adapters(names, [lo.scale for lo in loras])


def _load_into_denoiser(pipe: Any, lo: ResolvedLora, adapter: str) -> None:
    """Load a LoRA into the transformer only, skipping the pipeline loader's shape checks.

    On DFloat11 models the covered Linears have no ``weight`` in ``state_dict()``; FLUX's
    ``load_lora_weights`` reads it there to expand Control-LoRA shapes, which ordinary LoRAs never
    need. The pipeline's own ``lora_state_dict`` still converts third-party formats. Text-encoder
    parts of a LoRA are not applied on DF11 models."""
    import inspect

    if "return_alphas" in inspect.signature(pipe.lora_state_dict).parameters:
        state, alphas = pipe.lora_state_dict(str(lo.path), weight_name=lo.weight_name, return_alphas=True)
    else:
        out = pipe.lora_state_dict(str(lo.path), weight_name=lo.weight_name)
        state, alphas = out if isinstance(out, tuple) else (out, None)
    pipe.transformer.load_lora_adapter(
        state, network_alphas=alphas, prefix="transformer", adapter_name=adapter, _pipeline=pipe
    )


def _evict(entry: CachedModel, keep: set[str]) -> None:
    while len(entry.adapters) >= MAX_ADAPTERS:
        victim = next((k for k in entry.adapters if k not in keep), None)
        if victim is None:
            return
        name = entry.adapters.pop(victim)
        entry.pipe.delete_adapters(name)
        log.info("deleted LoRA %s (%s) from %s/%s", victim, name, entry.family, entry.model)


def reset(entry: CachedModel) -> None:
    """Turn every adapter off: the pipeline computes with its base weights again."""
    if entry.adapters:
        entry.pipe.disable_lora()


def _denoiser(pipe: Any) -> Any:
    return getattr(pipe, "transformer", None) or pipe.unet
