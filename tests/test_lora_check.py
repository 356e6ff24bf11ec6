"""The upload check of a LoRA reads the safetensors header alone (no torch in the API) and knows a
LoRA of the family from one of another family, a damaged file or no LoRA at all."""

from __future__ import annotations

import json
import struct
from pathlib import Path

import pytest

from inference_server.errors import InvalidRequest
from inference_server.registry.lora_check import check_lora, denoiser_layers


def lora(tiny_models: Path, family: str) -> bytes:
    return (
        tiny_models.parent / "loras" / f"{family}-style" / "pytorch_lora_weights.safetensors"
    ).read_bytes()


def safetensors(header: dict[str, object], body: bytes = b"") -> bytes:
    raw = json.dumps(header).encode()
    return struct.pack("<Q", len(raw)) + raw + body


def refused(data: bytes, family_dir: Path | None = None) -> str:
    kind, layers = denoiser_layers(family_dir) if family_dir else (None, None)
    with pytest.raises(InvalidRequest) as exc:
        check_lora(data, kind=kind, layers=layers)
    return exc.value.code


@pytest.mark.parametrize("family", ["sd15", "flux", "qwen-image-edit"])
def test_each_tiny_lora_fits_its_own_family_only(tiny_models: Path, family: str) -> None:
    root = tiny_models.parent
    kind, layers = denoiser_layers(root / family)
    assert kind == ("unet" if family == "sd15" else "transformer") and layers
    assert check_lora(lora(tiny_models, family), kind=kind, layers=layers).rank == 4
    for other in {"sd15", "sdxl", "flux", "qwen-image-edit"} - {family}:
        assert refused(lora(tiny_models, family), root / other) == "lora_family_mismatch", other


def test_damaged_or_foreign_files_are_not_loras(tiny_models: Path) -> None:
    good = lora(tiny_models, "sd15")
    assert refused(b"") == "invalid_lora"
    assert refused(b"\xff" * 64) == "invalid_lora"  # a header length past the end
    assert refused(struct.pack("<Q", 4) + b"nope") == "invalid_lora"  # not JSON
    assert refused(good[:-10]) == "invalid_lora"  # data shorter than the offsets say
    weights = {"dtype": "F32", "shape": [2, 2], "data_offsets": [0, 16]}
    assert refused(safetensors({"unet.conv.weight": weights}, b"\0" * 16)) == "invalid_lora"  # no LoRA
    wrong_size = {"unet.x.lora_A.weight": {"dtype": "F32", "shape": [4, 4], "data_offsets": [0, 16]}}
    assert refused(safetensors(wrong_size, b"\0" * 16)) == "invalid_lora"
    made_up = {"unet.nowhere.to_q.lora_A.weight": {"dtype": "F32", "shape": [1, 1], "data_offsets": [0, 4]}}
    assert refused(safetensors(made_up, b"\0" * 4), tiny_models.parent / "sd15") == "lora_family_mismatch"
