"""Per-family pipeline variants and call arguments.

A model is loaded once as whatever pipeline class its folder names (``model_index.json``); each task
gets a variant built with ``from_pipe`` (diffusers' AutoPipelines pick the class: SD, SDXL and FLUX
have txt2img, img2img and inpaint variants), sharing the same modules. Call arguments are written
once and filtered by what the variant's ``__call__`` accepts, so families differ only where they
must (FLUX's distilled guidance, Qwen's true CFG, Qwen's working area).
"""

from __future__ import annotations

import contextlib
import contextvars
import importlib
import inspect
from collections.abc import Iterator
from typing import Any

import torch

from inference_server.errors import InvalidRequest
from inference_server.jobs.spec import DEFAULT_STRENGTH

_EDIT_CLASSES = ("QwenImageEditPipeline", "QwenImageEditPlusPipeline")


def variant(base: Any, task: str) -> Any:
    """The pipeline of ``base``'s architecture for ``task``, sharing its modules."""
    from diffusers import AutoPipelineForImage2Image, AutoPipelineForInpainting, AutoPipelineForText2Image

    name = type(base).__name__
    if task == "edit":
        if name not in _EDIT_CLASSES:
            raise InvalidRequest(f"{name} does not support the edit task", code="unsupported_task")
        return base
    auto = {
        "txt2img": AutoPipelineForText2Image,
        "img2img": AutoPipelineForImage2Image,
        "inpaint": AutoPipelineForInpainting,
    }.get(task)
    if auto is None or name in _EDIT_CLASSES:
        raise InvalidRequest(f"{name} does not support task {task!r}", code="unsupported_task")
    try:
        pipe = auto.from_pipe(base)
    except ValueError as exc:  # no variant of this architecture for the task
        raise InvalidRequest(f"{name} does not support task {task!r}", code="unsupported_task") from exc
    pipe.set_progress_bar_config(disable=True)
    return pipe


def call_kwargs(pipe: Any, req: Any, seeds: list[int], callback: Any) -> dict[str, Any]:
    """Keyword arguments for one call making an image per seed of ``req``, limited to what ``pipe``
    accepts."""
    name = type(pipe).__name__
    kwargs: dict[str, Any] = {
        "prompt": req.prompt,
        "negative_prompt": req.negative_prompt,
        "width": req.width,
        "height": req.height,
        "num_inference_steps": req.steps,
        "num_images_per_prompt": len(seeds),
        # One CPU generator per image: the same noise on every device, and image i draws only from
        # seed i, so a seed means one image whatever else is in the batch.
        "generator": [torch.Generator(device="cpu").manual_seed(seed) for seed in seeds],
        "callback_on_step_end": callback,
        "output_type": "pil",
    }
    if req.guidance_scale is not None:
        kwargs["guidance_scale"] = req.guidance_scale
    if req.task in ("img2img", "inpaint"):
        # The input once per image: some pipelines encode a single input with the first generator
        # only, and image i would then draw its noise from a generator in another state than when
        # its seed runs alone.
        kwargs["image"] = [req.image] * len(seeds)
        kwargs["strength"] = req.strength if req.strength is not None else DEFAULT_STRENGTH
    if req.task == "inpaint":
        kwargs["mask_image"] = [req.mask] * len(seeds)
    if name.startswith("Flux"):
        # FLUX.1 is guidance-distilled: guidance_scale is an embedding, a negative prompt needs true CFG.
        kwargs.pop("negative_prompt")
    if name in _EDIT_CLASSES:
        # Once, not once per image: a list is several inputs to one edit for the Plus pipeline.
        # Qwen encodes its input with the latents' mode, drawing nothing from the generators.
        kwargs["image"] = req.image
        # Qwen edit runs true classifier-free guidance: its scale is true_cfg_scale, and it needs
        # a negative prompt.
        kwargs["true_cfg_scale"] = kwargs.pop("guidance_scale", 4.0)
        if kwargs["true_cfg_scale"] > 1 and not kwargs.get("negative_prompt"):
            kwargs["negative_prompt"] = " "
    accepted = inspect.signature(pipe.__call__).parameters
    return {k: v for k, v in kwargs.items() if k in accepted and v is not None}


# --- Working area of Qwen edit pipelines ------------------------------------------------------------
# Both Qwen edit pipelines resize their input before encoding it, whatever the output size, each
# through the calculate_dimensions of its own module: QwenImageEditPipeline to about 1024x1024
# (calculate_dimensions(1024 * 1024, ratio)); QwenImageEditPlusPipeline every input twice, for the
# VAE at VAE_IMAGE_SIZE (1024x1024) and for the vision encoder at CONDITION_IMAGE_SIZE (384x384).
# A cap set per call through a context variable bounds each of those areas; the wrappers are
# installed once and are no-ops when no cap is set.
_EDIT_MODULES = (
    "diffusers.pipelines.qwenimage.pipeline_qwenimage_edit",
    "diffusers.pipelines.qwenimage.pipeline_qwenimage_edit_plus",
)
_edit_pixels: contextvars.ContextVar[int] = contextvars.ContextVar("edit_pixels", default=0)
_patched = False


def _capped(original: Any) -> Any:
    def capped(target_area: float, ratio: float) -> Any:
        cap = _edit_pixels.get()
        return original(min(target_area, cap) if cap else target_area, ratio)

    return capped


def _install_edit_cap() -> None:
    global _patched
    if _patched:
        return
    for name in _EDIT_MODULES:
        module: Any = importlib.import_module(name)
        module.calculate_dimensions = _capped(module.calculate_dimensions)
    _patched = True


@contextlib.contextmanager
def edit_area(max_pixels: int) -> Iterator[None]:
    """Cap the working area of Qwen edit pipelines inside the block (0: the pipeline's own)."""
    if not max_pixels:  # no cap: nothing to install, the pipeline keeps its own area
        yield
        return
    _install_edit_cap()
    token = _edit_pixels.set(max_pixels)
    try:
        yield
    finally:
        _edit_pixels.reset(token)
