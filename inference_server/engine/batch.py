"""Several compatible jobs in one pipeline call (cross-request batching).

The members share what their batch key says they share (model, task, size, steps, guidance,
strength, LoRA set); each keeps its own prompt, negative prompt, seeds and input image. The call
gets one prompt and one CPU-seeded generator per image across all members, in member order, and
its images are split back per member in the same order, so each image still comes from its own
seed's noise.

What a member gets: the same bytes as in any other run of the same batch (same members, same
order); against a run of its own, images within the rounding of batched kernels (on the CPU, at
most a colour level or so per pixel), because a matrix product over several rows may sum in
another order than over one.

Progress and cancellation: diffusers has one step callback per call; every member's ``on_step``
sees every step, and a member whose callback asks to stop has left the batch: the call runs on
for the others (a row cannot be dropped from a running call cheaply) and the caller discards that
member's images. The call stops only when every member has left."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import replace
from typing import Any

from inference_server.errors import InvalidRequest

StepCallback = Callable[[int, int], bool]


def check_compatible(requests: Sequence[Any]) -> None:
    """Refuse members that cannot share one call (a caller's bug: the batch key keeps them apart)."""
    first = requests[0]
    if first.task == "edit":
        raise InvalidRequest("edit jobs cannot be batched: the pipeline takes one input per call")
    shared = ("family", "model", "task", "width", "height", "steps", "guidance_scale", "strength")
    for other in requests[1:]:
        differing = [name for name in shared if getattr(other, name) != getattr(first, name)]
        if [(lo.name, lo.scale) for lo in other.loras] != [(lo.name, lo.scale) for lo in first.loras]:
            differing.append("loras")
        if (other.negative_prompt is None) != (first.negative_prompt is None):
            differing.append("negative_prompt")
        if differing:
            raise InvalidRequest(f"jobs differ in {', '.join(differing)} and cannot share a call")


def merged(requests: Sequence[Any]) -> Any:
    """One request standing for the batch: the first member with every member's seeds."""
    return replace(requests[0], seeds=[seed for r in requests for seed in r.seeds])


def batch_kwargs(kwargs: dict[str, Any], requests: Sequence[Any]) -> dict[str, Any]:
    """The call arguments of the merged request (``variants.call_kwargs``) made per image: one
    prompt, negative prompt, input and mask per image of every member."""
    out = dict(kwargs)

    def per_image(value: Callable[[Any], Any]) -> list[Any]:
        return [value(r) for r in requests for _ in r.seeds]

    out["prompt"] = per_image(lambda r: r.prompt)
    out["num_images_per_prompt"] = 1
    if "negative_prompt" in out:  # the batch key makes members agree on having one
        out["negative_prompt"] = per_image(lambda r: r.negative_prompt or "")
    if "image" in out:
        out["image"] = per_image(lambda r: r.image)
    if "mask_image" in out:
        out["mask_image"] = per_image(lambda r: r.mask)
    return out


def split(images: Sequence[Any], requests: Sequence[Any]) -> list[list[Any]]:
    """The call's images, per member, in the order of its seeds."""
    out, start = [], 0
    for r in requests:
        out.append(list(images[start : start + len(r.seeds)]))
        start += len(r.seeds)
    return out


class SharedSteps:
    """The call's step callback fanned out to every member's ``on_step``."""

    def __init__(self, callbacks: Sequence[StepCallback | None]) -> None:
        self.callbacks = list(callbacks)
        self.left = [False] * len(self.callbacks)

    def __call__(self, step: int, total: int) -> bool:
        """Tell every member; return True (stop the call) once every member has left."""
        for i, callback in enumerate(self.callbacks):
            if callback is not None and callback(step, total):
                self.left[i] = True
        return all(self.left)
