"""Several jobs in one pipeline call (engine.batch) on tiny real pipelines: each member's images
come from its own prompt and seeds, the same batch gives the same bytes, a member alone gives the
same images up to batched kernels' rounding, progress reaches every member, a member that leaves
does not stop the others."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from PIL import Image

from inference_server.engine.runner import Engine
from inference_server.errors import InvalidRequest, JobCanceled
from inference_server.registry import load_registry
from tests.test_engine_generate import digest, pixel_gap, request

torch.set_num_threads(1)

CASES = [
    ("sd15", "txt2img"),
    ("sd15", "img2img"),
    ("sd15", "inpaint"),
    ("sdxl", "txt2img"),
    ("flux", "txt2img"),
]


@pytest.fixture(scope="module")
def engine(tiny_models: Path) -> Iterator[Engine]:
    yield Engine(load_registry(tiny_models), device="cpu")


def members(family: str, task: str) -> list:
    negative = None if family == "flux" else "blurry"
    # Another input image for the second member: img2img and inpaint take one per image.
    other = {"image": Image.new("RGB", (64, 64), (10, 200, 60))} if task != "txt2img" else {}
    return [
        request(family, None, task, [11], prompt="a red house", negative_prompt=negative),
        request(family, None, task, [12, 13], prompt="a blue boat", negative_prompt=negative, **other),
        request(family, None, task, [14], prompt="a green tree", negative_prompt=negative and "dark"),
    ]


@pytest.mark.parametrize(("family", "task"), CASES)
def test_a_batch_gives_each_member_its_own_images(engine: Engine, family: str, task: str) -> None:
    reqs = members(family, task)
    seen: list[list[tuple[int, int]]] = [[] for _ in reqs]
    callbacks = [lambda d, t, s=s: s.append((d, t)) and False for s in seen]
    out = engine.generate_batch(reqs, callbacks)
    assert [len(images) for images in out] == [1, 2, 1]
    # One loop: every member saw every step once.
    assert seen[0] and all(s == seen[0] for s in seen)
    # Same batch, same bytes.
    assert [digest(i) for i in engine.generate_batch(members(family, task), [None] * 3)] == [
        digest(i) for i in out
    ]
    # Alone, each member's image is the same up to the rounding of batched kernels, and further
    # from another member's (other prompt and seed).
    for req, images in zip(members(family, task), out, strict=True):
        alone = engine.generate(req)
        for a, b in zip(alone, images, strict=True):
            assert pixel_gap(a, b) < 1.0
    assert pixel_gap(out[0][0], out[2][0]) > 1.0


def test_a_member_that_leaves_does_not_stop_the_others(engine: Engine) -> None:
    reqs = members("sd15", "txt2img")
    steps: list[int] = []
    callbacks = [
        lambda d, t: d >= 1,  # canceled after its first step
        lambda d, t: steps.append(d) and False,
        None,
    ]
    out = engine.generate_batch(reqs, callbacks)
    assert steps == [1, 2, 3]  # the call ran to its end for the members still in it
    assert [len(images) for images in out] == [1, 2, 1]


def test_the_call_stops_when_every_member_has_left(engine: Engine) -> None:
    steps: list[int] = []
    with pytest.raises(JobCanceled):
        engine.generate_batch(
            members("sd15", "txt2img"),
            [lambda d, t: steps.append(d) or True, lambda d, t: True, lambda d, t: True],
        )
    assert steps == [1]


def test_incompatible_members_are_refused(engine: Engine) -> None:
    a, b, _ = members("sd15", "txt2img")
    b.steps = 4
    with pytest.raises(InvalidRequest, match="steps"):
        engine.generate_batch([a, b], [None, None])
