"""Cheap previews of a run in progress: the current latents projected to RGB by a fixed linear map
per latent space (one matrix multiply at latent resolution, no VAE), for ``job.preview``.

The factor matrices are the published per-channel approximations used by diffusion front ends for
the same purpose (ComfyUI's ``latent_formats``): SD 1.x and SDXL have 4 latent channels, FLUX.1 and
Qwen-Image (the Wan 2.1 VAE) 16. FLUX and Qwen-Image keep their latents packed into 2x2 patches
during the loop; they are unpacked first. A latent space with another channel count (the tiny test
models) falls back to its first three channels, scaled: still the run's own latents, changing
step by step, only without meaningful colours."""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

# fmt: off
SD15 = ([[0.3512, 0.2297, 0.3227], [0.3250, 0.4974, 0.2350], [-0.2829, 0.1762, 0.2721],
         [-0.2120, -0.2616, -0.7177]], [0.0, 0.0, 0.0])
SDXL = ([[0.3651, 0.4232, 0.4341], [-0.2533, -0.0042, 0.1068], [0.1076, 0.1111, -0.0362],
         [-0.3165, -0.2492, -0.2188]], [0.1084, -0.0175, -0.0011])
FLUX = ([[-0.0346, 0.0244, 0.0681], [0.0034, 0.0210, 0.0687], [0.0275, -0.0668, -0.0433],
         [-0.0174, 0.0160, 0.0617], [0.0859, 0.0721, 0.0329], [0.0004, 0.0383, 0.0115],
         [0.0405, 0.0861, 0.0915], [-0.0236, -0.0185, -0.0259], [-0.0245, 0.0250, 0.1180],
         [0.1008, 0.0755, -0.0421], [-0.0515, 0.0201, 0.0011], [0.0428, -0.0012, -0.0036],
         [0.0817, 0.0765, 0.0749], [-0.1264, -0.0522, -0.1103], [-0.0280, -0.0881, -0.0499],
         [-0.1262, -0.0982, -0.0778]], [-0.0329, -0.0718, -0.0851])
WAN21 = ([[-0.1299, -0.1692, 0.2932], [0.0671, 0.0406, 0.0442], [0.3568, 0.2548, 0.1747],
          [0.0372, 0.2344, 0.1420], [0.0313, 0.0189, -0.0328], [0.0296, -0.0956, -0.0665],
          [-0.3477, -0.4059, -0.2925], [0.0166, 0.1902, 0.1975], [-0.0412, 0.0267, -0.1364],
          [-0.1293, 0.0740, 0.1636], [0.0680, 0.3019, 0.1128], [0.0032, 0.0581, 0.0639],
          [-0.1251, 0.0927, 0.1699], [0.0060, -0.0633, 0.0005], [0.3477, 0.2275, 0.2950],
          [0.1984, 0.0913, 0.1861]], [-0.1835, -0.0868, -0.3360])
# fmt: on


def _factors(pipe: Any) -> tuple[list[list[float]], list[float]]:
    name = type(pipe).__name__
    if name.startswith("StableDiffusionXL"):
        return SDXL
    if name.startswith("Flux"):
        return FLUX
    if name.startswith("QwenImage"):
        return WAN21
    return SD15


def _unpack(pipe: Any, latents: torch.Tensor, width: int, height: int) -> torch.Tensor:
    """Latents as (batch, channels, h, w): packed FLUX / Qwen-Image sequences are unpacked."""
    if latents.ndim == 3:  # (batch, patches, channels * 4)
        scale = int(getattr(pipe, "vae_scale_factor", 8))
        latents = type(pipe)._unpack_latents(latents, height, width, scale)
    if latents.ndim == 5:  # Qwen-Image: (batch, channels, frames, h, w)
        latents = latents[:, :, 0]
    return latents


def latent_preview(pipe: Any, latents: torch.Tensor, width: int, height: int) -> np.ndarray:
    """The first image's latents as an RGB ``uint8`` array (h, w, 3) at latent resolution."""
    z = _unpack(pipe, latents.detach(), width, height)[0].float()
    factors, bias = _factors(pipe)
    if z.shape[0] == len(factors):
        matrix = torch.tensor(factors, dtype=z.dtype, device=z.device)
        offset = torch.tensor(bias, dtype=z.dtype, device=z.device)[:, None, None]
        rgb = torch.einsum("chw,cr->rhw", z, matrix) + offset
    else:
        first = z.repeat(3, 1, 1)[:3] if z.shape[0] < 3 else z[:3]
        rgb = first / (first.abs().amax() + 1e-6)
    image = ((rgb.clamp(-1, 1) + 1) * 127.5).to(torch.uint8).permute(1, 2, 0)
    return image.cpu().numpy()  # type: ignore[no-any-return]
