"""Job operations shared by every front door (the HTTP API, `generate`, `up`): submit, read, list,
cancel. Each is one database transaction; the queue message rides in the outbox of that transaction."""

from __future__ import annotations

import base64
import hashlib
import json
import logging
import secrets
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from sqlalchemy import CursorResult, select, update
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from inference_server.db import DeletedJob, Job, JobEvent, OutboxMessage, Tenant
from inference_server.db.base import new_id, utcnow
from inference_server.errors import Conflict, Forbidden, InvalidInput, InvalidRequest, NotFound, RateLimited
from inference_server.events import emit, event_values
from inference_server.jobs import composition
from inference_server.jobs.batch_key import batch_key
from inference_server.jobs.enums import TERMINAL, EventType, JobStatus, Priority, Task
from inference_server.jobs.persist import insert_new_rows
from inference_server.jobs.serialize import job_to_dict
from inference_server.jobs.spec import MAX_SEED, JobRequest, JobSpec, Route, Safety
from inference_server.logs import job_context
from inference_server.registry import FamilySpec, ModelSpec, Registry
from inference_server.registry.runtime import RuntimeRegistry
from inference_server.settings import Settings
from inference_server.storage.base import Storage, input_key

log = logging.getLogger(__name__)


@dataclass
class Submitted:
    job_id: str
    created: bool  # False when an Idempotency-Key replayed an earlier submit
    view: dict[str, Any]  # the job as the API shows it (relative output URLs)


@dataclass(frozen=True)
class Reply:
    """Where a job's events are also published (the AMQP ingress's ``reply_to``)."""

    queue: str
    correlation_id: str | None = None
    events: list[str] | None = None  # None: every event


@dataclass
class Planned:
    """A new job's rows (job, outbox message, ``job.queued`` event), validated and ready to insert."""

    job_id: str
    rows: list[tuple[type[Any], dict[str, Any]]]
    view: dict[str, Any]
    # What ``plan(..., charge=False)`` left for the caller to ``charge``: the job's images, and the
    # inputs it stored (taken back if the month's quota refuses them).
    images: int = 0
    stored: dict[str, Any] = field(default_factory=dict)


@dataclass
class JobContext:
    """What a job operation needs from the process: passed down, never global."""

    settings: Settings
    registry: Registry
    storage: Storage
    on_published: Callable[[], None] | None = None  # wakes the relay after a commit
    runtime: RuntimeRegistry | None = None  # models and LoRAs added through the API

    def registry_for(self, session: Session, tenant_id: str) -> Registry:
        """The registry ``tenant_id`` submits against: the seed plus the runtime entries it sees."""
        if self.runtime is None:
            return self.registry
        return self.runtime.view(session, tenant_id)


def request_hash(body: JobRequest) -> str:
    return hashlib.sha256(body.model_dump_json(exclude_none=True).encode()).hexdigest()


def _check_family(registry: Registry, req: JobRequest) -> tuple[FamilySpec, ModelSpec]:
    family = registry.family(req.family)
    model = family.model(req.model, req.task)
    for lora in req.loras:
        if family.lora(lora.name) is None and lora.name.startswith(("s3://", "gs://")):
            continue  # a LoRA in a bucket, fetched by the worker; never a path on the worker's disk
        if family.lora(lora.name) is None:
            known = ", ".join(lo.name for lo in family.loras) or "none"
            raise InvalidRequest(
                f"unknown LoRA {lora.name!r} for {family.name} (known: {known})", code="unknown_lora"
            )
    return family, model


