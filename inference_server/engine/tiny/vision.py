"""Tiny random-weight vision models: an open-vocabulary detector, SAM, and safety checkers.

Each builder seeds torch, builds the real transformers/diffusers class from a small config, and
writes it with ``save_pretrained`` beside its processor, so ``from_pretrained(folder)`` loads it
offline exactly as it would load real weights.

The detector is OWLv2 (``Owlv2ForObjectDetection``) rather than GroundingDINO: OWLv2 is a CLIP pair
with box heads, so it takes the local CLIP tokenizer and a few small layers, while GroundingDINO
needs a BERT tokenizer, a Swin/ResNet backbone and multi-scale deformable attention. Both answer a
free-text phrase with scored boxes through their processor's ``post_process_grounded_object_detection``.
"""

from __future__ import annotations

from pathlib import Path

import torch

from inference_server.engine.tiny.components import seeded, vision_tower
from inference_server.engine.tiny.tokenizers import clip_special_ids, clip_tokenizer

# Real OWLv2 checkpoints take 16 text tokens per query; the tiny one keeps that.
_OWL_TEXT_TOKENS = 16
_OWL_IMAGE = 64  # the square the processor pads and resizes every image to (960 in owlv2-base)
_SAM_IMAGE = 64  # SAM's longest edge and padded square (1024 in sam-vit-base)
_CLIP_IMAGE = 32  # the safety checker's crop (224 in the SD safety checker)


def build_detector(out: Path, *, seed: int) -> Path:
    """Write a tiny ``Owlv2ForObjectDetection`` and its ``Owlv2Processor`` to ``out``; return ``out``.

    Patches of 8 px on a 64 px square give 64 candidate boxes per image (one per patch), each scored
    against every text query.
    """
    from transformers import Owlv2Config, Owlv2ForObjectDetection, Owlv2ImageProcessorPil, Owlv2Processor

    vocab, bos, eos = clip_special_ids()
    config = Owlv2Config(
        text_config=dict(
            vocab_size=vocab,
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=2,
            max_position_embeddings=_OWL_TEXT_TOKENS,
            bos_token_id=bos,
            eos_token_id=eos,
            pad_token_id=eos,
        ),
        vision_config=vision_tower(_OWL_IMAGE),
        projection_dim=32,
    )
    seeded(seed)
    model = Owlv2ForObjectDetection(config).eval()
    with torch.no_grad():
        # Random box heads push the box sigmoid to 0 or 1, collapsing every box onto an image edge;
        # a small last layer leaves each patch's box near its own grid cell, where the model's
        # built-in box bias puts it, so the 64 boxes are distinct and inside the image.
        model.box_head.dense2.weight.mul_(0.01)
    tokenizer = clip_tokenizer()
    tokenizer.model_max_length = _OWL_TEXT_TOKENS
    image_processor = Owlv2ImageProcessorPil(size={"height": _OWL_IMAGE, "width": _OWL_IMAGE})
    out = Path(out)
    model.save_pretrained(out)
    Owlv2Processor(image_processor=image_processor, tokenizer=tokenizer).save_pretrained(out)
    return out


