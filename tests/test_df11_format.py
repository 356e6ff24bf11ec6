"""The on-disk DF11 layout: every field dfloat11 0.5.0 reads, with its dtype and shape, and the
naming rules its loader relies on (DF11 tensors are exactly the names the model lacks)."""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import torch
from diffusers import FluxTransformer2DModel
from safetensors import safe_open

from inference_server.engine.df11 import compress_transformer
from inference_server.engine.df11.compress import FLUX_PATTERNS

torch.set_num_threads(1)

CONFIG = dict(
    patch_size=1,
    in_channels=8,
    num_layers=2,
    num_single_layers=3,
    attention_head_dim=32,
    num_attention_heads=2,
    joint_attention_dim=32,
    pooled_projection_dim=32,
    axes_dims_rope=(8, 12, 12),
)


def test_layout_matches_dfloat11(tmp_path: Path) -> None:
    torch.manual_seed(0)
    model = FluxTransformer2DModel(**CONFIG)
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0.0, 0.02)
    model = model.to(torch.bfloat16)
    state = model.state_dict()
    compress_transformer(model, tmp_path)

    config = json.loads((tmp_path / "config.json").read_text())
    assert config["dfloat11_config"] == {
        "version": "0.5.0",
        "threads_per_block": [512],
        "bytes_per_thread": 8,
        "pattern_dict": FLUX_PATTERNS,
    }
    assert config["_class_name"] == "FluxTransformer2DModel"
    assert [p.name for p in tmp_path.glob("*.safetensors")] == ["model.safetensors"]

    with safe_open(str(tmp_path / "model.safetensors"), framework="pt") as f:
        tensors = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 (safe_open is no dict)
    blocks = sorted({k.rsplit(".", 1)[0] for k in tensors if k not in state})
    assert blocks == [f"single_transformer_blocks.{i}" for i in range(3)] + [
        f"transformer_blocks.{i}" for i in range(2)
    ]

    for block in blocks:
        pattern, attrs = next((p, a) for p, a in FLUX_PATTERNS.items() if re.fullmatch(p, block))
        linears = [model.get_submodule(f"{block}.{a}") for a in attrs]
        n = sum(lin.weight.numel() for lin in linears)
        get = {
            field: tensors[f"{block}.{field}"]
            for field in (
                "luts",
                "encoded_exponent",
                "sign_mantissa",
                "output_positions",
                "gaps",
                "split_positions",
            )
        }
        assert all(t.dim() == (2 if f == "luts" else 1) for f, t in get.items())
        assert {f: t.dtype for f, t in get.items()} == {
            "luts": torch.uint8,
            "encoded_exponent": torch.uint8,
            "sign_mantissa": torch.uint8,
            "output_positions": torch.uint8,
            "gaps": torch.uint8,
            "split_positions": torch.int64,
        }
        luts = get["luts"].numpy()
        assert luts.shape[1] == 256 and 2 <= luts.shape[0] <= 17
        assert luts[-1].max() <= 32  # code lengths, capped at 32 bits
        assert get["sign_mantissa"].numel() == n
        n_bytes = get["encoded_exponent"].numel()
        cuda_blocks = -(-n_bytes // (512 * 8))
        positions = get["output_positions"].numpy().view("<u4")  # little-endian uint32 per CUDA block
        assert positions.size == cuda_blocks + 1
        assert positions[0] == 0 and positions[-1] == n and np.all(np.diff(positions.astype(np.int64)) >= 0)
        assert get["gaps"].numel() == -(-cuda_blocks * 512 * 5 // 8)  # 5 bits per thread, packed
        assert (
            get["split_positions"].tolist()
            == np.cumsum([lin.weight.numel() for lin in linears])[:-1].tolist()
        )
        # The kernel's shared memory: 512 * 4 + 4 bytes plus 2 per weight of its largest CUDA block.
        assert 512 * 4 + 4 + 2 * int(np.diff(positions.astype(np.int64)).max()) <= 48 * 1024
        for a in attrs:
            assert f"{block}.{a}.weight" not in tensors

    plain = {k for k in tensors if k in state}
    covered = {
        f"{b}.{a}.weight"
        for b in blocks
        for p, attrs in FLUX_PATTERNS.items()
        if re.fullmatch(p, b)
        for a in attrs
    }
    assert plain == set(state) - covered
    for key in plain:
        assert tensors[key].dtype == state[key].dtype and torch.equal(tensors[key], state[key])
    # What stays BF16 is small next to what is coded.
    coded = sum(tensors[f"{b}.sign_mantissa"].numel() for b in blocks)
    assert coded > 4 * sum(state[k].numel() for k in plain)
