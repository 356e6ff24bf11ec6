"""A Celery app for Flower that knows the family queues:
``celery -A inference_server.roles.flower flower --broker_api=http://USER:PASS@rabbitmq:15672/api/``.

Flower's Broker tab lists the queues its online workers consume, and with no worker online, the
queues of the app it was started with. A plain ``celery flower`` has no app queues, so a family
whose workers are all down (or scaled to zero, the moment its backlog matters most) disappears
from the tab. This app declares every registry family's queue as the relay declares it, so
Flower shows each ``jobs.<family>`` with its ready and unacknowledged messages either way (the
counts come from RabbitMQ's management API, hence ``--broker_api``). Torch-free, like the API."""

from __future__ import annotations

from celery import Celery

from inference_server.publish.topology import job_queue
from inference_server.registry import Registry, load_registry
from inference_server.settings import Settings, get_settings


def flower_app(settings: Settings) -> Celery:
    """An app on ``BROKER_URL`` whose ``task_queues`` are the families' queues of ``MODELS_FILE``."""
    registry = load_registry(settings.models_file) if settings.models_file else Registry(None, {})
    app = Celery("inference_server", broker=settings.broker_url, set_as_current=False)
    timeout = settings.consumer_timeout_ms
    queues = [job_queue(f.queue, consumer_timeout_ms=timeout) for f in registry.families.values()]
    app.conf.update(task_queues=queues, task_default_queue=queues[0].name if queues else "celery")
    return app


# `celery -A inference_server.roles.flower` looks for ``app``; built from the environment, like api.main.
app = flower_app(get_settings())
