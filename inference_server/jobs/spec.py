"""The job contract: ``JobRequest`` is the body of ``POST /v1/jobs`` (shapes and static bounds);
``JobSpec`` is that request resolved against the registry (model id, defaults, seeds, inputs moved
to storage). The API stores the JobSpec; the worker reads it back and validates it again, so the
same types cross the queue and nothing is coerced by hand on either side."""

from __future__ import annotations

import math
from typing import Annotated, Any, Literal

from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, field_validator, model_validator

from inference_server.jobs.enums import EventType, Priority, Task

MAX_SEED = 2**32 - 1
MAX_IMAGES = 4


def _finite(value: Any) -> Any:
    """NaN compares false with every bound, so pydantic would report it as out of range."""
    if isinstance(value, bool) or not isinstance(value, str | int | float):
        return value
    try:
        number = float(value)
    except ValueError:
        return value  # not a number at all: pydantic says so
    if not math.isfinite(number):
        raise ValueError("NaN and infinity are not numbers: send a finite number")
    return value


Finite = BeforeValidator(_finite)


DEFAULT_STRENGTH = 0.75  # img2img and inpaint without a strength (engine and plan alike)
StrengthSteps = Literal["floor", "ceil"]  # how a family's pipelines round steps x strength


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class LoraSpec(Strict):
    name: str = Field(min_length=1, max_length=500)
    scale: Annotated[float, Finite] = Field(default=1.0, ge=-4.0, le=4.0)


class SignatureSpec(Strict):
    image: str = Field(min_length=1)
    position: Literal["bottom-left", "bottom-center", "bottom-right"] = "bottom-right"
    opacity: Annotated[float, Finite] = Field(default=1.0, ge=0.0, le=1.0)
    size: Literal["small", "medium", "large"] = "small"


MetadataKey = Annotated[str, Field(min_length=1, max_length=64)]
MetadataValue = Annotated[str, Field(max_length=2000)]


class OutputSpec(Strict):
    format: Literal["png", "jpeg", "webp"] = "png"
    quality: int = Field(default=90, ge=1, le=100)
    # The bounds are the Field's, so the OpenAPI document states exactly what is refused.
    metadata: dict[MetadataKey, MetadataValue] = Field(default_factory=dict, max_length=32)


class WebhookSpec(Strict):
    url: str = Field(min_length=1, max_length=2048)
    # Full names (``job.succeeded``) or the shorthand the dispatcher also accepts (``succeeded``).
    events: list[EventType] | None = None
    # The shape of the deliveries (None: the tenant's default, else standard). ``split``: progress as
    # PATCH {url}/progress, success as POST {url}/complete, failure as POST {url}/failed.
    profile: Literal["standard", "split"] | None = None

    @field_validator("events", mode="before")
    @classmethod
    def _names(cls, value: Any) -> Any:
        if not isinstance(value, list):
            return value
        known = ", ".join(e.value for e in EventType)
        parsed = []
        for name in value:
            try:
                parsed.append(EventType.parse(name) if isinstance(name, str) else name)
            except ValueError:
                raise ValueError(f"unknown event {name!r} (known: {known})") from None
        return parsed


INPUT = "An image: a `data:` URI, an `https://` URL, or the `uri` of `POST /v1/uploads`."


class PreviewSpec(Strict):
    """Live previews: every ``every_steps`` denoising steps the worker projects the latents to a
    small RGB image (no VAE), stores it as the job's latest preview and emits ``job.preview``."""

    every_steps: int = Field(ge=1, le=150)


Preprocess = Literal["none", "canny", "depth", "pose"]
Safety = Literal["off", "flag", "block"]
MAX_CONTROLNETS = 3


