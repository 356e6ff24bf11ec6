"""``POST /v1/uploads``: one image, validated now, stored, answered with a URI usable as a job input."""

from __future__ import annotations

import uuid
from typing import Any

from fastapi import APIRouter, Depends, File, UploadFile

from api.deps import AppState, current_tenant, state
from api.openapi import answers
from inference_server.db import Tenant
from inference_server.errors import InputTooLarge
from inference_server.schemas import Upload

router = APIRouter(prefix="/v1/uploads", tags=["uploads"])

IMAGE_PART = {"contentType": "image/png, image/jpeg, image/webp"}
FILE_RULES = (
    "One PNG, JPEG or WebP image of at most MAX_INPUT_BYTES bytes (20 MiB by default) and "
    "MAX_INPUT_PIXELS pixels; anything else is refused with a 4xx code."
)
FORMATS = {"PNG": ("png", "image/png"), "JPEG": ("jpg", "image/jpeg"), "WEBP": ("webp", "image/webp")}


@router.post(
    "",
    status_code=201,
    response_model=None,
    responses=answers(Upload, status=201),
    openapi_extra={"requestBody": {"content": {"multipart/form-data": {"encoding": {"file": IMAGE_PART}}}}},
)
def upload(
    file: UploadFile = File(description=FILE_RULES),
    tenant: Tenant = Depends(current_tenant),
    st: AppState = Depends(state),
) -> dict[str, Any]:
    from inference_server import imaging

    s = st.settings
    data = file.file.read(s.max_input_bytes + 1)
    if len(data) > s.max_input_bytes:
        raise InputTooLarge(f"uploads are limited to {s.max_input_bytes} bytes", code="input_too_large")
    info = imaging.validate_image(data, max_bytes=s.max_input_bytes, max_pixels=s.max_input_pixels)
    ext, content_type = FORMATS.get(info.format, ("img", "application/octet-stream"))
    uri = st.ctx.storage.put(f"uploads/{tenant.id}/{uuid.uuid4().hex}.{ext}", data, content_type)
    return {"uri": uri, "width": info.width, "height": info.height, "content_type": content_type}
