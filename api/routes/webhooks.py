"""Webhook visibility: a job's deliveries with their attempts, and replaying one delivery."""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter, Depends
from sqlalchemy.orm import Session

from api.deps import current_tenant, get_session
from api.openapi import answers
from inference_server.db import Tenant
from inference_server.schemas import Delivery, JobDeliveries
from webhooks import service

router = APIRouter(prefix="/v1", tags=["webhooks"])

SessionDep = Annotated[Session, Depends(get_session)]
TenantDep = Annotated[Tenant, Depends(current_tenant)]


@router.get("/jobs/{job_id}/webhooks", response_model=None, responses=answers(JobDeliveries))
def list_job_webhooks(job_id: str, session: SessionDep, tenant: TenantDep) -> dict[str, Any]:
    """Every delivery of the job's events, in event order, with each attempt's outcome."""
    deliveries = service.list_deliveries(session, tenant.id, job_id)
    return {"job_id": job_id, "deliveries": [service.delivery_to_dict(d) for d in deliveries]}


@router.post(
    "/webhooks/deliveries/{delivery_id}/replay",
    status_code=202,
    response_model=None,
    responses=answers(Delivery, 409, status=202),
)
def replay_webhook(delivery_id: str, session: SessionDep, tenant: TenantDep) -> dict[str, Any]:
    """Send a delivery again (same event id, fresh retry schedule); 409 while an attempt is in flight."""
    return service.delivery_to_dict(service.replay_delivery(session, tenant.id, delivery_id))
