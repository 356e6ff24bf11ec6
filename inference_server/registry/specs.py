"""The registry's tables as pydantic models: each field says what the file may hold, so parsing
is validation. Names are bound after parsing: a family is its key in ``[families]``, and its
models and LoRAs belong to it."""

from __future__ import annotations

from typing import Annotated, Literal, get_args

from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Field,
    PrivateAttr,
    StrictBool,
    StrictFloat,
    StrictInt,
    StrictStr,
    model_validator,
    with_config,
)
from typing_extensions import TypedDict

from inference_server.errors import InvalidRequest
from inference_server.jobs.enums import Task
from inference_server.jobs.spec import StrengthSteps
from inference_server.registry.composition import ControlNetEntry, IpAdapterEntry, RouteRule
from inference_server.registry.messages import key_error, rule_error

Dtype = Literal["float32", "float16", "bfloat16"]
Offload = Literal["none", "model", "sequential"]
TASKS = tuple(t.value for t in Task)  # the job vocabulary's tasks (jobs.enums), one spelling
DTYPES, OFFLOADS = get_args(Dtype), get_args(Offload)
QUEUE_MAX_LENGTH = 128  # the outbox's queue column

Text = Annotated[StrictStr, Field(min_length=1)]
Positive = Annotated[StrictInt, Field(gt=0)]
WaitMs = Annotated[StrictInt, Field(ge=0, le=10_000)]
MAX_BATCH_LIMIT = 64  # images in one pipeline call; far beyond what pays on any device measured


def _name_rule(what: str, extra: str, limit: int) -> AfterValidator:
    """Names that travel into queue names, URLs and a worker's comma-separated ``--queues``."""

    def check(name: str) -> str:
        ok = 0 < len(name) <= limit and name[0].isascii() and name[0].isalnum()
        if not ok or any(not (c.isascii() and (c.isalnum() or c in extra)) for c in name):
            allowed = ", ".join(repr(c) for c in extra)
            raise rule_error(
                "{name} cannot name a {what}: letters, digits and {allowed}, starting with a letter or "
                "digit, at most {limit} characters",
                name=repr(name),
                what=what,
                allowed=allowed,
                limit=limit,
            )
        if what == "queue" and name.startswith("amq."):
            raise rule_error("{name} cannot name a queue: 'amq.' names are RabbitMQ's own", name=repr(name))
        return name

    return AfterValidator(check)


FamilyName = Annotated[StrictStr, _name_rule("family", "._-", 64)]
QueueName = Annotated[StrictStr, _name_rule("queue", "._:-", QUEUE_MAX_LENGTH)]


@with_config(ConfigDict(extra="forbid"))
class Limits(TypedDict, total=False):
    """What a request to the family may ask for (a plain dict once parsed)."""

    min_size: Positive
    max_size: Positive
    max_steps: Positive
    size_multiple: Positive


DEFAULT_LIMITS = Limits(min_size=64, max_size=2048, max_steps=150, size_multiple=8)


@with_config(ConfigDict(extra="forbid"))
class Defaults(TypedDict, total=False):
    """Request values used when a request leaves them out (a plain dict once parsed)."""

    width: Positive
    height: Positive
    steps: Positive
    guidance_scale: Annotated[StrictFloat, Field(ge=0)]
    strength: Annotated[StrictFloat, Field(ge=0, le=1)]


class _Entry(BaseModel):
    """A model or LoRA: immutable once parsed, so the engine can share it freely."""

    model_config = ConfigDict(extra="forbid", frozen=True)


class ModelSpec(_Entry):
    """One loadable model of a family."""

    id: Text
    source: Text
    default: StrictBool = False
    dtype: Dtype = "float32"
    offload: Offload = "none"
    memory_gb: Annotated[StrictFloat, Field(ge=0)] = 0.0
    attention: Text = "sdpa"
    compile: StrictBool = False
    tasks: Annotated[tuple[Task, ...], Field(min_length=1)] = ()  # left out: the family's tasks
    df11: Text | None = None
    # Cross-request batching; left out: the family's (see BatchPolicy).
    max_batch: Annotated[StrictInt, Field(ge=1, le=MAX_BATCH_LIMIT)] | None = None
    batch_wait_ms: WaitMs | None = None
    batch_max_pixels: Positive | None = None
    # Per-model request defaults and limits, over the family's (a runtime model may set them).
    defaults: Defaults | None = None
    limits: Limits | None = None
    _family: str = PrivateAttr("")

    @property
    def family(self) -> str:
        return self._family

    @property
    def is_df11(self) -> bool:
        return self.df11 is not None


class LoraSpec(_Entry):
    """A LoRA registered for a family."""

    name: Text
    source: Text
    weight_name: Text | None = None
    _family: str = PrivateAttr("")

    @property
    def family(self) -> str:
        return self._family


class BatchPolicy(BaseModel):
    """How a model's queued jobs may share one pipeline call (cross-request batching).

    ``max_batch`` counts images, not jobs (a job of ``num_images`` 2 takes two places): device
    memory and time grow with the images of the call. ``batch_max_pixels`` bounds one image's
    width x height: above it a job always runs alone, because batching pays at small sizes and
    not at large ones (a batch of 4 gained 2.9x at 64x64 and 1.1x at 512x512 on the CPU, nothing at
    1024 px on an H200), and it caps a batch's memory at ``max_batch x batch_max_pixels``.
    ``batch_wait_ms``: how long a worker holding a job waits for compatible jobs to fill the batch;
    a lone job waits no longer than this."""

    model_config = ConfigDict(frozen=True)

    max_batch: int = 1
    batch_wait_ms: int = 10
    batch_max_pixels: int = 512 * 512

    @property
    def enabled(self) -> bool:
        return self.max_batch > 1

    def admits(self, width: int | None, height: int | None, images: int) -> bool:
        """Whether a job of this size may join a batch."""
        if not self.enabled or not width or not height or images >= self.max_batch:
            return False
        return width * height <= self.batch_max_pixels


