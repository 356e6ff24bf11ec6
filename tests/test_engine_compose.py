"""The engine's composition glue on the tiny models: tools share the pipeline cache but are never
reported or evicted as registry models, and a mask prompt's mask and the control images come
back from ``prepare``."""

from __future__ import annotations

from pathlib import Path

import torch
from PIL import Image

from inference_server.engine.compose import ControlRef
from inference_server.engine.runner import Engine, GenerationRequest
from inference_server.registry import load_registry

torch.set_num_threads(1)


def _scene() -> Image.Image:
    image = Image.new("RGB", (64, 64), (240, 240, 240))
    image.paste((200, 30, 30), (8, 36, 28, 58))
    return image


def _request(**kw: object) -> GenerationRequest:
    fields: dict = dict(
        family="sd15",
        model=None,
        task="txt2img",
        prompt="a box",
        negative_prompt=None,
        width=64,
        height=64,
        steps=2,
        guidance_scale=None,
        seeds=[3],
    )
    return GenerationRequest(**{**fields, **kw})


def test_tools_are_cached_beside_models_but_never_taken_for_them(tiny_models: Path) -> None:
    registry = load_registry(tiny_models)
    engine = Engine(registry, device="cpu")
    image = _scene()
    req = _request(
        task="inpaint",
        image=image,
        strength=0.75,
        mask_prompt="the red box",
        controls=[ControlRef("tiny-depth", image, 1.0, "depth")],
    )
    prepared = engine.prepare(req)
    assert prepared.mask is not None and prepared.mask.size == (64, 64) and req.mask is prepared.mask
    assert [c.size for c in prepared.controls] == [(64, 64)] and prepared.controls[0].mode == "RGB"
    engine.generate(req)
    engine.verdicts("sd15", [image])
    cached = {(e.family, e.model) for e in engine.cache.entries()}
    assert len(cached) > 1, cached  # the model, and the ControlNet, depth model, detector, SAM, checker
    assert engine.loaded() == {("sd15", "tiny-sd15")}
    assert engine.set_registry(load_registry(tiny_models)) == []  # nothing evicted
    assert {(e.family, e.model) for e in engine.cache.entries()} == cached
