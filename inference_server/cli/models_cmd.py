"""`inference-server models ...`: write tiny models, compress a transformer to DFloat11, show a registry.

torch and diffusers are imported inside the commands, so `--help` stays instant.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import click


@click.group()
def models() -> None:
    """Model files: tiny test models, DFloat11 compression, the registry."""


@models.command()
@click.argument("directory", type=click.Path(file_okay=False, path_type=Path))
@click.option("--families", default="", help="Comma-separated subset (default: every family).")
def tiny(directory: Path, families: str) -> None:
    """Write small random-weight models of every family and DIRECTORY/models.toml pointing at them."""
    from inference_server.engine.tiny import build_tiny_models

    wanted = [f.strip() for f in families.split(",") if f.strip()] or None
    started = time.perf_counter()
    try:
        toml = build_tiny_models(directory, wanted)
    except ValueError as exc:
        raise click.BadParameter(str(exc), param_hint="--families") from exc
    click.echo(f"wrote {toml} in {time.perf_counter() - started:.1f} s; use MODELS_FILE={toml}")


@models.command()
@click.argument("src", type=click.Path(exists=True, file_okay=False, path_type=Path))
@click.argument("dst", type=click.Path(file_okay=False, path_type=Path))
def compress(src: Path, dst: Path) -> None:
    """Compress a BF16 transformer to DFloat11.

    SRC is a diffusers pipeline folder (its transformer/ is used) or a transformer folder.
    DST receives the DFloat11 folder; register it as `df11 = "DST"` on a model of the registry.
    """
    import diffusers
    import torch

    from inference_server.engine.df11 import compress_transformer

    folder, subfolder = src, None
    if (src / "model_index.json").exists():
        index = diffusers.DiffusionPipeline.load_config(str(src))
        if "transformer" not in index:
            raise click.ClickException(
                f"{src} has no transformer (a UNet model cannot be compressed to DF11)"
            )
        class_name = index["transformer"][1]
        subfolder = "transformer"
    else:
        config = json.loads((src / "config.json").read_text())
        class_name = config["_class_name"]
    cls = getattr(diffusers, class_name)
    started = time.perf_counter()
    model = cls.from_pretrained(str(folder), subfolder=subfolder, dtype=torch.bfloat16)
    # Record a relative origin, not this machine's absolute path: the output is then reproducible.
    model.register_to_config(
        _name_or_path=f"{src.resolve().name}/{subfolder}" if subfolder else src.resolve().name
    )
    out = compress_transformer(model, dst)
    before = sum(p.numel() * p.element_size() for p in model.parameters())
    after = sum(f.stat().st_size for f in Path(out).rglob("*") if f.is_file())
    click.echo(
        f"wrote {out}: {before / 1e6:.1f} MB BF16 -> {after / 1e6:.1f} MB DF11 "
        f"({after / before:.0%}) in {time.perf_counter() - started:.1f} s"
    )


@models.command("list")
@click.option(
    "--file",
    "models_file",
    type=click.Path(exists=True, dir_okay=False, path_type=Path),
    default=None,
    help="Default: MODELS_FILE.",
)
def list_models(models_file: Path | None) -> None:
    """Validate a registry file and print its catalog as JSON."""
    from inference_server.registry import load_registry

    if models_file is None:
        from inference_server.settings import get_settings

        models_file = get_settings().models_file
        if models_file is None:
            raise click.ClickException("no --file and MODELS_FILE is not set")
    click.echo(json.dumps(load_registry(models_file).catalog(), indent=2))
