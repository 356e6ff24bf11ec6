"""Masks from words on tiny real OWLv2 and SAM models: boxes, threshold, grow, blur, SAM refinement."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from inference_server.engine.masks import (
    Detector,
    Segmenter,
    load_detector,
    load_segmenter,
    mask_from_prompt,
)
from inference_server.engine.tiny.vision import build_detector, build_segmenter
from inference_server.errors import InferenceError, InvalidRequest, ModelError

torch.set_num_threads(1)

PROMPT = "a red square"


@pytest.fixture(scope="module")
def folders(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("vision")
    return {
        "detector": build_detector(root / "detector", seed=1),
        "segmenter": build_segmenter(root / "segmenter", seed=2),
    }


@pytest.fixture(scope="module")
def detector(folders: dict[str, Path]) -> Detector:
    return load_detector(str(folders["detector"]), "cpu")


@pytest.fixture(scope="module")
def segmenter(folders: dict[str, Path]) -> Segmenter:
    return load_segmenter(str(folders["segmenter"]), "cpu")


@pytest.fixture
def image() -> Image.Image:
    # Not square, so the detector's padding to a square is exercised.
    im = Image.new("RGB", (80, 48), "white")
    im.paste((220, 20, 20), (20, 10, 44, 34))
    return im


def masked(mask: Image.Image) -> np.ndarray:
    return np.asarray(mask) > 0


def box_fill(boxes: list, size: tuple[int, int]) -> np.ndarray:
    out = np.zeros((size[1], size[0]), dtype=bool)
    for x0, y0, x1, y1, _ in boxes:
        out[int(np.floor(y0)) : int(np.ceil(y1)), int(np.floor(x0)) : int(np.ceil(x1))] = True
    return out


def test_threshold_zero_fills_every_box_at_the_image_size(detector: Detector, image: Image.Image) -> None:
    result = mask_from_prompt(detector, None, image, PROMPT, threshold=0.0, grow=0, blur=0)
    assert result.mask.mode == "L" and result.mask.size == image.size
    assert len(result.boxes) > 1
    scores = [box[4] for box in result.boxes]
    assert scores == sorted(scores, reverse=True)
    for x0, y0, x1, y1, score in result.boxes:
        assert 0 <= x0 < x1 <= image.width and 0 <= y0 < y1 <= image.height and 0 < score < 1
    values = np.asarray(result.mask)
    assert set(np.unique(values)) <= {0, 255}
    assert np.array_equal(values > 0, box_fill(result.boxes, image.size))


def test_same_inputs_give_the_same_mask_across_builds(
    tmp_path: Path, folders: dict[str, Path], detector: Detector, image: Image.Image
) -> None:
    again = load_detector(str(build_detector(tmp_path / "again", seed=1)), "cpu")
    first = mask_from_prompt(detector, None, image, PROMPT, threshold=0.0, grow=2, blur=1)
    second = mask_from_prompt(again, None, image, PROMPT, threshold=0.0, grow=2, blur=1)
    assert first.boxes == second.boxes
    assert first.mask.tobytes() == second.mask.tobytes()
    weights = (folders["detector"] / "model.safetensors").read_bytes()
    assert weights == (tmp_path / "again" / "model.safetensors").read_bytes()


def test_threshold_keeps_only_boxes_at_or_above_it(detector: Detector, image: Image.Image) -> None:
    every = mask_from_prompt(detector, None, image, PROMPT, threshold=0.0, grow=0, blur=0)
    third = every.boxes[2][4]
    kept = mask_from_prompt(detector, None, image, PROMPT, threshold=third, grow=0, blur=0)
    assert kept.boxes == every.boxes[:3]
    assert masked(kept.mask).sum() < masked(every.mask).sum()


def test_grow_dilates_by_that_many_pixels_and_blur_feathers(detector: Detector, image: Image.Image) -> None:
    best = mask_from_prompt(detector, None, image, PROMPT, threshold=0.0, grow=0, blur=0).boxes[0][4]
    plain = mask_from_prompt(detector, None, image, PROMPT, threshold=best, grow=0, blur=0)
    grown = mask_from_prompt(detector, None, image, PROMPT, threshold=best, grow=3, blur=0)
    assert len(plain.boxes) == 1
    before, after = masked(plain.mask), masked(grown.mask)
    assert after.sum() > before.sum() and not (before & ~after).any()
    # Every new pixel is within 3 px of the old mask, and some are exactly 3 px away.
    ys, xs = np.nonzero(before)
    for y, x in zip(*np.nonzero(after & ~before), strict=True):
        assert np.min((ys - y) ** 2 + (xs - x) ** 2) <= 9
    assert (
        np.max([np.min((ys - y) ** 2 + (xs - x) ** 2) for y, x in zip(*np.nonzero(after), strict=True)]) == 9
    )

    blurred = mask_from_prompt(detector, None, image, PROMPT, threshold=best, grow=3, blur=2)
    values = np.asarray(blurred.mask)
    assert ((values > 0) & (values < 255)).any()  # a feathered edge
    assert values.max() == 255 and np.array_equal(np.asarray(grown.mask) == 255, np.asarray(grown.mask) > 0)


def test_threshold_above_every_score_is_mask_not_found(detector: Detector, image: Image.Image) -> None:
    best = mask_from_prompt(detector, None, image, PROMPT, threshold=0.0, grow=0, blur=0).boxes[0][4]
    with pytest.raises(InferenceError) as caught:
        mask_from_prompt(detector, None, image, PROMPT, threshold=best + 0.01, grow=4, blur=2)
    assert caught.value.code == "mask_not_found"
    assert PROMPT in caught.value.message and f"{best:.3f}" in caught.value.message


def test_sam_refines_each_box_to_a_mask_inside_it(
    detector: Detector, segmenter: Segmenter, image: Image.Image
) -> None:
    threshold = mask_from_prompt(detector, None, image, PROMPT, threshold=0.0, grow=0, blur=0).boxes[3][4]
    boxes_only = mask_from_prompt(detector, None, image, PROMPT, threshold=threshold, grow=0, blur=0)
    refined = mask_from_prompt(detector, segmenter, image, PROMPT, threshold=threshold, grow=0, blur=0)
    assert refined.boxes == boxes_only.boxes and refined.mask.size == image.size
    inside, boxes = masked(refined.mask), masked(boxes_only.mask)
    assert inside.any() and not (inside & ~boxes).any()
    assert inside.sum() < boxes.sum()  # SAM outlined less than the whole boxes
    again = mask_from_prompt(detector, segmenter, image, PROMPT, threshold=threshold, grow=0, blur=0)
    assert again.mask.tobytes() == refined.mask.tobytes()


def test_negative_grow_is_refused(detector: Detector, image: Image.Image) -> None:
    with pytest.raises(InvalidRequest):
        mask_from_prompt(detector, None, image, PROMPT, threshold=0.0, grow=-1, blur=0)


def test_a_folder_that_is_no_detector_is_a_model_error(folders: dict[str, Path]) -> None:
    with pytest.raises(ModelError, match="sam"):
        load_detector(str(folders["segmenter"]), "cpu")
