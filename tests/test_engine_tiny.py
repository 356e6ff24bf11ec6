"""`models tiny` and friends: deterministic builds, the CLI, DFloat11 compression of a tiny transformer."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import torch
from click.testing import CliRunner

from inference_server.cli.models_cmd import models
from inference_server.registry import load_registry

torch.set_num_threads(1)


def file_digest(path: Path) -> str:
    if path.suffix != ".safetensors":
        return hashlib.sha256(path.read_bytes()).hexdigest()
    # safetensors writes its metadata map in a per-process random order: compare content instead.
    from safetensors import safe_open

    h = hashlib.sha256()
    with safe_open(str(path), "pt") as f:
        h.update(repr(sorted((f.metadata() or {}).items())).encode())
        for key in sorted(f.keys()):
            t = f.get_tensor(key)
            h.update(f"{key}{t.dtype}{tuple(t.shape)}".encode())
            h.update(t.contiguous().view(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def tree_digest(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): file_digest(p) for p in sorted(root.rglob("*")) if p.is_file()}


def test_build_is_deterministic_and_registered(tmp_path: Path, tiny_models: Path) -> None:
    result = CliRunner().invoke(models, ["tiny", str(tmp_path / "a"), "--families", "sd15,qwen-image-edit"])
    assert result.exit_code == 0, result.output
    registry = load_registry(tmp_path / "a" / "models.toml")
    assert sorted(registry.families) == ["qwen-image-edit", "sd15"]
    # Same seeds, same bytes as the full build the session made (weights, tokenizers, configs, LoRAs).
    ours = tree_digest(tmp_path / "a" / "sd15")
    assert ours == tree_digest(tiny_models.parent / "sd15")
    assert tree_digest(tmp_path / "a" / "qwen-image-edit-df11") == tree_digest(
        tiny_models.parent / "qwen-image-edit-df11"
    )
    assert any(name.endswith(".safetensors") for name in ours)


def test_cli_rejects_unknown_family(tmp_path: Path) -> None:
    result = CliRunner().invoke(models, ["tiny", str(tmp_path), "--families", "sd99"])
    assert result.exit_code != 0 and "sd99" in result.output


def test_cli_list_prints_the_catalog(tiny_models: Path) -> None:
    result = CliRunner().invoke(models, ["list", "--file", str(tiny_models)])
    assert result.exit_code == 0, result.output
    names = [f["name"] for f in json.loads(result.output)["families"]]
    assert names == ["sd15", "sdxl", "flux", "qwen-image-edit"]


def test_cli_compress_matches_the_registered_twin(tmp_path: Path, tiny_models: Path) -> None:
    result = CliRunner().invoke(
        models, ["compress", str(tiny_models.parent / "flux"), str(tmp_path / "df11")]
    )
    assert result.exit_code == 0, result.output
    assert "DF11" in result.output
    assert tree_digest(tmp_path / "df11") == tree_digest(tiny_models.parent / "flux-df11")
    result = CliRunner().invoke(models, ["compress", str(tiny_models.parent / "sd15"), str(tmp_path / "x")])
    assert result.exit_code != 0 and "UNet" in result.output
