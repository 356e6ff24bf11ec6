"""Starting the real system for a benchmark: a fresh PostgreSQL database, a RabbitMQ vhost of the
benchmark's own on the local broker, a moto S3 server, tiny models, and `inference-server`
processes. Shared by the benchmark scripts."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, contextmanager
from pathlib import Path
from typing import Any

import requests

from inference_server.devtools.services import (
    DEFAULT_BROKER,
    DEFAULT_PG_ADMIN,
    free_port,
    fresh_database,
    private_vhost,
)

ROOT = Path(__file__).resolve().parent.parent


def database() -> AbstractContextManager[str]:
    """A fresh PostgreSQL database at migration head, dropped afterwards."""
    return fresh_database("is_bench", os.environ.get("BENCH_PG_ADMIN_URL", DEFAULT_PG_ADMIN))


def broker() -> AbstractContextManager[str]:
    """The URL of a RabbitMQ vhost of this run's own, deleted afterwards with its queues: a
    benchmark starts on empty queues and never touches the broker's default vhost."""
    return private_vhost("is_bench", os.environ.get("BENCH_BROKER_URL", DEFAULT_BROKER))


def wait_http(url: str, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if requests.get(url, timeout=1).status_code < 500:
                return
        except requests.RequestException:
            pass
        time.sleep(0.1)
    raise RuntimeError(f"{url} did not come up")


@contextmanager
def moto_s3() -> Iterator[str]:
    import boto3

    port = free_port()
    proc = subprocess.Popen(
        [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    endpoint = f"http://127.0.0.1:{port}"
    try:
        wait_http(endpoint)
        boto3.client(
            "s3",
            endpoint_url=endpoint,
            region_name="us-east-1",
            aws_access_key_id="x",
            aws_secret_access_key="x",
        ).create_bucket(Bucket="bench")
        yield endpoint
    finally:
        proc.terminate()
        proc.wait()


def tiny_models() -> Path:
    cached = os.environ.get("BENCH_TINY_MODELS")
    if cached:
        return Path(cached) / "models.toml"
    import torch

    torch.set_num_threads(1)
    from inference_server.engine.tiny import build_tiny_models

    return build_tiny_models(Path(tempfile.mkdtemp(prefix="bench-tiny-")), families=["sd15"])


def pipeline_call(models_file: Path, params: dict[str, Any]) -> Callable[[], Any]:
    """A function running in this process the pipeline call of a txt2img job with ``params`` (its
    ``params`` as ``GET /v1/jobs/{id}`` shows them, or a request body with every value the engine
    needs), on one torch thread, the model loaded and warm."""
    import torch

    torch.set_num_threads(1)
    from inference_server.engine.runner import Engine, GenerationRequest
    from inference_server.registry import load_registry

    engine = Engine(load_registry(models_file), device="cpu")
    seed = int(params.get("seed", 0))
    req = GenerationRequest(
        family=params["family"],
        model=params.get("model"),
        task="txt2img",
        prompt=params["prompt"],
        negative_prompt=params.get("negative_prompt"),
        width=params["width"],
        height=params["height"],
        steps=params["steps"],
        guidance_scale=params.get("guidance_scale"),
        seeds=[seed + i for i in range(int(params.get("num_images", 1)))],
    )
    engine.generate(req)
    return lambda: engine.generate(req)


def system_env(db: str, broker_url: str, api: str, logs: Path, models: Path, **extra: str) -> dict[str, str]:
    """The environment of a benchmark's `inference-server` processes: one torch thread each."""
    return dict(
        os.environ,
        DATABASE_URL=db,
        BROKER_URL=broker_url,
        MODELS_FILE=str(models),
        TORCH_THREADS="1",
        OMP_NUM_THREADS="1",
        API_URL=api,
        INFERENCE_SERVER_HOME=str(logs),
        **extra,
    )


def wait_worker(log: Path, timeout: float = 90) -> None:
    """Until the worker whose output goes to ``log`` is consuming."""
    deadline = time.monotonic() + timeout
    while "ready." not in log.read_text(errors="replace"):
        if time.monotonic() > deadline:
            raise RuntimeError(f"worker did not start; see {log}")
        time.sleep(0.2)


@contextmanager
def api_and_worker(env: dict[str, str], logs: Path, port: int, db: str) -> Iterator[requests.Session]:
    """An `api` on ``port`` and an sd15 `worker`, both ready; yields an HTTP session with a new key."""
    procs = [
        start(["api", "--port", str(port)], env, logs / "api.log"),
        start(["worker", "--families", "sd15", "--device", "cpu"], env, logs / "worker.log"),
    ]
    try:
        wait_http(f"http://127.0.0.1:{port}/healthz")
        wait_worker(logs / "worker.log")
        http = requests.Session()
        http.headers["Authorization"] = f"Bearer {create_key(db)}"
        yield http
    finally:
        for p in procs:
            os.killpg(p.pid, signal.SIGTERM)
            p.wait()


def start(args: list[str], env: dict[str, str], log: Path) -> subprocess.Popen[bytes]:
    return subprocess.Popen(
        [sys.executable, "-m", "inference_server.cli.main", *args],
        env=env,
        cwd=ROOT,
        stdout=log.open("wb"),
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )


def create_key(database_url: str) -> str:
    from api.auth import create_tenant_key
    from inference_server.db import make_database, make_session_factory

    engine = make_database(database_url)
    with make_session_factory(engine)() as session:
        _, key = create_tenant_key(session, f"bench-{uuid.uuid4().hex[:6]}")
    engine.dispose()
    return key
