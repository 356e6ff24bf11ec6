"""Is this file a safetensors LoRA for that family? Checked from the header alone, without torch.

A safetensors file is an 8-byte little-endian header length, a JSON header naming each tensor's
dtype, shape and byte range, then the data. The checks, each with a code a client can act on:
- ``invalid_lora``: the header does not parse, a tensor's range or size is wrong, or no tensor is
  a LoRA weight (peft's ``lora_A``/``lora_B``, kohya's ``lora_down``/``lora_up``);
- ``lora_family_mismatch``: the weights target the other denoiser kind (a UNet LoRA for a
  transformer family, or back), or their sizes are not the family's attention sizes (read from
  the family's default model's config when it is a local folder).
"""

from __future__ import annotations

import json
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from inference_server.errors import InvalidRequest

MAX_HEADER = 100 * 1024 * 1024  # the format's own limit
DTYPE_BYTES = {
    "F64": 8,
    "F32": 4,
    "F16": 2,
    "BF16": 2,
    "I64": 8,
    "I32": 4,
    "I16": 2,
    "I8": 1,
    "U8": 1,
    "BOOL": 1,
    "F8_E4M3": 1,
    "F8_E5M2": 1,
}
LORA_MARKS = ("lora_A", "lora_B", "lora_down", "lora_up", "lora.down", "lora.up")
PREFIXES = {
    "unet": ("unet.", "lora_unet_"),
    "transformer": ("transformer.", "lora_transformer_", "diffusion_model."),
}
TEXT_PREFIXES = ("text_encoder", "lora_te")  # either kind may carry text-encoder layers


@dataclass(frozen=True)
class LoraFile:
    """What a valid LoRA file holds: its tensors' shapes by name and its rank."""

    shapes: dict[str, list[int]]
    rank: int


def read_header(data: bytes) -> dict[str, Any]:
    """The JSON header of a safetensors file; InvalidRequest ``invalid_lora`` if it is not one."""
    if len(data) < 8:
        raise InvalidRequest("not a safetensors file: too short", code="invalid_lora")
    (length,) = struct.unpack("<Q", data[:8])
    if length > MAX_HEADER or 8 + length > len(data):
        raise InvalidRequest("not a safetensors file: bad header length", code="invalid_lora")
    try:
        header = json.loads(data[8 : 8 + length])
    except (UnicodeDecodeError, ValueError):
        raise InvalidRequest("not a safetensors file: the header is not JSON", code="invalid_lora") from None
    if not isinstance(header, dict):
        raise InvalidRequest("not a safetensors file: the header is not a JSON object", code="invalid_lora")
    body = len(data) - 8 - length
    for name, info in header.items():
        if name == "__metadata__":
            continue
        _check_tensor(name, info, body)
    return header


def _check_tensor(name: str, info: Any, body: int) -> None:
    try:
        dtype, shape, (start, end) = info["dtype"], info["shape"], info["data_offsets"]
        count = 1
        for n in shape:
            count *= int(n)
        ok = dtype in DTYPE_BYTES and 0 <= start <= end <= body and end - start == count * DTYPE_BYTES[dtype]
    except (KeyError, TypeError, ValueError):
        ok = False
    if not ok:
        raise InvalidRequest(f"not a safetensors file: tensor {name!r} is malformed", code="invalid_lora")


def check_lora(data: bytes, *, kind: str | None, layers: dict[str, list[int]] | None) -> LoraFile:
    """Check ``data`` is a LoRA for a denoiser of ``kind`` ("unet", "transformer", None: either).
    With ``layers`` (the denoiser's weight shapes by name, :func:`denoiser_layers`), every
    diffusers-format LoRA pair must wrap a Linear the denoiser has, at its sizes."""
    header = read_header(data)
    shapes = {k: list(v["shape"]) for k, v in header.items() if k != "__metadata__"}
    lora_keys = [k for k in shapes if any(m in k for m in LORA_MARKS)]
    if not lora_keys:
        raise InvalidRequest(
            "the file holds no LoRA weights (lora_A/lora_B or lora_down/lora_up)", code="invalid_lora"
        )
    denoiser = [k for k in lora_keys if not k.startswith(TEXT_PREFIXES)]
    if kind is not None and denoiser:
        other = next(o for o in PREFIXES if o != kind)
        if any(k.startswith(PREFIXES[other]) for k in denoiser) or not any(
            k.startswith(PREFIXES[kind]) for k in denoiser
        ):
            raise InvalidRequest(
                f"this LoRA is not for a {kind} denoiser, which is what the family has",
                code="lora_family_mismatch",
            )
    down = [k for k in lora_keys if "lora_A" in k or "lora_down" in k or "lora.down" in k]
    ranks = {shapes[k][0] for k in down if shapes[k]}
    if kind is not None and layers:
        for key in denoiser:
            if key.startswith(f"{kind}.") and ".lora_A." in key:
                _check_pair(key, shapes, kind, layers)
    return LoraFile(shapes=shapes, rank=max(ranks, default=0))


def _check_pair(key: str, shapes: dict[str, list[int]], kind: str, layers: dict[str, list[int]]) -> None:
    module = key[len(kind) + 1 :].split(".lora_A.")[0]
    base = layers.get(f"{module}.weight")
    a, b = shapes[key], shapes.get(key.replace(".lora_A.", ".lora_B."))
    if base is None:
        raise InvalidRequest(
            f"LoRA layer {module} is not a layer of the family's denoiser", code="lora_family_mismatch"
        )
    if (
        len(base) != 2
        or b is None
        or len(a) != 2
        or len(b) != 2
        or a[1] != base[1]
        or b[0] != base[0]
        or a[0] != b[1]
    ):
        raise InvalidRequest(
            f"LoRA layer {module} has sizes {a} and {b}; the denoiser's layer is {base}",
            code="lora_family_mismatch",
        )


def read_header_file(path: Path) -> dict[str, Any]:
    """The header of a safetensors file on disk, read without its data."""
    with path.open("rb") as f:
        (length,) = struct.unpack("<Q", f.read(8))
        if length > MAX_HEADER:
            raise ValueError(f"{path}: bad safetensors header")
        header = json.loads(f.read(length))
    return header if isinstance(header, dict) else {}


def denoiser_layers(model_dir: Path) -> tuple[str | None, dict[str, list[int]] | None]:
    """The denoiser kind of a diffusers folder and its weights' shapes by name, from the headers of
    its safetensors files; (None, None) where they cannot be read (a model in a bucket)."""
    try:
        index = json.loads((model_dir / "model_index.json").read_text())
    except (OSError, ValueError):
        return None, None
    kind = "transformer" if "transformer" in index else "unet" if "unet" in index else None
    if kind is None:
        return None, None
    layers: dict[str, list[int]] = {}
    try:
        for path in sorted((model_dir / kind).glob("*.safetensors")):
            header = read_header_file(path)
            layers.update({k: list(v["shape"]) for k, v in header.items() if k != "__metadata__"})
    except (OSError, ValueError, KeyError, TypeError):
        return kind, None
    return kind, layers or None
