"""LoRA per job: it changes the image, its scale matters, and the pipeline returns to base weights."""

from __future__ import annotations

import hashlib
import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from PIL import Image

from inference_server.engine.cache import CachedModel
from inference_server.engine.runner import Engine, LoraRef
from inference_server.errors import InvalidRequest
from inference_server.registry import load_registry
from tests.support.engine import tiny_request

torch.set_num_threads(1)


@pytest.fixture(scope="module")
def engine(tiny_models: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Engine]:
    yield Engine(
        load_registry(tiny_models),
        max_edit_pixels=64 * 64,
        cache_dir=tmp_path_factory.mktemp("engine-cache"),
        fetch=_copy_fetch,
    )


def _copy_fetch(uri: str, dest: Path) -> Path:
    """A fetch for ``copy://<folder>`` URIs: exercises the download path without a network."""
    assert uri.startswith("copy://")
    target = dest / "lora"
    shutil.copytree(uri[len("copy://") :], target)
    return target


def cached(engine: Engine, family: str, model: str) -> CachedModel:
    [entry] = [e for e in engine.cache.entries() if (e.family, e.model) == (family, model)]
    return entry


def run(engine: Engine, family: str, loras: list[LoraRef], seed: int = 4) -> str:
    task = "edit" if family == "qwen-image-edit" else "txt2img"
    req = tiny_request(
        family,
        task,
        seeds=[seed],
        image=Image.new("RGB", (64, 64), (120, 60, 30)) if task == "edit" else None,
        loras=loras,
    )
    return hashlib.sha256(engine.generate(req)[0].tobytes()).hexdigest()


@pytest.mark.parametrize("family", ["sd15", "flux", "qwen-image-edit"])
def test_lora_changes_output_and_leaves_base_intact(engine: Engine, family: str) -> None:
    base = run(engine, family, [])
    full = run(engine, family, [LoraRef("tiny-style", 1.0)])
    half = run(engine, family, [LoraRef("tiny-style", 0.5)])
    assert full != base and half not in (base, full)
    assert run(engine, family, [LoraRef("tiny-style", 1.0)]) == full  # reloaded adapter: same bytes
    assert run(engine, family, [LoraRef("tiny-style", 0.0)]) == base  # scale 0 is the base model
    assert run(engine, family, []) == base  # the next job without LoRA runs on base weights exactly
    model = engine.registry.family(family).model(None, "edit" if family == "qwen-image-edit" else "txt2img")
    assert len(cached(engine, family, model.id).adapters) == 1  # loaded once, kept for the next job


def test_lora_by_uri_is_fetched_once(engine: Engine, tiny_models: Path) -> None:
    folder = tiny_models.parent / "loras" / "sd15-style"
    by_name = run(engine, "sd15", [LoraRef("tiny-style", 1.0)])
    assert run(engine, "sd15", [LoraRef(f"copy://{folder}", 1.0)]) == by_name
    assert run(engine, "sd15", [LoraRef(f"file://{folder}", 1.0)]) == by_name
    downloads = list((engine.cache_dir / "loras").iterdir())
    run(engine, "sd15", [LoraRef(f"copy://{folder}", 1.0)])
    assert list((engine.cache_dir / "loras").iterdir()) == downloads and len(downloads) == 1


def test_lora_of_another_family_is_refused(engine: Engine) -> None:
    with pytest.raises(InvalidRequest) as exc:
        run(engine, "sdxl", [LoraRef("tiny-style", 1.0)])
    assert exc.value.code == "unknown_lora" and "sd15" in exc.value.message


def test_adapters_are_bounded_per_pipeline(tiny_models: Path, tmp_path: Path) -> None:
    engine = Engine(load_registry(tiny_models), max_loras=2)
    folder = tiny_models.parent / "loras" / "sd15-style"
    base = run(engine, "sd15", [])
    full = run(engine, "sd15", [LoraRef("tiny-style", 1.0)])
    for i in range(3):  # three more distinct sources of the same weights
        copy = tmp_path / f"lora-copy-{i}"
        shutil.copytree(folder, copy)
        assert run(engine, "sd15", [LoraRef(f"file://{copy}", 1.0)]) == full
    assert len(cached(engine, "sd15", "tiny-sd15").adapters) == 2
    assert run(engine, "sd15", []) == base


def test_hotswap_gives_the_bytes_of_separate_adapters(tiny_models: Path, tmp_path: Path) -> None:
    """Swapping LoRAs into one adapter slot changes nothing in the images: alternating between
    three LoRAs, back to one already seen, two at once, and none, on both engines."""
    from inference_server.engine.tiny.loras import build_lora

    uris = []
    for i in range(3):
        build_lora(tiny_models.parent / "sd15", tmp_path / f"style-{i}", seed=20 + i)
        uris.append(f"file://{tmp_path / f'style-{i}'}")
    jobs = [[], [uris[0]], [uris[1]], [uris[0]], [uris[2]], [uris[1], uris[0]], [], [uris[2]]]
    registry = load_registry(tiny_models)
    by_mode = {}
    for hotswap in (False, True):
        engine = Engine(registry, lora_hotswap=hotswap, max_loras=2)
        by_mode[hotswap] = [run(engine, "sd15", [LoraRef(u, 0.8) for u in job]) for job in jobs]
        entry = cached(engine, "sd15", "tiny-sd15")
        if hotswap:  # two slots (the most a job used at once), at most two LoRAs' weights kept
            assert len(entry.slots) == 2 and len(entry.resident) == 2 and not entry.adapters
            assert engine.last_lora_seconds is not None and engine.last_lora_seconds > 0
    assert by_mode[True] == by_mode[False]
    assert len(set(by_mode[True][1:6])) == 4 and by_mode[True][0] == by_mode[True][6]
