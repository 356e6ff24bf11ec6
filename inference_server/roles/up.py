"""`up`'s composition root: the API, the webhook dispatcher and a worker in one process on embedded
defaults (SQLite, an in-process broker, file storage, tiny local models). Each part is built by its
own role's root; this module only chooses the settings and starts them side by side."""

from __future__ import annotations

import logging
import os
import signal
import sys
import threading
import time
from pathlib import Path
from typing import Any

import click
import requests

from inference_server.errors import DependencyDown
from inference_server.settings import Settings, get_settings

log = logging.getLogger(__name__)


def embedded_settings(port: int | None) -> Settings:
    """The environment's settings, with embedded defaults for whatever it leaves unset."""
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


def run_up(settings: Settings, *, prompt: str | None, output: Path, family: str) -> Path | None:
    """Run until stopped, or with ``prompt``: until its image is saved to ``output`` (returned)."""
    import uvicorn

    from api.app import create_app
    from api.auth import create_tenant_key
    from inference_server.db import make_database, make_session_factory
    from inference_server.migrate import upgrade
    from inference_server.roles.dispatcher import start_dispatcher
    from workers.launcher import build_worker

    assert settings.models_file is not None
    _quiet_for_a_first_try()
    _ensure_models(settings.models_file)
    upgrade(settings.database_url)
    db = make_database(settings.database_url)
    with make_session_factory(db)() as session:
        _, api_key = create_tenant_key(session, "local")
    db.dispose()
    families = _families(settings.models_file)
    worker_app, queues = build_worker(settings, families)

    stop = threading.Event()
    server = uvicorn.Server(
        uvicorn.Config(
            create_app(settings),
            host=settings.api_host,
            port=settings.api_port,
            log_level="warning",
            log_config=None,  # the process's own handler (inference_server.logs)
            access_log=False,
        )
    )
    threading.Thread(target=server.run, name="api", daemon=True).start()
    start_dispatcher(settings, stop, relay=False)  # the API's relay publishes
    _wait_ready(settings.api_url)
    click.echo(f"API on {settings.api_url}  (INFERENCE_SERVER_API_KEY={api_key})", err=True)
    click.echo(f"data in {settings.home}; families: {', '.join(families)}", err=True)

    result: dict[str, Any] = {}
    if prompt is not None:
        threading.Thread(
            target=_once, args=(settings, api_key, prompt, family, output, result), daemon=True
        ).start()
    # The worker runs in the main thread (Celery's solo pool), so SIGTERM and Ctrl-C stop it warmly.
    worker_app.Worker(
        pool_cls="solo",
        concurrency=1,
        queues=queues,
        loglevel="WARNING",
        without_gossip=True,
        without_mingle=True,
        without_heartbeat=True,
        hostname="up@%h",
        quiet=True,  # no banner: `up` says what it runs in two lines of its own
    ).start()
    stop.set()
    server.should_exit = True
    if prompt is None:
        return None
    if "path" not in result:
        raise click.ClickException(str(result.get("error", "stopped before the image was made")))
    return Path(result["path"])


def describe_result(settings: Settings, saved: Path) -> str:
    """One line on what `up --once` made: its size, and whether it came from random weights."""
    from PIL import Image

    with Image.open(saved) as image:
        width, height = image.size
    assert settings.models_file is not None
    if settings.models_file == settings.home / "tiny-models" / "models.toml":
        return (
            f"made a {width}x{height} image from random weights (the tiny test models: noise, not a "
            "picture; set MODELS_FILE to a registry of real models for real images)"
        )
    return f"made a {width}x{height} image with the models of {settings.models_file}"


def _quiet_for_a_first_try() -> None:
    """`up` is run by a person at a terminal: keep its output to what they need. Unless the log
    level was chosen (LOG_LEVEL, --log-level), only warnings and errors are shown; messages that
    are expected here (the in-process broker has no hostname; a laptop's root shell) are not."""
    import warnings

    from celery.exceptions import SecurityWarning

    root = logging.getLogger()
    if "LOG_LEVEL" not in os.environ and root.level == logging.INFO:
        root.setLevel(logging.WARNING)
    logging.getLogger("kombu.connection").setLevel(logging.ERROR)  # memory:// has no hostname
    warnings.filterwarnings("ignore", category=SecurityWarning)  # one user's machine, not a server


def _families(models_file: Path) -> list[str]:
    from inference_server.registry import load_registry

    return list(load_registry(models_file).families)


def _ensure_models(models_file: Path) -> None:
    if models_file.exists():
        return
    from diffusers.utils import logging as diffusers_logging
    from transformers.utils import logging as transformers_logging

    from inference_server.engine.tiny import build_tiny_models

    click.echo(f"building tiny random-weight models in {models_file.parent} (first run only) ...", err=True)
    diffusers_logging.disable_progress_bar()  # a bar per component of every family otherwise
    transformers_logging.disable_progress_bar()
    build_tiny_models(models_file.parent)


def _wait_ready(api_url: str, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if requests.get(f"{api_url}/healthz", timeout=1).ok:
                return
        except requests.RequestException:
            pass
        time.sleep(0.1)
    raise DependencyDown(f"the API did not start on {api_url}")


def _once(
    settings: Settings, api_key: str, prompt: str, family: str, output: Path, result: dict[str, Any]
) -> None:
    from inference_server.cli.client import generate_files

    try:
        body = {"family": family, "prompt": prompt}
        # A bar for a person at a terminal; none in a pipe, where it would be a line per update.
        shown = sys.stderr.isatty()
        result["path"] = generate_files(settings.api_url, api_key, body, output, show_progress=shown)[0]
    except Exception as exc:  # reported by the main thread after the worker stops
        result["error"] = exc
    finally:
        os.kill(os.getpid(), signal.SIGTERM)  # a warm shutdown of the worker in the main thread