class FamilySpec(BaseModel):
    """A model family: one queue, its tasks, request limits and defaults, its models and LoRAs."""

    model_config = ConfigDict(extra="forbid")

    queue_setting: QueueName | None = Field(None, alias="queue")
    tasks: Annotated[list[Task], Field(min_length=1)]
    limits: Limits = Field(default_factory=lambda: Limits())
    defaults: Defaults = Field(default_factory=lambda: Defaults())
    max_batch: Annotated[StrictInt, Field(ge=1, le=MAX_BATCH_LIMIT)] = 1
    batch_wait_ms: WaitMs = 10
    batch_max_pixels: Positive = 512 * 512
    models: Annotated[list[ModelSpec], Field(min_length=1)]
    loras: list[LoraSpec] = Field(default_factory=list)
    # Composition (registry/composition.py): ControlNets, IP-Adapters, task "auto" rules, and the
    # safety checker (a name of the file's [safety_checkers]) of its `safety: flag|block` jobs.
    controlnets: list[ControlNetEntry] = Field(default_factory=list)
    ip_adapters: list[IpAdapterEntry] = Field(default_factory=list)
    routes: list[RouteRule] = Field(default_factory=list)
    safety_checker: Text | None = None
    # How the family's img2img and inpaint pipelines turn steps x strength into steps (see
    # JobSpec.planned_steps): "floor" for SD and SDXL, "ceil" for FLUX and flow-matching ones.
    strength_steps: StrengthSteps = "floor"
    _name: str = PrivateAttr("")

    @property
    def name(self) -> str:
        return self._name

    @property
    def queue(self) -> str:
        """The broker queue of this family's jobs: what the relay publishes to and workers consume."""
        return self.queue_setting or f"jobs.{self._name}"

    @model_validator(mode="after")
    def _complete(self) -> FamilySpec:
        self.limits = {**DEFAULT_LIMITS, **self.limits}
        seen: set[str] = set()
        for i, m in enumerate(self.models):
            if m.id in seen:
                raise key_error(f"models[{i}].id", f"duplicate model id {m.id!r}")
            seen.add(m.id)
            outside = [t for t in m.tasks if t not in self.tasks]
            if outside:
                raise key_error(f"models[{i}].tasks", f"{str(outside[0])!r} is not a task of the family")
        for table, names in (
            ("controlnets", [c.name for c in self.controlnets]),
            ("ip_adapters", [a.name for a in self.ip_adapters]),
        ):
            for i, name in enumerate(names):
                if name in names[:i]:
                    raise key_error(f"{table}[{i}].name", f"duplicate name {name!r}")
        controlnets = {c.name for c in self.controlnets}
        for i, rule in enumerate(self.routes):
            if rule.controlnet not in controlnets:
                raise key_error(
                    f"routes[{i}].controlnet", f"{rule.controlnet!r} is not a ControlNet of the family"
                )
        defaults = [i for i, m in enumerate(self.models) if m.default]
        if len(defaults) > 1:
            raise key_error(f"models[{defaults[1]}].default", "more than one model has default = true")
        completed = []
        for i, m in enumerate(self.models):
            update: dict[str, object] = {"tasks": m.tasks or tuple(self.tasks)}
            if i == 0 and not defaults:
                update["default"] = True  # no model says default = true: the first one is
            completed.append(m.model_copy(update=update))
        self.models = completed
        return self

    def bind(self, name: str) -> None:
        """Name this family (its key in the file) and claim its models and LoRAs."""
        self._name = name
        for model in self.models:
            model._family = name
        for lora in self.loras:
            lora._family = name

    def model(self, model_id: str | None, task: str) -> ModelSpec:
        """The model to run ``task`` with: ``model_id`` or the family's default.

        Raises InvalidRequest ``unknown_model`` or ``unsupported_task``."""
        task = str(task)  # a Task's value: messages quote the word, never the enum's repr
        if task not in self.tasks:
            supported = ", ".join(map(str, self.tasks))
            raise InvalidRequest(
                f"family {self.name!r} does not support task {task!r} (supports {supported})",
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

    def batching(self, model_id: str) -> BatchPolicy:
        """The batching policy of model ``model_id``: its own settings over the family's."""
        model = next((m for m in self.models if m.id == model_id), None)

        def pick(name: str) -> int:
            own = getattr(model, name, None) if model is not None else None
            return int(own if own is not None else getattr(self, name))

        return BatchPolicy(
            max_batch=pick("max_batch"),
            batch_wait_ms=pick("batch_wait_ms"),
            batch_max_pixels=pick("batch_max_pixels"),
        )

    def controlnet(self, name: str) -> ControlNetEntry | None:
        """The registered ControlNet called ``name``, or None."""
        return next((c for c in self.controlnets if c.name == name), None)

    def ip_adapter(self, name: str) -> IpAdapterEntry | None:
        """The registered IP-Adapter called ``name``, or None."""
        return next((a for a in self.ip_adapters if a.name == name), None)

    def lora(self, name: str) -> LoraSpec | None:
        """The registered LoRA called ``name``, or None."""
        return next((lo for lo in self.loras if lo.name == name), None)

    @property
    def memory_gb(self) -> float:
        """The largest model's estimate: what a worker must hold to serve this family."""
        return max((m.memory_gb for m in self.models), default=0.0)
