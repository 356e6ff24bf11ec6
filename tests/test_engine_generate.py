"""The engine on tiny real pipelines: every family and task, determinism, progress, cancel, errors."""

from __future__ import annotations

import hashlib
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from inference_server.engine.runner import Engine, GenerationRequest, LoraRef
from inference_server.errors import InvalidRequest, JobCanceled
from inference_server.registry import load_registry
from tests.support.engine import tiny_request

torch.set_num_threads(1)

CASES = [
    ("sd15", None, "txt2img"),
    ("sd15", None, "img2img"),
    ("sd15", None, "inpaint"),
    ("sd15", "tiny-sd15-inpaint", "inpaint"),
    ("sdxl", None, "txt2img"),
    ("sdxl", None, "img2img"),
    ("sdxl", None, "inpaint"),
    ("flux", None, "txt2img"),
    ("flux", None, "img2img"),
    ("qwen-image-edit", None, "edit"),
]


@pytest.fixture(scope="module")
def engine(tiny_models: Path) -> Iterator[Engine]:
    # A working area of 64x64 keeps Qwen edit near a second per call (its own default is 1024x1024).
    yield Engine(load_registry(tiny_models), device="cpu", max_edit_pixels=64 * 64)


def request(family: str, model: str | None, task: str, seeds: list[int], **kw: object) -> GenerationRequest:
    image = Image.new("RGB", (64, 64), (200, 40, 30))
    image.paste((20, 90, 200), (0, 0, 32, 64))
    mask = Image.new("L", (64, 64), 0)
    mask.paste(255, (16, 16, 48, 48))
    fields: dict = dict(
        strength=None,
        image=image if task != "txt2img" else None,
        mask=mask if task == "inpaint" else None,
    )
    fields.update(kw)
    return tiny_request(family, task, seeds=seeds, model=model, **fields)


def digest(images: list[Image.Image]) -> list[str]:
    return [hashlib.sha256(im.tobytes()).hexdigest() for im in images]


def pixel_gap(a: Image.Image, b: Image.Image) -> float:
    """Mean absolute difference per channel, in 8-bit levels."""
    return float(np.abs(np.asarray(a, dtype=np.int16) - np.asarray(b, dtype=np.int16)).mean())


@pytest.mark.parametrize(("family", "model", "task"), CASES)
def test_every_family_and_task(engine: Engine, family: str, model: str | None, task: str) -> None:
    steps: list[tuple[int, int]] = []
    images = engine.generate(
        request(family, model, task, [1, 2]), on_step=lambda d, t: steps.append((d, t)) and False
    )
    assert [im.size for im in images] == [(64, 64), (64, 64)]
    assert all(im.mode == "RGB" for im in images)
    # Progress: both images in one denoising loop, each of its steps reported once against its length.
    assert steps == [(i, len(steps)) for i in range(1, len(steps) + 1)] and len(steps) >= 2
    assert len(steps) <= 3  # the request's 3 steps (fewer with strength), not 3 per image
    first, second = digest(images)
    assert first != second  # different seeds, different images
    # The same request gives the same bytes.
    assert digest(engine.generate(request(family, model, task, [1, 2]))) == [first, second]
    # Each image is its own seed's: the seed alone draws the same noise, so it gives the same image up
    # to the rounding of batched kernels (under a level on average; two seeds are levels apart).
    [alone] = engine.generate(request(family, model, task, [2]))
    assert pixel_gap(alone, images[1]) < 1.0 < pixel_gap(alone, images[0])


def test_requested_size_is_honoured(engine: Engine) -> None:
    images = engine.generate(request("sd15", None, "txt2img", [5], width=96, height=64))
    assert images[0].size == (96, 64)
    images = engine.generate(request("qwen-image-edit", None, "edit", [5], width=96, height=64))
    assert images[0].size == (96, 64)


