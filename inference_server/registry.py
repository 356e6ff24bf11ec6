"""The model registry: which families, models and LoRAs a deployment serves.

Pure Python (``tomllib``), no torch: the API process imports it to validate requests and to answer
``GET /v1/models``. The worker's engine reads the same object to load pipelines.

File format (TOML; paths are relative to the file)::

    [families.sd15]
    queue = "jobs.sd15"                 # optional, default "jobs.<family>"
    tasks = ["txt2img", "img2img", "inpaint"]
    limits = { min_size = 64, max_size = 1024, max_steps = 150, size_multiple = 8 }
    defaults = { width = 512, height = 512, steps = 30, guidance_scale = 7.5, strength = 0.75 }

    [[families.sd15.models]]
    id = "tiny-sd15"
    source = "sd15"                     # folder (relative to this file), hub id, or s3:// URI
    default = true                      # at most one per family; absent: the first model
    dtype = "float32"                   # float32 | float16 | bfloat16
    offload = "none"                    # none | model | sequential
    memory_gb = 0.1                     # device memory estimate; GPU workers pick families by it
    attention = "sdpa"                  # attention backend hint for GPU workers
    compile = false                     # torch.compile the denoiser on GPU
    tasks = ["txt2img", "img2img"]      # optional subset of the family's tasks this model serves
    df11 = "flux-df11"                  # optional: folder of DFloat11 weights replacing the transformer

    [[families.sd15.loras]]
    name = "tiny-style"
    source = "loras/sd15-style"         # folder or s3:// URI
    weight_name = "pytorch_lora_weights.safetensors"   # optional

Any error raises :class:`inference_server.errors.RegistryError` naming the file and the key.
"""

from __future__ import annotations

import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from inference_server.errors import InvalidRequest, RegistryError

TASKS = ("txt2img", "img2img", "inpaint", "edit")
DTYPES = ("float32", "float16", "bfloat16")
OFFLOADS = ("none", "model", "sequential")
DEFAULT_LIMITS = {"min_size": 64, "max_size": 2048, "max_steps": 150, "size_multiple": 8}


@dataclass(frozen=True)
class ModelSpec:
    """One loadable model of a family."""

    id: str
    source: str
    family: str
    default: bool = False
    dtype: str = "float32"
    offload: str = "none"
    memory_gb: float = 0.0
    attention: str = "sdpa"
    compile: bool = False
    tasks: tuple[str, ...] = ()
    df11: str | None = None

    @property
    def is_df11(self) -> bool:
        return self.df11 is not None


@dataclass(frozen=True)
class LoraSpec:
    """A LoRA registered for a family."""

    name: str
    source: str
    family: str
    weight_name: str | None = None


@dataclass
class FamilySpec:
    """A model family: one queue, its tasks, request limits and defaults, its models and LoRAs."""

    name: str
    queue: str
    tasks: list[str]
    limits: dict[str, Any]
    defaults: dict[str, Any]
    models: list[ModelSpec]
    loras: list[LoraSpec] = field(default_factory=list)

    def model(self, model_id: str | None, task: str) -> ModelSpec:
        """The model to run ``task`` with: ``model_id`` or the family's default.

        Raises InvalidRequest ``unknown_model`` or ``unsupported_task``."""
        if task not in self.tasks:
            raise InvalidRequest(
                f"family {self.name!r} does not support task {task!r} (supports {', '.join(self.tasks)})",
                code="unsupported_task",
            )
        if model_id is None:
            candidates = [m for m in self.models if task in m.tasks]
            if not candidates:
                raise InvalidRequest(f"no model of {self.name!r} serves {task!r}", code="unsupported_task")
            defaults = [m for m in candidates if m.default]
            return (defaults or candidates)[0]
        for m in self.models:
            if m.id == model_id:
                if task not in m.tasks:
                    raise InvalidRequest(
                        f"model {model_id!r} does not support task {task!r}", code="unsupported_task"
                    )
                return m
        known = ", ".join(m.id for m in self.models)
        raise InvalidRequest(
            f"unknown model {model_id!r} for family {self.name!r} (known: {known})", code="unknown_model"
        )

    def lora(self, name: str) -> LoraSpec | None:
        """The registered LoRA called ``name``, or None."""
        return next((lo for lo in self.loras if lo.name == name), None)

    @property
    def memory_gb(self) -> float:
        """The largest model's estimate: what a worker must hold to serve this family."""
        return max((m.memory_gb for m in self.models), default=0.0)


