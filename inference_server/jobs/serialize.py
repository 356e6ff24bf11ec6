"""The job as ``GET /v1/jobs/{id}`` returns it; webhooks carry the same dict."""

from __future__ import annotations

from datetime import datetime
from typing import Any

from inference_server.db import Job


def iso(value: datetime | None) -> str | None:
    return value.isoformat().replace("+00:00", "Z") if value else None


def public_params(params: dict[str, Any]) -> dict[str, Any]:
    """Parameters as the client sees them: inputs stay as the URIs they became at submit."""
    return {k: v for k, v in params.items() if not k.startswith("_")}


def job_to_dict(job: Job, *, api_base: str = "") -> dict[str, Any]:
    total = job.progress_total or 0
    step = job.progress_step or 0
    percent = 100.0 if job.status == "succeeded" else round(100.0 * step / total, 1) if total else 0.0
    return {
        "id": job.id,
        "status": job.status,
        "family": job.family,
        "model": job.model,
        "task": job.task,
        "params": public_params(job.params or {}),
        "progress": {
            "step": step,
            "total_steps": total,
            "percent": percent,
            "eta_seconds": job.eta_seconds,
        },
        "outputs": [
            {
                "url": f"{api_base}/v1/jobs/{job.id}/outputs/{out.index}",
                "content_type": out.content_type,
                "width": out.width,
                "height": out.height,
                "seed": out.seed,
                "sha256": out.sha256,
            }
            for out in job.outputs
        ],
        "error": {"code": job.error_code, "message": job.error_message} if job.error_code else None,
        "created_at": iso(job.created_at),
        "started_at": iso(job.started_at),
        "finished_at": iso(job.finished_at),
        "attempts": job.attempts,
    }
