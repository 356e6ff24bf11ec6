"""Who may see and change a runtime registry entry, and which sources an entry may name.

A tenant sees the registry file's entries, the shared ones (no owner) and its own; everyone else's
are 404, as if they did not exist. It changes its own; shared entries need an admin key; the
file's entries are changed in the file."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from inference_server.errors import Forbidden, InvalidRequest

SOURCE_SCHEMES = ("s3://", "gs://", "file://")


@dataclass(frozen=True)
class Who:
    """The caller of a registry operation: its tenant, and whether its key is an admin key."""

    tenant_id: str
    admin: bool = False

    @property
    def owner(self) -> str | None:
        """The owner of what this caller adds: None (shared) for an admin key, else its tenant."""
        return None if self.admin else self.tenant_id


def visible(row: Any, who: Who) -> bool:
    owner = row["owner_tenant_id"] if isinstance(row, dict) else row.owner_tenant_id
    return owner is None or owner == who.tenant_id


def check_manage(row: Any, who: Who, what: str) -> None:
    """Refuse a change of a visible entry ``who`` may not change (a shared one without an admin key)."""
    owner = row["owner_tenant_id"] if isinstance(row, dict) else row.owner_tenant_id
    if owner is None and not who.admin:
        raise Forbidden(f"{what} is shared: only an admin key may change it", code="admin_required")


def check_source(source: str, field: str = "source") -> str:
    """A model or LoRA source: an s3://, gs:// or file:// URI. https:// is refused with its own
    message: a model is a folder, and a URL names one file (see docs/runtime.md)."""
    if source.startswith(SOURCE_SCHEMES) and len(source.split("://", 1)[1].strip("/")) > 0:
        return source
    if source.startswith(("https://", "http://")):
        raise InvalidRequest(
            f"{field}: https:// sources are not supported; upload the folder to a bucket (s3:// or gs://) "
            "or, for a LoRA, upload the file to POST /v1/loras",
            code="unsupported_model_source",
        )
    raise InvalidRequest(f"{field} must be an s3://, gs:// or file:// URI", code="unsupported_model_source")
