"""Tiny random-weight ControlNets and preprocessor models, built offline through the real classes.

- ``build_controlnet``: a ControlNet for the tiny pipeline in a folder, made the way ControlNets are
  made for training (``ControlNetModel.from_unet``, ``FluxControlNetModel.from_transformer``: a
  copy of the denoiser's encoder). Real ControlNets start with zero convolutions, which would leave
  every image unchanged; here those layers get the random init their class would have had, so a
  scale above 0 changes pixels and a test can tell a ControlNet from none.
- ``build_depth_estimator``: a DPT depth model (the family of ``Intel/dpt-large``, diffusers' depth
  ControlNet example) with its image processor.
- ``build_pose_estimator``: a ViTPose top-down keypoint model (COCO's 17 keypoints) with its processor.

Every builder seeds torch first: the same call writes the same bytes.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from inference_server.engine.tiny.components import seeded

# A 4-stage conditioning embedding downscales the control image 8x to the latents, as in real
# ControlNets (16, 32, 96, 256), with fewer channels.
_CONDITIONING_CHANNELS = (8, 8, 16, 16)
# Processor input sizes: small so that tests stay fast, multiples of the patch size.
_DEPTH_SIZE = 64
_POSE_SIZE = (64, 48)  # height, width: ViTPose's 256x192 aspect


def _unzero(model: torch.nn.Module, seed: int) -> None:
    """Give every zero-initialised Linear/Conv2d the default random init of its class."""
    seeded(seed)
    for module in model.modules():
        if isinstance(module, (torch.nn.Linear, torch.nn.Conv2d)) and not module.weight.any():
            module.reset_parameters()


def build_controlnet(pipeline_dir: Path, out: Path, *, seed: int) -> Path:
    """Write a ControlNet matching the denoiser of the tiny pipeline in ``pipeline_dir`` to ``out``.

    SD 1.5 and SDXL get a ``ControlNetModel``, FLUX a ``FluxControlNetModel`` (stored in the
    transformer's dtype)."""
    from diffusers import ControlNetModel, DiffusionPipeline, FluxControlNetModel

    index = DiffusionPipeline.load_config(str(pipeline_dir))
    controlnet: Any
    if "transformer" in index:
        from diffusers import FluxTransformer2DModel

        transformer = FluxTransformer2DModel.from_pretrained(str(pipeline_dir), subfolder="transformer")
        dtype = transformer.dtype
        seeded(seed)  # the layers not copied from the transformer start random
        controlnet = FluxControlNetModel.from_transformer(
            transformer.to(torch.float32),
            num_layers=transformer.config.num_layers,
            num_single_layers=transformer.config.num_single_layers,
            attention_head_dim=transformer.config.attention_head_dim,
            num_attention_heads=transformer.config.num_attention_heads,
        )
        _unzero(controlnet, seed + 1)
        controlnet.to(dtype)
    else:
        from diffusers import UNet2DConditionModel

        unet = UNet2DConditionModel.from_pretrained(str(pipeline_dir), subfolder="unet")
        seeded(seed)  # the layers not copied from the UNet (the conditioning embedding) start random
        controlnet = ControlNetModel.from_unet(
            unet, conditioning_embedding_out_channels=_CONDITIONING_CHANNELS
        )
        _unzero(controlnet, seed + 1)
    # The config records where the weights came from; a fixed name keeps the bytes deterministic.
    controlnet.register_to_config(_name_or_path="controlnet")
    controlnet.eval().save_pretrained(str(out), safe_serialization=True)
    return Path(out)


def build_depth_estimator(out: Path, *, seed: int) -> Path:
    """Write a tiny ``DPTForDepthEstimation`` and its ``DPTImageProcessor`` to ``out``."""
    from transformers import DPTConfig, DPTForDepthEstimation, DPTImageProcessor

    config = DPTConfig(
        hidden_size=32,
        num_hidden_layers=4,
        num_attention_heads=2,
        intermediate_size=64,
        image_size=_DEPTH_SIZE,
        patch_size=16,
        backbone_out_indices=[0, 1, 2, 3],
        neck_hidden_sizes=[8, 16, 32, 32],
        reassemble_factors=[4, 2, 1, 0.5],
        fusion_hidden_size=16,
        head_in_index=-1,
    )
    seeded(seed)
    model = DPTForDepthEstimation(config).eval()
    processor = DPTImageProcessor(
        size={"height": _DEPTH_SIZE, "width": _DEPTH_SIZE}, keep_aspect_ratio=False, ensure_multiple_of=16
    )
    model.save_pretrained(str(out), safe_serialization=True)
    processor.save_pretrained(str(out))
    return Path(out)


def build_pose_estimator(out: Path, *, seed: int) -> Path:
    """Write a tiny ``VitPoseForPoseEstimation`` (17 COCO keypoints) and its processor to ``out``."""
    from transformers import (
        VitPoseBackboneConfig,
        VitPoseConfig,
        VitPoseForPoseEstimation,
        VitPoseImageProcessor,
    )

    # Keyword dicts: these configs take their backbone arguments through **kwargs.
    backbone_args: dict[str, Any] = dict(
        image_size=list(_POSE_SIZE),
        patch_size=[16, 16],
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        mlp_ratio=2,
        out_indices=[2],
    )
    head_args: dict[str, Any] = dict(num_labels=17, use_simple_decoder=True, scale_factor=4)
    config = VitPoseConfig(backbone_config=VitPoseBackboneConfig(**backbone_args), **head_args)
    seeded(seed)
    model = VitPoseForPoseEstimation(config).eval()
    processor = VitPoseImageProcessor(size={"height": _POSE_SIZE[0], "width": _POSE_SIZE[1]})
    model.save_pretrained(str(out), safe_serialization=True)
    processor.save_pretrained(str(out))
    return Path(out)
