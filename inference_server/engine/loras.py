"""LoRA adapters per job, through peft.

Two ways to keep LoRAs resident on a cached pipeline (loading from disk is the slow part):
- adapters (``hotswap=False``): each LoRA is its own peft adapter, keyed by its source; a job
  activates the ones it names, straight on peft's layers (:func:`_activate`). Every resident
  adapter wraps the same layers, so each costs memory and a little time in every forward.
- hotswap (``hotswap=True``; LORA_HOTSWAP=auto picks it for compiled models): the pipeline holds one adapter
  slot per LoRA a job uses at once; a job's i-th LoRA is copied into slot i with diffusers'
  ``load_lora_weights(..., hotswap=True)``, from weights kept in host memory. The layers stay as
  they are, so a compiled denoiser stays compiled. A LoRA whose layers or rank differ from the
  slot's cannot be swapped in; the slot is then loaded afresh.
After the job every adapter is disabled, which diffusers does by turning peft's LoRA layers off:
the next job runs on exactly the base weights (the tests compare bytes).
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


def apply(
    entry: CachedModel,
    loras: list[ResolvedLora],
    placeholders: Callable[[Any], Any] | None,
    *,
    hotswap: bool = False,
    max_loras: int = MAX_ADAPTERS,
) -> None:
    """Load what is missing and activate exactly ``loras`` at their scales on ``entry``'s pipeline.

    ``placeholders`` (DFloat11 models) is a context manager factory wrapping adapter loading; those
    models always use one adapter per LoRA. ``max_loras``: LoRAs kept resident per pipeline."""
    if hotswap and placeholders is None:
        _apply_hotswap(entry, loras, max_loras)
        return
    pipe = entry.pipe
    names: list[str] = []
    for lo in loras:
        adapter = entry.adapters.pop(lo.key, None)
        if adapter is not None:
            entry.adapters[lo.key] = adapter  # most recently used last
        else:
            _evict(entry, keep={x.key for x in loras}, limit=max_loras)
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
            entry.lora_layers = None
            metrics.LORA_LOADS.labels(entry.family).inc()
            log.info("loaded LoRA %s as %s on %s/%s", lo.key, adapter, entry.family, entry.model)
        names.append(adapter)
    _activate(entry, names, [lo.scale for lo in loras])


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


def _apply_hotswap(entry: CachedModel, loras: list[ResolvedLora], max_loras: int) -> None:
    pipe = entry.pipe
    names: list[str] = []
    for i, lo in enumerate(loras):
        slot = f"slot{i}"
        try:
            weights = _resident(entry, lo, max_loras)
            if i >= len(entry.slots):
                if not entry.slots:
                    _prepare_hotswap(pipe, max_rank=64)
                # Copies: peft may keep the given tensors as the slot's parameters, which later
                # swaps overwrite, and the resident weights must stay as read.
                pipe.load_lora_weights({k: v.clone() for k, v in weights.items()}, adapter_name=slot)
                entry.slots.append(lo.key)
                entry.lora_layers = None
                metrics.LORA_LOADS.labels(entry.family).inc()
            elif entry.slots[i] != lo.key:
                _swap(entry, slot, weights)
                entry.slots[i] = lo.key
        except Exception as exc:
            where = f"{entry.family}/{entry.model}"
            log.error("loading LoRA %s into %s failed", lo.key, where, exc_info=exc)
            if i < len(entry.slots) and entry.slots[i] != lo.key:
                # The slot may hold a half-copied LoRA: drop it and the ones after it.
                with contextlib.suppress(Exception):
                    pipe.delete_adapters([f"slot{j}" for j in range(i, len(entry.slots))])
                del entry.slots[i:]
                entry.lora_layers = None
            raise ModelError(f"could not load LoRA {lo.key} into {where} ({type(exc).__name__})") from exc
        names.append(slot)
    _activate(entry, names, [lo.scale for lo in loras])


def _prepare_hotswap(pipe: Any, max_rank: int) -> None:
    """Pad the adapters' rank so LoRAs of other ranks (up to ``max_rank``) swap in without new
    layers, which would make a compiled denoiser compile again. Only on compiled denoisers: the
    padding costs compute on every step."""
    denoiser = _denoiser(pipe)
    if not hasattr(denoiser, "_orig_mod") and not getattr(denoiser, "_compiled_call_impl", None):
        return
    try:
        pipe.enable_lora_hotswap(target_rank=max_rank, check_compiled="ignore")
    except Exception as exc:  # an older diffusers: LoRAs of another rank then load afresh
        log.warning("enable_lora_hotswap unavailable: %s", type(exc).__name__)


def _swap(entry: CachedModel, slot: str, weights: dict[str, Any]) -> None:
    """Copy ``weights`` into the adapter ``slot`` in place, or reload the slot where its layers or
    rank differ (hotswap refuses those)."""
    pipe = entry.pipe
    try:
        pipe.load_lora_weights(dict(weights), adapter_name=slot, hotswap=True)
    except Exception as exc:
        log.info("LoRA does not fit %s for a hotswap (%s); loading it afresh", slot, type(exc).__name__)
        pipe.delete_adapters(slot)
        pipe.load_lora_weights({k: v.clone() for k, v in weights.items()}, adapter_name=slot)
        entry.lora_layers = None


def _resident(entry: CachedModel, lo: ResolvedLora, max_loras: int) -> dict[str, Any]:
    """The LoRA's weights in host memory, read once from its file and kept (LRU, ``max_loras``)."""
    weights = entry.resident.pop(lo.key, None)
    if weights is None:
        from safetensors.torch import load_file

        file = lo.path / lo.weight_name if lo.weight_name else lo.path
        weights = load_file(str(file))
        while len(entry.resident) >= max_loras:
            entry.resident.pop(next(iter(entry.resident)))
    entry.resident[lo.key] = weights
    return weights


