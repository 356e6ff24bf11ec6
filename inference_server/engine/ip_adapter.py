"""IP-Adapter reference images per job, through diffusers' ``load_ip_adapter``.

The engine calls :func:`apply` on the pipeline variant about to run, adds :func:`call_kwargs` to
its call, and calls :func:`reset` in a ``finally``. Every variant of a model (``from_pipe``)
shares its denoiser, and an IP-Adapter lives in the denoiser: its attention processors and its
image projection (``encoder_hid_proj``). So the adapter's state is kept on the denoiser, and what
``apply`` replaces is put back by ``reset`` whichever variant runs next.

Reset restores the very processor objects, projection and config value the denoiser had, and the
variant's own ``image_encoder`` and ``feature_extractor``: the next job computes exactly as on a
pipeline that never saw an adapter (the tests compare bytes). Scale 0 is not a reset: diffusers'
processors skip the image tokens at scale 0 (the same bytes here), but a UNet left with
``encoder_hid_dim_type="ip_image_proj"`` refuses a call without a reference image.

Loading is the slow part, so the adapters' modules stay in host memory on the denoiser once
loaded (up to :data:`MAX_ADAPTERS`) and a repeated job only swaps them back in and sets the scale.
Image encoders are cached the same way (:data:`MAX_ENCODERS`), or passed in already loaded
(:func:`load_image_encoder`, for a cache of the caller's).
"""

from __future__ import annotations

import inspect
import logging
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from PIL import Image

from inference_server.errors import InvalidRequest, ModelError

log = logging.getLogger(__name__)

MAX_ADAPTERS = 4  # loaded adapters kept per denoiser; the least recently used one is dropped past it
MAX_ENCODERS = 2  # image encoders kept per denoiser (a real one is about 0.6 G parameters)
DEFAULT_ENCODER = "image_encoder"  # where load_ip_adapter looks by default, beside the weights
_ATTR = "_ip_adapter_state"
_MISSING = object()


@dataclass(frozen=True)
class ImageEncoder:
    """A loaded IP-Adapter image encoder: a ``CLIPVisionModelWithProjection`` and its processor."""

    model: Any
    processor: Any


@dataclass
class _Adapter:
    processors: dict[str, Any]  # the adapter's own attention processors, by layer
    projection: Any  # the MultiIPAdapterImageProjection diffusers built


@dataclass
class _Replaced:
    """What :func:`apply` replaced, for :func:`reset` to put back."""

    processors: dict[str, Any]
    projection: Any
    hid_type: Any
    pipe: Any
    image_encoder: Any
    feature_extractor: Any


@dataclass
class _State:
    adapters: OrderedDict[tuple[str, str, str], _Adapter] = field(default_factory=OrderedDict)
    encoders: OrderedDict[tuple[str, str, str], ImageEncoder] = field(default_factory=OrderedDict)
    replaced: _Replaced | None = None


def load_image_encoder(path: str | Path, device: str, dtype: torch.dtype) -> ImageEncoder:
    """Load the image encoder in folder ``path`` (its ``preprocessor_config.json`` if it has one,
    else the CLIP processor diffusers would make for the encoder's input size)."""
    from transformers import CLIPImageProcessor, CLIPVisionModelWithProjection

    path = Path(path)
    if not (path / "config.json").is_file():
        raise ModelError(f"no IP-Adapter image encoder at {path}")
    model: Any = CLIPVisionModelWithProjection.from_pretrained(str(path), dtype=dtype)
    model = model.to(device).eval()
    if (path / "preprocessor_config.json").is_file():
        processor = CLIPImageProcessor.from_pretrained(str(path))
    else:
        size = model.config.image_size
        processor = CLIPImageProcessor(size=size, crop_size=size)
    return ImageEncoder(model, processor)


def apply(
    pipe: Any,
    folder: str,
    *,
    weight_name: str,
    subfolder: str = "",
    image_encoder: str | ImageEncoder | None,
    scale: float,
    dtype: torch.dtype,
) -> None:
    """Put the IP-Adapter ``folder/subfolder/weight_name`` into ``pipe`` at ``scale``.

    ``image_encoder``: a folder (absolute, or relative to ``folder``), a loaded encoder, or None for
    ``image_encoder`` beside the weights as diffusers' loader defaults to; loaded in ``dtype`` on
    the pipeline's device. Raises InvalidRequest ``unsupported_composition`` for a pipeline without
    IP-Adapter support, ModelError when the files do not load. Call :func:`reset` after the call,
    also when this raises."""
    denoiser = _denoiser(pipe)
    if not _supports(pipe):
        raise InvalidRequest(
            f"{type(pipe).__name__} does not support IP-Adapters", code="unsupported_composition"
        )
    state = _state(denoiser)
    if state.replaced is not None:  # a previous job's reset did not run: start from a clean pipeline
        reset(state.replaced.pipe)
    encoder = _encoder(state, pipe, folder, subfolder, image_encoder, dtype)
    state.replaced = _Replaced(
        processors=dict(denoiser.attn_processors),
        projection=getattr(denoiser, "encoder_hid_proj", _MISSING),
        hid_type=getattr(denoiser.config, "encoder_hid_dim_type", _MISSING),
        pipe=pipe,
        image_encoder=getattr(pipe, "image_encoder", None),
        feature_extractor=getattr(pipe, "feature_extractor", None),
    )
    # The variant's own attributes: diffusers encodes the reference image with them. Set before
    # loading, so the loader finds an encoder and loads none of its own.
    pipe.image_encoder, pipe.feature_extractor = encoder.model, encoder.processor
    try:
        adapter = _adapter(state, pipe, denoiser, (folder, subfolder, weight_name))
        _install(denoiser, state.replaced.processors, adapter)
        pipe.set_ip_adapter_scale(float(scale))
    except Exception:
        reset(pipe)
        raise


