"""ControlNet preprocessors: turn an input image into the control image a ControlNet was trained on.

Kinds: ``none`` (the image, resized), ``canny`` (edges), ``depth`` (a transformers depth model's
prediction as a grey image), ``pose`` (a transformers keypoint model's skeleton, OpenPose-style).
Every kind first resizes the input to the job's size, as the ControlNet annotators do, so the
control image matches the latents it guides.

Canny is OpenCV's ``cv2.Canny``: the function lllyasviel's ControlNet annotator and controlnet_aux
call to make the canny ControlNets' training data, so a control image made here is the kind those
models saw (a re-implementation would differ in its gradient operator, rounding and hysteresis).

Depth and pose models are loaded by :func:`load_preprocessor` (the engine caches the result) and
used by :func:`preprocess`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from PIL import Image

from inference_server.errors import InvalidRequest

KINDS = ("none", "canny", "depth", "pose")
MODEL_KINDS = ("depth", "pose")

# controlnet_aux's CannyDetector defaults, used for the canny ControlNets' training images.
CANNY_LOW = 100
CANNY_HIGH = 200
# A keypoint below this heatmap score is not drawn (nor the limbs it ends).
POSE_THRESHOLD = 0.3

# OpenPose's 18 body keypoints as COCO's 17 (ViTPose's output): nose, neck (the shoulders' middle),
# right shoulder, elbow, wrist, left shoulder, elbow, wrist, right hip, knee, ankle, left hip, knee,
# ankle, right eye, left eye, right ear, left ear. None: the neck, derived.
_OPENPOSE_FROM_COCO = (0, None, 6, 8, 10, 5, 7, 9, 12, 14, 16, 11, 13, 15, 2, 1, 4, 3)
# OpenPose's limbs (pairs of the indices above) and its colours, as the openpose ControlNets saw them.
_LIMBS = (
    (1, 2), (1, 5), (2, 3), (3, 4), (5, 6), (6, 7), (1, 8), (8, 9), (9, 10),
    (1, 11), (11, 12), (12, 13), (1, 0), (0, 14), (14, 16), (0, 15), (15, 17),
)  # fmt: skip
_COLORS = (
    (255, 0, 0), (255, 85, 0), (255, 170, 0), (255, 255, 0), (170, 255, 0), (85, 255, 0),
    (0, 255, 0), (0, 255, 85), (0, 255, 170), (0, 255, 255), (0, 170, 255), (0, 85, 255),
    (0, 0, 255), (85, 0, 255), (170, 0, 255), (255, 0, 255), (255, 0, 170), (255, 0, 85),
)  # fmt: skip


@dataclass
class LoadedPreprocessor:
    """A preprocessor's model and image processor, on ``device``."""

    kind: str
    model: Any
    processor: Any
    device: str


def load_preprocessor(kind: str, path: str, device: str) -> LoadedPreprocessor:
    """Load the model of a ``depth`` or ``pose`` preprocessor from the folder ``path``.

    Depth: any transformers depth-estimation model (DPT, Depth Anything); pose: a ViTPose model.
    Each folder holds the model and its image processor, as they are published."""
    from transformers import AutoImageProcessor

    if kind == "depth":
        from transformers import AutoModelForDepthEstimation

        model: Any = AutoModelForDepthEstimation.from_pretrained(path)
    elif kind == "pose":
        from transformers import VitPoseForPoseEstimation

        model = VitPoseForPoseEstimation.from_pretrained(path)
    else:
        raise InvalidRequest(
            f"preprocess {kind!r} has no model (models: {', '.join(MODEL_KINDS)})",
            code="unsupported_composition",
        )
    processor = AutoImageProcessor.from_pretrained(path)
    return LoadedPreprocessor(kind=kind, model=model.to(device).eval(), processor=processor, device=device)


def preprocess(
    kind: str, loaded: LoadedPreprocessor | None, image: Image.Image, width: int, height: int
) -> Image.Image:
    """The RGB control image of ``width`` x ``height`` that preprocessor ``kind`` makes of ``image``.

    ``loaded`` is :func:`load_preprocessor`'s result for ``depth`` and ``pose``, None otherwise."""
    if kind not in KINDS:
        raise InvalidRequest(
            f"unknown preprocess {kind!r} (known: {', '.join(KINDS)})", code="unsupported_composition"
        )
    resized = image.convert("RGB").resize((width, height), Image.Resampling.LANCZOS)
    if kind == "none":
        return resized
    if kind == "canny":
        return canny(resized)
    if loaded is None or loaded.kind != kind:
        raise ValueError(f"preprocess {kind!r} needs its model loaded with load_preprocessor")
    if kind == "depth":
        return depth(loaded, resized)
    return pose(loaded, resized)


