"""BF16 transformer -> DFloat11 folder (``config.json`` + ``model.safetensors``), as dfloat11 0.5.0
lays it out, so the package's CUDA loader and our CPU loader both read it.

The caller's model is not modified (upstream's ``compress_model`` deletes weights as it goes).
"""

from __future__ import annotations

import json
import logging
import re
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import save_file

from inference_server.engine.df11.codec import encode_weights
from inference_server.engine.df11.format import (
    DF11_FIELDS,
    WEIGHTS_FILE,
    DF11Config,
    DF11FormatError,
    write_config,
)
from inference_server.engine.df11.load import resolve_targets

log = logging.getLogger(__name__)

# Upstream's published choices (DFloat11/FLUX.1-*-DF11, DFloat11/Qwen-Image-DF11): every Linear of
# each double- and single-stream block. Embedders, norm_out and proj_out stay BF16: they are
# small and run once per step.
FLUX_PATTERNS: dict[str, list[str]] = {
    r"transformer_blocks\.\d+": [
        "norm1.linear",
        "norm1_context.linear",
        "attn.to_q",
        "attn.to_k",
        "attn.to_v",
        "attn.add_k_proj",
        "attn.add_v_proj",
        "attn.add_q_proj",
        "attn.to_out.0",
        "attn.to_add_out",
        "ff.net.0.proj",
        "ff.net.2",
        "ff_context.net.0.proj",
        "ff_context.net.2",
    ],
    r"single_transformer_blocks\.\d+": [
        "norm.linear",
        "proj_mlp",
        "proj_out",
        "attn.to_q",
        "attn.to_k",
        "attn.to_v",
    ],
}
QWEN_IMAGE_PATTERNS: dict[str, list[str]] = {
    r"transformer_blocks\.\d+": [
        "img_mod.1",
        "attn.to_q",
        "attn.to_k",
        "attn.to_v",
        "attn.add_k_proj",
        "attn.add_v_proj",
        "attn.add_q_proj",
        "attn.to_out.0",
        "attn.to_add_out",
        "img_mlp.net.0.proj",
        "img_mlp.net.2",
        "txt_mod.1",
        "txt_mlp.net.0.proj",
        "txt_mlp.net.2",
    ],
}
KNOWN_PATTERNS = {"FluxTransformer2DModel": FLUX_PATTERNS, "QwenImageTransformer2DModel": QWEN_IMAGE_PATTERNS}


def default_pattern_dict(model: torch.nn.Module) -> dict[str, list[str]]:
    """The pattern_dict for ``model``: upstream's for FLUX and Qwen-Image, else every Linear
    inside each element of every top-level ``ModuleList`` (the repeated transformer blocks)."""
    known = KNOWN_PATTERNS.get(type(model).__name__)
    if known is not None:
        return {k: list(v) for k, v in known.items()}
    patterns: dict[str, list[str]] = {}
    for name, child in model.named_children():
        if not isinstance(child, torch.nn.ModuleList) or len(child) == 0:
            continue
        linears = [n for n, m in child[0].named_modules() if isinstance(m, torch.nn.Linear) and n]
        if linears:
            patterns[re.escape(name) + r"\.\d+"] = linears
    if not patterns:
        raise DF11FormatError(f"no repeated blocks with Linear layers found in {type(model).__name__}")
    return patterns


def compress_transformer(
    model: torch.nn.Module,
    out_dir: Path,
    *,
    pattern_dict: dict[str, list[str]] | None = None,
    release_weights: bool = False,
) -> Path:
    """Write ``model`` (BF16) to ``out_dir`` in the dfloat11 0.5.0 format and return ``out_dir``.

    Each module matching a ``pattern_dict`` regex (default: ``default_pattern_dict(model)``) has
    its listed Linears' weights coded together. A block whose weights hold an exponent the
    format cannot code (inf, nan, |w| >= 2**113) is kept as plain BF16, with a warning, so the
    folder still restores the model exactly. ``release_weights`` deletes each block's BF16
    weights from ``model`` once coded (as upstream does), so the peak memory stays near the
    BF16 model's size; the model is unusable afterwards.
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    patterns = pattern_dict if pattern_dict is not None else default_pattern_dict(model)
    config = DF11Config(pattern_dict={k: list(v) for k, v in patterns.items()})

    tensors: dict[str, torch.Tensor] = {}
    covered: set[str] = set()
    n_blocks = 0
    for name, module in model.named_modules():
        attrs = config.matches(name)
        if attrs is None:
            continue
        linears = resolve_targets(module, name, attrs)
        weights = [_bf16_bits(lin.weight, f"{name}.{path}") for path, lin in linears]
        try:
            block = encode_weights(weights)
        except DF11FormatError as exc:
            log.warning("DF11: keeping %s as BF16: %s", name, exc)
            continue
        prefix = f"{name}." if name else ""
        for field in DF11_FIELDS:
            tensors[prefix + field] = torch.from_numpy(np.ascontiguousarray(getattr(block, field)))
        covered.update(f"{prefix}{path}.weight" if path else f"{prefix}weight" for path, _ in linears)
        n_blocks += 1
        if release_weights:
            for _, lin in linears:
                del lin.weight
    if n_blocks == 0:
        raise DF11FormatError("pattern_dict matched no module with codable weights")

    for key, value in model.state_dict().items():
        if key not in covered and value is not None:
            tensors[key] = value.detach().to("cpu").contiguous()
    save_file(tensors, str(out_dir / WEIGHTS_FILE), metadata={"format": "pt", "dfloat11": config.version})
    write_config(out_dir, config, _model_config(model))
    return out_dir


def compress_folder(src: Path, dst: Path) -> Path:
    """Compress a diffusers transformer folder (config.json + safetensors) into ``dst``.

    ``src`` may also be a pipeline folder (model_index.json): its ``transformer`` is used. The
    model class is the config's ``_class_name``; weights are cast to bfloat16 when they are not.
    """
    import diffusers

    src = Path(src)
    if (src / "model_index.json").exists() and (src / "transformer").is_dir():
        src = src / "transformer"
    raw = json.loads((src / "config.json").read_text(encoding="utf-8"))
    class_name = raw.get("_class_name")
    cls = getattr(diffusers, class_name or "", None)
    if cls is None:
        raise DF11FormatError(f"{src}/config.json: unknown diffusers model class {class_name!r}")
    model = cls.from_pretrained(str(src), torch_dtype=torch.bfloat16, low_cpu_mem_usage=True)
    model = model.to(torch.bfloat16).eval()
    return compress_transformer(model, Path(dst), release_weights=True)


def _bf16_bits(weight: torch.Tensor, name: str) -> np.ndarray:
    if weight.dtype != torch.bfloat16:
        raise DF11FormatError(f"{name} is {weight.dtype}; DF11 compresses bfloat16 weights only")
    return weight.detach().to("cpu").contiguous().view(torch.int16).numpy().view(np.uint16)


def _model_config(model: torch.nn.Module) -> dict[str, Any]:
    to_json = getattr(model, "to_json_string", None)
    if to_json is None:
        return {}
    try:
        return json.loads(to_json())
    except (TypeError, ValueError):
        return {}
