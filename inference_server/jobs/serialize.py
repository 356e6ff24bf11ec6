"""The job as ``GET /v1/jobs/{id}`` returns it; webhooks carry the same dict.

A view is built from plain column mappings (a row as the worker holds it, or an ORM job through
``job_to_dict``). Output URLs are stored relative (``/v1/jobs/{id}/outputs/{n}``): the API and the
dispatcher prefix them with the public API URL when they read them, so that URL never travels
through workers or lives in stored events."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from datetime import datetime
from typing import Any

from inference_server.db import Job
from inference_server.jobs.enums import JobStatus, Priority
from inference_server.jobs.spec import public_params

OUTPUT_PATH = "/v1/jobs/{job_id}/outputs/{index}"
PREVIEW_PATH = "/v1/jobs/{job_id}/preview"


def iso(value: datetime | None) -> str | None:
    return value.isoformat().replace("+00:00", "Z") if value else None


def job_view(job: Mapping[str, Any], outputs: Sequence[Mapping[str, Any]] = ()) -> dict[str, Any]:
    """The public view of a ``jobs`` row and its ``job_outputs`` rows, with relative output URLs."""
    total = job["progress_total"] or 0
    step = job["progress_step"] or 0
    succeeded = job["status"] == JobStatus.SUCCEEDED
    percent = 100.0 if succeeded else round(100.0 * step / total, 1) if total else 0.0
    return {
        "id": job["id"],
        "status": str(job["status"]),
        "family": job["family"],
        "model": job["model"],
        "task": str(job["task"]),
        "params": public_params(job["params"] or {}),
        "priority": Priority.of_rank(job.get("priority")).value,
        # Set by the scheduler while the job waits (docs/scheduling.md); None once it runs.
        "queue_position": job.get("queue_position") if job["status"] == JobStatus.QUEUED else None,
        "progress": {
            "step": step,
            "total_steps": total,
            "percent": percent,
            "eta_seconds": job["eta_seconds"],
        },
        "outputs": [output_view(job["id"], out) for out in sorted(outputs, key=lambda o: o["index"])],
        # Where task "auto" sent the job and why (null: the client chose the task).
        "route": (job["params"] or {}).get("route"),
        # Retention deleted them (OUTPUT_RETENTION_DAYS): ``outputs`` is empty from then on.
        "outputs_expired": job.get("outputs_expired_at") is not None,
        "error": {"code": job["error_code"], "message": job["error_message"]} if job["error_code"] else None,
        "created_at": iso(job["created_at"]),
        "started_at": iso(job["started_at"]),
        "finished_at": iso(job["finished_at"]),
        "attempts": job["attempts"],
        # The pipeline call this job shared with other jobs (cross-request batching), or null.
        "batch": {"id": job["batch_id"], "size": job["batch_size"]} if job.get("batch_id") else None,
    }


def output_view(job_id: str, out: Mapping[str, Any]) -> dict[str, Any]:
    """One output as the API shows it. ``kind``: image, control or mask; a blocked image (the
    safety checker, ``safety: block``) has no URL and carries the code ``content_blocked``."""
    blocked = bool(out.get("blocked"))
    view = {
        "url": None if blocked else OUTPUT_PATH.format(job_id=job_id, index=out["index"]),
        "content_type": out["content_type"],
        "width": out["width"],
        "height": out["height"],
        "seed": out["seed"],
        "sha256": out["sha256"],
        "kind": out.get("kind") or "image",
    }
    if out.get("nsfw") is not None:
        view["nsfw"], view["nsfw_score"] = out["nsfw"], out.get("nsfw_score")
    if blocked:
        view["blocked"], view["code"] = True, "content_blocked"
    return view


def columns(row: Any) -> dict[str, Any]:
    """An ORM row's column values as a plain mapping."""
    return {c.key: getattr(row, c.key) for c in row.__table__.columns}


def job_to_dict(job: Job, *, api_base: str | None = None) -> dict[str, Any]:
    """The public view of an ORM job; with ``api_base``, output URLs are absolute."""
    view = job_view(columns(job), [columns(o) for o in job.outputs])
    return with_api_base(view, api_base) if api_base is not None else view


def with_api_base(view: dict[str, Any], api_base: str) -> dict[str, Any]:
    """``view`` (a job view, or a webhook body carrying one in ``data``) with absolute output URLs."""
    job = view.get("data", view)
    preview = job.get("preview")  # a job.preview event's
    if not api_base or not (job.get("outputs") or preview):
        return view
    outputs = [
        {**o, "url": api_base + o["url"]} if (o.get("url") or "").startswith("/") else o
        for o in job.get("outputs") or []
    ]
    job = {**job, "outputs": outputs}
    if preview and preview["url"].startswith("/"):
        job["preview"] = {**preview, "url": api_base + preview["url"]}
    return {**view, "data": job} if "data" in view else job
