"""`inference-server up`: the whole system in one process on embedded defaults — the first thing a
newcomer runs. The wiring is :mod:`inference_server.roles.up`."""

from __future__ import annotations

from pathlib import Path

import click


@click.command()
@click.option("--port", type=int, default=None, help="API port (default: API_PORT).")
@click.option("--once", "prompt", default=None, help="Generate one image for PROMPT, save it, and exit.")
@click.option(
    "-o",
    "--output",
    type=click.Path(dir_okay=False, path_type=Path),
    default=Path("image.png"),
    show_default=True,
    help="Where --once saves its image.",
)
@click.option("--family", default="sd15", show_default=True, help="Family --once uses.")
def up(port: int | None, prompt: str | None, output: Path, family: str) -> None:
    """Run the whole system in one process for a first try."""
    from inference_server.roles.up import embedded_settings, run_up

    saved = run_up(embedded_settings(port), prompt=prompt, output=output, family=family)
    if saved is not None:
        click.echo(str(saved))
