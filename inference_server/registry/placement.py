"""Warm placement through the database: the API writes a request, the family's workers answer it.

``POST /v1/models/{family}/{id}/load`` inserts a ``placement_requests`` row and bumps the registry
version; every worker child polls that version between jobs (REGISTRY_POLL_INTERVAL), loads or
unloads the model, and writes its answer to ``placement_answers``. A child busy with a job answers
when the job ends, so the wait is bounded by the caller's timeout and the answer may be partial.
What each worker holds loaded is kept in ``worker_models`` (loads by jobs included), which
``GET /v1/models/{family}/{id}`` shows."""

from __future__ import annotations

import time
from typing import Any

from sqlalchemy import delete, func, insert, select
from sqlalchemy.orm import Session, sessionmaker

from inference_server.db.base import utcnow
from inference_server.db.registry_tables import PlacementAnswer, PlacementRequest, WorkerModel
from inference_server.registry.runtime import bump_version

LOAD, UNLOAD = "load", "unload"


def request(session: Session, family: str, model_id: str, action: str) -> int:
    """Ask the workers of ``family`` to load or unload a model; returns the request's id."""
    row = PlacementRequest(family=family, model_id=model_id, action=action, created_at=utcnow())
    session.add(row)
    session.flush()
    bump_version(session)
    session.commit()
    return int(row.id)


def answers(session: Session, request_id: int) -> list[dict[str, Any]]:
    rows = session.scalars(
        select(PlacementAnswer)
        .where(PlacementAnswer.request_id == request_id)
        .order_by(PlacementAnswer.worker)
    )
    out = []
    for r in rows:
        answer: dict[str, Any] = {"worker": r.worker, "status": r.status, "seconds": round(r.seconds, 3)}
        if r.error_code:
            answer["error"] = {"code": r.error_code, "message": r.error_message}
        out.append(answer)
    return out


def wait_answers(
    sf: sessionmaker[Session], request_id: int, *, expected: int | None, timeout: float, interval: float = 0.1
) -> tuple[list[dict[str, Any]], bool]:
    """Answers to ``request_id`` once ``expected`` workers answered or ``timeout`` passed; and
    whether every expected worker answered. ``expected`` None (the broker could not say how many
    consume the family): complete once one answered and no other came for a second."""
    deadline = time.monotonic() + timeout
    last_change, seen = time.monotonic(), -1
    while True:
        with sf() as session:
            got = answers(session, request_id)
        now = time.monotonic()
        if len(got) != seen:
            seen, last_change = len(got), now
        if expected is not None and len(got) >= expected:
            return got, True
        if expected is None and got and now - last_change >= 1.0:
            return got, True
        if now >= deadline:
            return got, False
        time.sleep(interval)


# -- the worker's side ---------------------------------------------------------------------------


def latest_request(session: Session) -> int:
    """The newest request's id: a worker starting now answers only requests after it."""
    return int(session.scalar(select(func.max(PlacementRequest.id))) or 0)


def pending(session: Session, families: list[str], after: int) -> list[PlacementRequest]:
    return list(
        session.scalars(
            select(PlacementRequest)
            .where(PlacementRequest.id > after, PlacementRequest.family.in_(families))
            .order_by(PlacementRequest.id)
        )
    )


def answer(
    session: Session,
    request_id: int,
    worker: str,
    status: str,
    seconds: float,
    *,
    code: str | None = None,
    message: str | None = None,
) -> None:
    session.execute(
        insert(PlacementAnswer).values(
            request_id=request_id,
            worker=worker,
            status=status,
            seconds=seconds,
            error_code=code,
            error_message=message,
            created_at=utcnow(),
        )
    )
    session.commit()


def report_loaded(session: Session, worker: str, loaded: set[tuple[str, str]]) -> None:
    """Replace what ``worker`` reported loaded with ``loaded`` (family, model id) pairs."""
    held = {
        (r.family, r.model_id): r
        for r in session.scalars(select(WorkerModel).where(WorkerModel.worker == worker))
    }
    for key, row in held.items():
        if key not in loaded:
            session.delete(row)
    now = utcnow()
    for family, model_id in sorted(loaded - set(held)):
        session.add(WorkerModel(worker=worker, family=family, model_id=model_id, loaded_at=now))
    session.commit()


def forget(session: Session, worker: str) -> None:
    """Drop everything ``worker`` reported (its child starts afresh, with an empty cache)."""
    session.execute(delete(WorkerModel).where(WorkerModel.worker == worker))
    session.commit()