def test_prompt_and_params_matter(engine: Engine) -> None:
    base = digest(engine.generate(request("sd15", None, "txt2img", [3])))
    assert digest(engine.generate(request("sd15", None, "txt2img", [3], prompt="a dog"))) != base
    assert digest(engine.generate(request("sd15", None, "txt2img", [3], guidance_scale=2.0))) != base


@pytest.mark.parametrize(
    ("family", "task"), [("sd15", "txt2img"), ("flux", "txt2img"), ("qwen-image-edit", "edit")]
)
def test_cancel_stops_at_the_step(engine: Engine, family: str, task: str) -> None:
    seen: list[int] = []

    def on_step(done: int, total: int) -> bool:
        seen.append(done)
        return done == 2

    with pytest.raises(JobCanceled):
        engine.generate(request(family, None, task, [1, 2], steps=6), on_step=on_step)
    assert seen == [1, 2]  # the run stopped at the step that asked
    # The pipeline is usable afterwards: the stop leaves nothing behind for the next job.
    assert len(engine.generate(request(family, None, task, [1]))) == 1


def test_img2img_strength_shortens_the_run(engine: Engine) -> None:
    steps: list[tuple[int, int]] = []
    engine.generate(
        request("sd15", None, "img2img", [1], steps=10, strength=0.5),
        on_step=lambda d, t: steps.append((d, t)) and False,
    )
    assert steps[-1] == (5, 5)


@pytest.mark.parametrize(("family", "model", "task"), CASES)
@pytest.mark.parametrize(("steps", "strength"), [(5, 0.5), (7, 0.3), (5, None)])
def test_the_planned_steps_are_the_steps_that_run(
    engine: Engine, family: str, model: str | None, task: str, steps: int, strength: float | None
) -> None:
    """What submit stores as the job's total (JobSpec.planned_steps, rounded as the registry says
    the family's pipelines round steps x strength) is what the pipeline's callback counts."""
    from inference_server.jobs.enums import Task
    from inference_server.jobs.spec import JobSpec

    spec = JobSpec(
        family=family, model=model or "m", task=Task(task), steps=steps, strength=strength, seeds=[1]
    )
    planned = spec.planned_steps(engine.registry.family(family).strength_steps)
    counted: list[int] = []
    engine.generate(
        request(family, model, task, [1], steps=steps, strength=strength),
        on_step=lambda d, t: counted.append(t) and False,
    )
    assert counted and set(counted) == {planned} and len(counted) == planned


@pytest.mark.parametrize(
    ("kw", "code"),
    [
        (dict(family="nope"), "unknown_family"),
        (dict(model="nope"), "unknown_model"),
        (dict(task="edit"), "unsupported_task"),
        (dict(task="img2img", image=None), "invalid_input"),
        (dict(task="inpaint", mask=None), "invalid_input"),
        (dict(seeds=[]), "invalid_request"),
        (dict(loras=[LoraRef("nope")]), "unknown_lora"),
    ],
)
def test_bad_requests(engine: Engine, kw: dict, code: str) -> None:
    req = request("sd15", None, "txt2img", [1])
    if kw.get("task") in ("img2img", "inpaint"):
        req = request("sd15", None, kw["task"], [1])
    for k, v in kw.items():
        setattr(req, k, v)
    with pytest.raises(InvalidRequest) as exc:
        engine.generate(req)
    assert exc.value.code == code


def test_edit_working_area_is_capped(engine: Engine, tiny_models: Path) -> None:
    """The cap decides the area Qwen edit encodes the input at: another cap, another image."""
    small = digest(engine.generate(request("qwen-image-edit", None, "edit", [9])))
    wider = Engine(load_registry(tiny_models), max_edit_pixels=128 * 128)
    larger = digest(wider.generate(request("qwen-image-edit", None, "edit", [9])))
    assert larger != small
    assert digest(engine.generate(request("qwen-image-edit", None, "edit", [9]))) == small
