"""ENGINE_MAX_EDIT_PIXELS bounds the area at which both Qwen edit pipelines encode their input:
QwenImageEditPipeline and QwenImageEditPlusPipeline, which sizes its inputs in a module of its own.
Measured where the work happens, at the input of the VAE's encoder."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
from PIL import Image

from inference_server.engine.runner import Engine
from inference_server.registry import Registry, load_registry
from tests.support.engine import tiny_request

torch.set_num_threads(1)

CAP = 64 * 64
MODELS = {
    "tiny-qwen-image-edit": "QwenImageEditPipeline",
    "tiny-qwen-image-edit-plus": "QwenImageEditPlusPipeline",
}


class AreaExceeded(Exception):
    """Stops a run as soon as an input is encoded above the cap (uncapped is 1024x1024: slow)."""


@pytest.fixture(scope="module")
def registry(tiny_models: Path, tmp_path_factory: pytest.TempPathFactory) -> Registry:
    from inference_server.engine.tiny.qwen import build_qwen_edit

    root = tmp_path_factory.mktemp("edit-area")
    build_qwen_edit(root / "plus", plus=True)
    sources = {
        "tiny-qwen-image-edit": tiny_models.parent / "qwen-image-edit",
        "tiny-qwen-image-edit-plus": root / "plus",
    }
    for model, cls in MODELS.items():
        assert json.loads((sources[model] / "model_index.json").read_text())["_class_name"] == cls
    models = "".join(
        f'[[families.qwen-image-edit.models]]\nid = "{m}"\nsource = "{src}"\ndtype = "bfloat16"\n'
        for m, src in sources.items()
    )
    (root / "models.toml").write_text(f'[families.qwen-image-edit]\ntasks = ["edit"]\n{models}')
    return load_registry(root / "models.toml")


@pytest.fixture
def encoded_areas() -> Iterator[list[int]]:
    """H*W of every image the Qwen-Image VAE encoder receives while the test runs."""
    areas: list[int] = []

    def record(module: torch.nn.Module, args: Any) -> None:
        if type(module).__name__ == "QwenImageEncoder3d":
            height, width = args[0].shape[-2:]
            areas.append(height * width)
            if height * width > CAP:
                raise AreaExceeded(f"input encoded at {width}x{height}, over the cap of {CAP} pixels")

    handle = torch.nn.modules.module.register_module_forward_pre_hook(record)
    yield areas
    handle.remove()


@pytest.mark.parametrize("model", MODELS)
def test_cap_bounds_the_working_area(registry: Registry, model: str, encoded_areas: list[int]) -> None:
    engine = Engine(registry, device="cpu", max_edit_pixels=CAP)
    image = Image.new("RGB", (256, 256), (200, 40, 30))  # larger than the cap: the pipeline resizes it
    [out] = engine.generate(tiny_request("qwen-image-edit", "edit", seeds=[4], model=model, image=image))
    assert out.size == (64, 64)
    assert encoded_areas and max(encoded_areas) == CAP  # 64x64: capped, not the pipeline's 1024x1024
