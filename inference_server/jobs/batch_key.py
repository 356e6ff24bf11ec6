"""Which jobs may share one pipeline call: the batch key of a job's spec.

Two jobs get the same key when one call can run both and give each the images it would get in a
call of its own (up to batched kernels' rounding): same model, task, size, steps, guidance, strength
and LoRA set (names and scales). What each image draws on its own may differ: prompt, negative
prompt, seeds, number of images, the input image and mask of img2img and inpaint (one per image in
the call), and everything done after the pipeline (signature, output format, metadata, webhook).

Whether a negative prompt is given is part of the key: some pipelines embed a missing negative
prompt as zeros (SDXL's ``force_zeros_for_empty_prompt``) and an empty one as the empty string's
embedding, so a batch cannot mix the two. Edit jobs have no key: Qwen edit pipelines take one
input image per call. Torch-free: the API computes the key at submit and stores it on the job row,
where a worker looks compatible queued jobs up by index."""

from __future__ import annotations

import hashlib
import json

from inference_server.jobs.enums import Task
from inference_server.jobs.spec import JobSpec

BATCHABLE_TASKS = (Task.TXT2IMG, Task.IMG2IMG, Task.INPAINT)


def batch_key(spec: JobSpec) -> str | None:
    """The key jobs that can share a pipeline call have in common, or None for a job that always
    runs alone."""
    if spec.task not in BATCHABLE_TASKS or not spec.width or not spec.height:
        return None
    if spec.preview is not None:  # previews come from a single job's latents (engine/preview.py)
        return None
    if spec.composed:  # control images, a reference image or a found mask are set per call
        return None
    shared = {
        "family": spec.family,
        "model": spec.model,
        "task": spec.task.value,
        "width": spec.width,
        "height": spec.height,
        "steps": spec.steps,
        "guidance_scale": spec.guidance_scale,
        "strength": spec.strength if spec.task.has_strength else None,
        "loras": [[lo.name, lo.scale] for lo in spec.loras],
        "negative_prompt": spec.negative_prompt is not None,
    }
    digest = hashlib.sha256(json.dumps(shared, sort_keys=True).encode()).hexdigest()
    return digest[:40]
