"""The safety checker: a verdict and a score for each output image.

Two kinds of checker load from a folder:

- diffusers' ``StableDiffusionSafetyChecker`` with its ``CLIPImageProcessor``, either laid out as
  in a Stable Diffusion pipeline (``safety_checker/`` and ``feature_extractor/`` side by side) or as
  one folder holding both configs (the layout of the published checker's own repository);
- any transformers image classifier (``AutoModelForImageClassification``) with a label named
  ``nsfw``, with its image processor in the same folder.

``check_images`` only judges; the engine decides what a flagged image becomes.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from inference_server.errors import ModelError

SD_CHECKER = "stable-diffusion"
CLASSIFIER = "classifier"


class _NoBlackImageNotice(logging.Filter):
    """diffusers' checker warns that it returns a black image: ours only judges (the verdict is on
    the output, and the worker decides what a flagged image becomes)."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "Potential NSFW content was detected" not in record.getMessage()


logging.getLogger("diffusers.pipelines.stable_diffusion.safety_checker").addFilter(_NoBlackImageNotice())


@dataclass(frozen=True)
class Verdict:
    """Whether an image is flagged, and the number behind it.

    ``score`` depends on the checker's kind. For the Stable Diffusion checker it is the largest
    concept margin over its 17 concepts: cosine(image embedding, concept embedding), in [-1, 1],
    less that concept's threshold, plus the checker's own 0.01 when a special-care concept matched;
    above 0 exactly when the checker flags (its own verdict, which rounds margins to 3 decimals, is
    the one reported in ``nsfw``). For a classifier it is the probability of the ``nsfw`` label, in
    [0, 1], and ``nsfw`` is whether that label is the classifier's top one.
    """

    nsfw: bool
    score: float


@dataclass(frozen=True)
class SafetyChecker:
    """A loaded checker: its kind (``SD_CHECKER`` or ``CLASSIFIER``), model, image processor, device."""

    kind: str
    model: Any
    processor: Any
    device: str
    nsfw_label: int | None = None  # the classifier's label id of "nsfw"


def load_safety_checker(path: str, device: str, dtype: torch.dtype | None = None) -> SafetyChecker:
    """Load the checker in folder ``path`` (either kind, see the module's docstring) onto ``device``."""
    from transformers import AutoConfig, AutoImageProcessor

    folder = Path(path)
    dtype = dtype or torch.float32
    if (folder / "safety_checker" / "config.json").is_file():
        return _sd_checker(folder / "safety_checker", folder / "feature_extractor", device, dtype)
    config = AutoConfig.from_pretrained(folder)
    if "StableDiffusionSafetyChecker" in (config.architectures or []):
        return _sd_checker(folder, folder, device, dtype)
    labels = {str(name).lower(): int(i) for i, name in (config.id2label or {}).items()}
    if "nsfw" not in labels:
        raise ModelError(
            "the safety checker is neither a StableDiffusionSafetyChecker nor an image classifier "
            "with an 'nsfw' label"
        )
    from transformers import AutoModelForImageClassification

    model = AutoModelForImageClassification.from_pretrained(folder, dtype=dtype)
    processor = AutoImageProcessor.from_pretrained(folder)
    return SafetyChecker(CLASSIFIER, model.to(device).eval(), processor, device, labels["nsfw"])


def check_images(checker: SafetyChecker, images: list[Image.Image]) -> list[Verdict]:
    """One :class:`Verdict` per image, in order, from one batched pass of the checker."""
    if not images:
        return []
    rgb = [image.convert("RGB") for image in images]
    pixels = checker.processor(rgb, return_tensors="pt").pixel_values
    pixels = pixels.to(checker.device, checker.model.dtype)
    if checker.kind == SD_CHECKER:
        return _sd_verdicts(checker.model, pixels)
    with torch.no_grad():
        logits = checker.model(pixel_values=pixels).logits.float()
    probabilities = logits.softmax(dim=-1)
    flagged = logits.argmax(dim=-1) == checker.nsfw_label
    return [
        Verdict(nsfw=bool(f), score=float(p[checker.nsfw_label]))
        for f, p in zip(flagged.tolist(), probabilities, strict=True)
    ]


def _sd_checker(model_dir: Path, processor_dir: Path, device: str, dtype: torch.dtype) -> SafetyChecker:
    from diffusers.pipelines.stable_diffusion.safety_checker import StableDiffusionSafetyChecker
    from transformers import CLIPImageProcessor

    model: Any = StableDiffusionSafetyChecker.from_pretrained(str(model_dir), dtype=dtype)
    processor = CLIPImageProcessor.from_pretrained(str(processor_dir))
    return SafetyChecker(SD_CHECKER, model.to(device).eval(), processor, device)


def _sd_verdicts(model: Any, pixels: torch.Tensor) -> list[Verdict]:
    """The checker's own verdicts, with the margins computed from the embeddings it judged."""
    from diffusers.pipelines.stable_diffusion.safety_checker import cosine_distance

    captured: list[torch.Tensor] = []
    # The checker returns only its verdicts; its image embeddings are taken on the way through, so
    # the score comes from the very pass that decided, without a second run of the vision model.
    hook = model.visual_projection.register_forward_hook(lambda _m, _i, out: captured.append(out))
    try:
        placeholders = [np.zeros((1, 1, 3)) for _ in range(len(pixels))]
        _, flagged = model(clip_input=pixels, images=placeholders)
    finally:
        hook.remove()
    embeds = captured[0].float()
    special = cosine_distance(embeds, model.special_care_embeds.float()) - model.special_care_embeds_weights
    concept = cosine_distance(embeds, model.concept_embeds.float()) - model.concept_embeds_weights
    # As in the checker: a matched special-care concept lowers every concept's bar by 0.01.
    concept = concept + 0.01 * (special > 0).any(dim=1, keepdim=True)
    margins = concept.max(dim=1).values.tolist()
    return [Verdict(nsfw=bool(f), score=float(m)) for f, m in zip(flagged, margins, strict=True)]
