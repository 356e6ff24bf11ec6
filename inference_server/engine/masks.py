"""Masks from words: an open-vocabulary detector finds the phrase, SAM outlines what it found.

``mask_from_prompt`` turns a phrase ("the red car") into an inpainting mask: the detector (OWLv2)
scores its candidate boxes against the phrase, the boxes at or above a threshold are kept, SAM (when
given) refines each box into the object's outline, and the union is grown and feathered. Loaded
models are plain data (:class:`Detector`, :class:`Segmenter`) that the engine caches.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from PIL import Image, ImageFilter

from inference_server.errors import InferenceError, InvalidRequest, ModelError

# The detector families whose processor pads to a bottom-right square before resizing, so that
# boxes come back relative to that square (see ``_detect``).
_DETECTORS = ("owlv2",)

Box = tuple[float, float, float, float, float]  # x0, y0, x1, y1 in pixels, then the score


@dataclass(frozen=True)
class Detector:
    """An open-vocabulary detector loaded with its processor, on ``device``."""

    model: Any
    processor: Any
    device: str


@dataclass(frozen=True)
class Segmenter:
    """A ``SamModel`` loaded with its ``SamProcessor``, on ``device``."""

    model: Any
    processor: Any
    device: str


@dataclass(frozen=True)
class MaskResult:
    """The mask (mode "L", the image's size; 255 = repaint) and the boxes it came from.

    Each box is ``(x0, y0, x1, y1, score)`` in the image's pixels, best score first.
    """

    mask: Image.Image
    boxes: list[Box] = field(default_factory=list)


def load_detector(path: str, device: str, dtype: torch.dtype | None = None) -> Detector:
    """Load the OWLv2 detector and processor saved in folder ``path`` onto ``device``."""
    from transformers import AutoConfig, AutoModelForZeroShotObjectDetection, AutoProcessor

    model_type = AutoConfig.from_pretrained(path).model_type
    if model_type not in _DETECTORS:
        raise ModelError(
            f"the detector is a {model_type} model; masks from words take {', '.join(_DETECTORS)}"
        )
    model = AutoModelForZeroShotObjectDetection.from_pretrained(path, dtype=dtype or torch.float32)
    return Detector(model.to(device).eval(), AutoProcessor.from_pretrained(path), device)


def load_segmenter(path: str, device: str, dtype: torch.dtype | None = None) -> Segmenter:
    """Load the ``SamModel`` and ``SamProcessor`` saved in folder ``path`` onto ``device``."""
    from transformers import SamModel, SamProcessor

    model: Any = SamModel.from_pretrained(path, dtype=dtype or torch.float32)
    return Segmenter(model.to(device).eval(), SamProcessor.from_pretrained(path), device)


def mask_from_prompt(
    detector: Detector,
    segmenter: Segmenter | None,
    image: Image.Image,
    prompt: str,
    *,
    threshold: float,
    grow: int,
    blur: int,
) -> MaskResult:
    """The mask of what ``prompt`` names in ``image``.

    Boxes scoring ``>= threshold`` are kept. With ``segmenter``, each box is a SAM box prompt and
    its mask, cut to the box, replaces it (a box where SAM outlines nothing stays a filled box, so a
    detection is never lost); without, the boxes are filled. The union is then dilated by ``grow``
    pixels (a disc, Euclidean distance) and feathered by a Gaussian blur of radius ``blur``.
    A phrase longer than the detector's text window (16 tokens for OWLv2) is cut to it.

    Raises ``InferenceError(code="mask_not_found")`` when no box reaches the threshold, naming the
    prompt and the best score seen; ``InvalidRequest`` for a negative ``grow`` or ``blur``.
    """
    if grow < 0 or blur < 0:
        raise InvalidRequest("mask grow and blur are pixels, 0 or more", code="invalid_request")
    image = image.convert("RGB")
    scored = _detect(detector, image, prompt)
    kept = [box for box in scored if box[4] >= threshold]
    if not kept:
        best = max((box[4] for box in scored), default=0.0)
        raise InferenceError(
            f"nothing in the image matches {prompt!r} at threshold {threshold:g} (best score {best:.3f})",
            code="mask_not_found",
        )
    binary = _filled(kept, image.size) if segmenter is None else _segmented(segmenter, image, kept)
    return MaskResult(_feathered(binary, grow, blur), kept)


def _detect(detector: Detector, image: Image.Image, prompt: str) -> list[Box]:
    """Every candidate box for ``prompt`` that overlaps the image, clipped to it, best score first."""
    processor = detector.processor
    inputs = processor(text=[[prompt]], images=image, return_tensors="pt", truncation=True)
    inputs = inputs.to(detector.device)
    inputs["pixel_values"] = inputs["pixel_values"].to(detector.model.dtype)
    with torch.no_grad():
        outputs = detector.model(**inputs)
    width, height = image.size
    # OWLv2 pads the image to a square at its bottom and right before resizing it, so its boxes are
    # fractions of that square, not of the image.
    side = max(width, height)
    # A threshold below any sigmoid keeps every box here, so the best score is known for the error.
    (result,) = processor.post_process_grounded_object_detection(
        outputs, threshold=-1.0, target_sizes=[(side, side)]
    )
    boxes = []
    for (x0, y0, x1, y1), score in zip(
        result["boxes"].float().tolist(), result["scores"].float().tolist(), strict=True
    ):
        box = (_clip(x0, width), _clip(y0, height), _clip(x1, width), _clip(y1, height), score)
        if _area(box) > 0:  # a box wholly in the padding holds nothing of the image
            boxes.append(box)
    boxes.sort(key=lambda box: -box[4])
    return boxes


def _segmented(segmenter: Segmenter, image: Image.Image, boxes: list[Box]) -> np.ndarray:
    """The union of SAM's masks for ``boxes`` (one box prompt each), each cut to its box."""
    processor = segmenter.processor
    prompts = [[[x0, y0, x1, y1] for x0, y0, x1, y1, _ in boxes]]
    inputs = processor(image, input_boxes=prompts, return_tensors="pt").to(segmenter.device)
    inputs["pixel_values"] = inputs["pixel_values"].to(segmenter.model.dtype)
    with torch.no_grad():
        outputs = segmenter.model(**inputs, multimask_output=False)
    (masks,) = processor.post_process_masks(
        outputs.pred_masks.float().cpu(), inputs["original_sizes"].cpu(), inputs["reshaped_input_sizes"].cpu()
    )
    union = np.zeros((image.height, image.width), dtype=bool)
    for box, sam_mask in zip(boxes, masks[:, 0].numpy(), strict=True):
        inside = _filled([box], image.size)
        refined = sam_mask & inside
        union |= refined if refined.any() else inside
    return union


def _filled(boxes: list[Box], size: tuple[int, int]) -> np.ndarray:
    """A boolean (height, width) array, True inside any of ``boxes`` (edges rounded outwards)."""
    width, height = size
    out = np.zeros((height, width), dtype=bool)
    for x0, y0, x1, y1, _ in boxes:
        out[int(np.floor(y0)) : int(np.ceil(y1)), int(np.floor(x0)) : int(np.ceil(x1))] = True
    return out


def _feathered(binary: np.ndarray, grow: int, blur: int) -> Image.Image:
    """``binary`` dilated by ``grow`` pixels, then blurred with radius ``blur``, as an "L" image."""
    if grow > 0:
        from scipy import ndimage

        # Distance to the nearest masked pixel: a round dilation of exactly ``grow`` pixels.
        binary = ndimage.distance_transform_edt(~binary) <= grow
    mask = Image.fromarray(binary.astype(np.uint8) * 255)  # 2-D uint8: mode "L"
    if blur > 0:
        mask = mask.filter(ImageFilter.GaussianBlur(radius=blur))
    return mask


def _clip(value: float, limit: int) -> float:
    return min(max(value, 0.0), float(limit))


def _area(box: Box) -> float:
    return max(box[2] - box[0], 0.0) * max(box[3] - box[1], 0.0)
