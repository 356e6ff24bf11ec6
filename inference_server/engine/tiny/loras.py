"""Tiny LoRAs for the tiny pipelines, saved the way trainers publish them.

peft's default LoRA init sets B to zeros (the adapter changes nothing); ``init_lora_weights=False``
gives random A and B so that applying the LoRA visibly changes the image.
"""

from __future__ import annotations

from pathlib import Path

import torch

# Attention projections carry the same names in the SD UNet, FLUX and Qwen-Image transformers.
TARGETS = ["to_q", "to_k", "to_v", "to_out.0"]


def build_lora(pipeline_dir: Path, out: Path, *, seed: int = 7, rank: int = 4) -> Path:
    """Write a random LoRA for the denoiser of the pipeline in ``pipeline_dir`` to ``out``."""
    from diffusers import DiffusionPipeline
    from peft import LoraConfig
    from peft.utils import get_peft_model_state_dict

    pipe = DiffusionPipeline.from_pretrained(str(pipeline_dir))
    denoiser = getattr(pipe, "transformer", None) or pipe.unet
    torch.manual_seed(seed)
    denoiser.add_adapter(LoraConfig(r=rank, lora_alpha=rank, target_modules=TARGETS, init_lora_weights=False))
    layers = get_peft_model_state_dict(denoiser)
    # LoRA weights are float32 whatever the base dtype: small, and exact when cast down.
    layers = {k: v.detach().to(torch.float32).contiguous() for k, v in layers.items()}
    key = "transformer_lora_layers" if hasattr(pipe, "transformer") else "unet_lora_layers"
    type(pipe).save_lora_weights(str(out), **{key: layers}, safe_serialization=True)
    return out
