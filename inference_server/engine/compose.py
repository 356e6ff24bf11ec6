"""Composition around the pipeline call: what a ControlNet, an IP-Adapter, a mask from words or a
safety checker adds to a job, on the engine's cache and device.

Before the call, ``prepare`` finds the mask a ``mask_prompt`` names (detector, then SAM) and turns
each ControlNet's image into its control image (canny, depth, pose). The call then runs on the
model's ControlNet variant (built once per model, task and ControlNet set, sharing the model's
modules) with the control arguments, and with the IP-Adapter loaded for the call alone. After it,
``verdicts`` scores the images with the family's safety checker.

Every tool (ControlNet, preprocessor model, detector, segmenter, checker) is loaded through the
engine's pipeline cache, so they share its byte budget and its LRU with the pipelines. The model
code lives in ``control``, ``preprocess``, ``ip_adapter``, ``masks`` and ``safety``."""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from PIL import Image

from inference_server.errors import InferenceError, InvalidRequest, ModelError

if TYPE_CHECKING:
    from inference_server.engine.cache import CachedModel
    from inference_server.engine.runner import Engine, GenerationRequest

log = logging.getLogger(__name__)

TOOLS = "tools"  # the cache's family key of the components every family shares
MAX_CONTROL_VARIANTS = 4  # ControlNet pipelines kept per model: each holds its ControlNets


@dataclass
class ControlRef:
    """A ControlNet of a job: its source image (decoded, before preprocessing) and settings."""

    name: str
    image: Image.Image
    scale: float = 1.0
    preprocess: str = "none"
    start: float = 0.0
    end: float = 1.0


@dataclass
class IpAdapterRef:
    """The IP-Adapter of a job and its reference image."""

    name: str
    image: Image.Image
    scale: float = 1.0


@dataclass
class Prepared:
    """What ``prepare`` made besides the request's own changes: the control images as the
    pipeline sees them, and the mask found from words (for ``return_control``/``return_mask``)."""

    controls: list[Image.Image]
    mask: Image.Image | None = None


