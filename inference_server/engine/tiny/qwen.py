"""A tiny Qwen-Image-Edit pipeline: Qwen2.5-VL text encoder with a vision tower, Qwen-Image VAE and
transformer. The transformer is BF16 so that a DFloat11 twin decodes to identical weights. The
same components make a tiny QwenImageEditPlusPipeline (Qwen-Image-Edit-2509 and later), which
sizes its inputs its own way."""

from __future__ import annotations

from pathlib import Path

import torch

from inference_server.engine.compat import qwen_processor_without_video
from inference_server.engine.tiny.components import seeded
from inference_server.engine.tiny.tokenizers import qwen2_special_ids, qwen2_tokenizer

HIDDEN = 16  # text hidden size = the transformer's joint_attention_dim


def _text_encoder(seed: int, ids: dict[str, int], vocab_size: int):
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

    config = Qwen2_5_VLConfig(
        text_config={
            "vocab_size": vocab_size,
            "hidden_size": HIDDEN,
            "intermediate_size": 32,
            "num_hidden_layers": 2,
            "num_attention_heads": 2,
            "num_key_value_heads": 2,
            "max_position_embeddings": 4096,
            "rope_parameters": {"rope_type": "default", "mrope_section": [1, 1, 2], "rope_theta": 1000000.0},
            "bos_token_id": ids["<|endoftext|>"],
            "eos_token_id": ids["<|im_end|>"],
            "pad_token_id": ids["<|endoftext|>"],
        },
        vision_config={
            "depth": 2,
            "hidden_size": 16,
            "intermediate_size": 32,
            "num_heads": 2,
            "out_hidden_size": HIDDEN,
            "patch_size": 14,
            "spatial_merge_size": 2,
            "temporal_patch_size": 2,
            "window_size": 56,
            "fullatt_block_indexes": [1],
        },
        image_token_id=ids["<|image_pad|>"],
        video_token_id=ids["<|video_pad|>"],
        vision_start_token_id=ids["<|vision_start|>"],
        vision_end_token_id=ids["<|vision_end|>"],
    )
    seeded(seed)
    return Qwen2_5_VLForConditionalGeneration(config).eval()


def _processor(tokenizer):
    from transformers import Qwen2VLProcessor
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

    qwen_processor_without_video()
    image_processor = Qwen2VLImageProcessorPil(
        patch_size=14,
        merge_size=2,
        temporal_patch_size=2,
        min_pixels=56 * 56,
        max_pixels=28 * 28 * 64,
    )
    return Qwen2VLProcessor(image_processor=image_processor, tokenizer=tokenizer)


def build_qwen_edit(out: Path, *, seed: int = 300, plus: bool = False) -> Path:
    """Write a tiny QwenImageEditPipeline (``plus``: QwenImageEditPlusPipeline) to ``out``, with
    the transformer and text encoder in bfloat16."""
    from diffusers import (
        AutoencoderKLQwenImage,
        FlowMatchEulerDiscreteScheduler,
        QwenImageEditPipeline,
        QwenImageEditPlusPipeline,
        QwenImageTransformer2DModel,
    )

    tokenizer = qwen2_tokenizer()
    ids = qwen2_special_ids(tokenizer)
    text_encoder = _text_encoder(seed + 2, ids, len(tokenizer))
    seeded(seed + 1)
    z = 4
    # Three temporal downsamples: 8x spatially, like the real Qwen-Image VAE.
    vae = AutoencoderKLQwenImage(
        base_dim=8,
        z_dim=z,
        dim_mult=[1, 1, 1, 1],
        num_res_blocks=1,
        temperal_downsample=[False, True, True],
        latents_mean=[0.0] * z,
        latents_std=[1.0] * z,
    ).eval()
    seeded(seed + 3)
    transformer = QwenImageTransformer2DModel(
        patch_size=2,
        in_channels=4 * z,
        out_channels=z,
        num_layers=2,
        attention_head_dim=16,
        num_attention_heads=2,
        joint_attention_dim=HIDDEN,
        guidance_embeds=False,
        axes_dims_rope=(8, 4, 4),
    ).eval()
    pipeline_class = QwenImageEditPlusPipeline if plus else QwenImageEditPipeline
    pipe = pipeline_class(
        scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0, use_dynamic_shifting=False),
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        processor=_processor(tokenizer),
        transformer=transformer,
    )
    pipe.transformer.to(torch.bfloat16)
    pipe.text_encoder.to(torch.bfloat16)
    pipe.save_pretrained(out, safe_serialization=True)
    return out