@dataclass
class Registry:
    """Every family a deployment serves, read from one TOML file."""

    path: Path | None
    families: dict[str, FamilySpec]

    def family(self, name: str) -> FamilySpec:
        """The family called ``name``; InvalidRequest ``unknown_family`` otherwise."""
        try:
            return self.families[name]
        except KeyError:
            known = ", ".join(sorted(self.families))
            raise InvalidRequest(f"unknown family {name!r} (known: {known})", code="unknown_family") from None

    def resolve_source(self, source: str) -> str:
        """A source as written, with relative folders made absolute against the registry file."""
        if "://" in source or self.path is None:
            return source
        p = Path(source).expanduser()
        if not p.is_absolute():
            p = self.path.parent / p
        if p.exists():
            return str(p.resolve())
        # Not a local folder: may be a hub id ("org/name"); left for the engine to decide.
        return source

    def catalog(self) -> dict[str, Any]:
        """The body of GET /v1/models, without ``online_workers`` (the API adds it)."""
        return {
            "families": [
                {
                    "name": f.name,
                    "tasks": list(f.tasks),
                    "defaults": dict(f.defaults),
                    "limits": dict(f.limits),
                    "models": [
                        {"id": m.id, "default": m.default, "df11": m.is_df11, "tasks": list(m.tasks)}
                        for m in f.models
                    ],
                    "loras": [{"name": lo.name} for lo in f.loras],
                }
                for f in self.families.values()
            ]
        }


