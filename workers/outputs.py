"""Storing a denoised job's outputs: each image signed (the artist's signature composited), encoded
with its parameters, hashed and uploaded, then the control images and mask the job asked to get
back. Plain functions of the settings and a storage, so the same code runs on the finisher's thread
or in the storing process (workers/storing.py); nothing here imports torch."""

from __future__ import annotations

import hashlib
import logging
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

from PIL import Image

from inference_server.jobs.spec import JobSpec
from inference_server.settings import Settings
from inference_server.storage.base import Storage, output_key

log = logging.getLogger(__name__)

EXTENSIONS = {"png": "png", "jpeg": "jpg", "webp": "webp"}


@dataclass(frozen=True)
class Judged:
    """The safety checker's verdict on one image, as storing needs it."""

    nsfw: bool
    score: float


@dataclass
class Extras:
    """What a run makes besides its images: the control images and mask the job asked to get
    back, and the safety checker's verdicts (one per image; None: not checked)."""

    controls: list[Image.Image] = field(default_factory=list)
    mask: Image.Image | None = None
    verdicts: list[Any] | None = None

    def plain(self) -> Extras:
        """The same, its verdicts as ``Judged`` (the engine's own carry tensors' types along)."""
        verdicts = None
        if self.verdicts is not None:
            verdicts = [None if v is None else Judged(bool(v.nsfw), float(v.score)) for v in self.verdicts]
        return Extras(self.controls, self.mask, verdicts)


def read_image(
    settings: Settings, storage: Storage, ref: str, *, draft_size: tuple[int, int] | None = None
) -> Image.Image:
    """An input image (a storage URI, a data URI or a URL), fetched and decoded within the limits."""
    from inference_server import imaging

    data = imaging.resolve_input(
        ref,
        read_storage=storage.get,
        allow_private=settings.allow_private_networks,
        timeout=settings.input_fetch_timeout,
        max_bytes=settings.max_input_bytes,
        attempts=settings.input_fetch_attempts,
    )
    return imaging.decode_image(
        data, max_bytes=settings.max_input_bytes, max_pixels=settings.max_input_pixels, draft_size=draft_size
    )


def store_outputs(
    settings: Settings,
    storage: Storage,
    job_id: str,
    spec: JobSpec,
    images: list[Image.Image],
    extras: Extras | None = None,
) -> list[dict[str, Any]]:
    """Encode and upload the job's images (signed, with their parameters), then the control
    images and mask it asked for; a blocked image (``safety: block``) is stored nowhere. Returns
    the output rows, in index order."""
    from inference_server import imaging

    sig = spec.signature
    signature = read_image(settings, storage, sig.image) if sig is not None else None
    extras = extras or Extras()
    verdicts = extras.verdicts or [None] * len(images)
    blocked = {i for i, v in enumerate(verdicts) if v is not None and v.nsfw and spec.safety == "block"}

    def finish(index: int, image: Image.Image) -> dict[str, Any]:
        verdict = verdicts[index]
        judged = {
            "kind": "image",
            "nsfw": None if verdict is None else bool(verdict.nsfw),
            "nsfw_score": None if verdict is None else float(verdict.score),
            "blocked": index in blocked,
        }
        if index in blocked:  # nothing of it leaves the worker: no bytes, no key
            log.info("job %s: output %d blocked by the safety checker", job_id, index)
            return {
                **_nothing_stored(job_id, index, image, spec.seeds[index]),
                **judged,
            }
        if sig is not None and signature is not None:
            image = imaging.composite_signature(
                image, signature, position=sig.position, opacity=sig.opacity, size=sig.size
            )
        seed = spec.seeds[index]
        parameters = {
            "prompt": spec.prompt,
            "negative_prompt": spec.negative_prompt,
            "seed": seed,
            "model": spec.model,
            "family": spec.family,
            "task": spec.task.value,
            "steps": spec.steps,
            "guidance_scale": spec.guidance_scale,
            "width": image.width,
            "height": image.height,
            "loras": [lo.model_dump() for lo in spec.loras],
        }
        data, content_type = imaging.encode_output(
            image,
            fmt=spec.output.format,
            quality=spec.output.quality,
            metadata=spec.output.metadata,
            parameters=parameters,
        )
        key = output_key(job_id, index, EXTENSIONS[spec.output.format])
        return {**_put(storage, key, data, content_type, job_id, index, image, seed), **judged}

    if len(images) == 1:
        outputs = [finish(0, images[0])]
    else:
        # Encodes release the GIL in Pillow and uploads wait on the network: overlap them.
        with ThreadPoolExecutor(max_workers=min(4, len(images))) as pool:
            outputs = list(pool.map(finish, range(len(images)), images))
    side = [("control", image) for image in extras.controls]
    if extras.mask is not None:
        side.append(("mask", extras.mask))
    for kind, image in side:
        outputs.append(store_side_output(storage, job_id, len(outputs), kind, image))
    return outputs


@dataclass
class ToStore:
    """One job's images to store, with what else its run made."""

    job_id: str
    spec: JobSpec
    images: list[Image.Image]
    extras: Extras | None = None


def store_all(
    settings: Settings, storage: Storage, jobs: list[ToStore]
) -> list[list[dict[str, Any]] | Exception]:
    """``store_outputs`` for several jobs (a batch's members, finished together), overlapped as
    one job's images are; return, in order, each job's rows or the error that stopped it (one
    job's failure leaves the others stored)."""
    if len(jobs) == 1:
        one = jobs[0]
        try:
            return [store_outputs(settings, storage, one.job_id, one.spec, one.images, one.extras)]
        except Exception as exc:
            return [exc]
    with ThreadPoolExecutor(max_workers=min(4, len(jobs))) as pool:
        futures = [
            pool.submit(store_outputs, settings, storage, j.job_id, j.spec, j.images, j.extras) for j in jobs
        ]
    results: list[list[dict[str, Any]] | Exception] = []
    for future in futures:
        error = future.exception()
        if error is not None and not isinstance(error, Exception):
            raise error
        results.append(error if error is not None else future.result())
    return results


def store_side_output(
    storage: Storage, job_id: str, index: int, kind: str, image: Image.Image
) -> dict[str, Any]:
    """A control image or mask as a plain PNG output: no seed, no signature, no safety check."""
    from inference_server import imaging

    data, content_type = imaging.encode_output(
        image, fmt="png", quality=100, metadata={}, parameters={"kind": kind}
    )
    stored = _put(storage, output_key(job_id, index, "png"), data, content_type, job_id, index, image, None)
    return {**stored, "kind": kind, "nsfw": None, "nsfw_score": None, "blocked": False}


def _put(
    storage: Storage,
    key: str,
    data: bytes,
    content_type: str,
    job_id: str,
    index: int,
    image: Image.Image,
    seed: int | None,
) -> dict[str, Any]:
    """Upload ``data``; the output row's common fields."""
    uri = storage.put(key, data, content_type)
    stored = {"uri": uri, "content_type": content_type, "sha256": hashlib.sha256(data).hexdigest()}
    return {**_nothing_stored(job_id, index, image, seed), **stored, "size_bytes": len(data)}


def _nothing_stored(job_id: str, index: int, image: Image.Image, seed: int | None) -> dict[str, Any]:
    return {
        "job_id": job_id,
        "index": index,
        "uri": None,
        "content_type": None,
        "width": image.width,
        "height": image.height,
        "seed": seed,
        "sha256": None,
        "size_bytes": 0,
    }
