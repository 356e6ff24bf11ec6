"""The engine tests' requests: a tiny model at 64x64 for three steps, anything else set per test."""

from __future__ import annotations

from typing import Any

from inference_server.engine.runner import GenerationRequest


def tiny_request(
    family: str, task: str = "txt2img", *, seeds: list[int], model: str | None = None, **fields: Any
) -> GenerationRequest:
    values: dict[str, Any] = dict(
        family=family,
        model=model,
        task=task,
        prompt="a photo of the cat",
        negative_prompt=None,
        width=64,
        height=64,
        steps=3,
        guidance_scale=None,
        seeds=seeds,
    )
    values.update(fields)
    return GenerationRequest(**values)