def resolve(
    family: FamilySpec,
    model: ModelSpec,
    req: JobRequest,
    *,
    safety: Safety = "off",
    route: Route | None = None,
) -> JobSpec:
    """The request with the family's defaults and limits applied, its seeds chosen, and each
    ControlNet's preprocessing made explicit."""
    limits = {**family.limits, **(model.limits or {})}
    defaults = {**family.defaults, **(model.defaults or {})}
    values = req.model_dump(exclude_none=True, exclude={"webhook", "seed", "num_images", "priority"})
    for key in ("width", "height", "steps", "guidance_scale"):
        if values.get(key) is None and defaults.get(key) is not None:
            values[key] = defaults[key]
    if Task(req.task).has_strength and values.get("strength") is None:
        values["strength"] = defaults.get("strength", 0.75)
    lo, hi = limits.get("min_size", 64), limits.get("max_size", 2048)
    multiple = limits.get("size_multiple", 8)
    for key in ("width", "height"):
        value = values.get(key)
        if value is not None and not lo <= value <= hi:
            raise InvalidRequest(
                f"{key} must be between {lo} and {hi} for {family.name}", code="invalid_size"
            )
        if value is not None and value % multiple:
            raise InvalidRequest(
                f"{key} must be a multiple of {multiple} for {family.name}", code="invalid_size"
            )
    max_steps = limits.get("max_steps", 150)
    if "steps" not in values:
        raise InvalidRequest(f"steps is required: {family.name} has no default", code="invalid_steps")
    if values["steps"] > max_steps:
        raise InvalidRequest(f"steps must be at most {max_steps} for {family.name}", code="invalid_steps")
    if req.preview is not None and req.preview.every_steps > values["steps"]:
        raise InvalidRequest(
            f"preview.every_steps ({req.preview.every_steps}) is more than the job's {values['steps']} steps",
            code="invalid_preview",
        )
    seed = req.seed if req.seed is not None and req.seed != -1 else secrets.randbelow(MAX_SEED + 1)
    values["seeds"] = [seed + i for i in range(req.num_images)]
    values["model"] = model.id
    values["safety"] = safety
    if route is not None:
        values["route"] = route.model_dump(mode="json", exclude_none=True)
    for control in values.get("controlnets", []):
        if control.get("preprocess") is None:
            entry = family.controlnet(control["name"])
            control["preprocess"] = entry.preprocess if entry is not None else "none"
    return JobSpec.model_validate(values)


def max_priority(tenant: Tenant) -> Priority:
    """The highest priority ``tenant``'s jobs may ask for (``normal`` unless an operator set it)."""
    return Priority(tenant.max_priority) if tenant.max_priority else Priority.NORMAL


def _check_priority(tenant: Tenant, asked: Priority) -> None:
    allowed = max_priority(tenant)
    if asked.rank > allowed.rank:
        raise Forbidden(
            f"priority {asked.value!r} is above this tenant's maximum, {allowed.value!r}",
            code="priority_not_allowed",
        )


def _check_inputs(req: JobRequest) -> None:
    task = Task(req.task)  # routed by now: "auto" never reaches here
    if task.needs_image and not req.image:
        raise InvalidRequest(f"task {task.value!r} needs an input `image`", code="missing_image")
    if req.task == Task.INPAINT and not (req.mask or req.mask_prompt):
        raise InvalidRequest("task 'inpaint' needs a `mask` or a `mask_prompt`", code="missing_mask")
    if req.task == Task.EDIT and not req.prompt:
        raise InvalidRequest("task 'edit' needs a `prompt` (the instruction)", code="missing_prompt")


def _store_input(ctx: JobContext, tenant: Tenant, job_id: str, name: str, ref: str) -> str:
    """Inline inputs are validated now (a 4xx beats a failed job) and moved to storage, so rows and
    queue messages stay small. URLs are checked statically here and fetched by the worker."""
    from inference_server import imaging, netguard

    s = ctx.settings
    if ref.startswith("data:"):
        data = imaging.parse_data_uri(ref, max_bytes=s.max_input_bytes)
        imaging.validate_image(data, max_bytes=s.max_input_bytes, max_pixels=s.max_input_pixels)
        return ctx.storage.put(input_key(job_id, name, "img"), data, "application/octet-stream")
    if ref.startswith(("https://", "http://")):
        netguard.check_url(ref, allow_private=s.allow_private_networks)
        if ref.startswith("http://") and not s.allow_private_networks:
            raise InvalidInput("input URLs must use https://", code="unsupported_input_uri")
        return ref
    if ctx.storage.owns(ref) and f"/uploads/{tenant.id}/" in ref:
        return ref
    raise InvalidInput(
        f"{name} must be a data: URI, an https:// URL or a URI returned by POST /v1/uploads",
        code="unsupported_input_uri",
    )


