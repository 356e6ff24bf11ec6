"""Tiny random-weight components shared by the family builders.

Every builder seeds torch before creating weights, so the same call writes the same bytes.
VAEs downscale by 8 like the real ones, so request sizes and multiples behave as in production.
"""

from __future__ import annotations

from typing import Any

import torch

from inference_server.engine.tiny.tokenizers import clip_special_ids


def seeded(seed: int) -> None:
    """Make the next weight initialisations deterministic."""
    torch.manual_seed(seed)


def vision_tower(image_size: int, **extra: Any) -> dict[str, Any]:
    """The config of a 2-layer, 32-wide ViT tower with 8 px patches, the shape every tiny vision
    model here shares (detector, safety checkers, image encoders); ``extra`` adds or overrides."""
    return dict(
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=2,
        image_size=image_size,
        patch_size=8,
        **extra,
    )


def clip_text_encoder(
    seed: int, *, hidden: int = 32, with_projection: bool = False, projection_dim: int = 32
):
    """A 2-layer CLIP text encoder matching :func:`clip_tokenizer`."""
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    vocab, bos, eos = clip_special_ids()
    config = CLIPTextConfig(
        vocab_size=vocab,
        hidden_size=hidden,
        intermediate_size=hidden * 2,
        num_hidden_layers=2,
        num_attention_heads=2,
        max_position_embeddings=77,
        bos_token_id=bos,
        eos_token_id=eos,
        pad_token_id=eos,
        projection_dim=projection_dim,
        hidden_act="gelu",
    )
    seeded(seed)
    cls = CLIPTextModelWithProjection if with_projection else CLIPTextModel
    return cls(config).eval()


def sd_vae(seed: int, *, latent_channels: int = 4, flux: bool = False):
    """An AutoencoderKL with 4 blocks (8x downscale) and 8 channels per block."""
    from diffusers import AutoencoderKL

    seeded(seed)
    kwargs = {}
    if flux:
        # FLUX's VAE has no quant convs and shifts latents.
        kwargs = {
            "use_quant_conv": False,
            "use_post_quant_conv": False,
            "shift_factor": 0.0609,
            "scaling_factor": 1.5035,
        }
    return AutoencoderKL(
        in_channels=3,
        out_channels=3,
        latent_channels=latent_channels,
        down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4,
        block_out_channels=(8, 8, 8, 8),
        layers_per_block=1,
        norm_num_groups=4,
        sample_size=64,
        **kwargs,
    ).eval()
