"""The engine the worker calls: load (or reuse) a model's pipeline and run one job on it.

A job is one pipeline call however many images it asks for: one image per seed, each from its own
CPU-seeded generator, so a seed draws the same noise whatever else is in the job and on whichever
device the job runs. Progress and cancellation go through diffusers' ``callback_on_step_end``: the
worker's ``on_step`` sees every step of the one denoising loop, as (steps done, steps in the loop),
and can stop the run by returning True (:class:`JobCanceled` is raised).
"""

from __future__ import annotations

import hashlib
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from PIL import Image

from inference_server.engine import batch, loras, variants
from inference_server.engine.cache import CachedModel, PipelineCache
from inference_server.engine.compose import Composer, ControlRef, IpAdapterRef, Prepared
from inference_server.engine.device import DTYPES, default_cache_bytes
from inference_server.engine.preview import latent_preview
from inference_server.errors import InferenceError, InvalidRequest, JobCanceled, ModelError, public_reason
from inference_server.registry import ModelSpec, Registry

log = logging.getLogger(__name__)


class _EmptyFp32Warning(logging.Filter):
    """diffusers warns on every ``vae.to(dtype)`` inside pipelines even when no module must stay fp32."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "should be kept in float32: []" not in record.getMessage()


logging.getLogger("diffusers.models.modeling_utils").addFilter(_EmptyFp32Warning())


@dataclass
class LoraRef:
    """A LoRA a job asks for: a registered name or a URI, and its scale."""

    name: str
    scale: float = 1.0


@dataclass
class GenerationRequest:
    """One job as the engine sees it: validated parameters and decoded inputs."""

    family: str
    model: str | None
    task: str  # txt2img | img2img | inpaint | edit
    prompt: str
    negative_prompt: str | None
    width: int
    height: int
    steps: int
    guidance_scale: float | None
    seeds: list[int]  # one output image per seed
    strength: float | None = None
    image: Image.Image | None = None  # decoded, RGB, sized by the caller
    mask: Image.Image | None = None  # "L"
    loras: list[LoraRef] = field(default_factory=list)
    preview_every: int = 0  # a preview every N steps (0: none)
    # Composition (engine/compose.py): ControlNets, a reference image, a mask found from words.
    controls: list[ControlRef] = field(default_factory=list)
    ip_adapter: IpAdapterRef | None = None
    mask_prompt: str | None = None
    mask_grow: int = 0
    mask_blur: int = 0
    mask_threshold: float | None = None  # None: the registry's detector threshold


StepCallback = Callable[[int, int], bool]  # (steps done, steps in the loop) -> stop?
PreviewCallback = Callable[[int, Any], None]  # (steps done, RGB uint8 array h x w x 3)


class Engine:
    """Runs generation requests on the models of a registry, caching loaded pipelines.

    One job at a time (a worker child runs one job): not safe to call from several threads."""

    def __init__(
        self,
        registry: Registry,
        *,
        device: str = "cpu",
        cache_bytes: int = 0,
        max_edit_pixels: int = 0,
        cache_dir: Path | None = None,
        fetch: Callable[[str, Path], Path] | None = None,
        lora_hotswap: bool | str = "auto",
        max_loras: int = loras.MAX_ADAPTERS,
    ) -> None:
        self.registry = registry
        self.lora_hotswap = lora_hotswap  # True, False, or "auto": for models compiled on GPU
        self.max_loras = max_loras
        # The last job's LoRA switch (loading or swapping its LoRAs in, turning them off after) and
        # pipeline call, in seconds; the worker reports the first as a metric. None: no LoRA.
        self.last_lora_seconds: float | None = None
        self.last_pipeline_seconds = 0.0
        self.device = device
        self.max_edit_pixels = max_edit_pixels
        self.cache_dir = cache_dir
        self.fetch = fetch
        self.cache = PipelineCache(cache_bytes or default_cache_bytes(device), device)
        self.composer = Composer(self)
        _quiet_loading()

    # --- public -----------------------------------------------------------------------------------
    def generate(
        self,
        req: GenerationRequest,
        on_step: StepCallback | None = None,
        on_preview: PreviewCallback | None = None,
    ) -> list[Image.Image]:
        """Run ``req`` in one pipeline call: one image per seed, in the order of the seeds. Raises
        InvalidRequest, JobCanceled or ModelError. ``on_preview`` gets the latents' RGB projection
        every ``req.preview_every`` steps (``engine.preview``); it must return at once."""
        return self._generate([req], on_step, on_preview if req.preview_every else None)

    def prepare(self, req: GenerationRequest) -> Prepared:
        """Before ``generate``: find the mask ``req.mask_prompt`` names and preprocess the control
        images, in place; return them for a job that asked to get them back. Raises
        InvalidRequest, ModelError, or InferenceError ``mask_not_found``."""
        return self.composer.prepare(req)

    def verdicts(self, family: str, images: list[Image.Image]) -> list[Any]:
        """The family's safety checker on ``images``: one ``engine.safety.Verdict`` each."""
        return self.composer.verdicts(family, images)

    def generate_batch(
        self, reqs: list[GenerationRequest], on_steps: list[StepCallback | None]
    ) -> list[list[Image.Image]]:
        """Run compatible requests (see :mod:`inference_server.engine.batch`) in one pipeline call;
        return each one's images. Every ``on_steps[i]`` sees every step; a request whose callback
        asks to stop leaves the batch (its images are still returned, for the caller to discard),
        and the call stops (JobCanceled) only when all have. Raises InvalidRequest, JobCanceled
        or ModelError for the whole call."""
        if len(reqs) == 1:
            return [self.generate(reqs[0], on_steps[0])]
        batch.check_compatible(reqs)
        shared = batch.SharedSteps(on_steps)
        return batch.split(self._generate(reqs, shared), reqs)

    def _generate(
        self,
        reqs: list[GenerationRequest],
        on_step: StepCallback | None,
        on_preview: PreviewCallback | None = None,
    ) -> list[Image.Image]:
        req = reqs[0]
        family = self.registry.family(req.family)
        spec = family.model(req.model, req.task)
        for member in reqs:
            _check(member)
        resolved = [
            loras.resolve(
                self.registry, family, ref.name, ref.scale, fetch=self.fetch, cache_dir=self.cache_dir
            )
            for ref in req.loras
        ]
        entry = self._entry(spec)
        pipe = self.composer.pipeline(entry, req, self._variant(entry, req.task))
        self.last_lora_seconds = None
        switch = 0.0
        try:
            if resolved:
                started = time.perf_counter()
                loras.apply(
                    entry,
                    resolved,
                    self._placeholders(spec),
                    hotswap=self._hotswap(spec),
                    max_loras=self.max_loras,
                )
                switch = time.perf_counter() - started
            started = time.perf_counter()
            with self.composer.adapters(pipe, req):
                images = self._run(pipe, reqs, on_step, on_preview)
            self.last_pipeline_seconds = time.perf_counter() - started
            return images
        finally:
            started = time.perf_counter()
            loras.reset(entry)
            if resolved:
                self.last_lora_seconds = switch + time.perf_counter() - started

    def _hotswap(self, spec: ModelSpec) -> bool:
        if self.lora_hotswap == "auto":
            # Where swapping in place pays: a compiled denoiser keeps its compiled graph. Elsewhere
            # activating resident adapters is cheaper (docs/runtime.md has the figures).
            return spec.compile and self.device.startswith("cuda")
        return bool(self.lora_hotswap)

    def set_registry(self, registry: Registry) -> list[tuple[str, str]]:
        """Serve ``registry`` from now on (the runtime registry changed). Cached models it no longer
        has, or whose source changed, are evicted, and the named LoRAs it no longer has are dropped
        from the models that hold them; returns the evicted (family, model) pairs."""
        gone = _lora_sources(self.registry) - _lora_sources(registry)
        self.registry = registry
        evicted = []
        for entry in self.cache.entries():
            if _is_tool(entry):
                continue  # ControlNets and the shared tools come from the registry file alone
            family = registry.families.get(entry.family)
            spec = next((m for m in family.models if m.id == entry.model), None) if family else None
            if spec is None or (entry.source and spec.source != entry.source):
                self.cache.evict(entry.family, entry.model)
                evicted.append((entry.family, entry.model))
            elif gone:
                loras.forget(entry, gone)
        return evicted

    def unload(self, family: str, model: str) -> bool:
        """Drop a model from the cache; whether it was loaded."""
        return self.cache.evict(family, model)

    def loaded(self) -> set[tuple[str, str]]:
        """The (family, model) pairs cached now."""
        return {(e.family, e.model) for e in self.cache.entries() if not _is_tool(e)}

    def warm(self, family: str, model: str | None = None) -> None:
        """Load a model into the cache ahead of its first job."""
        fam = self.registry.family(family)
        spec = (
            fam.model(model, fam.tasks[0])
            if model is None
            else next((m for m in fam.models if m.id == model), None)
        )
        if spec is None:
            raise InvalidRequest(f"unknown model {model!r} for family {family!r}", code="unknown_model")
        self._entry(spec)

    # --- running ----------------------------------------------------------------------------------
    def _run(
        self,
        pipe: Any,
        reqs: list[GenerationRequest],
        on_step: StepCallback | None,
        on_preview: PreviewCallback | None = None,
    ) -> list[Image.Image]:
        req = batch.merged(reqs) if len(reqs) > 1 else reqs[0]
        previews = [on_preview] if on_preview is not None else []

        def callback(p: Any, step: int, timestep: Any, kwargs: dict[str, Any]) -> dict[str, Any]:
            # Pipelines set _num_timesteps before their loop: exact even when strength shortens it.
            total = int(getattr(p, "_num_timesteps", 0) or req.steps)
            if previews and (step + 1) % req.preview_every == 0 and "latents" in kwargs:
                try:
                    previews[0](step + 1, latent_preview(p, kwargs["latents"], req.width, req.height))
                except Exception as exc:  # a side channel: the run goes on without previews
                    log.warning("previews of %s stopped: %s", req.family, exc)
                    previews.clear()
            if on_step is not None and on_step(step + 1, total):
                # Raised, not the pipeline's interrupt flag: that one still runs the loop out and
                # decodes the latents, GPU time nobody will look at.
                raise JobCanceled(f"canceled after {step + 1} steps")
            return kwargs

        kwargs = variants.call_kwargs(pipe, req, req.seeds, callback)
        kwargs.update(self.composer.call_kwargs(pipe, req, len(req.seeds)))
        if len(reqs) > 1:
            kwargs = batch.batch_kwargs(kwargs, reqs)
        cap = self.max_edit_pixels if req.task == "edit" else 0
        try:
            with torch.inference_mode(), variants.edit_area(cap):
                out = pipe(**kwargs)
        except InferenceError:
            raise
        except Exception as exc:
            log.error("%s/%s %s failed (%d jobs)", req.family, req.model, req.task, len(reqs), exc_info=exc)
            why = type(exc).__name__
            raise ModelError(f"{req.family} {req.task} failed in the model ({why})") from exc
        images: list[Image.Image] = list(out.images)
        if len(images) != len(req.seeds):  # a pipeline that ignored the batch: never a short job
            raise ModelError(f"{req.family} {req.task} made {len(images)} images for {len(req.seeds)} seeds")
        return images

    # --- loading ----------------------------------------------------------------------------------
    def _entry(self, spec: ModelSpec) -> CachedModel:
        estimate = int(spec.memory_gb * 1024**3) if self.device.startswith("cuda") else 0
        return self.cache.get(spec.family, spec.id, lambda: self._load(spec), estimate, source=spec.source)

    def _variant(self, entry: CachedModel, task: str) -> Any:
        pipe = entry.variants.get(task)
        if pipe is None:
            pipe = variants.variant(entry.pipe, task)
            entry.variants[task] = pipe
        return pipe

    def _load(self, spec: ModelSpec) -> Any:
        from diffusers import DiffusionPipeline

        from inference_server.engine.compat import qwen_processor_without_video

        qwen_processor_without_video()
        source = self._local_model(spec.source, f"models/{spec.family}/{spec.id}")
        dtype = DTYPES[spec.dtype]
        kwargs: dict[str, Any] = {"dtype": dtype}
        if self.cache_dir is not None and not Path(source).exists():
            kwargs["cache_dir"] = str(self.cache_dir / "hub")
        try:
            if spec.df11:
                kwargs["transformer"] = self._df11_transformer(spec, source)
            pipe = DiffusionPipeline.from_pretrained(source, **kwargs)
        except InferenceError:
            raise
        except Exception as exc:
            log.error("loading %s/%s from %s failed", spec.family, spec.id, source, exc_info=exc)
            raise ModelError(f"could not load model {spec.family}/{spec.id} ({type(exc).__name__})") from exc
        pipe.set_progress_bar_config(disable=True)
        self._place(pipe, spec)
        return pipe

    def _local_model(self, source: str, cache_key: str) -> str:
        """A local folder for ``source``: as is, relative to the registry, or downloaded via ``fetch``."""
        resolved = self.registry.resolve_source(source)
        if resolved.startswith("file://"):
            return resolved[len("file://") :]
        if "://" not in resolved:
            return resolved  # a local folder, or a hub id diffusers resolves itself
        if self.fetch is None or self.cache_dir is None:
            raise ModelError(f"{cache_key} lives in remote storage, which this worker cannot reach")
        dest = self.cache_dir / cache_key / hashlib.sha256(resolved.encode()).hexdigest()[:12]
        marker = dest / ".complete"
        if marker.exists():
            return marker.read_text()
        dest.mkdir(parents=True, exist_ok=True)
        try:
            got = self.fetch(resolved, dest)
        except Exception as exc:
            log.error("downloading %s failed", resolved, exc_info=exc)
            raise ModelError(f"could not download {cache_key}: {public_reason(exc)}") from exc
        marker.write_text(str(got))
        return str(got)

    def _df11_transformer(self, spec: ModelSpec, source: str) -> torch.nn.Module:
        """The pipeline's transformer architecture in BF16 with DFloat11 weights installed."""
        import diffusers

        from inference_server.engine.df11 import load_df11

        df11_dir = Path(self._local_model(spec.df11 or "", f"df11/{spec.family}/{spec.id}"))
        index = diffusers.DiffusionPipeline.load_config(source)
        _library, class_name = index["transformer"]
        cls = getattr(diffusers, class_name)
        config = cls.load_config(source, subfolder="transformer")
        from accelerate import init_empty_weights

        # Meta tensors: the BF16 weights are never allocated; load_df11 installs every parameter.
        with init_empty_weights():
            model = cls.from_config(config).to(torch.bfloat16)
        return load_df11(model, df11_dir, self.device)

    def _placeholders(self, spec: ModelSpec) -> Callable[[Any], Any] | None:
        if not spec.df11:
            return None
        from inference_server.engine.df11 import lora_placeholders

        return lora_placeholders

    def _place(self, pipe: Any, spec: ModelSpec) -> None:
        if not self.device.startswith("cuda"):
            if self.device != "cpu":  # pipelines load on the CPU; moving them there again only warns
                pipe.to(self.device)
            return
        if spec.offload == "model":
            pipe.enable_model_cpu_offload(device=self.device)
        elif spec.offload == "sequential":
            pipe.enable_sequential_cpu_offload(device=self.device)
        else:
            pipe.to(self.device)
        denoiser = getattr(pipe, "transformer", None) or getattr(pipe, "unet", None)
        if denoiser is None:
            return
        if spec.attention not in ("sdpa", "native", "default") and hasattr(denoiser, "set_attention_backend"):
            try:
                denoiser.set_attention_backend(spec.attention)
            except Exception as exc:  # a missing kernel package must not take the worker down
                log.warning("attention backend %s unavailable for %s: %s", spec.attention, spec.id, exc)
        if spec.compile:
            denoiser.compile()


def _is_tool(entry: CachedModel) -> bool:
    """A cached component that is not a model of the registry (engine/compose.py)."""
    return entry.tool


def _lora_sources(registry: Registry) -> set[str]:
    return {registry.resolve_source(lo.source) for f in registry.families.values() for lo in f.loras}


def _quiet_loading() -> None:
    """Loading progress bars are noise in a worker's log; the cache logs each load in one line."""
    from diffusers.utils import logging as diffusers_logging
    from transformers.utils import logging as transformers_logging

    diffusers_logging.disable_progress_bar()
    transformers_logging.disable_progress_bar()


def _check(req: GenerationRequest) -> None:
    if not req.seeds:
        raise InvalidRequest("at least one seed is required")
    if req.task in ("img2img", "inpaint", "edit") and req.image is None:
        raise InvalidRequest(f"task {req.task} needs an input image", code="invalid_input")
    if req.task == "inpaint" and req.mask is None:
        raise InvalidRequest("inpaint needs a mask", code="invalid_input")
