"""``Client``: the API over ``requests``, for scripts and threads."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any

import requests

from inference_server.client.common import (
    MAX_POLL,
    RETRY_STATUSES,
    TERMINAL,
    Job,
    RetryPolicy,
    error_from,
    job_body,
    params,
    submit_headers,
)
from inference_server.client.events import STREAM_READ_TIMEOUT, Event, SSEParser, stream_headers
from inference_server.jobs.spec import JobRequest

STREAM_ERRORS = (requests.ConnectionError, requests.Timeout, requests.exceptions.ChunkedEncodingError)


class Client:
    """A client of one API with one key. Safe to share between threads as ``requests.Session`` is
    for plain requests; use one per thread under heavy concurrency."""

    def __init__(
        self,
        base_url: str,
        api_key: str,
        *,
        timeout: float = 30.0,
        retry: RetryPolicy | None = None,
        session: requests.Session | None = None,
    ) -> None:
        self.base_url = base_url.rstrip("/")
        self.timeout = timeout
        self.retry = retry or RetryPolicy()
        self.http = session or requests.Session()
        self.http.headers["Authorization"] = f"Bearer {api_key}"

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        self.http.close()

    def _request(
        self,
        method: str,
        path: str,
        *,
        safe: bool,
        timeout: float | tuple[float, float] | None = None,
        **kw: Any,
    ) -> requests.Response:
        attempt = 0
        while True:
            try:
                resp = self.http.request(method, self.base_url + path, timeout=timeout or self.timeout, **kw)
            except (requests.ConnectionError, requests.Timeout):
                if not safe or attempt >= self.retry.retries:
                    raise
                time.sleep(self.retry.delay(attempt, None))
                attempt += 1
                continue
            if resp.status_code in RETRY_STATUSES and attempt < self.retry.retries:
                time.sleep(self.retry.delay(attempt, resp.headers.get("Retry-After")))
                attempt += 1
                continue
            if resp.status_code >= 400:
                raise error_from(resp.status_code, resp.content)
            return resp

    def submit(
        self,
        request: JobRequest | Mapping[str, Any],
        *,
        idempotency_key: str | None = None,
        wait: float | None = None,
    ) -> Job:
        """Submit a job; with ``wait``, the answer comes when the job ends or ``wait`` seconds pass.
        The job is made once however often the request is retried (see ``submit_headers``)."""
        headers = submit_headers(idempotency_key, wait)
        timeout = self.timeout + (wait or 0)
        return self._request(
            "POST", "/v1/jobs", safe=True, json=job_body(request), headers=headers, timeout=timeout
        ).json()  # type: ignore[no-any-return]

    def get(self, job_id: str, *, wait: float | None = None) -> Job:
        """The job; with ``wait``, held by the API until it ends or ``wait`` seconds pass."""
        timeout = self.timeout + (wait or 0)
        return self._request(
            "GET", f"/v1/jobs/{job_id}", safe=True, params=params(wait=wait), timeout=timeout
        ).json()  # type: ignore[no-any-return]

    def wait(
        self, job_id: str, *, timeout: float | None = None, on_update: Callable[[Job], None] | None = None
    ) -> Job:
        """The job once it has ended, by long polls. ``on_update`` sees every state read (progress);
        ``TimeoutError`` after ``timeout`` seconds."""
        deadline = None if timeout is None else time.monotonic() + timeout
        poll = 2.0 if on_update else MAX_POLL  # short polls only when someone shows progress
        while True:
            remaining = MAX_POLL if deadline is None else deadline - time.monotonic()
            job = self.get(job_id, wait=max(0.0, min(poll, remaining)))
            if on_update is not None:
                on_update(job)
            if job["status"] in TERMINAL:
                return job
            if deadline is not None and time.monotonic() >= deadline:
                raise TimeoutError(f"job {job_id} still {job['status']} after {timeout}s")

    def stream(self, job_id: str, last_event_id: int | None = None) -> Iterator[Event]:
        """The job's events as they happen (Server-Sent Events): every event after
        ``last_event_id`` (all of them when None), then each new one, ending after the terminal
        event. A dropped connection is resumed with ``Last-Event-ID``: nothing missed or repeated."""
        return self._events(f"/v1/jobs/{job_id}/events", last_event_id, job_id=job_id)

    def events(self, last_event_id: int | None = None) -> Iterator[Event]:
        """Every event of this tenant's jobs from now on (after ``last_event_id`` when given),
        resumed like ``stream``; it does not end."""
        return self._events("/v1/events", last_event_id, job_id=None)

    def _events(self, path: str, last: int | None, *, job_id: str | None) -> Iterator[Event]:
        failures = 0
        while True:
            received = False
            try:
                resp = self._request(
                    "GET", path, safe=True, stream=True, headers=stream_headers(last),
                    timeout=(self.timeout, STREAM_READ_TIMEOUT),
                )  # fmt: skip
                with resp:
                    parser = SSEParser()
                    for line in resp.iter_lines():
                        event = parser.feed(line.decode("utf-8"))
                        if event is None:
                            continue
                        last, failures, received = event.seq, 0, True
                        yield event
                        if job_id is not None and event.terminal:
                            return
            except STREAM_ERRORS:
                if failures >= self.retry.retries:
                    raise
            else:
                # The server ended the stream early (it is stopping, or this reader fell behind); one
                # ending with nothing new is a finished job whose last event was already seen.
                if job_id is not None and not received and self.get(job_id)["status"] in TERMINAL:
                    return
            time.sleep(self.retry.delay(failures, None))
            failures += 1

    def cancel(self, job_id: str) -> Job:
        """Ask for the job to stop; it ends ``canceled`` at its next step (or at once if queued)."""
        return self._request("POST", f"/v1/jobs/{job_id}/cancel", safe=True).json()  # type: ignore[no-any-return]

    def list(
        self,
        *,
        status: str | None = None,
        family: str | None = None,
        limit: int | None = None,
        cursor: str | None = None,
    ) -> dict[str, Any]:
        """One page: ``{"jobs": [...], "next_cursor": ...}``."""
        query = params(status=status, family=family, limit=limit, cursor=cursor)
        return self._request("GET", "/v1/jobs", safe=True, params=query).json()  # type: ignore[no-any-return]

    def iter_jobs(self, *, status: str | None = None, family: str | None = None) -> Iterator[Job]:
        """Every job matching the filters, newest first, page after page."""
        cursor = None
        while True:
            page = self.list(status=status, family=family, cursor=cursor, limit=200)
            yield from page["jobs"]
            cursor = page.get("next_cursor")
            if not cursor:
                return

    def download(self, job_id: str, index: int = 0) -> bytes:
        """The bytes of output ``index`` (a presigned redirect is followed without the API key)."""
        return self._request(
            "GET", f"/v1/jobs/{job_id}/outputs/{index}", safe=True, timeout=self.timeout * 4
        ).content

    def upload(self, data: bytes | Path, filename: str | None = None) -> dict[str, Any]:
        """Store an image for later jobs: ``{"uri", "width", "height", "content_type"}``; ``uri`` goes
        in a job's ``image`` or ``mask``."""
        if isinstance(data, Path):
            filename = filename or data.name
            data = data.read_bytes()
        files = {"file": (filename or "upload", data)}
        return self._request("POST", "/v1/uploads", safe=True, files=files, timeout=self.timeout * 4).json()  # type: ignore[no-any-return]

    def models(self) -> dict[str, Any]:
        """The model catalog (``GET /v1/models``)."""
        return self._request("GET", "/v1/models", safe=True).json()  # type: ignore[no-any-return]
