"""A job's events: its history as JSON, a Server-Sent Events stream (per job, and per tenant at
``/v1/events``) and a WebSocket carrying the same events. The live part comes from ``api/feed.py``.

Every message carries the event's sequence number (SSE ``id:``), its type, and the webhook body. A
client resumes with ``Last-Event-ID`` (or ``?last_event_id=``): it gets every event after that
number, none twice. A job's stream ends after its terminal event; the tenant's never ends."""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import AsyncIterator
from typing import Any

from fastapi import APIRouter, Depends, Header, Query, Request, WebSocket, WebSocketDisconnect
from fastapi.responses import StreamingResponse
from starlette.concurrency import run_in_threadpool

from api.deps import AppState, caller_for, current_tenant, state
from api.openapi import answers
from inference_server.db import Tenant
from inference_server.errors import InferenceError, InvalidRequest, NotFound
from inference_server.jobs import history
from inference_server.jobs.history import StoredEvent
from inference_server.jobs.serialize import with_api_base
from inference_server.schemas import JobEventPage

router = APIRouter(tags=["events"])

PAGE = 500
SSE_HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}  # no proxy buffering either
# The WebSocket subprotocol the server selects; the key rides in a second offered one, "bearer.<key>".
WS_PROTOCOL = "inference-server"
WS_KEY_PREFIX = "bearer."


def _resume_point(header: str | None, query: int | None) -> int:
    """The sequence number to resume after: the ``Last-Event-ID`` header or the query parameter."""
    if query is not None:
        return query
    if header is None or not header.strip():
        return 0
    if not header.strip().isdigit():
        raise InvalidRequest("Last-Event-ID must be an event's sequence number", code="invalid_last_event_id")
    return int(header.strip())


def _body(event: StoredEvent, st: AppState) -> dict[str, Any]:
    """The webhook body of ``event``, with absolute output URLs."""
    return with_api_base(event.payload, st.settings.api_url)


def _sse(event: StoredEvent, st: AppState) -> str:
    data = json.dumps(_body(event, st), separators=(",", ":"))
    return f"id: {event.seq}\nevent: {event.type}\ndata: {data}\n\n"


def _wants_stream(request: Request) -> bool:
    return "text/event-stream" in request.headers.get("accept", "")


def _page(st: AppState, tenant_id: str, job_id: str, after: int, limit: int) -> Any:
    with st.session_factory() as session:
        return history.job_page(session.connection(), tenant_id, job_id, after=after, limit=limit)


def _tenant_page(st: AppState, tenant_id: str, after: int) -> list[StoredEvent]:
    with st.session_factory() as session:
        return history.tenant_events(session.connection(), tenant_id, after=after, limit=PAGE)


async def _job_events(
    st: AppState, tenant_id: str, job_id: str, after: int
) -> AsyncIterator[StoredEvent | None]:
    """The job's events after ``after``: history, then live, until the terminal event. ``None``
    (no event) every keep-alive interval while idle. Ends at once if the job is gone."""
    feed = st.feed
    sub = feed.subscribe(job_id=job_id)  # before the history read: nothing falls in between
    try:
        while True:
            status, page = await run_in_threadpool(_page, st, tenant_id, job_id, after, PAGE)
            if status is None:
                return  # deleted meanwhile (the routes check the job before they stream)
            for event in page:
                after = event.seq
                yield event
                if event.terminal:
                    return
            if len(page) < PAGE:
                break
        if history.finished(status):
            return  # its terminal event is at or before the resume point
        while True:
            try:
                event = await asyncio.wait_for(sub.queue.get(), st.settings.stream_keepalive_seconds)
            except TimeoutError:
                yield None
                continue
            if event is None:
                return  # too far behind: the client resumes from its last id
            if event.seq <= after:
                continue  # already sent from the history
            after = event.seq
            yield event
            if event.terminal:
                return
    finally:
        feed.unsubscribe(sub)


async def _tenant_events(
    st: AppState, tenant_id: str, after: int | None
) -> AsyncIterator[StoredEvent | None]:
    """The tenant's events: after ``after`` when resuming, else from now on; never ends."""
    feed = st.feed
    sub = feed.subscribe(tenant_id=tenant_id)
    sent: set[int] = set()  # from the history: the live queue may carry them again
    try:
        while after is not None:
            page = await run_in_threadpool(_tenant_page, st, tenant_id, after)
            for event in page:
                sent.add(event.seq)
                yield event
            after = page[-1].seq if len(page) == PAGE else None
        while True:
            try:
                event = await asyncio.wait_for(sub.queue.get(), st.settings.stream_keepalive_seconds)
            except TimeoutError:
                yield None
                continue
            if event is None:
                return
            if event.seq in sent:
                sent.discard(event.seq)
                continue
            yield event
    finally:
        feed.unsubscribe(sub)


async def _sse_stream(events: AsyncIterator[StoredEvent | None], st: AppState) -> AsyncIterator[str]:
    yield ": stream open\n\n"  # the headers and a first line go out at once: the client knows it is connected
    async for event in events:
        yield ": keep-alive\n\n" if event is None else _sse(event, st)


def _check_job(st: AppState, tenant_id: str, job_id: str) -> None:
    with st.session_factory() as session:
        if history.job_status(session.connection(), tenant_id, job_id) is None:
            raise NotFound(f"job {job_id} not found", code="job_not_found")


