"""Models added, read and deleted at runtime (``/v1/models``), one transaction each.

Model ids are unique within a family across the file and every tenant: a job names a model by
family and id alone, and the worker finds it by them. Every change bumps the registry version, so
API replicas and workers see it within their poll interval (REGISTRY_POLL_INTERVAL)."""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field
from sqlalchemy import select, update
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from inference_server.db import Job
from inference_server.db.base import utcnow
from inference_server.db.registry_tables import RuntimeModel, WorkerModel
from inference_server.errors import Conflict, Forbidden, NotFound
from inference_server.events import JOB_CANCELED_CHANNEL, emit
from inference_server.jobs.enums import EventType, JobStatus
from inference_server.registry import Defaults, Limits, Registry
from inference_server.registry.access import Who, check_manage, check_source, visible
from inference_server.registry.runtime import RuntimeRegistry, bump_version
from inference_server.registry.specs import FamilyName

ModelId = Annotated[str, Field(min_length=1, max_length=200, pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]*$")]
ACTIVE = (JobStatus.QUEUED.value, JobStatus.RUNNING.value)


class NewModel(BaseModel):
    """The body of ``POST /v1/models``."""

    model_config = ConfigDict(extra="forbid")

    family: FamilyName
    id: ModelId
    source: str = Field(
        min_length=1,
        description="s3://, gs:// or file:// URI of a diffusers folder, or https:// URL of its .tar/.tar.gz",
    )
    dtype: Literal["float32", "float16", "bfloat16"] = "float32"
    df11: str | None = Field(None, description="URI of a folder of DFloat11 weights for the transformer")
    defaults: Defaults | None = None
    limits: Limits | None = None


def model_view(row: RuntimeModel, workers: list[dict[str, Any]] | None = None) -> dict[str, Any]:
    view: dict[str, Any] = {
        "family": row.family,
        "id": row.model_id,
        "source": row.source,
        "dtype": row.dtype,
        "df11": row.df11 is not None,
        "defaults": row.defaults or {},
        "limits": row.limits or {},
        "shared": row.owner_tenant_id is None,
        "origin": "runtime",
        "created_at": row.created_at.isoformat().replace("+00:00", "Z"),
    }
    if workers is not None:
        view["workers"] = workers
    return view


def add_model(
    session: Session, runtime: RuntimeRegistry, who: Who, body: NewModel, *, allow_private: bool = False
) -> dict[str, Any]:
    """Add a runtime model; ``allow_private`` (ALLOW_PRIVATE_NETWORKS) lets a URL source be private."""
    family = runtime.seed.family(body.family)  # unknown_family: models join the file's families
    check_source(body.source, allow_private=allow_private)
    if body.df11:
        check_source(body.df11, "df11", allow_private=allow_private)
    if any(m.id == body.id for m in family.models):
        raise Conflict(f"{body.family} already has a model {body.id!r} (in MODELS_FILE)", code="model_exists")
    row = RuntimeModel(
        family=body.family,
        model_id=body.id,
        source=body.source,
        dtype=body.dtype,
        df11=body.df11,
        defaults=dict(body.defaults) if body.defaults else None,
        limits=dict(body.limits) if body.limits else None,
        owner_tenant_id=who.owner,
        created_at=utcnow(),
    )
    session.add(row)
    bump_version(session)
    try:
        session.commit()
    except IntegrityError:
        session.rollback()
        raise Conflict(f"{body.family} already has a model {body.id!r}", code="model_exists") from None
    runtime.invalidate()
    return model_view(row, [])


def _find(session: Session, registry: Registry, who: Who, family: str, model_id: str) -> RuntimeModel | None:
    """The runtime row of a model ``who`` sees; None for a model of the file. 404 otherwise."""
    spec = registry.family(family)
    row = session.scalar(
        select(RuntimeModel).where(RuntimeModel.family == family, RuntimeModel.model_id == model_id)
    )
    if row is not None and visible(row, who):
        return row
    if row is None and any(m.id == model_id for m in spec.models):
        return None
    raise NotFound(f"no model {model_id!r} in {family}", code="model_not_found")


def loaded_on(session: Session, family: str, model_id: str) -> list[dict[str, Any]]:
    """The workers that hold the model loaded now, as they last reported."""
    rows = session.scalars(
        select(WorkerModel)
        .where(WorkerModel.family == family, WorkerModel.model_id == model_id)
        .order_by(WorkerModel.worker)
    )
    return [{"worker": r.worker, "loaded_at": r.loaded_at.isoformat().replace("+00:00", "Z")} for r in rows]


def get_model(
    session: Session, runtime: RuntimeRegistry, who: Who, family: str, model_id: str
) -> dict[str, Any]:
    row = _find(session, runtime.seed, who, family, model_id)
    workers = loaded_on(session, family, model_id)
    if row is not None:
        return model_view(row, workers)
    spec = runtime.seed.family(family).model(model_id, runtime.seed.family(family).tasks[0])
    return {
        "family": family,
        "id": spec.id,
        "source": spec.source,
        "dtype": spec.dtype,
        "df11": spec.is_df11,
        "default": spec.default,
        "tasks": [str(t) for t in spec.tasks],
        "shared": True,
        "origin": "registry_file",
        "workers": workers,
    }


def check_model(session: Session, runtime: RuntimeRegistry, who: Who, family: str, model_id: str) -> None:
    """404 unless ``who`` sees the model; 403 unless it may place it (its own, or an admin key)."""
    row = _find(session, runtime.seed, who, family, model_id)
    if row is not None:
        check_manage(row, who, f"model {family}/{model_id}")
    elif not who.admin:
        raise Forbidden(
            f"model {family}/{model_id} is in MODELS_FILE: only an admin key may place it",
            code="admin_required",
        )


def delete_model(
    session: Session, runtime: RuntimeRegistry, who: Who, family: str, model_id: str, *, force: bool = False
) -> dict[str, Any]:
    """Delete a runtime model. Refused with ``model_busy`` while jobs for it are queued or running,
    unless ``force``: those jobs then fail with ``model_deleted`` in the same transaction."""
    row = _find(session, runtime.seed, who, family, model_id)
    if row is None:
        raise Conflict(
            f"{family}/{model_id} is in MODELS_FILE: remove it there", code="model_in_registry_file"
        )
    check_manage(row, who, f"model {family}/{model_id}")
    active = list(
        session.scalars(
            select(Job)
            .where(Job.family == family, Job.model == model_id, Job.status.in_(ACTIVE))
            .with_for_update()
        )
    )
    if active and not force:
        session.rollback()
        raise Conflict(
            f"{len(active)} job(s) for {family}/{model_id} are queued or running; "
            "wait for them, or delete with ?force=true to fail them",
            code="model_busy",
        )
    failed = [_fail_deleted(session, job) for job in active]
    session.delete(row)
    bump_version(session)
    session.commit()
    runtime.invalidate()
    return {"deleted": True, "family": family, "id": model_id, "failed_jobs": [j for j in failed if j]}


def _fail_deleted(session: Session, job: Job) -> str | None:
    now = utcnow()
    result = session.execute(
        update(Job)
        .where(Job.id == job.id, Job.status.in_(ACTIVE))
        .values(
            status=JobStatus.FAILED.value,
            error_code="model_deleted",
            error_message=f"model {job.family}/{job.model} was deleted",
            finished_at=now,
            eta_seconds=None,
            lease_expires_at=None,
            updated_at=now,
        )
    )
    if not result.rowcount:  # type: ignore[attr-defined]
        return None
    session.refresh(job)
    emit(session, job, EventType.FAILED)
    if session.get_bind().dialect.name == "postgresql":
        from sqlalchemy import func

        # Wakes the worker running it now, as a cancel does: it stops at its next step.
        session.execute(select(func.pg_notify(JOB_CANCELED_CHANNEL, job.id)))
    return job.id
