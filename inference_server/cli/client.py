"""`inference-server generate`: submit a job through ``inference_server.client``, show its
progress, save the results."""

from __future__ import annotations

import sys
import time
from pathlib import Path
from typing import Any

import click
from pydantic import ValidationError

from inference_server.client import Client, ClientError, Job
from inference_server.client.common import TERMINAL

EXTENSIONS = {"image/png": "png", "image/jpeg": "jpg", "image/webp": "webp"}


def generate_files(
    api_url: str,
    api_key: str,
    body: dict[str, Any],
    output: Path | None,
    *,
    image: Path | None = None,
    mask: Path | None = None,
    show_progress: bool = True,
    timeout: float = 3600.0,
) -> list[Path]:
    """Upload ``image`` and ``mask``, submit ``body``, wait, save every output: ``output`` for the
    first, ``<stem>-<n><suffix>`` for the others (``<job id>.<ext>`` without ``output``)."""
    try:
        with Client(api_url, api_key) as client:
            for field, path in (("image", image), ("mask", mask)):
                if path is not None:
                    body[field] = client.upload(path)["uri"]
            job = client.submit(body)
            done = _wait(client, job, show_progress, timeout)
            if done["status"] != "succeeded":
                err = done.get("error") or {}
                raise click.ClickException(
                    f"job {done['id']} {done['status']}: {err.get('code')}: {err.get('message')}"
                )
            return [
                _save(client.download(done["id"], n), _target(output, done, n, o["content_type"]))
                for n, o in enumerate(done["outputs"])
            ]
    except ClientError as exc:
        raise click.ClickException(f"{exc.code}: {exc.message}") from None
    except ValidationError as exc:
        problems = "; ".join(
            f"{'.'.join(str(p) for p in e['loc'])}: {e['msg']}" if e["loc"] else e["msg"]
            for e in exc.errors()
        )
        raise click.ClickException(f"validation_error: {problems}") from None
    except TimeoutError as exc:
        raise click.ClickException(str(exc)) from None


def _wait(client: Client, job: Job, show_progress: bool, timeout: float) -> Job:
    """The job once it has ended: followed live over its event stream while a progress bar is shown,
    else by long polls (no events to show)."""
    if not show_progress:
        return client.wait(job["id"], timeout=timeout)
    from tqdm import tqdm

    deadline = time.monotonic() + timeout
    total = max(job["progress"]["total_steps"], 1)
    with tqdm(total=total, unit="step", desc=job["id"][:8]) as bar:
        for event in client.stream(job["id"]):
            progress = event.progress
            bar.total = max(progress.get("total_steps") or 0, 1)
            bar.n = progress.get("step") or 0
            bar.set_postfix_str(event.data.get("status", ""))
            bar.refresh()
            if event.type == "job.preview":
                preview = event.data.get("preview") or {}
                tqdm.write(f"preview of step {preview.get('step')}: {preview.get('url')}", file=sys.stderr)
            if event.terminal or time.monotonic() > deadline:
                break
        finished = client.get(job["id"])
    if finished["status"] not in TERMINAL:
        raise TimeoutError(f"job {job['id']} still {finished['status']} after {timeout}s")
    return finished


def _target(output: Path | None, job: Job, n: int, content_type: str) -> Path:
    if output is None:
        ext = EXTENSIONS.get(content_type, "img")
        return Path(f"{job['id']}.{ext}" if n == 0 else f"{job['id']}-{n}.{ext}")
    return output if n == 0 else output.with_name(f"{output.stem}-{n}{output.suffix}")


def _save(data: bytes, path: Path) -> Path:
    path.write_bytes(data)
    return path


def parse_lora(value: str) -> dict[str, Any]:
    """``NAME[:SCALE]``; a name may hold colons itself (a URI), so only a numeric tail is a scale."""
    name, sep, tail = value.rpartition(":")
    if sep and name:
        try:
            return {"name": name, "scale": float(tail)}
        except ValueError:
            pass
    return {"name": value}