def submit(
    session: Session,
    ctx: JobContext,
    tenant: Tenant,
    req: JobRequest,
    *,
    idempotency_key: str | None = None,
    job_id: str | None = None,
    reply: Reply | None = None,
) -> Submitted:
    """Validate, store and enqueue one job in a single transaction. ``job_id`` lets a caller know the
    new job's id before it exists (to wait for its end without a gap); a replay keeps its own id."""
    # An empty key names nothing: stored, it would make every later keyless-looking submit a conflict.
    idempotency_key = idempotency_key or None
    # The body's hash only matters to tell a replay from a conflict, so only with a key.
    digest = request_hash(req) if idempotency_key else None
    if idempotency_key:
        existing = _by_idempotency_key(session, tenant, idempotency_key)
        if existing is not None:
            return replay(existing, digest)
    planned = plan(
        session, ctx, tenant, req, idempotency_key=idempotency_key, job_id=job_id, reply=reply, charge=False
    )
    try:
        insert_new_rows(session, planned.rows)
        # The month's count last: its row lock, which every submit of the tenant takes, is then
        # held for the commit alone, not for the inserts, or one tenant's submits would queue
        # behind each other's whole writes.
        try:
            _charge(session, ctx, tenant, planned.images, utcnow(), planned.stored)
        except RateLimited:  # the month's quota: the job's rows go with the transaction
            session.rollback()
            raise
        session.commit()
    except IntegrityError:
        # Two submits raced with one Idempotency-Key: the loser answers with the winner's job.
        session.rollback()
        if idempotency_key:
            existing = _by_idempotency_key(session, tenant, idempotency_key)
            if existing is not None:
                return replay(existing, digest)
        raise
    if ctx.on_published:
        ctx.on_published()
    with job_context(job_id=planned.job_id, tenant=str(tenant.id), family=req.family, attempt=0):
        log.info("job queued")
    return Submitted(job_id=planned.job_id, created=True, view=planned.view)


