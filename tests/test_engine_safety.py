"""The safety checker on tiny real models whose verdicts are set by their thresholds or bias."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from inference_server.engine.safety import (
    CLASSIFIER,
    SD_CHECKER,
    check_images,
    load_safety_checker,
)
from inference_server.engine.tiny.vision import build_detector, build_nsfw_classifier, build_safety_checker
from inference_server.errors import ModelError

torch.set_num_threads(1)


@pytest.fixture(scope="module")
def root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("safety")
    build_safety_checker(root / "normal", seed=3)
    build_safety_checker(root / "flags", seed=3, flags_everything=True)
    build_nsfw_classifier(root / "classifier", seed=4)
    build_nsfw_classifier(root / "classifier-flags", seed=4, flags_everything=True)
    return root


@pytest.fixture
def images() -> list[Image.Image]:
    red = Image.new("RGB", (64, 64), "white")
    red.paste((220, 20, 20), (16, 16, 48, 48))
    noise = Image.fromarray(np.random.default_rng(0).integers(0, 256, (256, 256, 3), dtype=np.uint8))
    return [red, Image.new("RGB", (64, 64), "black"), noise, Image.new("L", (40, 72), 128)]


def test_normal_checker_flags_nothing(root: Path, images: list[Image.Image]) -> None:
    checker = load_safety_checker(str(root / "normal"), "cpu")
    assert checker.kind == SD_CHECKER
    verdicts = check_images(checker, images)
    assert len(verdicts) == len(images)
    # Margins are cosine - 2, so in [-3, -1].
    assert all(not v.nsfw and -3.0 <= v.score <= -1.0 for v in verdicts)
    assert len({v.score for v in verdicts}) > 1  # the score comes from each image


def test_flags_everything_checker_flags_every_image(root: Path, images: list[Image.Image]) -> None:
    verdicts = check_images(load_safety_checker(str(root / "flags"), "cpu"), images)
    # Margins are cosine + 2 plus the special-care 0.01, so in [1, 3.01].
    assert all(v.nsfw and 1.0 <= v.score <= 3.01 for v in verdicts)


def test_verdicts_are_deterministic_across_loads(root: Path, images: list[Image.Image]) -> None:
    first = check_images(load_safety_checker(str(root / "normal"), "cpu"), images)
    second = check_images(load_safety_checker(str(root / "normal"), "cpu"), images)
    assert first == second
    one_by_one = [check_images(load_safety_checker(str(root / "normal"), "cpu"), [im])[0] for im in images]
    assert [v.nsfw for v in one_by_one] == [v.nsfw for v in first]
    assert np.allclose([v.score for v in one_by_one], [v.score for v in first], atol=1e-5)


def test_checker_in_one_folder_loads_too(root: Path, tmp_path: Path, images: list[Image.Image]) -> None:
    # The published checker's own repository keeps the model and the processor configs side by side.
    flat = tmp_path / "flat"
    shutil.copytree(root / "flags" / "safety_checker", flat)
    shutil.copy(root / "flags" / "feature_extractor" / "preprocessor_config.json", flat)
    checker = load_safety_checker(str(flat), "cpu")
    assert checker.kind == SD_CHECKER
    assert check_images(checker, images) == check_images(
        load_safety_checker(str(root / "flags"), "cpu"), images
    )


def test_image_classifier_with_an_nsfw_label(root: Path, images: list[Image.Image]) -> None:
    normal = load_safety_checker(str(root / "classifier"), "cpu")
    assert normal.kind == CLASSIFIER
    assert all(not v.nsfw and 0.0 <= v.score < 0.5 for v in check_images(normal, images))
    flags = load_safety_checker(str(root / "classifier-flags"), "cpu")
    assert all(v.nsfw and 0.5 < v.score <= 1.0 for v in check_images(flags, images))


def test_no_images_no_verdicts(root: Path) -> None:
    assert check_images(load_safety_checker(str(root / "normal"), "cpu"), []) == []


def test_a_model_that_is_no_checker_is_a_model_error(tmp_path: Path) -> None:
    with pytest.raises(ModelError, match="nsfw"):
        load_safety_checker(str(build_detector(tmp_path / "detector", seed=1)), "cpu")
