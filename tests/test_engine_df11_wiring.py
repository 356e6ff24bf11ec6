"""DFloat11 twins in the engine: same images as the BF16 models, with and without LoRA, less memory."""

from __future__ import annotations

import hashlib
from pathlib import Path

import pytest
import torch
from PIL import Image

from inference_server.engine.runner import Engine, LoraRef
from inference_server.registry import load_registry
from tests.support.engine import tiny_request

torch.set_num_threads(1)

TWINS = [
    ("flux", "txt2img", "tiny-flux", "tiny-flux-df11"),
    ("flux", "img2img", "tiny-flux", "tiny-flux-df11"),
    ("qwen-image-edit", "edit", "tiny-qwen-image-edit", "tiny-qwen-image-edit-df11"),
]


@pytest.fixture(scope="module")
def engine(tiny_models: Path) -> Engine:
    return Engine(load_registry(tiny_models), max_edit_pixels=64 * 64)


def run(engine: Engine, family: str, task: str, model: str, loras: list[LoraRef]) -> list[str]:
    image = Image.new("RGB", (64, 64), (90, 160, 40)) if task != "txt2img" else None
    # Two images: the DF11 weights serve a batched call as they serve a lone one.
    req = tiny_request(family, task, model=model, seeds=[11, 12], image=image, loras=loras)
    return [hashlib.sha256(im.tobytes()).hexdigest() for im in engine.generate(req)]


def test_registry_marks_df11_twins(tiny_models: Path) -> None:
    catalog = load_registry(tiny_models).catalog()
    df11 = {m["id"] for f in catalog["families"] for m in f["models"] if m["df11"]}
    assert df11 == {"tiny-flux-df11", "tiny-qwen-image-edit-df11"}


@pytest.mark.parametrize(("family", "task", "bf16", "df11"), TWINS)
def test_df11_twin_is_bit_identical(engine: Engine, family: str, task: str, bf16: str, df11: str) -> None:
    for loras in ([], [LoraRef("tiny-style", 1.0)], [LoraRef("tiny-style", 0.5)], []):
        assert run(engine, family, task, df11, loras) == run(engine, family, task, bf16, loras)
    sizes = {e.model: e.size for e in engine.cache.entries()}
    assert sizes[df11] < sizes[bf16]  # the cache sees the compressed weights, not BF16 copies
