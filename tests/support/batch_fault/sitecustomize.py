"""A fault for the batching tests, loaded by a test worker through PYTHONPATH (Python imports
``sitecustomize`` at start): a batched call with a member whose prompt holds ``[fails-in-a-batch]``
gets a prompt list one short, so the real pipeline refuses the whole call (diffusers checks the
prompts against the generators) while each member alone runs normally."""

from __future__ import annotations

from typing import Any

from inference_server.engine import batch

MARK = "[fails-in-a-batch]"
_original = batch.batch_kwargs


def _faulty(kwargs: dict[str, Any], requests: Any) -> dict[str, Any]:
    out = _original(kwargs, requests)
    if any(MARK in r.prompt for r in requests):
        out["prompt"] = out["prompt"][:-1]
    return out


batch.batch_kwargs = _faulty  # type: ignore[assignment]
