"""The on-disk layout of a DFloat11 model, as dfloat11 0.5.0 writes and reads it.

A DF11 folder holds ``config.json`` with a ``dfloat11_config`` object (version,
threads_per_block, bytes_per_thread, pattern_dict) and safetensors files. For every module
whose name fully matches a ``pattern_dict`` regex there are six tensors named
``<module>.<field>`` (``DF11_FIELDS``); its covered Linear weights (the pattern's attribute
paths, in order) are absent. Every other parameter and buffer is stored as is, under its
``state_dict`` name. We also keep the source model's diffusers config (``_class_name`` and
friends) in ``config.json``: upstream reads only ``dfloat11_config`` and ignores the rest.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from inference_server.errors import ModelError

VERSION = "0.5.0"
THREADS_PER_BLOCK = 512
BYTES_PER_THREAD = 8
WEIGHTS_FILE = "model.safetensors"  # upstream's single-file name; not a name diffusers loads
DF11_FIELDS = ("luts", "encoded_exponent", "sign_mantissa", "output_positions", "gaps", "split_positions")
FIELD_DTYPES = {  # torch dtype names as safetensors stores them
    "luts": "uint8",
    "encoded_exponent": "uint8",
    "sign_mantissa": "uint8",
    "output_positions": "uint8",
    "gaps": "uint8",
    "split_positions": "int64",
}


class DF11FormatError(ModelError):
    """A DF11 folder or tensor is not in the dfloat11 format, or weights cannot be coded in it."""

    code = "df11_format_error"


@dataclass(frozen=True)
class DF11Config:
    """``dfloat11_config`` from config.json. ``pattern_dict`` maps a module-name regex to the
    attribute paths of the Linears whose weights are compressed together (empty list: the
    matched module is itself the Linear)."""

    pattern_dict: dict[str, list[str]]
    version: str = VERSION
    threads_per_block: tuple[int, ...] = (THREADS_PER_BLOCK,)
    bytes_per_thread: int = BYTES_PER_THREAD
    extra: dict[str, Any] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        return {
            "version": self.version,
            "threads_per_block": list(self.threads_per_block),
            "bytes_per_thread": self.bytes_per_thread,
            "pattern_dict": {k: list(v) for k, v in self.pattern_dict.items()},
        }

    def matches(self, module_name: str) -> list[str] | None:
        """The attribute paths for ``module_name`` if a pattern fully matches it, else None."""
        for pattern, attrs in self.pattern_dict.items():
            if re.fullmatch(pattern, module_name):
                return list(attrs)
        return None


def read_config(df11_dir: Path) -> tuple[DF11Config, dict[str, Any]]:
    """Parse ``df11_dir/config.json``: the DF11 config and the whole JSON object."""
    path = Path(df11_dir) / "config.json"
    try:
        raw = json.loads(path.read_text(encoding="utf-8"))
        cfg = raw["dfloat11_config"]
        config = DF11Config(
            pattern_dict={k: list(v) for k, v in cfg["pattern_dict"].items()},
            version=str(cfg.get("version", VERSION)),
            threads_per_block=tuple(int(t) for t in cfg["threads_per_block"]),
            bytes_per_thread=int(cfg["bytes_per_thread"]),
        )
    except FileNotFoundError as exc:
        raise DF11FormatError(f"{path} not found") from exc
    except (KeyError, TypeError, ValueError) as exc:
        raise DF11FormatError(f"{path}: no valid dfloat11_config ({exc})") from exc
    if config.threads_per_block[0] != THREADS_PER_BLOCK or config.bytes_per_thread != BYTES_PER_THREAD:
        # The CPU decoder follows the same values; the CUDA kernel has 8 bytes per thread built in.
        raise DF11FormatError(f"unsupported layout {config.threads_per_block}x{config.bytes_per_thread}")
    return config, raw


def write_config(out_dir: Path, config: DF11Config, model_config: dict[str, Any] | None = None) -> Path:
    """Write config.json: the model's own config (if any) plus ``dfloat11_config``."""
    body = dict(model_config or {})
    body["dfloat11_config"] = config.to_json()
    path = Path(out_dir) / "config.json"
    path.write_text(json.dumps(body, indent=2, sort_keys=False) + "\n", encoding="utf-8")
    return path


def weight_files(df11_dir: Path) -> list[Path]:
    """The safetensors files of a DF11 folder (upstream loads every one in the folder)."""
    files = sorted(Path(df11_dir).glob("*.safetensors"))
    if not files:
        raise DF11FormatError(f"no .safetensors file in {df11_dir}")
    return files


def split_df11_name(name: str) -> tuple[str, str] | None:
    """``("blocks.0", "luts")`` for ``"blocks.0.luts"``; None for a plain tensor name."""
    module, _, leaf = name.rpartition(".")
    return (module, leaf) if leaf in DF11_FIELDS else None


def group_df11_tensors(names: Iterator[str] | list[str]) -> dict[str, dict[str, str]]:
    """Map each compressed module to {field: full tensor name}; plain tensors are left out."""
    groups: dict[str, dict[str, str]] = {}
    for name in names:
        parts = split_df11_name(name)
        if parts:
            groups.setdefault(parts[0], {})[parts[1]] = name
    for module, fields in groups.items():
        missing = set(DF11_FIELDS) - set(fields)
        if missing:
            raise DF11FormatError(f"{module}: missing DF11 tensors {sorted(missing)}")
    return groups
