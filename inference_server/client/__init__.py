"""A Python client of the inference-server HTTP API.

::

    from inference_server.client import Client

    with Client("http://localhost:8000", api_key="isk_...") as client:
        job = client.submit({"family": "sd15", "prompt": "a lighthouse"})
        job = client.wait(job["id"])
        png = client.download(job["id"])
        for event in client.stream(job["id"]):  # live, instead of wait(): SSE, resumed on drops
            print(event.type, event.progress.get("percent"))

``AsyncClient`` has the same methods as coroutines (it needs ``httpx``). Request bodies are the API's
own ``JobRequest`` model (a dict is validated against it first); answers are the API's JSON as
plain dicts. Errors the API reports raise ``ClientError`` with its ``code``; 429 and 503 answers are
retried with backoff, honouring ``Retry-After``. ``verify_webhook`` checks a received webhook."""

from inference_server.client.common import ClientError, Job
from inference_server.client.events import Event
from inference_server.client.sync import Client
from inference_server.jobs.spec import JobRequest
from webhooks import WebhookVerificationError
from webhooks import verify as verify_webhook

__all__ = [
    "AsyncClient",
    "Client",
    "ClientError",
    "Event",
    "Job",
    "JobRequest",
    "WebhookVerificationError",
    "verify_webhook",
]


def __getattr__(name: str) -> object:
    # httpx is needed only by the async client, so it is imported when that client is asked for.
    if name == "AsyncClient":
        from inference_server.client.aio import AsyncClient

        return AsyncClient
    raise AttributeError(name)
