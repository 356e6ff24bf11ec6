"""Tiny diffusers transformer configs and realistic weights for them (seeded N(0, 0.02), bfloat16),
shared by the DFloat11 tests and benchmark."""

from __future__ import annotations

from typing import Any

import torch

FLUX_CONFIG: dict[str, Any] = dict(
    patch_size=1,
    in_channels=8,
    num_layers=2,
    num_single_layers=2,
    attention_head_dim=16,
    num_attention_heads=2,
    joint_attention_dim=32,
    pooled_projection_dim=32,
    axes_dims_rope=(4, 6, 6),
)
QWEN_CONFIG: dict[str, Any] = dict(
    patch_size=2,
    in_channels=16,
    out_channels=4,
    num_layers=2,
    attention_head_dim=16,
    num_attention_heads=2,
    joint_attention_dim=32,
    axes_dims_rope=(4, 6, 6),
)


def seeded_transformer(cls: type, config: dict[str, Any], seed: int) -> torch.nn.Module:
    """``cls(**config)`` with seeded N(0, 0.02) weights, like real checkpoints, in bfloat16."""
    torch.manual_seed(seed)
    model = cls(**config)
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0.0, 0.02)
    return model.to(torch.bfloat16).eval()
