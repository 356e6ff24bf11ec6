"""LoRAs added, read and deleted at runtime (``/v1/loras``).

A LoRA is added by URI (a folder or file in a bucket, or a file:// path the workers can read) or
uploaded: the API checks the file from its safetensors header (:mod:`registry.lora_check`; no
torch here) and stores it in the storage backend under ``loras/``, where the workers fetch it as
they fetch any bucket LoRA. Names are one name space across families, unique against the file's
LoRAs too, so ``/v1/loras/{name}`` needs no family."""

from __future__ import annotations

import functools
import logging
import uuid
from pathlib import Path
from typing import Annotated, Any

from pydantic import BaseModel, ConfigDict, Field
from sqlalchemy import select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from inference_server.db.base import utcnow
from inference_server.db.registry_tables import RuntimeLora
from inference_server.errors import Conflict, InvalidRequest, NotFound
from inference_server.registry import FamilySpec, Registry
from inference_server.registry.access import Who, check_manage, check_source, visible
from inference_server.registry.lora_check import check_lora, denoiser_layers
from inference_server.registry.runtime import RuntimeRegistry, bump_version
from inference_server.registry.specs import FamilyName
from inference_server.storage.base import Storage

log = logging.getLogger(__name__)

LoraName = Annotated[str, Field(min_length=1, max_length=200, pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]*$")]
WEIGHT_NAME = "pytorch_lora_weights.safetensors"


class NewLora(BaseModel):
    """The JSON body of ``POST /v1/loras`` (a multipart upload sends the same fields as form fields)."""

    model_config = ConfigDict(extra="forbid")

    name: LoraName
    family: FamilyName
    source: str = Field(
        min_length=1,
        description="s3://, gs:// or file:// URI of a LoRA folder or file, or https:// URL of a .safetensors",
    )
    weight_name: str | None = Field(None, max_length=200)


def lora_view(row: RuntimeLora) -> dict[str, Any]:
    return {
        "name": row.name,
        "family": row.family,
        "source": row.source,
        "weight_name": row.weight_name,
        "size_bytes": row.size_bytes,
        "shared": row.owner_tenant_id is None,
        "origin": "runtime",
        "created_at": row.created_at.isoformat().replace("+00:00", "Z"),
    }


def _file_view(family: FamilySpec, name: str) -> dict[str, Any]:
    spec = family.lora(name)
    assert spec is not None
    return {
        "name": name,
        "family": family.name,
        "source": spec.source,
        "weight_name": spec.weight_name,
        "shared": True,
        "origin": "registry_file",
    }


def _check_new_name(seed: Registry, name: str) -> None:
    if any(f.lora(name) is not None for f in seed.families.values()):
        raise Conflict(f"a LoRA called {name!r} is in MODELS_FILE", code="lora_exists")


def _insert(session: Session, runtime: RuntimeRegistry, row: RuntimeLora) -> dict[str, Any]:
    session.add(row)
    bump_version(session)
    try:
        session.commit()
    except IntegrityError:
        session.rollback()
        raise Conflict(f"a LoRA called {row.name!r} already exists", code="lora_exists") from None
    runtime.invalidate()
    return lora_view(row)


def add_lora(
    session: Session, runtime: RuntimeRegistry, who: Who, body: NewLora, *, allow_private: bool = False
) -> dict[str, Any]:
    """Register a LoRA at a URI (its content is checked by the worker that first loads it)."""
    runtime.seed.family(body.family)
    check_source(body.source, kind="lora", allow_private=allow_private)
    _check_new_name(runtime.seed, body.name)
    row = RuntimeLora(
        name=body.name,
        family=body.family,
        source=body.source,
        weight_name=body.weight_name,
        owner_tenant_id=who.owner,
        created_at=utcnow(),
    )
    return _insert(session, runtime, row)


def upload_lora(
    session: Session,
    runtime: RuntimeRegistry,
    storage: Storage,
    who: Who,
    *,
    name: str,
    family: str,
    data: bytes,
) -> dict[str, Any]:
    """Check an uploaded safetensors file is a LoRA for ``family``, store it, register it."""
    try:
        body = NewLora(name=name, family=family, source="file:///upload", weight_name=None)
    except ValueError:
        raise InvalidRequest(
            "name and family must be letters, digits, '.', '_' and '-', starting with a letter or digit",
            code="invalid_request",
        ) from None
    spec = runtime.seed.family(body.family)
    _check_new_name(runtime.seed, body.name)
    kind, layers = _denoiser(runtime.seed, spec)
    check_lora(data, kind=kind, layers=layers)
    owner = who.owner or "shared"
    uri = storage.put(f"loras/{owner}/{uuid.uuid4().hex}/{WEIGHT_NAME}", data, "application/octet-stream")
    row = RuntimeLora(
        name=body.name,
        family=body.family,
        source=uri.rsplit("/", 1)[0],
        weight_name=WEIGHT_NAME,
        size_bytes=len(data),
        owner_tenant_id=who.owner,
        created_at=utcnow(),
    )
    try:
        return _insert(session, runtime, row)
    except Conflict:
        _remove_object(storage, uri)
        raise


def _denoiser(seed: Registry, family: FamilySpec) -> tuple[str | None, dict[str, list[int]] | None]:
    """The family's denoiser kind and weight shapes, from its default model's folder when local."""
    default = next((m for m in family.models if m.default), family.models[0])
    source = seed.resolve_source(default.source)
    if "://" in source and not source.startswith("file://"):
        return None, None  # in a bucket: only the worker that loads the LoRA will know
    return _layers_of(source.removeprefix("file://"))


@functools.lru_cache(maxsize=32)
def _layers_of(folder: str) -> tuple[str | None, dict[str, list[int]] | None]:
    return denoiser_layers(Path(folder))


def _find(session: Session, runtime: RuntimeRegistry, who: Who, name: str) -> RuntimeLora | FamilySpec:
    """The runtime row of LoRA ``name`` ``who`` sees, or the family of a file LoRA; 404 otherwise."""
    row = session.scalar(select(RuntimeLora).where(RuntimeLora.name == name))
    if row is not None and visible(row, who):
        return row
    if row is None:
        family = next((f for f in runtime.seed.families.values() if f.lora(name) is not None), None)
        if family is not None:
            return family
    raise NotFound(f"no LoRA called {name!r}", code="lora_not_found")


def get_lora(session: Session, runtime: RuntimeRegistry, who: Who, name: str) -> dict[str, Any]:
    found = _find(session, runtime, who, name)
    return lora_view(found) if isinstance(found, RuntimeLora) else _file_view(found, name)


def list_loras(
    session: Session, runtime: RuntimeRegistry, who: Who, family: str | None = None
) -> list[dict[str, Any]]:
    """The file's LoRAs and the runtime ones ``who`` sees, by family then name."""
    if family is not None:
        runtime.seed.family(family)
    out = [
        _file_view(f, lo.name)
        for f in runtime.seed.families.values()
        if family in (None, f.name)
        for lo in f.loras
    ]
    query = select(RuntimeLora).order_by(RuntimeLora.family, RuntimeLora.name)
    if family is not None:
        query = query.where(RuntimeLora.family == family)
    out += [lora_view(r) for r in session.scalars(query) if visible(r, who)]
    return sorted(out, key=lambda v: (v["family"], v["name"]))


def delete_lora(
    session: Session, runtime: RuntimeRegistry, storage: Storage, who: Who, name: str
) -> dict[str, Any]:
    """Delete a runtime LoRA; an uploaded file is removed from storage too. Jobs submitted after
    this are refused ``unknown_lora``; a queued job naming it fails ``unknown_lora`` on its worker."""
    found = _find(session, runtime, who, name)
    if not isinstance(found, RuntimeLora):
        raise Conflict(f"LoRA {name!r} is in MODELS_FILE: remove it there", code="model_in_registry_file")
    check_manage(found, who, f"LoRA {name!r}")
    uploaded = (
        f"{found.source}/{found.weight_name}" if found.weight_name and storage.owns(found.source) else None
    )
    session.delete(found)
    bump_version(session)
    session.commit()
    runtime.invalidate()
    if uploaded and "/loras/" in uploaded:
        _remove_object(storage, uploaded)
    return {"deleted": True, "name": name}


def _remove_object(storage: Storage, uri: str) -> None:
    try:
        storage.delete([uri])
    except Exception as exc:  # the row is gone, so no job uses it; a stray object is only space
        log.warning("could not delete %s from storage: %s", uri, exc)
