"""ControlNet preprocessors on real (tiny, random-weight) transformers models: size, mode, determinism,
and that each kind shows what it claims (edges where the image has them, the model's depth, the
model's keypoints drawn as OpenPose's skeleton)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from inference_server.engine import preprocess as pp
from inference_server.engine.tiny.control import build_depth_estimator, build_pose_estimator
from inference_server.errors import InvalidRequest

torch.set_num_threads(1)


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("preprocessors")
    return {
        "depth": build_depth_estimator(root / "depth", seed=1),
        "depth-other": build_depth_estimator(root / "depth-other", seed=2),
        "pose": build_pose_estimator(root / "pose", seed=3),
    }


@pytest.fixture(scope="module")
def loaded(models: dict[str, Path]) -> dict[str, pp.LoadedPreprocessor]:
    return {kind: pp.load_preprocessor(kind.split("-")[0], str(path), "cpu") for kind, path in models.items()}


def person_like() -> Image.Image:
    """A red and blue image split at x = 40, with a light square: edges at known places."""
    image = Image.new("RGB", (80, 60), (200, 40, 30))
    image.paste((20, 90, 200), (40, 0, 80, 60))
    image.paste((240, 240, 240), (10, 10, 30, 30))
    return image


@pytest.mark.parametrize("kind", pp.KINDS)
@pytest.mark.parametrize("size", [(64, 64), (72, 48)])
def test_every_kind_gives_an_rgb_image_of_the_job_size(
    kind: str, size: tuple[int, int], loaded: dict[str, pp.LoadedPreprocessor]
) -> None:
    out = pp.preprocess(kind, loaded.get(kind), person_like(), *size)
    assert out.mode == "RGB"
    assert out.size == size


@pytest.mark.parametrize("kind", pp.KINDS)
def test_every_kind_is_deterministic_across_loads(
    kind: str, models: dict[str, Path], loaded: dict[str, pp.LoadedPreprocessor]
) -> None:
    first = pp.preprocess(kind, loaded.get(kind), person_like(), 64, 64)
    again = pp.preprocess(kind, loaded.get(kind), person_like(), 64, 64)
    reloaded = pp.load_preprocessor(kind, str(models[kind]), "cpu") if kind in pp.MODEL_KINDS else None
    fresh = pp.preprocess(kind, reloaded, person_like(), 64, 64)
    assert first.tobytes() == again.tobytes() == fresh.tobytes()


def test_none_only_resizes() -> None:
    image = person_like()
    out = pp.preprocess("none", None, image, 80, 60)
    assert out.tobytes() == image.tobytes()


def test_canny_draws_white_edges_where_the_colours_change_and_black_elsewhere() -> None:
    edges = np.asarray(pp.preprocess("canny", None, person_like(), 80, 60))
    assert set(np.unique(edges)) == {0, 255}
    assert (edges[..., 0] == edges[..., 1]).all() and (edges[..., 1] == edges[..., 2]).all()
    columns = np.flatnonzero(edges[40:55, :, 0].any(axis=0))  # rows below the square: the split only
    assert columns.size and columns.min() >= 38 and columns.max() <= 41
    assert not edges[40:55, :30, 0].any() and not edges[40:55, 50:, 0].any()  # flat areas stay black


def test_depth_is_the_models_prediction_stretched_to_the_full_range(
    loaded: dict[str, pp.LoadedPreprocessor],
) -> None:
    out = np.asarray(pp.preprocess("depth", loaded["depth"], person_like(), 64, 64))
    assert (out[..., 0] == out[..., 2]).all()
    assert out.min() == 0 and out.max() == 255
    # The model's own prediction, min-max scaled, is the image: another model gives another one.
    other = np.asarray(pp.preprocess("depth", loaded["depth-other"], person_like(), 64, 64))
    assert (out != other).mean() > 0.5
    model, processor = loaded["depth"].model, loaded["depth"].processor
    with torch.inference_mode():
        raw = model(
            **processor(images=person_like().resize((64, 64), Image.Resampling.LANCZOS), return_tensors="pt")
        )
    depth = processor.post_process_depth_estimation(raw, target_sizes=[(64, 64)])[0][
        "predicted_depth"
    ].numpy()
    # The grey levels are a monotone function of the predicted depth: sorted by depth, never darker.
    by_depth = out[..., 0].reshape(-1)[np.argsort(depth, axis=None, kind="stable")]
    assert (np.diff(by_depth.astype(int)) >= 0).all()


def test_pose_draws_the_models_keypoints_as_openpose_joints(loaded: dict[str, pp.LoadedPreprocessor]) -> None:
    image = person_like().resize((64, 64), Image.Resampling.LANCZOS)
    points, scores = pp.keypoints(loaded["pose"], image)
    assert points.shape == (17, 2) and scores.shape == (17,)
    threshold = float(np.sort(scores)[-6])  # the model's 6 best keypoints are drawn
    canvas = np.asarray(pp.draw_skeleton(points, scores, 64, 64, threshold))
    assert canvas.any()
    for openpose, coco in enumerate(pp._OPENPOSE_FROM_COCO):
        if coco is None or scores[coco] < threshold:
            continue
        x, y = int(points[coco][0]), int(points[coco][1])
        if 0 <= x < 64 and 0 <= y < 64:
            assert tuple(canvas[y, x]) == pp._COLORS[openpose]  # joints are drawn last, at full colour
    # Nothing above the threshold: a black canvas, no skeleton invented.
    assert not np.asarray(pp.draw_skeleton(points, scores, 64, 64, float(scores.max()) + 1)).any()


def test_skeleton_drawing_follows_openpose_colours_and_limbs() -> None:
    # A standing figure in COCO order: nose, eyes, ears, shoulders, elbows, wrists, hips, knees, ankles.
    points = np.array(
        [[32, 8], [30, 6], [34, 6], [28, 7], [36, 7], [24, 16], [40, 16], [22, 26], [42, 26],
         [20, 36], [44, 36], [27, 36], [37, 36], [27, 48], [37, 48], [27, 60], [37, 60]],
        dtype=np.float32,
    )  # fmt: skip
    canvas = np.asarray(pp.draw_skeleton(points, np.ones(17), 64, 64, 0.5))
    assert tuple(canvas[8, 32]) == (255, 0, 0)  # nose, OpenPose keypoint 0
    assert tuple(canvas[16, 32]) == (255, 85, 0)  # the neck, between the shoulders
    # The right forearm (elbow 3 to wrist 4), limb 3 in OpenPose's order, at 60% of its colour.
    assert tuple(canvas[31, 43]) == tuple(int(c * 0.6) for c in pp._COLORS[3])
    assert not canvas[:, :10].any()  # nothing drawn far from the figure


def test_unknown_kinds_are_refused(models: dict[str, Path]) -> None:
    with pytest.raises(InvalidRequest) as refused:
        pp.preprocess("sketch", None, person_like(), 64, 64)
    assert refused.value.code == "unsupported_composition"
    with pytest.raises(InvalidRequest):
        pp.load_preprocessor("canny", str(models["depth"]), "cpu")
    with pytest.raises(ValueError):
        pp.preprocess("depth", None, person_like(), 64, 64)