class Composer:
    """The engine's composition steps (one per Engine, same thread rules)."""

    def __init__(self, engine: Engine) -> None:
        self.engine = engine

    # --- before the call ---------------------------------------------------------------------
    def prepare(self, req: GenerationRequest) -> Prepared:
        """Find the mask of ``req.mask_prompt`` (into ``req.mask``) and preprocess every control
        image to the output size (in place). Raises InferenceError ``mask_not_found``."""
        found = None
        if req.mask_prompt:
            found = self._mask(req)
            req.mask = found
        for control in req.controls:
            control.image = self._control_image(control, req.width, req.height)
        return Prepared(controls=[c.image for c in req.controls], mask=found)

    def _mask(self, req: GenerationRequest) -> Image.Image:
        from inference_server.engine import masks

        detector_spec = self.engine.registry.tools.detector
        if detector_spec is None:
            raise InvalidRequest(
                "mask_prompt needs a detector, and this deployment has none", code="no_detector"
            )
        if req.image is None:
            raise InvalidRequest("mask_prompt needs an input image", code="missing_image")
        detector = self._tool("detector", detector_spec.source, masks.load_detector)
        segmenter = (
            self._tool("segmenter", detector_spec.segmenter, masks.load_segmenter)
            if detector_spec.segmenter
            else None
        )
        threshold = req.mask_threshold if req.mask_threshold is not None else detector_spec.threshold
        found = masks.mask_from_prompt(
            detector,
            segmenter,
            req.image,
            req.mask_prompt or "",
            threshold=threshold,
            grow=req.mask_grow,
            blur=req.mask_blur,
        )
        return found.mask

    def _control_image(self, control: ControlRef, width: int, height: int) -> Image.Image:
        from inference_server.engine import preprocess

        loaded = None
        if control.preprocess in ("depth", "pose"):
            spec = self.engine.registry.tools.preprocessors.get(control.preprocess)  # type: ignore[call-overload]
            if spec is None:
                raise InvalidRequest(
                    f"preprocess {control.preprocess!r} has no model in this deployment",
                    code="unsupported_composition",
                )
            kind = control.preprocess
            loaded = self._tool(
                f"preprocess-{kind}",
                spec.source,
                lambda path, device: preprocess.load_preprocessor(kind, path, device),
            )
        try:
            return preprocess.preprocess(control.preprocess, loaded, control.image, width, height)
        except InferenceError:
            raise
        except Exception as exc:
            log.error("preprocess %s failed", control.preprocess, exc_info=exc)
            raise ModelError(f"preprocess {control.preprocess} failed ({type(exc).__name__})") from exc

    # --- the call ----------------------------------------------------------------------------
    def pipeline(self, entry: CachedModel, req: GenerationRequest, plain: Any) -> Any:
        """The pipeline to call: ``plain`` (the task's variant) or its ControlNet variant."""
        if not req.controls:
            return plain
        from inference_server.engine import control

        names = tuple(c.name for c in req.controls)
        key = f"{req.task}+controlnet:{','.join(names)}"
        pipe = entry.variants.get(key)
        if pipe is not None:
            entry.variants[key] = entry.variants.pop(key)  # most recently used last
            return pipe
        family = self.engine.registry.family(req.family)
        dtype = _dtype(plain)
        models = []
        for name in names:
            spec = family.controlnet(name)
            if spec is None:
                raise InvalidRequest(
                    f"unknown ControlNet {name!r} for {req.family}", code="unknown_controlnet"
                )
            models.append(
                self._tool(
                    f"controlnet-{name}",
                    spec.source,
                    lambda path, _device, **_: control.load_controlnet(path, dtype),
                    family=req.family,
                )
            )
        pipe = control.control_pipeline(entry.pipe, req.task, models)
        controls = [k for k in entry.variants if "+controlnet:" in k]
        if len(controls) >= MAX_CONTROL_VARIANTS:
            del entry.variants[controls[0]]
        entry.variants[key] = pipe
        return pipe

    def call_kwargs(self, pipe: Any, req: GenerationRequest, images: int) -> dict[str, Any]:
        """The call arguments composition adds (control images, IP-Adapter image)."""
        out: dict[str, Any] = {}
        if req.controls:
            from inference_server.engine import control

            inputs = [control.ControlInput(c.image, c.scale, c.start, c.end) for c in req.controls]
            out.update(control.control_kwargs(pipe, req.task, inputs, images))
        if req.ip_adapter is not None:
            from inference_server.engine import ip_adapter

            out.update(ip_adapter.call_kwargs(req.ip_adapter.image, images))
        return out

    @contextlib.contextmanager
    def adapters(self, pipe: Any, req: GenerationRequest) -> Iterator[None]:
        """The request's IP-Adapter loaded into ``pipe`` for the block, and taken out after it
        whatever happens, so the next job's pixels are a clean run's."""
        if req.ip_adapter is None:
            yield
            return
        from inference_server.engine import ip_adapter

        family = self.engine.registry.family(req.family)
        spec = family.ip_adapter(req.ip_adapter.name)
        if spec is None:
            raise InvalidRequest(
                f"unknown IP-Adapter {req.ip_adapter.name!r} for {req.family}", code="unknown_ip_adapter"
            )
        folder = self.engine._local_model(spec.source, f"ip-adapters/{req.family}/{spec.name}")
        encoder = (
            self.engine._local_model(spec.image_encoder, f"ip-adapters/{req.family}/{spec.name}-encoder")
            if spec.image_encoder
            else None
        )
        try:
            ip_adapter.apply(
                pipe,
                folder,
                weight_name=spec.weight_name,
                subfolder=spec.subfolder,
                image_encoder=encoder,
                scale=req.ip_adapter.scale,
                dtype=_dtype(pipe),
            )
            yield
        finally:
            ip_adapter.reset(pipe)

    # --- after the call ----------------------------------------------------------------------
    def verdicts(self, family_name: str, images: list[Image.Image]) -> list[Any]:
        """The family's safety checker's verdict on each image (``safety.Verdict``)."""
        from inference_server.engine import safety

        family = self.engine.registry.family(family_name)
        name = family.safety_checker
        spec = self.engine.registry.tools.safety_checkers.get(name) if name else None
        if spec is None:
            raise InvalidRequest(f"family {family_name!r} has no safety checker", code="no_safety_checker")
        checker = self._tool(f"safety-{name}", spec.source, safety.load_safety_checker)
        try:
            return list(safety.check_images(checker, images))
        except Exception as exc:
            log.error("safety checker %s failed", name, exc_info=exc)
            raise ModelError(f"the safety checker failed ({type(exc).__name__})") from exc

    # --- loading -----------------------------------------------------------------------------
    def _tool(self, key: str, source: str, load: Any, *, family: str = TOOLS, **kwargs: Any) -> Any:
        """A component loaded once through the engine's cache (``load(path, device, **kwargs)``)."""
        engine = self.engine
        resolved = engine.registry.resolve_source(source)

        def loader() -> Any:
            path = engine._local_model(source, f"{family}/{key}")
            try:
                return load(path, engine.device, **kwargs)
            except InferenceError:
                raise
            except Exception as exc:
                log.error("loading %s from %s failed", key, path, exc_info=exc)
                raise ModelError(f"could not load {key} ({type(exc).__name__})") from exc

        return engine.cache.get(family, key, loader, source=resolved, tool=True).pipe


def _dtype(pipe: Any) -> Any:
    import torch

    denoiser = getattr(pipe, "unet", None) or getattr(pipe, "transformer", None)
    return getattr(denoiser, "dtype", None) or torch.float32