def reset(pipe: Any) -> None:
    """Put back what :func:`apply` replaced on ``pipe``'s denoiser and variant (a no-op when
    nothing was applied): the next call on any variant computes as if no adapter was ever loaded."""
    denoiser = _denoiser(pipe)
    state: _State | None = getattr(denoiser, _ATTR, None) if denoiser is not None else None
    if state is None or state.replaced is None:
        return
    r, state.replaced = state.replaced, None
    denoiser.set_attn_processor(dict(r.processors))  # a copy: set_attn_processor pops its argument
    if r.projection is _MISSING:
        if hasattr(denoiser, "encoder_hid_proj"):
            del denoiser.encoder_hid_proj
    else:
        denoiser.encoder_hid_proj = r.projection
    if r.hid_type is _MISSING:
        if "encoder_hid_dim_type" in vars(denoiser.config):
            delattr(denoiser.config, "encoder_hid_dim_type")
    else:
        # An attribute of the frozen config, as diffusers' loader and unload_ip_adapter set it.
        denoiser.config.encoder_hid_dim_type = r.hid_type
    r.pipe.image_encoder, r.pipe.feature_extractor = r.image_encoder, r.feature_extractor


def call_kwargs(image: Image.Image, images: int) -> dict[str, Any]:
    """The call arguments adding the reference ``image`` to a call making ``images`` images.

    One image per loaded adapter, not per output: diffusers encodes it once and repeats its
    embedding for every image of the call (``batch_size * num_images_per_prompt``), drawing nothing
    from the generators, so a seed gives the same image alone or in a batch. Jobs with different
    reference images therefore cannot share a call."""
    if images < 1:
        raise ValueError("a call makes at least one image")
    return {"ip_adapter_image": [image.convert("RGB")]}


def forget(pipe: Any) -> None:
    """Drop the adapters and image encoders kept on ``pipe``'s denoiser (after :func:`reset`)."""
    denoiser = _denoiser(pipe)
    if denoiser is not None and getattr(denoiser, _ATTR, None) is not None:
        reset(pipe)
        delattr(denoiser, _ATTR)


# --- internals -------------------------------------------------------------------------------------
def _denoiser(pipe: Any) -> Any:
    return getattr(pipe, "unet", None) or getattr(pipe, "transformer", None)


def _supports(pipe: Any) -> bool:
    return (
        _denoiser(pipe) is not None
        and hasattr(pipe, "load_ip_adapter")
        and hasattr(pipe, "image_encoder")
        and "ip_adapter_image" in inspect.signature(pipe.__call__).parameters
    )


def _state(denoiser: Any) -> _State:
    # A plain object, not a Module: nn.Module would register anything holding modules as a child.
    state = getattr(denoiser, _ATTR, None)
    if state is None:
        state = _State()
        setattr(denoiser, _ATTR, state)
    return state


def _encoder(
    state: _State,
    pipe: Any,
    folder: str,
    subfolder: str,
    given: str | ImageEncoder | None,
    dtype: torch.dtype,
) -> ImageEncoder:
    if isinstance(given, ImageEncoder):
        return given
    path = Path(folder) / (given if given is not None else Path(subfolder, DEFAULT_ENCODER))
    device = str(getattr(pipe, "_execution_device", None) or pipe.device)
    key = (str(path), device, str(dtype))
    encoder = state.encoders.pop(key, None)
    if encoder is None:
        try:
            encoder = load_image_encoder(path, device, dtype)
        except ModelError:
            raise
        except Exception as exc:
            log.error("loading IP-Adapter image encoder %s failed", path, exc_info=exc)
            raise ModelError(
                f"could not load the IP-Adapter image encoder {path} ({type(exc).__name__})"
            ) from exc
        while len(state.encoders) >= MAX_ENCODERS:
            state.encoders.popitem(last=False)
    state.encoders[key] = encoder  # most recently used last
    return encoder


def _adapter(state: _State, pipe: Any, denoiser: Any, key: tuple[str, str, str]) -> _Adapter:
    """The adapter ``key``'s modules: kept from an earlier job, or loaded by diffusers now."""
    adapter = state.adapters.pop(key, None)
    if adapter is None:
        folder, subfolder, weight_name = key
        try:
            pipe.load_ip_adapter(folder, subfolder=subfolder, weight_name=weight_name)
        except Exception as exc:
            where = str(Path(folder, subfolder, weight_name))
            log.error("loading IP-Adapter %s into %s failed", where, type(pipe).__name__, exc_info=exc)
            raise ModelError(f"could not load IP-Adapter {where} ({type(exc).__name__})") from exc
        adapter = _Adapter(
            processors={n: p for n, p in denoiser.attn_processors.items() if hasattr(p, "to_k_ip")},
            projection=denoiser.encoder_hid_proj,
        )
        while len(state.adapters) >= MAX_ADAPTERS:
            state.adapters.popitem(last=False)
        log.info(
            "loaded IP-Adapter %s into %s", Path(folder, subfolder, weight_name), type(denoiser).__name__
        )
    state.adapters[key] = adapter
    return adapter


def _install(denoiser: Any, original: dict[str, Any], adapter: _Adapter) -> None:
    """The adapter's processors on its layers, the denoiser's own everywhere else (the loader
    makes new ones there); its projection; the config value the UNet's forward reads."""
    denoiser.set_attn_processor({**original, **adapter.processors})
    denoiser.encoder_hid_proj = adapter.projection
    denoiser.config.encoder_hid_dim_type = "ip_image_proj"
