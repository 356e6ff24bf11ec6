"""The submit body of ``POST /v1/jobs``: shapes and static bounds. Family limits are checked in
``jobs.service`` against the model registry."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

Task = Literal["txt2img", "img2img", "inpaint", "edit"]
EVENT_NAMES = ("job.queued", "job.started", "job.progress", "job.succeeded", "job.failed", "job.canceled")
MAX_SEED = 2**32 - 1


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class LoraSpec(Strict):
    name: str = Field(min_length=1, max_length=500)
    scale: float = Field(default=1.0, ge=-4.0, le=4.0)


class SignatureSpec(Strict):
    image: str = Field(min_length=1)
    position: Literal["bottom-left", "bottom-center", "bottom-right"] = "bottom-right"
    opacity: float = Field(default=1.0, ge=0.0, le=1.0)
    size: Literal["small", "medium", "large"] = "small"


class OutputSpec(Strict):
    format: Literal["png", "jpeg", "webp"] = "png"
    quality: int = Field(default=90, ge=1, le=100)
    metadata: dict[str, str] = Field(default_factory=dict)

    @field_validator("metadata")
    @classmethod
    def _bounded(cls, value: dict[str, str]) -> dict[str, str]:
        if len(value) > 32:
            raise ValueError("at most 32 metadata keys")
        for key, val in value.items():
            if not key or len(key) > 64 or len(val) > 2000:
                raise ValueError("metadata keys are 1-64 characters and values at most 2000")
        return value


class WebhookSpec(Strict):
    url: str = Field(min_length=1, max_length=2048)
    events: list[Literal[EVENT_NAMES]] | None = None  # type: ignore[valid-type]


class JobRequest(Strict):
    family: str = Field(min_length=1, max_length=64)
    model: str | None = Field(default=None, max_length=200)
    task: Task = "txt2img"
    prompt: str = Field(default="", max_length=2000)
    negative_prompt: str | None = Field(default=None, max_length=2000)
    width: int | None = Field(default=None, ge=8, le=8192)
    height: int | None = Field(default=None, ge=8, le=8192)
    steps: int | None = Field(default=None, ge=1, le=150)
    guidance_scale: float | None = Field(default=None, ge=0.0, le=30.0)
    seed: int | None = Field(default=None, ge=-1, le=MAX_SEED)
    num_images: int = Field(default=1, ge=1, le=4)
    strength: float | None = Field(default=None, gt=0.0, le=1.0)
    image: str | None = None
    mask: str | None = None
    loras: list[LoraSpec] = Field(default_factory=list, max_length=8)
    signature: SignatureSpec | None = None
    output: OutputSpec = Field(default_factory=OutputSpec)
    webhook: WebhookSpec | None = None

    @field_validator("width", "height")
    @classmethod
    def _multiple_of_8(cls, value: int | None) -> int | None:
        if value is not None and value % 8:
            raise ValueError("must be a multiple of 8")
        return value