def build_segmenter(out: Path, *, seed: int) -> Path:
    """Write a tiny ``SamModel`` and its ``SamProcessor`` to ``out``; return ``out``.

    The image encoder sees a 64 px square in 8 px patches; the mask decoder answers at 32x32, which
    the processor's ``post_process_masks`` scales back to the input image.
    """
    from transformers import SamConfig, SamImageProcessorPil, SamModel, SamProcessor

    channels = 32
    config = SamConfig(
        vision_config=dict(
            hidden_size=32,
            output_channels=channels,
            num_hidden_layers=2,
            num_attention_heads=2,
            image_size=_SAM_IMAGE,
            patch_size=8,
            window_size=4,
            global_attn_indexes=[1],
            num_pos_feats=channels // 2,  # the prompt encoder's positional embedding is channels wide
            mlp_dim=64,
        ),
        prompt_encoder_config=dict(
            hidden_size=channels, image_size=_SAM_IMAGE, patch_size=8, mask_input_channels=4
        ),
        mask_decoder_config=dict(
            hidden_size=channels, mlp_dim=64, num_attention_heads=2, iou_head_hidden_dim=channels
        ),
    )
    seeded(seed)
    model = SamModel(config).eval()
    image_processor = SamImageProcessorPil(
        size={"longest_edge": _SAM_IMAGE},
        pad_size={"height": _SAM_IMAGE, "width": _SAM_IMAGE},
        mask_size={"longest_edge": _SAM_IMAGE // 4},
        mask_pad_size={"height": _SAM_IMAGE // 4, "width": _SAM_IMAGE // 4},
    )
    out = Path(out)
    model.save_pretrained(out)
    SamProcessor(image_processor=image_processor).save_pretrained(out)
    return out


def build_safety_checker(out: Path, *, seed: int, flags_everything: bool = False) -> Path:
    """Write a tiny diffusers ``StableDiffusionSafetyChecker`` with its ``CLIPImageProcessor``.

    Layout, the one inside a Stable Diffusion pipeline folder::

        out/safety_checker/     config.json, model.safetensors
        out/feature_extractor/  preprocessor_config.json

    With random weights the checker's judgement would be arbitrary, so its thresholds are set to make
    it known. The checker flags an image when, for some concept, cosine(image embedding, concept
    embedding) - threshold > 0. A cosine is always in [-1, 1], so thresholds of 2 make every margin
    negative (flags nothing: the normal checker), and thresholds of -2 make every margin positive
    (``flags_everything``), whatever the image and the random concept embeddings.
    """
    from diffusers.pipelines.stable_diffusion.safety_checker import StableDiffusionSafetyChecker
    from transformers import CLIPConfig, CLIPImageProcessor

    config = CLIPConfig(
        text_config=dict(hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2),
        vision_config=vision_tower(_CLIP_IMAGE),
        projection_dim=16,
    )
    seeded(seed)
    checker = StableDiffusionSafetyChecker(config).eval()
    threshold = -2.0 if flags_everything else 2.0
    with torch.no_grad():
        # Distinct concept directions, so the margins differ per concept as with real embeddings.
        checker.concept_embeds.copy_(torch.randn_like(checker.concept_embeds))
        checker.special_care_embeds.copy_(torch.randn_like(checker.special_care_embeds))
        checker.concept_embeds_weights.fill_(threshold)
        checker.special_care_embeds_weights.fill_(threshold)
    out = Path(out)
    checker.save_pretrained(out / "safety_checker")
    CLIPImageProcessor(
        size={"shortest_edge": _CLIP_IMAGE}, crop_size={"height": _CLIP_IMAGE, "width": _CLIP_IMAGE}
    ).save_pretrained(out / "feature_extractor")
    return out


def build_nsfw_classifier(out: Path, *, seed: int, flags_everything: bool = False) -> Path:
    """Write a tiny ``ViTForImageClassification`` with labels ``normal`` and ``nsfw``, and its processor.

    The other kind of checker :func:`inference_server.engine.safety.load_safety_checker` accepts: a
    generic image classifier with an ``nsfw`` label, in one folder. Its verdict is made known through
    the classifier's bias: +/-20 on the ``nsfw`` logit outweighs anything the random layers add.
    """
    from transformers import ViTConfig, ViTForImageClassification, ViTImageProcessor

    config = ViTConfig(
        **vision_tower(_CLIP_IMAGE, id2label={0: "normal", 1: "nsfw"}, label2id={"normal": 0, "nsfw": 1})
    )
    seeded(seed)
    model = ViTForImageClassification(config).eval()
    with torch.no_grad():
        model.classifier.bias.copy_(torch.tensor([0.0, 20.0 if flags_everything else -20.0]))
    out = Path(out)
    model.save_pretrained(out)
    ViTImageProcessor(size={"height": _CLIP_IMAGE, "width": _CLIP_IMAGE}).save_pretrained(out)
    return out