def load_registry(path: Path | str) -> Registry:
    """Read and validate a registry file. Raises RegistryError naming the file and the key."""
    path = Path(path)
    try:
        data = tomllib.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise RegistryError(f"{path}: registry file not found") from None
    except (OSError, tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
        raise RegistryError(f"{path}: cannot read registry: {exc}") from exc
    return parse_registry(data, path)


def parse_registry(data: dict[str, Any], path: Path | None = None) -> Registry:
    """Validate an already-parsed registry mapping (``path`` is used in messages and for relative sources)."""
    where = str(path) if path is not None else "<registry>"

    def fail(key: str, msg: str) -> RegistryError:
        return RegistryError(f"{where}: {key}: {msg}")

    families_raw = data.get("families")
    if not isinstance(families_raw, dict) or not families_raw:
        raise fail("families", "missing or empty table")
    families: dict[str, FamilySpec] = {}
    for name, raw in families_raw.items():
        families[name] = _parse_family(name, raw, fail)
    return Registry(path=path.resolve() if path is not None else None, families=families)


def _parse_family(name: str, raw: Any, fail: Any) -> FamilySpec:
    key = f"families.{name}"
    if not isinstance(raw, dict):
        raise fail(key, "must be a table")
    unknown = set(raw) - {"queue", "tasks", "limits", "defaults", "models", "loras"}
    if unknown:
        raise fail(f"{key}.{sorted(unknown)[0]}", "unknown key")
    tasks = raw.get("tasks")
    if not isinstance(tasks, list) or not tasks:
        raise fail(f"{key}.tasks", "must be a non-empty list")
    for t in tasks:
        if t not in TASKS:
            raise fail(f"{key}.tasks", f"unknown task {t!r} (expected one of {', '.join(TASKS)})")
    queue = raw.get("queue", f"jobs.{name}")
    if not isinstance(queue, str) or not queue:
        raise fail(f"{key}.queue", "must be a non-empty string")
    limits = {**DEFAULT_LIMITS, **_table(raw.get("limits", {}), f"{key}.limits", fail)}
    for k, v in limits.items():
        if not isinstance(v, int) or isinstance(v, bool) or v <= 0:
            raise fail(f"{key}.limits.{k}", "must be a positive integer")
    defaults = _table(raw.get("defaults", {}), f"{key}.defaults", fail)
    models_raw = raw.get("models")
    if not isinstance(models_raw, list) or not models_raw:
        raise fail(f"{key}.models", "must list at least one model ([[families.<name>.models]])")
    models = [_parse_model(name, i, m, tasks, fail) for i, m in enumerate(models_raw)]
    ids = [m.id for m in models]
    if len(set(ids)) != len(ids):
        raise fail(f"{key}.models", "duplicate model id")
    if sum(m.default for m in models) > 1:
        raise fail(f"{key}.models", "more than one model has default = true")
    if not any(m.default for m in models):
        models[0] = _replace_default(models[0])
    loras_raw = raw.get("loras", [])
    if not isinstance(loras_raw, list):
        raise fail(f"{key}.loras", "must be an array of tables")
    loras = [_parse_lora(name, i, lo, fail) for i, lo in enumerate(loras_raw)]
    return FamilySpec(name, queue, list(tasks), limits, defaults, models, loras)


def _table(value: Any, key: str, fail: Any) -> dict[str, Any]:
    if not isinstance(value, dict):
        raise fail(key, "must be a table")
    return dict(value)


def _parse_model(family: str, i: int, raw: Any, family_tasks: list[str], fail: Any) -> ModelSpec:
    key = f"families.{family}.models[{i}]"
    if not isinstance(raw, dict):
        raise fail(key, "must be a table")
    allowed = {
        "id",
        "source",
        "default",
        "dtype",
        "offload",
        "memory_gb",
        "attention",
        "compile",
        "tasks",
        "df11",
    }
    unknown = set(raw) - allowed
    if unknown:
        raise fail(f"{key}.{sorted(unknown)[0]}", "unknown key")
    for req in ("id", "source"):
        if not isinstance(raw.get(req), str) or not raw[req]:
            raise fail(f"{key}.{req}", "required string")
    dtype = raw.get("dtype", "float32")
    if dtype not in DTYPES:
        raise fail(f"{key}.dtype", f"{dtype!r} is not one of {', '.join(DTYPES)}")
    offload = raw.get("offload", "none")
    if offload not in OFFLOADS:
        raise fail(f"{key}.offload", f"{offload!r} is not one of {', '.join(OFFLOADS)}")
    tasks = raw.get("tasks", family_tasks)
    if not isinstance(tasks, list) or any(t not in family_tasks for t in tasks):
        raise fail(f"{key}.tasks", "must be a list of the family's tasks")
    df11 = raw.get("df11")
    if df11 is not None and (not isinstance(df11, str) or not df11):
        raise fail(f"{key}.df11", "must be a folder path")
    memory = raw.get("memory_gb", 0.0)
    if not isinstance(memory, int | float) or isinstance(memory, bool) or memory < 0:
        raise fail(f"{key}.memory_gb", "must be a non-negative number")
    for b in ("default", "compile"):
        if not isinstance(raw.get(b, False), bool):
            raise fail(f"{key}.{b}", "must be true or false")
    return ModelSpec(
        id=raw["id"],
        source=raw["source"],
        family=family,
        default=raw.get("default", False),
        dtype=dtype,
        offload=offload,
        memory_gb=float(memory),
        attention=str(raw.get("attention", "sdpa")),
        compile=raw.get("compile", False),
        tasks=tuple(tasks),
        df11=df11,
    )


def _replace_default(m: ModelSpec) -> ModelSpec:
    from dataclasses import replace

    return replace(m, default=True)


def _parse_lora(family: str, i: int, raw: Any, fail: Any) -> LoraSpec:
    key = f"families.{family}.loras[{i}]"
    if not isinstance(raw, dict):
        raise fail(key, "must be a table")
    unknown = set(raw) - {"name", "source", "weight_name"}
    if unknown:
        raise fail(f"{key}.{sorted(unknown)[0]}", "unknown key")
    for req in ("name", "source"):
        if not isinstance(raw.get(req), str) or not raw[req]:
            raise fail(f"{key}.{req}", "required string")
    return LoraSpec(name=raw["name"], source=raw["source"], family=family, weight_name=raw.get("weight_name"))
