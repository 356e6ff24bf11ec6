"""``AsyncClient``: the API over ``httpx``, for asyncio programs; the same methods as ``Client``."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable, Mapping
from pathlib import Path
from typing import Any

import httpx

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

STREAM_ERRORS = (httpx.TransportError,)  # connect, read (timeouts too) and protocol errors


class AsyncClient:
    """A client of one API with one key, on one ``httpx.AsyncClient`` connection pool."""

    def __init__(
        self,
        base_url: str,
        api_key: str,
        *,
        timeout: float = 30.0,
        retry: RetryPolicy | None = None,
        http: httpx.AsyncClient | None = None,
    ) -> None:
        self.base_url = base_url.rstrip("/")
        self.timeout = timeout
        self.retry = retry or RetryPolicy()
        self.http = http or httpx.AsyncClient(follow_redirects=True)
        self.http.headers["Authorization"] = f"Bearer {api_key}"

    async def __aenter__(self) -> AsyncClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        await self.http.aclose()

    async def _request(
        self, method: str, path: str, *, safe: bool, timeout: float | None = None, **kw: Any
    ) -> httpx.Response:
        attempt = 0
        while True:
            try:
                resp = await self.http.request(
                    method, self.base_url + path, timeout=timeout or self.timeout, **kw
                )
            except (httpx.ConnectError, httpx.TimeoutException, httpx.RemoteProtocolError):
                if not safe or attempt >= self.retry.retries:
                    raise
                await asyncio.sleep(self.retry.delay(attempt, None))
                attempt += 1
                continue
            if resp.status_code in RETRY_STATUSES and attempt < self.retry.retries:
                await asyncio.sleep(self.retry.delay(attempt, resp.headers.get("Retry-After")))
                attempt += 1
                continue
            if resp.status_code >= 400:
                raise error_from(resp.status_code, resp.content)
            return resp

    async def submit(
        self,
        request: JobRequest | Mapping[str, Any],
        *,
        idempotency_key: str | None = None,
        wait: float | None = None,
    ) -> Job:
        """See ``Client.submit``."""
        headers = submit_headers(idempotency_key, wait)
        resp = await self._request(
            "POST",
            "/v1/jobs",
            safe=True,
            json=job_body(request),
            headers=headers,
            timeout=self.timeout + (wait or 0),
        )
        return resp.json()  # type: ignore[no-any-return]

    async def get(self, job_id: str, *, wait: float | None = None) -> Job:
        """See ``Client.get``."""
        resp = await self._request(
            "GET",
            f"/v1/jobs/{job_id}",
            safe=True,
            params=params(wait=wait),
            timeout=self.timeout + (wait or 0),
        )
        return resp.json()  # type: ignore[no-any-return]

    async def wait(
        self, job_id: str, *, timeout: float | None = None, on_update: Callable[[Job], None] | None = None
    ) -> Job:
        """See ``Client.wait``."""
        loop = asyncio.get_running_loop()
        deadline = None if timeout is None else loop.time() + timeout
        poll = 2.0 if on_update else MAX_POLL
        while True:
            remaining = MAX_POLL if deadline is None else deadline - loop.time()
            job = await self.get(job_id, wait=max(0.0, min(poll, remaining)))
            if on_update is not None:
                on_update(job)
            if job["status"] in TERMINAL:
                return job
            if deadline is not None and loop.time() >= deadline:
                raise TimeoutError(f"job {job_id} still {job['status']} after {timeout}s")

    def stream(self, job_id: str, last_event_id: int | None = None) -> AsyncIterator[Event]:
        """See ``Client.stream``."""
        return self._events(f"/v1/jobs/{job_id}/events", last_event_id, job_id=job_id)

    def events(self, last_event_id: int | None = None) -> AsyncIterator[Event]:
        """See ``Client.events``."""
        return self._events("/v1/events", last_event_id, job_id=None)

    async def _events(self, path: str, last: int | None, *, job_id: str | None) -> AsyncIterator[Event]:
        failures = 0
        timeout = httpx.Timeout(self.timeout, read=STREAM_READ_TIMEOUT)
        while True:
            received = False
            try:
                async with self.http.stream(
                    "GET", self.base_url + path, headers=stream_headers(last), timeout=timeout
                ) as resp:
                    if resp.status_code >= 400 and not (
                        resp.status_code in RETRY_STATUSES and failures < self.retry.retries
                    ):
                        raise error_from(resp.status_code, await resp.aread())
                    if resp.status_code < 400:
                        parser = SSEParser()
                        async for line in resp.aiter_lines():
                            event = parser.feed(line)
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
                if job_id is not None and not received and (await self.get(job_id))["status"] in TERMINAL:
                    return
            await asyncio.sleep(self.retry.delay(failures, None))
            failures += 1

    async def cancel(self, job_id: str) -> Job:
        """See ``Client.cancel``."""
        return (await self._request("POST", f"/v1/jobs/{job_id}/cancel", safe=True)).json()  # type: ignore[no-any-return]

    async def list(
        self,
        *,
        status: str | None = None,
        family: str | None = None,
        limit: int | None = None,
        cursor: str | None = None,
    ) -> dict[str, Any]:
        """See ``Client.list``."""
        query = params(status=status, family=family, limit=limit, cursor=cursor)
        return (await self._request("GET", "/v1/jobs", safe=True, params=query)).json()  # type: ignore[no-any-return]

    async def iter_jobs(self, *, status: str | None = None, family: str | None = None) -> AsyncIterator[Job]:
        """See ``Client.iter_jobs``."""
        cursor = None
        while True:
            page = await self.list(status=status, family=family, cursor=cursor, limit=200)
            for job in page["jobs"]:
                yield job
            cursor = page.get("next_cursor")
            if not cursor:
                return

    async def download(self, job_id: str, index: int = 0) -> bytes:
        """See ``Client.download``."""
        path = f"/v1/jobs/{job_id}/outputs/{index}"
        return (await self._request("GET", path, safe=True, timeout=self.timeout * 4)).content

    async def upload(self, data: bytes | Path, filename: str | None = None) -> dict[str, Any]:
        """See ``Client.upload``."""
        if isinstance(data, Path):
            filename = filename or data.name
            data = data.read_bytes()
        files = {"file": (filename or "upload", data)}
        resp = await self._request("POST", "/v1/uploads", safe=True, files=files, timeout=self.timeout * 4)
        return resp.json()  # type: ignore[no-any-return]

    async def models(self) -> dict[str, Any]:
        """See ``Client.models``."""
        return (await self._request("GET", "/v1/models", safe=True)).json()  # type: ignore[no-any-return]
