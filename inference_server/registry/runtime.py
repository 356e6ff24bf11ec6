"""The registry a process serves: the seed file plus the models and LoRAs added at runtime.

Pure Python and SQLAlchemy, no torch: the API resolves job submits with it, and the worker's
engine loads what it names. Runtime rows are read in one pass whenever the registry version (one
row, bumped by every change) moved; between reads the snapshot is reused, so a submit costs no
extra round trip while nothing changes. Each tenant sees the seed, the shared rows (no owner) and
its own; a worker sees every row."""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass, field
from typing import Any

from sqlalchemy import select, update
from sqlalchemy.orm import Session

from inference_server.db.registry_tables import RegistryVersion, RuntimeLora, RuntimeModel
from inference_server.registry import FamilySpec, LoraSpec, ModelSpec, Registry

EVERYONE = "*"  # the worker's view: every tenant's rows


def bump_version(session: Session) -> None:
    """Mark the runtime registry changed (in the caller's transaction): pollers read it again."""
    session.execute(
        update(RegistryVersion).where(RegistryVersion.id == 1).values(version=RegistryVersion.version + 1)
    )


def read_version(session: Session) -> int:
    """The current registry version (0 before any change)."""
    return int(session.scalar(select(RegistryVersion.version).where(RegistryVersion.id == 1)) or 0)


@dataclass(frozen=True)
class Rows:
    """Every runtime model and LoRA at one registry version, as plain dicts."""

    version: int
    models: tuple[dict[str, Any], ...] = ()
    loras: tuple[dict[str, Any], ...] = ()


def read_rows(session: Session) -> Rows:
    version = read_version(session)
    models = tuple(dict(r) for r in session.execute(select(RuntimeModel.__table__)).mappings())
    loras = tuple(dict(r) for r in session.execute(select(RuntimeLora.__table__)).mappings())
    return Rows(version, models, loras)


def model_spec(row: dict[str, Any], family: FamilySpec) -> ModelSpec:
    """The ModelSpec of a runtime model row: it serves every task of its family."""
    return ModelSpec(
        id=row["model_id"],
        source=row["source"],
        dtype=row["dtype"],
        df11=row["df11"],
        tasks=tuple(family.tasks),
        defaults=row["defaults"] or None,
        limits=row["limits"] or None,
    )


def lora_spec(row: dict[str, Any]) -> LoraSpec:
    return LoraSpec(name=row["name"], source=row["source"], weight_name=row["weight_name"])


def merge(seed: Registry, rows: Rows, tenant_id: str | None) -> Registry:
    """The seed with the rows ``tenant_id`` may see (EVERYONE: all of them) added to its families.
    Rows of a family the seed no longer has are left out."""

    def visible(row: dict[str, Any]) -> bool:
        owner = row["owner_tenant_id"]
        return tenant_id == EVERYONE or owner is None or owner == tenant_id

    models = [r for r in rows.models if visible(r) and r["family"] in seed.families]
    loras = [r for r in rows.loras if visible(r) and r["family"] in seed.families]
    if not models and not loras:
        return seed
    families: dict[str, FamilySpec] = {}
    for name, family in seed.families.items():
        extra_models = [model_spec(r, family) for r in models if r["family"] == name]
        extra_loras = [lora_spec(r) for r in loras if r["family"] == name]
        if not extra_models and not extra_loras:
            families[name] = family
            continue
        merged = family.model_copy(
            update={"models": [*family.models, *extra_models], "loras": [*family.loras, *extra_loras]}
        )
        merged.bind(name)
        families[name] = merged
    return Registry(path=seed.path, families=families, tools=seed.tools)


@dataclass
class RuntimeRegistry:
    """The seed and a cached snapshot of the runtime rows, read again at most every ``poll``
    seconds, and only when the version moved. ``invalidate`` forces the next read (after a change
    this process made)."""

    seed: Registry
    poll: float = 1.0
    _rows: Rows = field(default_factory=lambda: Rows(-1))
    _checked: float = float("-inf")
    _views: dict[str | None, Registry] = field(default_factory=dict)
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def invalidate(self) -> None:
        with self._lock:
            self._checked = float("-inf")

    def rows(self, session: Session) -> Rows:
        """The runtime rows, fresh within ``poll`` seconds."""
        now = time.monotonic()
        with self._lock:
            if now - self._checked < self.poll:
                return self._rows
        version = read_version(session)
        with self._lock:
            if version != self._rows.version:
                self._rows = read_rows(session)
                self._views = {}
            self._checked = now
            return self._rows

    def view(self, session: Session, tenant_id: str | None) -> Registry:
        """The registry ``tenant_id`` sees (EVERYONE: a worker's view)."""
        rows = self.rows(session)
        with self._lock:
            cached = self._views.get(tenant_id)
            if cached is not None and self._rows is rows:
                return cached
        registry = merge(self.seed, rows, tenant_id)
        with self._lock:
            if self._rows is rows:
                if len(self._views) > 1000:  # many tenants: keep memory bounded
                    self._views = {}
                self._views[tenant_id] = registry
        return registry