def forget(entry: CachedModel, keys: set[str]) -> None:
    """Drop the LoRAs of sources ``keys`` (deleted from the registry) from ``entry``."""
    entry.slots = ["" if k in keys else k for k in entry.slots]  # swapped out by the next job
    for key in keys:
        entry.resident.pop(key, None)
        name = entry.adapters.pop(key, None)
        if name is not None:
            entry.lora_layers = None
            with contextlib.suppress(Exception):
                entry.pipe.delete_adapters(name)


def _evict(entry: CachedModel, keep: set[str], limit: int = MAX_ADAPTERS) -> None:
    while len(entry.adapters) >= limit:
        victim = next((k for k in entry.adapters if k not in keep), None)
        if victim is None:
            return
        name = entry.adapters.pop(victim)
        entry.lora_layers = None
        entry.pipe.delete_adapters(name)
        log.info("deleted LoRA %s (%s) from %s/%s", victim, name, entry.family, entry.model)


def reset(entry: CachedModel) -> None:
    """Turn every adapter off: the pipeline computes with its base weights again."""
    if not (entry.adapters or entry.slots):
        return
    layers = _layers(entry)
    if layers is None:
        entry.pipe.disable_lora()
        return
    for layer in layers:
        layer._disable_adapters = True  # what enable_adapters(False) sets, without gradient flags


def _activate(entry: CachedModel, names: list[str], scales: list[float]) -> None:
    """Make exactly ``names`` active at ``scales``. Straight on peft's LoRA layers, found once:
    diffusers' ``set_adapters`` and ``enable_lora`` walk every module of every component and
    toggle gradients on each call, which on a small model costs more than the denoising does."""
    layers = _layers(entry)
    if layers is None:
        entry.pipe.enable_lora()
        entry.pipe.set_adapters(names, scales)
        return
    for layer in layers:
        # What peft's set_adapter and enable_adapters set, without their gradient flags.
        layer._active_adapter = names
        for name, scale in zip(names, scales, strict=True):
            layer.set_scale(name, scale)
        layer._disable_adapters = False


def _layers(entry: CachedModel) -> list[Any] | None:
    """peft's LoRA layers in the pipeline's LoRA-loadable components, or None where this peft's
    layers lack the attributes :func:`_activate` sets (the pipeline's own calls are used then)."""
    if entry.lora_layers is None:
        from peft.tuners.tuners_utils import BaseTunerLayer

        found: list[Any] = []
        for name in getattr(entry.pipe, "_lora_loadable_modules", []):
            component = getattr(entry.pipe, name, None)
            if component is not None and hasattr(component, "modules"):
                found += [m for m in component.modules() if isinstance(m, BaseTunerLayer)]
        entry.lora_layers = found
    ok = all(
        hasattr(m, "_active_adapter") and hasattr(m, "_disable_adapters") and hasattr(m, "set_scale")
        for m in entry.lora_layers
    )
    return entry.lora_layers if ok else None


def _denoiser(pipe: Any) -> Any:
    return getattr(pipe, "transformer", None) or pipe.unet
