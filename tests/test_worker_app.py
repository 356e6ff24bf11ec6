"""The worker's Celery app registers the job task once, on itself: a second worker app in a process
keeps its own task instead of the first app's. (That `up`, API, dispatcher and worker in one
process, starts without Celery's DuplicateTaskNameWarning is checked on its run in test_cli.py.)"""

from __future__ import annotations

import warnings
from pathlib import Path

from celery.exceptions import DuplicateTaskNameWarning


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
