"""A tiny FLUX.1 pipeline: CLIP + T5 text encoders, a BF16 transformer (so a DFloat11 twin is exact)."""

from __future__ import annotations

from pathlib import Path

import torch

from inference_server.engine.tiny.components import clip_text_encoder, sd_vae, seeded
from inference_server.engine.tiny.tokenizers import clip_tokenizer, t5_tokenizer, t5_vocab_size


def _t5(seed: int):
    from transformers import T5Config, T5EncoderModel

    seeded(seed)
    config = T5Config(
        vocab_size=t5_vocab_size(),
        d_model=32,
        d_kv=8,
        d_ff=64,
        num_layers=2,
        num_heads=4,
        relative_attention_num_buckets=8,
        pad_token_id=0,
        eos_token_id=1,
    )
    return T5EncoderModel(config).eval()


def build_flux(out: Path, *, seed: int = 200) -> Path:
    """Write a tiny FluxPipeline to ``out``; the whole pipeline is stored in bfloat16."""
    from diffusers import FlowMatchEulerDiscreteScheduler, FluxPipeline, FluxTransformer2DModel

    seeded(seed + 4)
    transformer = FluxTransformer2DModel(
        patch_size=1,
        in_channels=16,
        out_channels=None,
        num_layers=1,
        num_single_layers=2,
        attention_head_dim=16,
        num_attention_heads=2,
        joint_attention_dim=32,
        pooled_projection_dim=32,
        guidance_embeds=True,
        axes_dims_rope=(4, 4, 8),
    ).eval()
    pipe = FluxPipeline(
        scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0, use_dynamic_shifting=False),
        vae=sd_vae(seed + 1, latent_channels=4, flux=True),
        text_encoder=clip_text_encoder(seed + 2, hidden=32),
        tokenizer=clip_tokenizer(),
        text_encoder_2=_t5(seed + 3),
        tokenizer_2=t5_tokenizer(),
        transformer=transformer,
    )
    pipe.to(torch.bfloat16)
    pipe.save_pretrained(out, safe_serialization=True)
    return out
