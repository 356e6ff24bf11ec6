"""The worker's Celery app registers the job task once, on itself: `up` (API, dispatcher and worker
in one process) starts without Celery's DuplicateTaskNameWarning, and a second worker app in a
process keeps its own task instead of the first app's."""

from __future__ import annotations

import warnings
from pathlib import Path

from celery.exceptions import DuplicateTaskNameWarning
from PIL import Image

from inference_server.devtools.services import free_port
from tests.support.system import base_env
from tests.test_cli import cli


def test_up_registers_the_job_task_once(tiny_models: Path, tmp_path: Path) -> None:
    env = base_env(
        INFERENCE_SERVER_HOME=str(tmp_path / "home"), MODELS_FILE=str(tiny_models), API_PORT=str(free_port())
    )
    for key in ("BROKER_URL", "DATABASE_URL", "STORAGE_URL"):
        env.pop(key, None)
    target = tmp_path / "kite.png"
    result = cli("up", "--once", "a red kite", "-o", str(target), env=env, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert Image.open(target).size == (64, 64)
    output = result.stdout + result.stderr
    assert "DuplicateTaskNameWarning" not in output and "already registered" not in output, output[-3000:]


def test_two_worker_apps_in_one_process_each_keep_their_task(tiny_models: Path) -> None:
    from inference_server.publish.topology import RUN_JOB
    from inference_server.settings import Settings
    from workers.celery_app import create_celery_app
    from workers.child import ChildRunner

    apps = []
    with warnings.catch_warnings():
        warnings.simplefilter("error", DuplicateTaskNameWarning)
        for queue in ("jobs.sd15", "jobs.sdxl"):
            settings = Settings(broker_url="memory://", models_file=tiny_models)
            app = create_celery_app(settings, [queue], ChildRunner(settings, []))
            app.finalize()
            apps.append(app)
    first, second = (app.tasks[RUN_JOB] for app in apps)
    assert first is not second and first.app is apps[0] and second.app is apps[1]
    assert [[q.name for q in app.conf.task_queues] for app in apps] == [["jobs.sd15"], ["jobs.sdxl"]]
