"""Tiny Stable Diffusion 1.5 and SDXL pipelines.

SD 1.5: one 4-channel UNet serves txt2img, img2img and inpaint (diffusers' inpaint pipeline blends
the mask in latent space when the UNet has 4 input channels). A 9-channel UNet, the layout of real
inpainting checkpoints (latents + mask + masked-image latents), cannot run txt2img or img2img: the
pipelines would feed it 4 channels. So the tiny set also writes ``sd15-inpaint``, a separate model
serving only inpaint, as production registries do with ``stable-diffusion-inpainting``.
"""

from __future__ import annotations

from pathlib import Path

from inference_server.engine.tiny.components import clip_text_encoder, sd_vae, seeded
from inference_server.engine.tiny.tokenizers import clip_tokenizer


def _unet(seed: int, *, in_channels: int = 4, sdxl: bool = False):
    from diffusers import UNet2DConditionModel

    seeded(seed)
    kwargs: dict = {}
    if sdxl:
        # text_time conditioning: pooled text embeds (32) + 6 time ids x addition_time_embed_dim (8).
        kwargs = {
            "addition_embed_type": "text_time",
            "addition_time_embed_dim": 8,
            "projection_class_embeddings_input_dim": 32 + 6 * 8,
            "transformer_layers_per_block": (1, 1),
            "cross_attention_dim": 64,
        }
    return UNet2DConditionModel(
        sample_size=8,
        in_channels=in_channels,
        out_channels=4,
        layers_per_block=1,
        block_out_channels=(16, 32),
        norm_num_groups=8,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        attention_head_dim=(2, 4),
        **{"cross_attention_dim": 32, **kwargs},
    ).eval()


def _scheduler():
    from diffusers import DDIMScheduler

    return DDIMScheduler(
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        clip_sample=False,
        set_alpha_to_one=False,
        steps_offset=1,
    )


def build_sd15(out: Path, *, seed: int = 0, inpaint_unet: bool = False) -> Path:
    """Write a tiny SD 1.5 pipeline to ``out``; ``inpaint_unet`` gives the 9-channel inpainting layout."""
    from diffusers import StableDiffusionInpaintPipeline, StableDiffusionPipeline

    cls = StableDiffusionInpaintPipeline if inpaint_unet else StableDiffusionPipeline
    pipe = cls(
        vae=sd_vae(seed + 1),
        text_encoder=clip_text_encoder(seed + 2),
        tokenizer=clip_tokenizer(),
        unet=_unet(seed + 3, in_channels=9 if inpaint_unet else 4),
        scheduler=_scheduler(),
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    pipe.save_pretrained(out, safe_serialization=True)
    return out


def build_sdxl(out: Path, *, seed: int = 100) -> Path:
    """Write a tiny SDXL pipeline (two CLIP text encoders, text_time conditioning) to ``out``."""
    from diffusers import EulerDiscreteScheduler, StableDiffusionXLPipeline

    scheduler = EulerDiscreteScheduler(
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        steps_offset=1,
        timestep_spacing="leading",
    )
    pipe = StableDiffusionXLPipeline(
        vae=sd_vae(seed + 1),
        text_encoder=clip_text_encoder(seed + 2, hidden=32),
        text_encoder_2=clip_text_encoder(seed + 3, hidden=32, with_projection=True, projection_dim=32),
        tokenizer=clip_tokenizer(),
        tokenizer_2=clip_tokenizer(),
        unet=_unet(seed + 4, sdxl=True),
        scheduler=scheduler,
        force_zeros_for_empty_prompt=True,
    )
    pipe.save_pretrained(out, safe_serialization=True)
    return out
