"""The `generate` command's options: each one a field of the job body (``JobRequest``)."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import click

from inference_server.cli.client import generate_files, parse_lora
from inference_server.settings import get_settings

FILE = click.Path(exists=True, dir_okay=False, path_type=Path)


@click.command()
@click.argument("prompt")
@click.option("--family", default="sd15", show_default=True)
@click.option("--model", default=None)
@click.option(
    "--task",
    type=click.Choice(["txt2img", "img2img", "inpaint", "edit"]),
    default=None,
    help="Default: inpaint with --mask, img2img with --image, else txt2img.",
)
@click.option("--image", type=FILE, default=None, help="Input image, uploaded first.")
@click.option("--mask", type=FILE, default=None, help="Inpainting mask (white is repainted), uploaded first.")
@click.option("--negative-prompt", default=None)
@click.option("--width", type=int, default=None)
@click.option("--height", type=int, default=None)
@click.option("--steps", type=int, default=None)
@click.option("--guidance", type=float, default=None, help="guidance_scale")
@click.option("--strength", type=float, default=None, help="How far img2img/inpaint move from the image.")
@click.option("--seed", type=int, default=None, help="Default: random (the job reports the seed used).")
@click.option("--num-images", type=int, default=None)
@click.option("--lora", "loras", multiple=True, metavar="NAME[:SCALE]", help="Repeatable.")
@click.option("--format", "fmt", type=click.Choice(["png", "jpeg", "webp"]), default=None)
@click.option("-o", "--output", type=click.Path(dir_okay=False, path_type=Path), default=None)
@click.option("--api-url", default=None, help="Default: API_URL.")
@click.option("--api-key", default=None, help="Default: INFERENCE_SERVER_API_KEY.")
@click.option("--quiet", is_flag=True, help="No progress bar.")
@click.option(
    "--preview",
    "preview_every",
    type=click.IntRange(min=1),
    default=None,
    metavar="N",
    help="Ask for a preview every N steps; each one's URL is printed (stderr) as it comes.",
)
def generate(
    prompt: str,
    image: Path | None,
    mask: Path | None,
    loras: tuple[str, ...],
    fmt: str | None,
    output: Path | None,
    api_url: str | None,
    api_key: str | None,
    quiet: bool,
    task: str | None,
    preview_every: int | None,
    **fields: Any,
) -> None:
    """Submit PROMPT, show a progress bar, save the images (one path a line)."""
    key = api_key or os.environ.get("INFERENCE_SERVER_API_KEY")
    if not key:
        raise click.ClickException("no API key: pass --api-key or set INFERENCE_SERVER_API_KEY")
    body: dict[str, Any] = {
        "prompt": prompt,
        "task": task or ("inpaint" if mask else "img2img" if image else "txt2img"),
    }
    names = {"guidance": "guidance_scale"}
    body.update({names.get(k, k): v for k, v in fields.items() if v is not None})
    if loras:
        body["loras"] = [parse_lora(v) for v in loras]
    if fmt:
        body["output"] = {"format": fmt}
    if preview_every:
        body["preview"] = {"every_steps": preview_every}
    url = api_url or get_settings().api_url
    for path in generate_files(url, key, body, output, image=image, mask=mask, show_progress=not quiet):
        click.echo(str(path))