STREAM = {"text/event-stream": {"schema": {"type": "string", "description": "Server-Sent Events"}}}
# The SSE form (Accept: text/event-stream) is described in the route's text, not as a second
# content type: a schema fuzzer asking for it on a job that never ends would hold the stream open.
JOB_EVENTS_ANSWERS = answers(JobEventPage, 404)


@router.get("/v1/jobs/{job_id}/events", response_model=None, responses=JOB_EVENTS_ANSWERS)
async def job_events(
    job_id: str,
    request: Request,
    after: int | None = Query(default=None, ge=0, description="Only events after this sequence number"),
    limit: int = Query(default=PAGE, ge=1, le=PAGE),
    last_event_id: str | None = Header(default=None, max_length=20),
    tenant: Tenant = Depends(current_tenant),
    st: AppState = Depends(state),
) -> Any:
    """The job's events. As JSON: ``{"events": [...], "next_after": n|null}`` in order, a page at a
    time. With ``Accept: text/event-stream``: an SSE stream of every event so far (after
    ``Last-Event-ID``), then each new one, ending after the terminal event."""
    start = _resume_point(last_event_id, after)
    if not _wants_stream(request):
        status, page = await run_in_threadpool(_page, st, tenant.id, job_id, start, limit)
        if status is None:
            raise NotFound(f"job {job_id} not found", code="job_not_found")
        items = [{"seq": e.seq, "id": e.id, **_body(e, st)} for e in page]
        return {"events": items, "next_after": page[-1].seq if len(page) == limit else None}
    await run_in_threadpool(_check_job, st, tenant.id, job_id)  # a 404 before the stream starts
    events = _job_events(st, tenant.id, job_id, start)
    return StreamingResponse(_sse_stream(events, st), media_type="text/event-stream", headers=SSE_HEADERS)


@router.get(
    "/v1/events",
    response_model=None,
    response_class=StreamingResponse,
    responses={200: {"description": "An endless SSE stream.", "content": STREAM}},
)
async def tenant_events(
    after: int | None = Query(default=None, ge=0, description="Resume after this sequence number"),
    last_event_id: str | None = Header(default=None, max_length=20),
    tenant: Tenant = Depends(current_tenant),
    st: AppState = Depends(state),
) -> StreamingResponse:
    """An SSE stream of the events of all the tenant's jobs: from now on, or every event after
    ``Last-Event-ID``. It does not end; keep-alive comments keep it open while idle."""
    start = _resume_point(last_event_id, after) if (last_event_id or after is not None) else None
    events = _tenant_events(st, tenant.id, start)
    return StreamingResponse(_sse_stream(events, st), media_type="text/event-stream", headers=SSE_HEADERS)


def _ws_credentials(ws: WebSocket) -> tuple[str | None, bool]:
    """The ``Authorization`` value for a WebSocket, and whether it came as a subprotocol."""
    header = ws.headers.get("authorization")
    if header:
        return header, False
    offered = ws.scope.get("subprotocols") or []
    key = next((p[len(WS_KEY_PREFIX) :] for p in offered if p.startswith(WS_KEY_PREFIX)), None)
    return (f"Bearer {key}", True) if key else (None, False)


@router.websocket("/v1/jobs/{job_id}/ws")
async def job_socket(
    job_id: str, ws: WebSocket, last_event_id: int | None = Query(default=None, ge=0)
) -> None:
    """The job's events over a WebSocket: one JSON text message per event, ``{"seq", "id", "type",
    "timestamp", "data"}``, closed (1000) after the terminal event. The key comes in the
    ``Authorization`` header or, from a browser, as the subprotocol ``bearer.<key>`` next to
    ``inference-server``. A refusal is a message ``{"error": {code, message}}`` and close 4401
    (key), 4404 (job) or 4400 (request)."""
    st: AppState = ws.app.state.inference
    header, as_protocol = _ws_credentials(ws)
    offered = ws.scope.get("subprotocols") or []
    # Never echo the key: the server selects the plain protocol name, which the client also offers.
    await ws.accept(subprotocol=WS_PROTOCOL if as_protocol or WS_PROTOCOL in offered else None)
    try:
        tenant = (await caller_for(ws, st, header)).tenant
        start = _resume_point(ws.headers.get("last-event-id"), last_event_id)
        await run_in_threadpool(_check_job, st, tenant.id, job_id)
        sending = asyncio.create_task(_send_events(ws, st, _job_events(st, tenant.id, job_id, start)))
        closed = asyncio.create_task(_until_closed(ws))
        done, _ = await asyncio.wait({sending, closed}, return_when=asyncio.FIRST_COMPLETED)
        for task in (sending, closed):
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError, WebSocketDisconnect):
                await task
        if sending in done:
            sending.result()
            await ws.close(1000)
    except InferenceError as exc:
        close = {401: 4401, 404: 4404, 429: 4429}.get(exc.status or 400, 4400)
        with contextlib.suppress(Exception):
            await ws.send_text(json.dumps({"error": {"code": exc.code, "message": exc.message}}))
            await ws.close(close, reason=exc.code)
    except WebSocketDisconnect:
        pass


async def _send_events(ws: WebSocket, st: AppState, events: AsyncIterator[StoredEvent | None]) -> None:
    async for event in events:
        if event is not None:  # idle: the WebSocket protocol's own pings keep the socket alive
            await ws.send_text(json.dumps({"seq": event.seq, "id": event.id, **_body(event, st)}))


async def _until_closed(ws: WebSocket) -> None:
    """Returns when the client closes (its messages are not read otherwise: the socket is one-way)."""
    while (await ws.receive())["type"] != "websocket.disconnect":
        pass
