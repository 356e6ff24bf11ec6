"""Who may see and change a runtime registry entry, and which sources an entry may name.

A tenant sees the registry file's entries, the shared ones (no owner) and its own; everyone else's
are 404, as if they did not exist. It changes its own; shared entries need an admin key; the
file's entries are changed in the file."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

from inference_server.errors import Forbidden, InvalidRequest
from inference_server.netguard import check_url

SOURCE_SCHEMES = ("s3://", "gs://", "file://")
# What an https:// source names: one file, an archive of a model folder or a LoRA's weights.
ARCHIVE_SUFFIXES = (".tar", ".tar.gz", ".tgz")
LORA_SUFFIXES = (".safetensors",)


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


def check_source(
    source: str, field: str = "source", *, kind: str = "model", allow_private: bool = False
) -> str:
    """A model or LoRA source: an s3://, gs:// or file:// URI, or an https:// URL of one file the
    worker downloads: a ``.tar``/``.tar.gz``/``.tgz`` archive of a model folder, or a LoRA's
    ``.safetensors`` (``kind="lora"``). The URL passes the SSRF guard's static check; plain
    http:// only with ``allow_private`` (ALLOW_PRIVATE_NETWORKS), as for input URLs."""
    if source.startswith(SOURCE_SCHEMES) and len(source.split("://", 1)[1].strip("/")) > 0:
        return source
    if source.startswith(("https://", "http://")):
        if source.startswith("http://") and not allow_private:
            raise InvalidRequest(f"{field}: URLs must use https://", code="unsupported_model_source")
        check_url(source, allow_private=allow_private)  # unsafe_url
        suffixes = LORA_SUFFIXES if kind == "lora" else ARCHIVE_SUFFIXES
        if not urlsplit(source).path.lower().endswith(suffixes):
            raise InvalidRequest(
                f"{field}: a URL must name a {' or '.join(suffixes)} file", code="unsupported_model_source"
            )
        return source
    raise InvalidRequest(
        f"{field} must be an s3://, gs://, file:// or https:// URI", code="unsupported_model_source"
    )