def plan(
    session: Session,
    ctx: JobContext,
    tenant: Tenant,
    req: JobRequest,
    *,
    idempotency_key: str | None = None,
    job_id: str | None = None,
    reply: Reply | None = None,
    charge: bool = True,
) -> Planned:
    """Everything ``submit`` does before its write: validate against the registry, store inline
    inputs, count the images against the tenant's month (unless ``charge`` is false: the caller
    then charges ``images`` itself before its commit), build the rows. A front door that writes
    many jobs per transaction (the AMQP ingress) inserts them with ``jobs.persist.insert_new_rows``
    and commits them itself."""
    digest = request_hash(req) if idempotency_key else None
    _check_priority(tenant, req.priority)
    registry = ctx.registry_for(session, tenant.id)
    req, route = composition.route(registry.family(req.family), req)
    try:
        family, model = _check_family(registry, req)
    except InvalidRequest as exc:
        if ctx.runtime is None or exc.code not in ("unknown_model", "unknown_lora"):
            raise
        # Perhaps added a moment ago through another API process: read the registry again first.
        ctx.runtime.invalidate()
        registry = ctx.registry_for(session, tenant.id)
        family, model = _check_family(registry, req)
    _check_inputs(req)
    safety = composition.resolved_safety(req, tenant.safety, ctx.settings.safety_default)
    composition.check(registry, family, req, safety=safety)
    composition.check_prompt(req.prompt, tenant.deny_words)
    if req.output.metadata:
        from inference_server import imaging

        # Refuse now what would otherwise fail the job at encode time, after the GPU work.
        imaging.validate_metadata(req.output.metadata)
    spec = resolve(family, model, req, safety=safety, route=route)
    if req.webhook:
        from inference_server import netguard

        netguard.check_url(req.webhook.url, allow_private=ctx.settings.allow_private_networks)
    job_id = job_id or new_id()
    stored: dict[str, Any] = {
        name: _store_input(ctx, tenant, job_id, name, ref)
        for name, ref in (("image", spec.image), ("mask", spec.mask))
        if ref
    }
    if spec.signature:
        image = _store_input(ctx, tenant, job_id, "signature", spec.signature.image)
        stored["signature"] = spec.signature.model_copy(update={"image": image})
    if any(c.image for c in spec.controlnets):
        stored["controlnets"] = [
            c.model_copy(update={"image": _store_input(ctx, tenant, job_id, f"control{i}", c.image)})
            if c.image
            else c
            for i, c in enumerate(spec.controlnets)
        ]
    if spec.ip_adapter:
        image = _store_input(ctx, tenant, job_id, "reference", spec.ip_adapter.image)
        stored["ip_adapter"] = spec.ip_adapter.model_copy(update={"image": image})
    spec = spec.model_copy(update=stored)
    now = utcnow()
    if charge:
        _charge(session, ctx, tenant, len(spec.seeds), now, stored)
    # Plain values, not ORM objects: this is the API's hot path (see jobs.persist).
    values = {
        "id": job_id,
        "tenant_id": tenant.id,
        "status": JobStatus.QUEUED.value,
        "family": req.family,
        "model": model.id,
        "task": Task(req.task).value,
        "params": spec.stored(),
        "batch_key": batch_key(spec),
        "webhook_url": req.webhook.url if req.webhook else None,
        "webhook_events": [e.value for e in req.webhook.events]
        if req.webhook and req.webhook.events is not None
        else None,
        "webhook_profile": req.webhook.profile if req.webhook else None,
        "reply_to": reply.queue if reply else None,
        "correlation_id": reply.correlation_id if reply else None,
        "reply_events": reply.events if reply else None,
        "idempotency_key": idempotency_key,
        "request_hash": digest,
        "progress_step": 0,
        "progress_total": spec.planned_steps(family.strength_steps),
        "eta_seconds": None,
        "priority": req.priority.rank,
        "queue_position": None,
        "error_code": None,
        "error_message": None,
        "attempts": 0,
        "created_at": now,
        "started_at": None,
        "finished_at": None,
        "updated_at": now,
    }
    event = event_values(values, EventType.QUEUED)
    outbox = {
        "job_id": job_id,
        "queue": family.queue,
        "created_at": now,
        "published_at": None,
        "publish_attempts": 0,
    }
    rows: list[tuple[type[Any], dict[str, Any]]] = [(Job, values), (OutboxMessage, outbox), (JobEvent, event)]
    view = event["payload"]["data"]
    return Planned(job_id=job_id, rows=rows, view=view, images=len(spec.seeds), stored=stored)


def _charge(
    session: Session, ctx: JobContext, tenant: Tenant, images: int, now: datetime, stored: dict[str, Any]
) -> None:
    """Count the job's images for the tenant's month, late in the submit so the usage row's lock is
    held only up to the commit; a refusal (429 past the monthly quota) takes back the inputs stored.
    A refused charge writes nothing, so the transaction stays usable (the ingress plans a batch in one)."""
    from inference_server.tenancy.usage import QuotaExceeded, charge

    try:
        charge(session, tenant, images, now)
    except QuotaExceeded:
        uris = [v if isinstance(v, str) else v.image for v in stored.values()]
        ctx.storage.delete([u for u in uris if ctx.storage.owns(u) and "/inputs/" in u])
        raise


def _by_idempotency_key(session: Session, tenant: Tenant, key: str) -> Job | None:
    return session.scalar(select(Job).where(Job.tenant_id == tenant.id, Job.idempotency_key == key))


def by_idempotency_keys(session: Session, keys: list[tuple[str, str]]) -> dict[tuple[str, str], Job]:
    """The jobs already submitted under these (tenant id, idempotency key) pairs, in one query."""
    if not keys:
        return {}
    wanted = set(keys)
    query = select(Job).where(
        Job.tenant_id.in_({t for t, _ in wanted}), Job.idempotency_key.in_({k for _, k in wanted})
    )
    found = {(job.tenant_id, job.idempotency_key or ""): job for job in session.scalars(query)}
    return {key: job for key, job in found.items() if key in wanted}


