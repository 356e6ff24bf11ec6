"""The model catalog and the runtime registry: models and LoRAs added, read and deleted through the
API, and warm placement. Routes parse and map; the work is in ``inference_server.registry``."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Depends, Query, Request
from pydantic import ValidationError
from sqlalchemy.orm import Session
from starlette.concurrency import run_in_threadpool

from api.auth import Caller
from api.deps import AppState, current_caller, get_session, state
from api.openapi import answers
from inference_server.errors import InputTooLarge, InvalidRequest
from inference_server.registry import loras_service as loras
from inference_server.registry import models_service as models
from inference_server.registry import placement
from inference_server.registry.access import Who
from inference_server.registry.runtime import RuntimeRegistry
from inference_server.schemas import Catalogue

router = APIRouter(tags=["models"])

# The LoRA route reads its body itself (JSON or a multipart upload), so FastAPI cannot describe it.
LORA_BODY: dict[str, Any] = {
    "requestBody": {
        "required": True,
        "content": {
            "application/json": {"schema": loras.NewLora.model_json_schema()},
            "multipart/form-data": {
                "schema": {
                    "type": "object",
                    "required": ["name", "family", "file"],
                    "properties": {
                        "name": {"type": "string"},
                        "family": {"type": "string"},
                        "file": {"type": "string", "format": "binary"},
                    },
                }
            },
        },
    }
}


def _runtime(st: AppState) -> RuntimeRegistry:
    assert st.ctx.runtime is not None  # create_app always builds one
    return st.ctx.runtime


def _who(caller: Caller) -> Who:
    return Who(caller.tenant.id, caller.admin)


@router.get("/v1/models", response_model=None, responses=answers(Catalogue))
def catalog(
    caller: Caller = Depends(current_caller),
    st: AppState = Depends(state),
    session: Session = Depends(get_session),
) -> dict[str, Any]:
    """Every family with its models and LoRAs: the registry file's and those added at runtime that
    the caller sees; per family the consumers of its queue (``online_workers``) and the workers' own
    heartbeats (``workers``: slots, busy, device, GPU memory in bytes, None on a CPU);
    ``gpu_memory_free`` is the most any one of them has free."""
    from inference_server.publish.scheduler import online_workers

    registry = _runtime(st).view(session, caller.tenant.id)
    body = registry.catalog()
    queues = {f["name"]: registry.families[f["name"]].queue for f in body["families"]}
    online = st.broker.consumers(list(queues.values())) if st.broker is not None else {}
    fleet = online_workers(session, timeout=st.settings.worker_heartbeat_timeout)
    for family in body["families"]:
        family["online_workers"] = online.get(queues[family["name"]])
        workers = fleet.get(family["name"], [])
        family["workers"] = workers
        free = [w["gpu_memory_free"] for w in workers if w["gpu_memory_free"] is not None]
        family["gpu_memory_free"] = max(free) if free else None
    return body


@router.post(
    "/v1/models", status_code=201, response_model=None, responses=answers(None, 403, 409, status=201)
)
def add_model(
    body: models.NewModel,
    caller: Caller = Depends(current_caller),
    st: AppState = Depends(state),
    session: Session = Depends(get_session),
) -> dict[str, Any]:
    """Add a model to a family at runtime (shared with an admin key, else the caller's own)."""
    return models.add_model(
        session, _runtime(st), _who(caller), body, allow_private=st.settings.allow_private_networks
    )


@router.get("/v1/models/{family}/{model_id}", response_model=None, responses=answers(None, 404))
def get_model(
    family: str,
    model_id: str,
    caller: Caller = Depends(current_caller),
    st: AppState = Depends(state),
    session: Session = Depends(get_session),
) -> dict[str, Any]:
    """A model, with the workers that hold it loaded."""
    return models.get_model(session, _runtime(st), _who(caller), family, model_id)


@router.delete("/v1/models/{family}/{model_id}", response_model=None, responses=answers(None, 403, 404, 409))
def delete_model(
    family: str,
    model_id: str,
    force: bool = False,
    caller: Caller = Depends(current_caller),
    st: AppState = Depends(state),
    session: Session = Depends(get_session),
) -> dict[str, Any]:
    """Delete a runtime model: 409 ``model_busy`` while its jobs are queued or running, unless
    ``force=true``, which fails them ``model_deleted``. Workers evict it within their poll."""
    return models.delete_model(session, _runtime(st), _who(caller), family, model_id, force=force)


def _place(
    st: AppState, caller: Caller, session: Session, family: str, model_id: str, action: str, timeout: float
) -> dict[str, Any]:
    runtime = _runtime(st)
    models.check_model(session, runtime, _who(caller), family, model_id)
    queue = runtime.seed.family(family).queue
    expected = st.broker.consumers([queue]).get(queue) if st.broker is not None else None
    request_id = placement.request(session, family, model_id, action)
    got, complete = placement.wait_answers(
        st.session_factory, request_id, expected=expected or None, timeout=timeout
    )
    return {
        "family": family,
        "id": model_id,
        "action": action,
        "request_id": request_id,
        "expected_workers": expected,
        "complete": complete,
        "workers": got,
    }


@router.post("/v1/models/{family}/{model_id}/load", response_model=None, responses=answers(None, 403, 404))
def load_model(
    family: str,
    model_id: str,
    timeout: float = Query(None, gt=0, le=600, description="seconds to wait for the workers' answers"),
    caller: Caller = Depends(current_caller),
    st: AppState = Depends(state),
    session: Session = Depends(get_session),
) -> dict[str, Any]:
    """Ask the family's workers to load the model now, between their jobs; answered with each
    worker that loaded it and how long it took (partial, ``complete: false``, after ``timeout``)."""
    wait = timeout or st.settings.placement_timeout
    return _place(st, caller, session, family, model_id, placement.LOAD, wait)


@router.post("/v1/models/{family}/{model_id}/unload", response_model=None, responses=answers(None, 403, 404))
def unload_model(
    family: str,
    model_id: str,
    timeout: float = Query(None, gt=0, le=600),
    caller: Caller = Depends(current_caller),
    st: AppState = Depends(state),
    session: Session = Depends(get_session),
) -> dict[str, Any]:
    """Ask the family's workers to drop the model from their caches."""
    wait = timeout or st.settings.placement_timeout
    return _place(st, caller, session, family, model_id, placement.UNLOAD, wait)


# -- LoRAs ------------------------------------------------------------------------------------------


@router.post(
    "/v1/loras",
    status_code=201,
    tags=["loras"],
    response_model=None,
    responses=answers(None, 403, 409, 413, 422, status=201),
    openapi_extra=LORA_BODY,
)
async def add_lora(
    request: Request, caller: Caller = Depends(current_caller), st: AppState = Depends(state)
) -> Any:
    """Register a LoRA: JSON ``{name, family, source}`` for a URI, or a multipart upload with
    fields ``name``, ``family`` and ``file`` (a ``.safetensors`` file, checked and stored)."""
    who = _who(caller)
    if request.headers.get("content-type", "").startswith("multipart/form-data"):
        form = await request.form(max_files=1, max_fields=10)
        upload, name, family = form.get("file"), form.get("name"), form.get("family")
        if (
            upload is None
            or isinstance(upload, str)
            or not isinstance(name, str)
            or not isinstance(family, str)
        ):
            raise InvalidRequest(
                "a LoRA upload needs the fields name, family and file", code="invalid_request"
            )
        limit = st.settings.max_lora_bytes
        data = await upload.read(limit + 1)
        if len(data) > limit:
            raise InputTooLarge(f"LoRA uploads are limited to {limit} bytes", code="lora_too_large")
        return await run_in_threadpool(_upload, st, who, name, family, data)
    try:
        body = loras.NewLora.model_validate_json(await request.body())
    except ValidationError as exc:
        first = exc.errors(include_url=False)[0]
        where = ".".join(str(p) for p in first["loc"]) or "body"
        raise InvalidRequest(f"{where}: {first['msg']}", code="validation_error") from None
    return await run_in_threadpool(_add_by_uri, st, who, body)


def _upload(st: AppState, who: Who, name: str, family: str, data: bytes) -> dict[str, Any]:
    with st.session_factory() as session:
        return loras.upload_lora(
            session, _runtime(st), st.ctx.storage, who, name=name, family=family, data=data
        )


def _add_by_uri(st: AppState, who: Who, body: loras.NewLora) -> dict[str, Any]:
    with st.session_factory() as session:
        return loras.add_lora(
            session, _runtime(st), who, body, allow_private=st.settings.allow_private_networks
        )


@router.get("/v1/loras", tags=["loras"], response_model=None, responses=answers(None))
def list_loras(
    family: str | None = None,
    caller: Caller = Depends(current_caller),
    st: AppState = Depends(state),
    session: Session = Depends(get_session),
) -> dict[str, Any]:
    return {"loras": loras.list_loras(session, _runtime(st), _who(caller), family)}


@router.get("/v1/loras/{name}", tags=["loras"], response_model=None, responses=answers(None, 404))
def get_lora(
    name: str,
    caller: Caller = Depends(current_caller),
    st: AppState = Depends(state),
    session: Session = Depends(get_session),
) -> dict[str, Any]:
    return loras.get_lora(session, _runtime(st), _who(caller), name)


@router.delete(
    "/v1/loras/{name}", tags=["loras"], response_model=None, responses=answers(None, 403, 404, 409)
)
def delete_lora(
    name: str,
    caller: Caller = Depends(current_caller),
    st: AppState = Depends(state),
    session: Session = Depends(get_session),
) -> dict[str, Any]:
    return loras.delete_lora(session, _runtime(st), st.ctx.storage, _who(caller), name)
