"""`inference-server generate`: submit a job over HTTP, show its progress, save the result."""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Any

import click
import requests

from inference_server.settings import get_settings

TERMINAL = {"succeeded", "failed", "canceled"}


def run_generate(
    api_url: str,
    api_key: str,
    body: dict[str, Any],
    output: Path | None,
    *,
    image: Path | None = None,
    poll: float = 0.5,
    show_progress: bool = True,
    timeout: float = 3600.0,
) -> Path:
    """Submit ``body``, wait for the job, save output 0; returns the file written."""
    from tqdm import tqdm

    http = requests.Session()
    http.headers["Authorization"] = f"Bearer {api_key}"
    if image is not None:
        with image.open("rb") as fh:
            up = http.post(f"{api_url}/v1/uploads", files={"file": (image.name, fh)}, timeout=60)
        _raise_for(up)
        body["image"] = up.json()["uri"]
    resp = http.post(f"{api_url}/v1/jobs", json=body, timeout=30)
    _raise_for(resp)
    job = resp.json()
    bar = tqdm(
        total=max(job["progress"]["total_steps"], 1),
        unit="step",
        disable=not show_progress,
        desc=job["id"][:8],
    )
    deadline = time.monotonic() + timeout
    while job["status"] not in TERMINAL:
        if time.monotonic() > deadline:
            raise click.ClickException(f"job {job['id']} still {job['status']} after {timeout:.0f}s")
        # Long-poll: the API answers at once when the job finishes, or after `poll` seconds with progress.
        resp = http.get(f"{api_url}/v1/jobs/{job['id']}", params={"wait": poll}, timeout=poll + 30)
        _raise_for(resp)
        job = resp.json()
        bar.total = max(job["progress"]["total_steps"], 1)
        bar.n = job["progress"]["step"]
        bar.set_postfix_str(job["status"])
        bar.refresh()
    bar.close()
    if job["status"] != "succeeded":
        err = job.get("error") or {}
        raise click.ClickException(
            f"job {job['id']} {job['status']}: {err.get('code')}: {err.get('message')}"
        )
    first = job["outputs"][0]
    data = http.get(f"{api_url}/v1/jobs/{job['id']}/outputs/0", timeout=120)
    _raise_for(data)
    ext = first["content_type"].split("/")[-1].replace("jpeg", "jpg")
    path = output or Path(f"{job['id']}.{ext}")
    path.write_bytes(data.content)
    return path


def _raise_for(resp: requests.Response) -> None:
    if resp.status_code >= 400:
        try:
            err = resp.json()["error"]
            raise click.ClickException(f"HTTP {resp.status_code} {err['code']}: {err['message']}")
        except (ValueError, KeyError):
            raise click.ClickException(f"HTTP {resp.status_code}: {resp.text[:200]}") from None


@click.command()
@click.argument("prompt")
@click.option("--family", default="sd15", show_default=True)
@click.option("--model", default=None)
@click.option("--task", default=None, help="Default: txt2img, or img2img with --image.")
@click.option("--image", type=click.Path(exists=True, dir_okay=False, path_type=Path), default=None)
@click.option("--width", type=int, default=None)
@click.option("--height", type=int, default=None)
@click.option("--steps", type=int, default=None)
@click.option("--seed", type=int, default=None)
@click.option("-o", "--output", type=click.Path(dir_okay=False, path_type=Path), default=None)
@click.option("--api-url", default=None, help="Default: API_URL.")
@click.option("--api-key", default=None, help="Default: INFERENCE_SERVER_API_KEY.")
def generate(
    prompt: str,
    family: str,
    model: str | None,
    task: str | None,
    image: Path | None,
    width: int | None,
    height: int | None,
    steps: int | None,
    seed: int | None,
    output: Path | None,
    api_url: str | None,
    api_key: str | None,
) -> None:
    """Submit PROMPT, show a progress bar, save the image."""
    key = api_key or os.environ.get("INFERENCE_SERVER_API_KEY")
    if not key:
        raise click.ClickException("no API key: pass --api-key or set INFERENCE_SERVER_API_KEY")
    body: dict[str, Any] = {
        "family": family,
        "prompt": prompt,
        "task": task or ("img2img" if image else "txt2img"),
    }
    for name, value in (
        ("model", model),
        ("width", width),
        ("height", height),
        ("steps", steps),
        ("seed", seed),
    ):
        if value is not None:
            body[name] = value
    path = run_generate(api_url or get_settings().api_url, key, body, output, image=image)
    click.echo(str(path))
