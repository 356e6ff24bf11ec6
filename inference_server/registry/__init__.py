"""The model registry: which families, models and LoRAs a deployment serves.

Pure Python (``tomllib`` and pydantic), no torch: the API process imports it to validate requests
and to answer ``GET /v1/models``. The worker's engine reads the same object to load pipelines.

File format (TOML; paths are relative to the file)::

    [families.sd15]
    queue = "jobs.sd15"                 # optional, default "jobs.<family>"; one family per queue
    tasks = ["txt2img", "img2img", "inpaint"]
    limits = { min_size = 64, max_size = 1024, max_steps = 150, size_multiple = 8 }
    defaults = { width = 512, height = 512, steps = 30, guidance_scale = 7.5, strength = 0.75 }
    strength_steps = "floor"            # steps x strength rounded: floor (SD, SDXL) | ceil (FLUX)
    max_batch = 4                       # images per pipeline call from queued jobs (1: no batching)
    batch_wait_ms = 10                  # how long a worker waits for compatible jobs to fill a batch
    batch_max_pixels = 262144           # width x height above which a job always runs alone

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
    max_batch = 2                       # optional: batching settings of this model over the family's

    [[families.sd15.loras]]
    name = "tiny-style"
    source = "loras/sd15-style"         # folder or s3:// URI
    weight_name = "pytorch_lora_weights.safetensors"   # optional

Family names are letters, digits, ``.``, ``_`` and ``-``; queue names may also hold ``:``. Limits
left out take ``DEFAULT_LIMITS``; defaults left out are the request's own or the pipeline's. The
tables are pydantic models (:mod:`inference_server.registry.specs`): parsing is validation.

Any error raises :class:`inference_server.errors.RegistryError` naming the file and the key path,
one line per problem: ``models.toml: families.sd15.models[0].dtype: must be one of ... (got 'int8')``.
"""

from __future__ import annotations

import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from inference_server.errors import InvalidRequest, RegistryError
from inference_server.registry.composition import DetectorEntry, Tools, ToolSource
from inference_server.registry.messages import describe, key_error
from inference_server.registry.specs import (
    DEFAULT_LIMITS,
    DTYPES,
    OFFLOADS,
    TASKS,
    BatchPolicy,
    Defaults,
    FamilyName,
    FamilySpec,
    Limits,
    LoraSpec,
    ModelSpec,
)

__all__ = [
    "BatchPolicy",
    "DEFAULT_LIMITS",
    "DTYPES",
    "OFFLOADS",
    "TASKS",
    "Defaults",
    "FamilySpec",
    "Limits",
    "LoraSpec",
    "ModelSpec",
    "Registry",
    "load_registry",
    "parse_registry",
]


@dataclass
class Registry:
    """Every family a deployment serves, read from one TOML file."""

    path: Path | None
    families: dict[str, FamilySpec]
    tools: Tools = field(default_factory=Tools)  # preprocessors, detector, safety checkers

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
                    "controlnets": [{"name": c.name, "preprocess": c.preprocess} for c in f.controlnets],
                    "ip_adapters": [{"name": a.name} for a in f.ip_adapters],
                    "tools": {
                        "preprocessors": self.tools.preprocess_kinds(),
                        "detector": self.tools.detector is not None,
                        "segmenter": bool(self.tools.detector and self.tools.detector.segmenter),
                        "safety_checker": f.safety_checker,
                    },
                }
                for f in self.families.values()
            ]
        }


class _RegistryFile(BaseModel):
    """The whole file: at least one family, each on a queue of its own."""

    model_config = ConfigDict(extra="forbid")

    families: dict[FamilyName, FamilySpec] = Field(min_length=1)
    preprocessors: dict[Literal["depth", "pose"], ToolSource] = Field(default_factory=dict)
    detector: DetectorEntry | None = None
    safety_checkers: dict[str, ToolSource] = Field(default_factory=dict)

    @model_validator(mode="after")
    def _bind_names(self) -> _RegistryFile:
        owners: dict[str, str] = {}
        for name, family in self.families.items():
            family.bind(name)
            if family.safety_checker is not None and family.safety_checker not in self.safety_checkers:
                raise key_error(
                    f"families.{name}.safety_checker",
                    f"{family.safety_checker!r} is not in [safety_checkers]",
                )
            if family.queue in owners:
                # A worker consumes whole queues: two families on one would send a job to a worker
                # chosen for the other family's models and memory.
                raise key_error(
                    f"families.{name}.queue",
                    f"{family.queue!r} is already the queue of family {owners[family.queue]!r}; "
                    "each family needs a queue of its own",
                )
            owners[family.queue] = name
        return self


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
    try:
        parsed = _RegistryFile.model_validate(data)
    except ValidationError as exc:
        raise RegistryError("\n".join(f"{where}: {line}" for line in describe(exc))) from None
    tools = Tools(
        preprocessors=parsed.preprocessors, detector=parsed.detector, safety_checkers=parsed.safety_checkers
    )
    return Registry(path=path.resolve() if path is not None else None, families=parsed.families, tools=tools)
