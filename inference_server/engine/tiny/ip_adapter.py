"""Tiny IP-Adapters for the tiny pipelines, in the layout published IP-Adapters have.

``out/ip-adapter.safetensors`` holds the original IP-Adapter format that diffusers'
``load_ip_adapter`` reads (``loaders/ip_adapter.py``, converted in ``_convert_ip_adapter_*``):
- ``image_proj.proj.{weight,bias}`` and ``image_proj.norm.{weight,bias}``: the projection of the
  CLIP image embedding to 4 tokens of the denoiser's cross-attention width (diffusers'
  ``ImageProjection``, whose ``image_embeds`` layer is stored as ``proj``);
- ``ip_adapter.{k}.to_k_ip.weight`` / ``to_v_ip.weight``: the extra key and value projections of
  every cross-attention layer. UNets number every attention layer, self-attention too, so the
  cross-attention layers are 1, 3, 5, ... in the order of ``unet.attn_processors``; FLUX numbers
  its double-stream blocks 0, 1, ... and its projections carry a bias.
``out/image_encoder`` holds the image encoder: a ``CLIPVisionModelWithProjection`` and its
``CLIPImageProcessor``, as ``h94/IP-Adapter`` ships them beside the weights.

Weights are the real modules' default initialisation under a fixed seed (never zeros), so a scale
above 0 changes the pixels and the same call writes the same bytes.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from inference_server.engine.tiny.components import seeded, vision_tower

WEIGHT_NAME = "ip-adapter.safetensors"
IMAGE_ENCODER = "image_encoder"
IMAGE_SIZE = 32  # the tiny encoder's input; its processor resizes and crops reference images to it
EMBED_DIM = 32  # the image embedding the projection maps to tokens
TOKENS = 4  # image tokens per reference image, as in the base IP-Adapter


def build_ip_adapter(pipeline_dir: Path, out: Path, *, seed: int = 30) -> Path:
    """Write an IP-Adapter for the denoiser of the tiny pipeline in ``pipeline_dir`` to ``out``
    (``ip-adapter.safetensors`` and ``image_encoder/``); return ``out``."""
    from diffusers import DiffusionPipeline
    from safetensors.torch import save_file

    index = DiffusionPipeline.load_config(str(pipeline_dir))
    name = "transformer" if "transformer" in index else "unet"
    denoiser = _load_denoiser(Path(pipeline_dir), name, index[name][1])
    seeded(seed)
    layers = _flux_layers(denoiser) if name == "transformer" else _unet_layers(denoiser)
    width = (
        denoiser.config.joint_attention_dim if name == "transformer" else denoiser.config.cross_attention_dim
    )
    weights = {**_projection(width), **layers}
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    # float32 whatever the denoiser's dtype: small, and the loader casts it to the denoiser's dtype.
    save_file(
        {k: v.detach().to(torch.float32).contiguous() for k, v in weights.items()}, str(out / WEIGHT_NAME)
    )
    _image_encoder(seed + 1).save_pretrained(str(out / IMAGE_ENCODER), safe_serialization=True)
    _image_processor().save_pretrained(str(out / IMAGE_ENCODER))
    return out


def _load_denoiser(pipeline_dir: Path, subfolder: str, class_name: str) -> Any:
    import diffusers

    return getattr(diffusers, class_name).from_pretrained(str(pipeline_dir), subfolder=subfolder)


def _projection(width: int) -> dict[str, torch.Tensor]:
    from diffusers.models.embeddings import ImageProjection

    projection = ImageProjection(
        image_embed_dim=EMBED_DIM, cross_attention_dim=width, num_image_text_embeds=TOKENS
    )
    with torch.no_grad():  # LayerNorm starts at ones and zeros: perturbed so it is not the identity
        projection.norm.weight.add_(0.1 * torch.randn_like(projection.norm.weight))
        projection.norm.bias.add_(0.1 * torch.randn_like(projection.norm.bias))
    state = projection.state_dict()
    return {f"image_proj.{k.replace('image_embeds', 'proj')}": v for k, v in state.items()}


def _unet_layers(unet: Any) -> dict[str, torch.Tensor]:
    out: dict[str, torch.Tensor] = {}
    key_id = 1
    for name in unet.attn_processors:
        if name.endswith("attn1.processor"):  # self-attention: no image tokens
            continue
        attn = unet.get_submodule(name.removesuffix(".processor"))
        for proj in ("to_k_ip", "to_v_ip"):
            linear = torch.nn.Linear(attn.to_k.in_features, attn.to_k.out_features, bias=False)
            out[f"ip_adapter.{key_id}.{proj}.weight"] = linear.weight
        key_id += 2
    return out


def _flux_layers(transformer: Any) -> dict[str, torch.Tensor]:
    out: dict[str, torch.Tensor] = {}
    cross, hidden = transformer.config.joint_attention_dim, transformer.inner_dim
    for key_id in range(len(transformer.transformer_blocks)):  # the double-stream blocks only
        for proj in ("to_k_ip", "to_v_ip"):
            linear = torch.nn.Linear(cross, hidden, bias=True)
            out[f"ip_adapter.{key_id}.{proj}.weight"] = linear.weight
            out[f"ip_adapter.{key_id}.{proj}.bias"] = linear.bias
    return out


def _image_encoder(seed: int) -> Any:
    from transformers import CLIPVisionConfig, CLIPVisionModelWithProjection

    config = CLIPVisionConfig(**vision_tower(IMAGE_SIZE, projection_dim=EMBED_DIM, hidden_act="gelu"))
    seeded(seed)
    return CLIPVisionModelWithProjection(config).eval()


def _image_processor() -> Any:
    from transformers import CLIPImageProcessor

    return CLIPImageProcessor(
        size={"shortest_edge": IMAGE_SIZE}, crop_size={"height": IMAGE_SIZE, "width": IMAGE_SIZE}
    )
