"""`inference-server up`: the whole system in one process on embedded defaults — the first thing a
newcomer runs. The wiring is :mod:`inference_server.roles.up`."""

from __future__ import annotations

import time
from pathlib import Path

import click


@click.command()
@click.option("--port", type=int, default=None, help="API port (default: API_PORT).")
@click.option("--once", "prompt", default=None, help="Generate one image for PROMPT, save it, and exit.")
@click.option(
    "-o",
    "--output",
    type=click.Path(dir_okay=False, path_type=Path),
    default=None,
    help="Where --once saves its image (default: a new file in $INFERENCE_SERVER_HOME/outputs).",
)
@click.option("--family", default="sd15", show_default=True, help="Family --once uses.")
def up(port: int | None, prompt: str | None, output: Path | None, family: str) -> None:
    """Run the whole system in one process for a first try."""
    from inference_server.roles.up import describe_result, embedded_settings, run_up

    settings = embedded_settings(port)
    if output is None:
        # Outside the working directory: a first try run from a clone leaves the repository clean.
        output = settings.home / "outputs" / f"up-{time.strftime('%Y%m%d-%H%M%S')}.png"
        output.parent.mkdir(parents=True, exist_ok=True)
    saved = run_up(settings, prompt=prompt, output=output, family=family)
    if saved is not None:
        click.echo(describe_result(settings, saved), err=True)
        click.echo(str(saved))