class ControlNetRequest(Strict):
    """One ControlNet of a job: a registered name, its control image and how strongly and over
    which part of the denoising (``start``..``end``, fractions of the steps) it steers."""

    name: str = Field(
        min_length=1, max_length=200, description="A ControlNet of the family (GET /v1/models)."
    )
    image: str | None = Field(default=None, description=INPUT + " Left out: the job's `image`.")
    scale: Annotated[float, Finite] = Field(default=1.0, ge=0.0, le=2.0)
    # Left out: what the ControlNet is registered with (the kind of image it was trained on).
    preprocess: Preprocess | None = None
    start: Annotated[float, Finite] = Field(default=0.0, ge=0.0, le=1.0)
    end: Annotated[float, Finite] = Field(default=1.0, ge=0.0, le=1.0)

    @model_validator(mode="after")
    def _window(self) -> ControlNetRequest:
        if self.start >= self.end:
            raise ValueError(f"start ({self.start}) must be before end ({self.end})")
        return self


class IpAdapterRequest(Strict):
    """A reference image steering the job through a registered IP-Adapter."""

    name: str = Field(
        min_length=1, max_length=200, description="An IP-Adapter of the family (GET /v1/models)."
    )
    image: str = Field(min_length=1, description=INPUT)
    scale: Annotated[float, Finite] = Field(default=1.0, ge=0.0, le=2.0)


class Route(Strict):
    """Where ``task: "auto"`` sent the job, and why."""

    task: Task
    reason: str
    controlnet: str | None = None  # a routing rule's ControlNet, added to the job


class JobRequest(Strict):
    family: str = Field(min_length=1, max_length=64, description="A family of GET /v1/models.")
    model: str | None = Field(default=None, max_length=200)
    # "auto": chosen from the request (jobs/routing.py); the job records the route and its reason.
    task: Task | Literal["auto"] = Task.TXT2IMG
    prompt: str = Field(default="", max_length=2000)
    negative_prompt: str | None = Field(default=None, max_length=2000)
    # Static bounds; each family's own limits (GET /v1/models) are checked against the registry.
    width: int | None = Field(default=None, ge=8, le=8192, multiple_of=8)
    height: int | None = Field(default=None, ge=8, le=8192, multiple_of=8)
    steps: int | None = Field(default=None, ge=1, le=150)
    guidance_scale: Annotated[float | None, Finite] = Field(default=None, ge=0.0, le=30.0)
    seed: int | None = Field(default=None, ge=-1, le=MAX_SEED)
    num_images: int = Field(default=1, ge=1, le=MAX_IMAGES)
    strength: Annotated[float | None, Finite] = Field(default=None, gt=0.0, le=1.0)
    image: str | None = Field(default=None, description=INPUT)
    mask: str | None = Field(default=None, description=INPUT)
    loras: list[LoraSpec] = Field(default_factory=list, max_length=8)
    signature: SignatureSpec | None = None
    output: OutputSpec = Field(default_factory=OutputSpec)
    webhook: WebhookSpec | None = None
    preview: PreviewSpec | None = None  # off unless asked
    # Composition (docs/composition.md).
    controlnets: list[ControlNetRequest] = Field(default_factory=list, max_length=MAX_CONTROLNETS)
    ip_adapter: IpAdapterRequest | None = None
    mask_prompt: str | None = Field(
        default=None,
        min_length=1,
        max_length=500,
        description="Inpaint what these words name (a detector finds it).",
    )
    mask_grow: int = Field(default=0, ge=0, le=256, description="Pixels to dilate the mask by.")
    mask_blur: int = Field(
        default=0, ge=0, le=64, description="Radius of the feathering blur of the mask's edge."
    )
    mask_threshold: Annotated[float | None, Finite] = Field(
        default=None,
        ge=0.0,
        le=1.0,
        description="The detector's score a box needs; left out: the registry's.",
    )
    return_control: bool = Field(
        default=False, description="Also return each control image after preprocessing."
    )
    return_mask: bool = Field(default=False, description="Also return the mask inpainted.")
    safety: Safety | None = Field(default=None, description="Left out: the tenant's default.")
    # Scheduling, not running: stored on the job row, not in its JobSpec; capped per tenant.
    priority: Priority = Priority.NORMAL


