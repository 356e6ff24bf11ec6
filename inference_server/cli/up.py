"""`inference-server up`: API, worker and dispatcher in one process on embedded defaults (SQLite,
an in-process broker, file storage, tiny local models) — the first thing a newcomer runs."""

from __future__ import annotations

import logging
import os
import signal
import threading
import time
from pathlib import Path

import click
import requests

from inference_server.settings import get_settings

log = logging.getLogger(__name__)


def _embedded_settings(port: int | None):  # type: ignore[no-untyped-def]
    base = get_settings()
    update: dict[str, object] = {"allow_private_networks": True}
    if "BROKER_URL" not in os.environ:
        update["broker_url"] = "memory://"
    if port:
        update["api_port"] = port
        update["api_url"] = f"http://{base.api_host}:{port}"
    if base.models_file is None:
        update["models_file"] = base.home / "tiny-models" / "models.toml"
    if not base.torch_threads:
        update["torch_threads"] = min(4, os.cpu_count() or 1)
    return base.model_copy(update=update)


def _ensure_models(models_file: Path) -> None:
    if models_file.exists():
        return
    from inference_server.engine.tiny import build_tiny_models

    click.echo(f"building tiny random-weight models in {models_file.parent} (first run only) ...", err=True)
    build_tiny_models(models_file.parent)


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
    import uvicorn

    from api.app import create_app
    from api.auth import create_tenant_key
    from inference_server.cli.roles import start_dispatcher_threads
    from inference_server.db import make_database, make_session_factory
    from inference_server.migrate import upgrade
    from inference_server.publish.topology import queue_name
    from inference_server.registry import load_registry
    from workers.celery_app import create_celery_app

    settings = _embedded_settings(port)
    assert settings.models_file is not None
    _ensure_models(settings.models_file)
    upgrade(settings.database_url)
    db = make_database(settings.database_url)
    with make_session_factory(db)() as session:
        _, api_key = create_tenant_key(session, "local")
    db.dispose()
    families = list(load_registry(settings.models_file).families)

    stop = threading.Event()
    server = uvicorn.Server(
        uvicorn.Config(
            create_app(settings), host=settings.api_host, port=settings.api_port, log_level="warning"
        )
    )
    threading.Thread(target=server.run, name="api", daemon=True).start()
    start_dispatcher_threads(settings, stop, relay=False)
    _wait_ready(settings.api_url)
    click.echo(f"API on {settings.api_url}  (INFERENCE_SERVER_API_KEY={api_key})", err=True)
    click.echo(f"data in {settings.home}; families: {', '.join(families)}", err=True)

    result: dict[str, object] = {}
    if prompt is not None:
        threading.Thread(
            target=_once, args=(settings, api_key, prompt, family, output, result), daemon=True
        ).start()

    app = create_celery_app(settings, families=families)
    worker = app.Worker(
        pool_cls="solo",
        concurrency=1,
        queues=[queue_name(f) for f in families],
        loglevel="WARNING",
        without_gossip=True,
        without_mingle=True,
        without_heartbeat=True,
        hostname="up@%h",
    )
    worker.start()
    stop.set()
    server.should_exit = True
    if prompt is not None:
        if "path" not in result:
            raise click.ClickException(str(result.get("error", "stopped before the image was made")))
        click.echo(str(result["path"]))


def _wait_ready(api_url: str, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if requests.get(f"{api_url}/healthz", timeout=1).ok:
                return
        except requests.RequestException:
            pass
        time.sleep(0.1)
    raise click.ClickException(f"the API did not start on {api_url}")


def _once(settings, api_key: str, prompt: str, family: str, output: Path, result: dict) -> None:  # type: ignore[no-untyped-def]
    from inference_server.cli.client import run_generate

    try:
        result["path"] = run_generate(settings.api_url, api_key, {"family": family, "prompt": prompt}, output)
    except Exception as exc:  # reported by the main thread after the worker stops
        result["error"] = exc
    finally:
        os.kill(os.getpid(), signal.SIGTERM)  # a warm shutdown of the worker in the main thread