def replay(existing: Job, digest: str | None) -> Submitted:
    """The answer to a submit that repeats ``existing``'s idempotency key: its job, or a conflict
    when the body (``digest``, see ``request_hash``) differs."""
    if existing.request_hash != digest:
        raise Conflict(
            "this Idempotency-Key was already used with a different request body", code="idempotency_conflict"
        )
    return Submitted(job_id=existing.id, created=False, view=job_to_dict(existing))


def get_job(session: Session, tenant: Tenant, job_id: str) -> Job:
    job = session.get(Job, job_id)
    if job is None or job.tenant_id != tenant.id:
        tomb = session.get(DeletedJob, job_id) if job is None else None
        if tomb is not None and tomb.tenant_id == tenant.id:
            raise NotFound(f"job {job_id} was deleted", code="job_deleted")
        raise NotFound(f"job {job_id} not found", code="job_not_found")
    return job


def list_jobs(
    session: Session,
    tenant: Tenant,
    *,
    status: str | None = None,
    family: str | None = None,
    limit: int = 50,
    cursor: str | None = None,
) -> tuple[list[Job], str | None]:
    """Newest first; the cursor is the (created_at, id) of the last job of the previous page."""
    query = select(Job).where(Job.tenant_id == tenant.id)
    if status:
        if status not in {s.value for s in JobStatus}:
            raise InvalidRequest(f"unknown status {status!r}", code="invalid_filter")
        query = query.where(Job.status == status)
    if family:
        query = query.where(Job.family == family)
    if cursor:
        created, last_id = _decode_cursor(cursor)
        query = query.where((Job.created_at < created) | ((Job.created_at == created) & (Job.id < last_id)))
    query = query.order_by(Job.created_at.desc(), Job.id.desc()).limit(limit + 1)
    jobs = list(session.scalars(query))
    next_cursor = _encode_cursor(jobs[limit - 1]) if len(jobs) > limit else None
    return jobs[:limit], next_cursor


def _encode_cursor(job: Job) -> str:
    raw = json.dumps([job.created_at.isoformat(), job.id]).encode()
    return base64.urlsafe_b64encode(raw).decode().rstrip("=")


def _decode_cursor(cursor: str) -> tuple[datetime, str]:
    try:
        raw = base64.urlsafe_b64decode(cursor + "=" * (-len(cursor) % 4))
        created, job_id = json.loads(raw)
        return datetime.fromisoformat(created), str(job_id)
    except (ValueError, TypeError) as exc:
        raise InvalidRequest("invalid cursor", code="invalid_cursor") from exc


def cancel(session: Session, ctx: JobContext, tenant: Tenant, job_id: str) -> Job:
    """Cancel a queued or running job. A running job's worker sees the status at its next step."""
    job = get_job(session, tenant, job_id)
    if cancel_in_transaction(session, job):
        session.commit()
    return job


def cancel_in_transaction(session: Session, job: Job) -> bool:
    """Cancel ``job`` if it is queued or running, its event added; the caller commits (the running
    job's worker is told at that commit). Return whether this canceled it; 409 ``job_finished``
    when it had already succeeded or failed."""
    if JobStatus(job.status) in TERMINAL:
        if job.status == JobStatus.CANCELED:
            return False
        raise Conflict(f"job {job.id} already {job.status}", code="job_finished")
    now = utcnow()
    # Conditional update: a worker finishing at the same moment wins or loses cleanly, never both.
    result: CursorResult[Any] = session.execute(  # type: ignore[assignment]
        update(Job)
        .where(Job.id == job.id, Job.status.in_([JobStatus.QUEUED, JobStatus.RUNNING]))
        .values(status=JobStatus.CANCELED, finished_at=now, eta_seconds=None, updated_at=now)
    )
    if result.rowcount == 0:
        session.rollback()
        session.refresh(job)
        if job.status == JobStatus.CANCELED:
            return False
        raise Conflict(f"job {job.id} already {job.status}", code="job_finished")
    session.refresh(job)
    emit(session, job, EventType.CANCELED)
    return True
