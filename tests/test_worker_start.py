"""What a worker does when it starts, through real processes (API, worker) on a PostgreSQL database
and a RabbitMQ vhost of their own: it consumes the queue the registry names for each of its
families (the queue the relay publishes to), and loads WARM_MODELS before its first job."""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
import requests

from inference_server.devtools.services import private_vhost
from tests.conftest import fresh_database
from tests.support.jobs import submit, wait_done
from tests.support.system import Proc, base_env, start_api, start_worker
from tests.support.waiting import wait_for

QUEUE = "custom.sd15"  # not jobs.sd15: the name the worker would derive from the family


@pytest.fixture(scope="module")
def env(tiny_models: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, str]]:
    root = tmp_path_factory.mktemp("worker-start")
    registry = root / "models.toml"
    registry.write_text(
        f"""
[families.sd15]
queue = "{QUEUE}"
tasks = ["txt2img"]
limits = {{ min_size = 64, max_size = 512, max_steps = 50, size_multiple = 8 }}
defaults = {{ width = 64, height = 64, steps = 4 }}
[[families.sd15.models]]
id = "tiny-sd15"
source = "{tiny_models.parent / "sd15"}"
"""
    )
    with fresh_database("is_worker_start") as db, private_vhost("is_worker_start") as broker:
        yield base_env(
            DATABASE_URL=db,
            BROKER_URL=broker,
            STORAGE_URL=(root / "storage").as_uri(),
            MODELS_FILE=str(registry),
            INFERENCE_SERVER_HOME=str(root / "home"),
            ALLOW_PRIVATE_NETWORKS="true",
            RELAY_INTERVAL="0.05",
            WARM_MODELS="sd15",
            DISPATCHER_METRICS_PORT="0",
        )


@pytest.fixture(scope="module")
def worker(env: dict[str, str], logs_dir: Path) -> Iterator[Proc]:
    proc = start_worker(env, logs_dir, families="sd15")
    yield proc
    proc.kill(15)


@pytest.fixture(scope="module")
def http(env: dict[str, str], logs_dir: Path) -> Iterator[requests.Session]:
    from api.auth import create_tenant_key
    from inference_server.db import make_database, make_session_factory

    database = make_database(env["DATABASE_URL"])
    with make_session_factory(database)() as session:
        _, key = create_tenant_key(session, f"start-{uuid.uuid4().hex[:6]}")
    database.dispose()
    api, url = start_api(env, logs_dir)
    session = requests.Session()
    session.headers["Authorization"] = f"Bearer {key}"
    session.base_url = url  # type: ignore[attr-defined]
    yield session
    session.close()
    api.kill(15)


def metric(worker: Proc, name: str) -> float | None:
    text = requests.get(worker.metrics_url, timeout=10).text  # type: ignore[attr-defined]
    values = [float(line.split()[-1]) for line in text.splitlines() if line.startswith(name)]
    return sum(values) if values else None


def test_warm_models_load_before_the_first_job(worker: Proc) -> None:
    """The child loads sd15's default model as it starts, though no job has reached it."""
    loads = 'engine_pipeline_loads_total{family="sd15",model="tiny-sd15"}'
    wait_for(lambda: metric(worker, loads), 120, interval=0.5, what="the warm load in the worker's metrics")
    log = worker.log.read_text(errors="replace")
    loaded = log.index("loaded sd15/tiny-sd15")
    assert "Task inference.run_job[" not in log[:loaded]  # no job had been received when it loaded
    assert metric(worker, loads) == 1.0


def test_jobs_reach_a_worker_on_the_registry_queue(http: requests.Session, worker: Proc) -> None:
    """The relay publishes to the family's registry queue; the worker consumes that same queue."""
    families = http.get(f"{http.base_url}/v1/models", timeout=10).json()["families"]  # type: ignore[attr-defined]
    assert [(f["name"], f["online_workers"]) for f in families] == [("sd15", 1)]  # consumers of QUEUE
    done = wait_done(http, submit(http, {"family": "sd15", "prompt": "a red kite", "seed": 5})["id"], 90)
    assert done["status"] == "succeeded", done
    assert (done["outputs"][0]["width"], done["outputs"][0]["height"]) == (64, 64)


def test_warm_models_the_registry_lacks_are_refused_at_start(tiny_models: Path) -> None:
    from tests.test_cli import cli

    for warm in ("sd99", "sd15/nope"):
        env = base_env(MODELS_FILE=str(tiny_models), WARM_MODELS=warm)
        result = cli("worker", "--families", "sd15", "--device", "cpu", env=env)
        assert result.returncode == 1 and "invalid_warm_models" in result.stderr, result.stderr[-2000:]
        assert repr(warm) in result.stderr and "Traceback" not in result.stderr
