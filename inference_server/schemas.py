"""The API's answers as pydantic models: the schemas of the OpenAPI document, and types a client
can parse answers with (``JobView.model_validate(client.get(job_id))``).

The routes build their answers as plain dicts (``jobs.serialize``, ``webhooks.service``) and send
them without validating them again (the submit path is hot); these models describe those dicts,
and the schemathesis test checks every answer against them. Extra fields are allowed, so a newer
server's additions never break an older client."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from inference_server.jobs.enums import JobStatus, Task


class Answer(BaseModel):
    model_config = ConfigDict(extra="allow")


class ErrorDetail(Answer):
    code: str = Field(description="A stable code from the catalogue (docs/errors.md).")
    message: str = Field(description="What went wrong, in plain words.")


class ErrorResponse(Answer):
    """Every error answer: 4xx and 503 alike."""

    error: ErrorDetail


class Progress(Answer):
    step: int = Field(ge=0)
    total_steps: int = Field(ge=0)
    percent: float = Field(ge=0, le=100)
    eta_seconds: float | None = Field(default=None, ge=0)


class Output(Answer):
    url: str | None = Field(
        description="Absolute URL of the output (GET it with the API key); null when it was blocked."
    )
    content_type: str | None
    width: int = Field(ge=1)
    height: int = Field(ge=1)
    seed: int | None = Field(default=None, ge=0, description="Null for control images and masks.")
    sha256: str | None = Field(pattern="^[0-9a-f]{64}$")
    kind: Literal["image", "control", "mask"] = Field(
        default="image", description="A generated image, a control image after preprocessing, or the mask."
    )
    nsfw: bool | None = Field(
        default=None, description="The safety checker's verdict (`safety: flag|block`)."
    )
    nsfw_score: float | None = Field(default=None, description="The checker's score behind the verdict.")
    blocked: bool = Field(default=False, description="`safety: block` withheld it: no URL, nothing stored.")
    code: str | None = Field(default=None, description="`content_blocked` on a blocked output.")


class JobError(Answer):
    code: str
    message: str | None = None


class RouteInfo(Answer):
    task: Task = Field(description='The task `task: "auto"` chose.')
    reason: str
    controlnet: str | None = Field(default=None, description="The ControlNet a routing rule added, if any.")


class BatchInfo(Answer):
    id: str = Field(description="The pipeline call this job shared with other jobs.")
    size: int = Field(ge=2, description="Jobs in that call.")


class JobView(Answer):
    """A job, as ``GET /v1/jobs/{id}`` returns it and webhooks carry it in ``data``."""

    id: str
    status: JobStatus
    family: str
    model: str | None
    task: Task
    params: dict[str, Any] = Field(description="The request as resolved: defaults applied, inputs as URIs.")
    progress: Progress
    outputs: list[Output]
    error: JobError | None
    created_at: str | None = Field(json_schema_extra={"format": "date-time"})
    started_at: str | None = Field(json_schema_extra={"format": "date-time"})
    finished_at: str | None = Field(json_schema_extra={"format": "date-time"})
    attempts: int = Field(ge=0)
    batch: BatchInfo | None = Field(
        default=None, description="Cross-request batching: the call this job's run shared, or null (alone)."
    )
    route: RouteInfo | None = Field(default=None, description='Where `task: "auto"` sent the job, or null.')


class JobList(Answer):
    jobs: list[JobView]
    next_cursor: str | None = Field(description="Pass as `cursor` for the next page; null on the last.")


class Upload(Answer):
    uri: str = Field(description="A storage URI to pass as a job's `image` or `mask`.")
    width: int = Field(ge=1)
    height: int = Field(ge=1)
    content_type: str


class CatalogueModel(Answer):
    id: str
    default: bool
    df11: bool
    tasks: list[Task]


class CatalogueLora(Answer):
    name: str


class CatalogueControlNet(Answer):
    name: str
    preprocess: str = Field(
        description="The preprocessing its control images get unless a job says otherwise."
    )


class CatalogueIpAdapter(Answer):
    name: str


class CatalogueTools(Answer):
    """What composition jobs of the family can use besides its own ControlNets and IP-Adapters."""

    preprocessors: list[str] = Field(
        description="`preprocess` values: none, canny, and depth/pose where registered."
    )
    detector: bool = Field(description="Whether `mask_prompt` can run (an open-vocabulary detector).")
    segmenter: bool = Field(description="Whether found boxes are refined to masks by SAM.")
    safety_checker: str | None = Field(
        description="The checker of `safety: flag|block`, or null (safety off only)."
    )


class CatalogueFamily(Answer):
    name: str
    tasks: list[Task]
    defaults: dict[str, Any]
    limits: dict[str, int] = Field(description="min_size, max_size, max_steps, size_multiple.")
    online_workers: int | None = Field(default=None, description="Consumers of its queue; null: unknown.")
    models: list[CatalogueModel]
    loras: list[CatalogueLora]
    controlnets: list[CatalogueControlNet] = Field(default_factory=list)
    ip_adapters: list[CatalogueIpAdapter] = Field(default_factory=list)
    tools: CatalogueTools | None = None


class Catalogue(Answer):
    """``GET /v1/models``: the families this deployment serves."""

    families: list[CatalogueFamily]


class DeliveryAttempt(Answer):
    number: int
    started_at: str | None
    duration_ms: int | None
    status_code: int | None
    error: str | None


class Delivery(Answer):
    id: str
    event_id: str
    event_type: str
    url: str
    status: str
    attempts: int
    last_status_code: int | None
    last_error: str | None
    next_attempt_at: str | None
    created_at: str | None
    delivered_at: str | None
    attempt_log: list[DeliveryAttempt]


class JobDeliveries(Answer):
    job_id: str
    deliveries: list[Delivery]


class Health(Answer):
    status: str


class Readiness(Answer):
    status: str
    checks: dict[str, bool]


class JobEventItem(Answer):
    """One stored event of a job: its sequence number (the SSE ``id``) and the webhook body."""

    seq: int = Field(description="The event's sequence number: resume after it with Last-Event-ID.")
    id: str = Field(description="The event's webhook-id.")
    type: str
    timestamp: str
    data: dict[str, Any] = Field(description="The job as the event saw it.")


class JobEventPage(Answer):
    events: list[JobEventItem]
    next_after: int | None = Field(description="Pass as `after` for the next page; null on the last.")