def canny(image: Image.Image, low: int = CANNY_LOW, high: int = CANNY_HIGH) -> Image.Image:
    """White edges on black, by ``cv2.Canny`` on the image's pixels (as the annotators do)."""
    import cv2

    edges = cv2.Canny(np.asarray(image.convert("RGB")), low, high)
    return Image.fromarray(edges).convert("RGB")


@torch.inference_mode()
def depth(loaded: LoadedPreprocessor, image: Image.Image) -> Image.Image:
    """The model's predicted depth at the image's size, stretched to 0..255, as a grey RGB image."""
    inputs = loaded.processor(images=image, return_tensors="pt").to(loaded.device)
    outputs = loaded.model(**inputs)
    predicted = loaded.processor.post_process_depth_estimation(
        outputs, target_sizes=[(image.height, image.width)]
    )
    values = predicted[0]["predicted_depth"].float().cpu().numpy()
    low, high = float(values.min()), float(values.max())
    # A flat prediction has no depth to show: mid-grey rather than a division by zero.
    scaled = (values - low) / (high - low) if high > low else np.full_like(values, 0.5)
    grey = np.clip(np.rint(scaled * 255.0), 0, 255).astype(np.uint8)
    return Image.fromarray(grey).convert("RGB")


@torch.inference_mode()
def keypoints(loaded: LoadedPreprocessor, image: Image.Image) -> tuple[np.ndarray, np.ndarray]:
    """COCO's 17 keypoints (x, y in pixels) and their scores for the person filling ``image``.

    ViTPose is top-down: it estimates the pose of a person in a given box. The box here is the
    whole image (a person detector in front would find one box per person; the jobs this serves
    show one person, framed)."""
    boxes = [[[0.0, 0.0, float(image.width), float(image.height)]]]
    inputs = loaded.processor(images=image, boxes=boxes, return_tensors="pt").to(loaded.device)
    outputs = loaded.model(**inputs)
    person = loaded.processor.post_process_pose_estimation(outputs, boxes=boxes)[0][0]
    return person["keypoints"].float().cpu().numpy(), person["scores"].float().cpu().numpy()


def pose(loaded: LoadedPreprocessor, image: Image.Image, threshold: float = POSE_THRESHOLD) -> Image.Image:
    """The skeleton of the person in ``image``, drawn OpenPose-style on black at the image's size."""
    points, scores = keypoints(loaded, image)
    return draw_skeleton(points, scores, image.width, image.height, threshold)


def draw_skeleton(
    points: np.ndarray, scores: np.ndarray, width: int, height: int, threshold: float
) -> Image.Image:
    """Draw COCO keypoints as OpenPose's 18-keypoint body: limbs as ellipses at 60% of their colour,
    then the joints as discs, on a black ``width`` x ``height`` canvas (controlnet_aux's drawing)."""
    import cv2

    body: list[tuple[float, float] | None] = []
    for coco in _OPENPOSE_FROM_COCO:
        if coco is None:  # the neck: between the shoulders, when both are seen
            ok = scores[5] >= threshold and scores[6] >= threshold
            body.append(tuple((points[5] + points[6]) / 2) if ok else None)  # type: ignore[arg-type]
        else:
            body.append(
                (float(points[coco][0]), float(points[coco][1])) if scores[coco] >= threshold else None
            )
    canvas = np.zeros((height, width, 3), dtype=np.uint8)
    # OpenPose draws at 512 px with limbs 4 px wide and joints of radius 4: scaled to the canvas.
    stick = max(1, round(4 * max(width, height) / 512))
    for (a, b), color in zip(_LIMBS, _COLORS[: len(_LIMBS)], strict=True):
        pa, pb = body[a], body[b]
        if pa is None or pb is None:
            continue
        (xa, ya), (xb, yb) = pa, pb
        length = float(np.hypot(xb - xa, yb - ya))
        angle = float(np.degrees(np.arctan2(yb - ya, xb - xa)))
        centre = (int((xa + xb) / 2), int((ya + yb) / 2))
        polygon = cv2.ellipse2Poly(centre, (int(length / 2), stick), int(angle), 0, 360, 1)
        cv2.fillConvexPoly(canvas, np.asarray(polygon, dtype=np.int32), [int(c * 0.6) for c in color])
    for point, color in zip(body, _COLORS, strict=True):
        if point is not None:
            cv2.circle(canvas, (int(point[0]), int(point[1])), stick, color, thickness=-1)
    return Image.fromarray(canvas)