class JobSpec(Strict):
    """A job as it runs: every default applied, one seed per image, inputs as storage URIs or
    https URLs. ``width`` and ``height`` are absent only for an edit sized by its input image."""

    family: str
    model: str
    task: Task
    prompt: str = ""
    negative_prompt: str | None = None
    width: int | None = None
    height: int | None = None
    steps: int = Field(ge=1)
    guidance_scale: float | None = None
    # A client's seed may be MAX_SEED itself; its later images take the seeds after it.
    seeds: list[Annotated[int, Field(ge=0, le=MAX_SEED + MAX_IMAGES)]] = Field(
        min_length=1, max_length=MAX_IMAGES
    )
    strength: float | None = Field(default=None, gt=0.0, le=1.0)
    image: str | None = None
    mask: str | None = None
    loras: list[LoraSpec] = Field(default_factory=list)
    signature: SignatureSpec | None = None
    output: OutputSpec = Field(default_factory=OutputSpec)
    preview: PreviewSpec | None = None
    controlnets: list[ControlNetRequest] = Field(default_factory=list)
    ip_adapter: IpAdapterRequest | None = None
    mask_prompt: str | None = None
    mask_grow: int = 0
    mask_blur: int = 0
    mask_threshold: float | None = None
    return_control: bool = False
    return_mask: bool = False
    safety: Safety = "off"
    route: Route | None = None

    @property
    def composed(self) -> bool:
        """Whether the job runs through ControlNets, an IP-Adapter or a mask from words: such a
        job always runs alone (their inputs are per call, not per image)."""
        return bool(self.controlnets or self.ip_adapter or self.mask_prompt)

    @model_validator(mode="before")
    @classmethod
    def _stored_before_seed_lists(cls, data: Any) -> Any:
        """Jobs stored by an earlier release keep ``seed`` and ``num_images``: still runnable."""
        if isinstance(data, dict) and "seeds" not in data and "seed" in data:
            data = dict(data)
            first, count = int(data.pop("seed")), int(data.pop("num_images", 1))
            data["seeds"] = [first + i for i in range(count)]
        return data

    def planned_steps(self, rounding: StrengthSteps = "floor") -> int:
        """Denoising steps the job runs: its images share one loop, so the count does not grow with
        them; img2img and inpaint run ``steps * strength``, rounded as the family's pipelines do
        (``rounding``: the registry's ``strength_steps``). Mirrors diffusers' ``get_timesteps``:
        SD and SDXL keep ``int(steps * strength)``, FLUX and the other flow-matching pipelines
        ``steps - int(steps - steps * strength)``."""
        if not self.task.has_strength:
            return self.steps
        strength = self.strength if self.strength is not None else DEFAULT_STRENGTH
        if rounding == "ceil":
            runs = self.steps - int(max(self.steps - min(self.steps * strength, self.steps), 0))
        else:
            runs = min(int(self.steps * strength), self.steps)
        return max(1, runs)

    def stored(self) -> dict[str, Any]:
        """The form kept in ``jobs.params`` (JSON): composition fields only where a job sets them."""
        data = self.model_dump(mode="json", exclude_none=True)
        for key, default in _UNSET_COMPOSITION.items():
            if data.get(key) == default:
                del data[key]
        return data


_UNSET_COMPOSITION: dict[str, Any] = {
    "controlnets": [],
    "mask_grow": 0,
    "mask_blur": 0,
    "return_control": False,
    "return_mask": False,
    "safety": "off",
}


def public_params(stored: dict[str, Any]) -> dict[str, Any]:
    """A stored spec as ``GET /v1/jobs/{id}`` shows it: ``seed`` and ``num_images`` as the client
    wrote them (the first seed; the rest follow it), inputs as the URIs they became."""
    view = {k: v for k, v in stored.items() if k != "seeds"}
    seeds = stored.get("seeds")
    if seeds:
        view["seed"], view["num_images"] = seeds[0], len(seeds)
    return view
