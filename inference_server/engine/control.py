"""ControlNets: loading them, the ControlNet variant of a pipeline, and the arguments of its call.

A ControlNet job runs diffusers' ControlNet pipeline of the model's architecture for the task
(``StableDiffusionControlNet[Img2Img|Inpaint]Pipeline``, the SDXL ones, ``FluxControlNet*``), built
with ``from_pipe`` so it shares the loaded model's modules; several ControlNets become diffusers'
multi-ControlNet (their residuals summed, each with its own image, scale and window).

Scale 0 and the plain pipeline: SD 1.5 and SDXL ControlNet pipelines add the ControlNet's residuals,
multiplied by the scale, to the UNet's own features and draw nothing from the generators for the
control image, so a scale of 0 (or a step outside the start..end window) gives the plain
pipeline's pixels bit for bit, as long as both run with the same guidance scale (SDXL's ControlNet
inpaint pipeline defaults to 5.0, the plain one to 7.5) and without ``guess_mode`` (which feeds the
ControlNet the conditional half only and is not used here). FLUX's ControlNet pipelines VAE-encode
the control image by sampling with the job's generators before drawing the initial noise, so their
noise, and the image, differ from the plain pipeline's even at scale 0.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from PIL import Image

from inference_server.errors import InvalidRequest

_TASKS = ("txt2img", "img2img", "inpaint")
# Pipelines that take the control image as ``image`` (their only image input).
_CONTROL_AS_IMAGE = ("StableDiffusionControlNetPipeline", "StableDiffusionXLControlNetPipeline")
# FLUX's img2img and inpaint ControlNet pipelines build no control modes for several ControlNets
# unless given a list (diffusers 0.42: the multi-ControlNet then merges nothing and fails); a mode of
# None per ControlNet is what their txt2img sibling fills in.
_FLUX_NEEDS_MODES = ("FluxControlNetImg2ImgPipeline", "FluxControlNetInpaintPipeline")


@dataclass
class ControlInput:
    """One ControlNet's part of a job: its control image (already preprocessed, at the job's size),
    its scale, and the fraction of the steps it acts on (``start``..``end``, 0..1)."""

    image: Image.Image
    scale: float = 1.0
    start: float = 0.0
    end: float = 1.0


def load_controlnet(path: str, dtype: torch.dtype) -> Any:
    """Load the ControlNet in the folder ``path`` as the class its ``config.json`` names
    (``ControlNetModel`` for SD 1.5 / SDXL, ``FluxControlNetModel`` for FLUX)."""
    import diffusers
    from diffusers import ControlNetModel

    config = ControlNetModel.load_config(path)
    name = config.get("_class_name", "ControlNetModel")
    cls = getattr(diffusers, name, None)
    if cls is None or "ControlNet" not in name:
        raise InvalidRequest(f"the folder holds a {name}, not a ControlNet", code="unsupported_composition")
    return cls.from_pretrained(path, dtype=dtype).eval()


def control_pipeline(base: Any, task: str, controlnets: list[Any]) -> Any:
    """The ControlNet pipeline of ``base``'s architecture for ``task`` (txt2img, img2img, inpaint),
    sharing ``base``'s modules and using ``controlnets`` (several: a multi-ControlNet).

    Raises ``InvalidRequest(code="unsupported_composition")`` where diffusers has no such pipeline."""
    from diffusers import AutoPipelineForImage2Image, AutoPipelineForInpainting, AutoPipelineForText2Image

    name = type(base).__name__
    if not controlnets:
        raise ValueError("control_pipeline needs at least one ControlNet")
    auto = {
        "txt2img": AutoPipelineForText2Image,
        "img2img": AutoPipelineForImage2Image,
        "inpaint": AutoPipelineForInpainting,
    }.get(task)
    # Qwen edit pipelines (and any class the AutoPipelines do not map) have no ControlNet variant.
    if auto is None or "Edit" in name:
        raise InvalidRequest(
            f"{name} has no ControlNet pipeline for task {task!r}", code="unsupported_composition"
        )
    controlnet = controlnets[0] if len(controlnets) == 1 else list(controlnets)
    try:
        pipe = auto.from_pipe(base, controlnet=controlnet)
    except (ValueError, KeyError) as exc:  # the architecture has no ControlNet variant for the task
        raise InvalidRequest(
            f"{name} has no ControlNet pipeline for task {task!r}", code="unsupported_composition"
        ) from exc
    if "ControlNet" not in type(pipe).__name__:
        # from_pipe fell back to a plain pipeline: the ControlNet would be silently ignored.
        raise InvalidRequest(
            f"{name} has no ControlNet pipeline for task {task!r}", code="unsupported_composition"
        )
    pipe.set_progress_bar_config(disable=True)
    return pipe


def control_kwargs(pipe: Any, task: str, controls: list[ControlInput], images: int) -> dict[str, Any]:
    """Keyword arguments to add to the call of ``pipe`` (a :func:`control_pipeline` result) for
    ``controls``, one per ControlNet of the pipeline, in its order; ``images`` is the number of images
    the call makes.

    Each control image is given once: every ControlNet pipeline repeats a single control image for
    each image of the call (``num_images_per_prompt``) and refuses a batch of them unless it matches
    the prompts. Several ControlNets take lists, element i for ControlNet i."""
    if task not in _TASKS:
        raise InvalidRequest(f"no ControlNet for task {task!r}", code="unsupported_composition")
    if not controls:
        raise ValueError("control_kwargs needs at least one control")
    if images < 1:
        raise ValueError("a call makes at least one image")
    name = type(pipe).__name__
    wanted = len(getattr(pipe.controlnet, "nets", [pipe.controlnet]))
    if len(controls) != wanted:
        raise ValueError(f"{len(controls)} controls for a pipeline of {wanted} ControlNet(s)")
    for control in controls:
        if not 0.0 <= control.start < control.end <= 1.0:
            raise InvalidRequest(
                f"a ControlNet's window must have 0 <= start < end <= 1 (got {control.start}..{control.end})",
                code="validation_error",
            )
    several = len(controls) > 1
    images_arg: Any = [c.image for c in controls] if several else controls[0].image

    def per_net(values: list[float]) -> float | list[float]:
        return values if several else values[0]

    kwargs: dict[str, Any] = {
        "image" if name in _CONTROL_AS_IMAGE else "control_image": images_arg,
        "controlnet_conditioning_scale": per_net([float(c.scale) for c in controls]),
        "control_guidance_start": per_net([float(c.start) for c in controls]),
        "control_guidance_end": per_net([float(c.end) for c in controls]),
    }
    if several and name in _FLUX_NEEDS_MODES:
        kwargs["control_mode"] = [None] * len(controls)
    return kwargs
