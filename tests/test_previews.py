"""Previews: the latent-to-RGB projection per family, and a tiny-model job asking for a preview
every step through the real system (stored, served, announced as job.preview, changing as it runs)."""

from __future__ import annotations

import io
import json

import pytest
import torch
from PIL import Image

from tests.support import jobs

BODY = {"family": "sd15", "prompt": "a harbour", "width": 128, "height": 128, "steps": 40, "seed": 9}


@pytest.mark.parametrize(
    ("pipeline", "latents"),
    [
        ("StableDiffusionPipeline", torch.randn(2, 4, 16, 24)),  # 4 channels, (batch, c, h, w)
        ("StableDiffusionXLPipeline", torch.randn(1, 4, 16, 24)),
        ("FluxPipeline", torch.randn(1, 8 * 12, 64)),  # packed 2x2 patches of 16 channels
        ("QwenImagePipeline", torch.randn(1, 8 * 12, 64)),  # packed, unpacked to 5-D
    ],
)
def test_latent_preview_is_an_rgb_image_at_latent_size(pipeline: str, latents: torch.Tensor) -> None:
    import diffusers

    from inference_server.engine.preview import latent_preview

    cls = getattr(diffusers, pipeline)
    pipe = cls.__new__(cls)  # the projection needs the class (its unpacking) and the VAE's scale only
    pipe.vae_scale_factor = 8
    rgb = latent_preview(pipe, latents, width=192, height=128)
    assert rgb.shape == (16, 24, 3) and rgb.dtype.name == "uint8"
    assert rgb.std() > 0  # random latents: not a flat image
    assert (latent_preview(pipe, latents * 0.5, width=192, height=128) != rgb).any()


def test_a_job_with_previews_every_step(api_client, worker) -> None:  # type: ignore[no-untyped-def]
    base = api_client.base_url
    job = jobs.submit(api_client, {**BODY, "preview": {"every_steps": 1}})
    fetched: dict[str, bytes] = {}  # X-Preview-Step -> the PNG served at that moment
    previews = []
    url = f"{base}/v1/jobs/{job['id']}/events"
    with api_client.get(url, headers={"Accept": "text/event-stream"}, stream=True, timeout=60) as resp:
        for line in resp.iter_lines():
            if not line.startswith(b"data: "):
                continue
            body = json.loads(line[6:])
            if body["type"] == "job.preview":
                previews.append(body["data"]["preview"])
                served = api_client.get(body["data"]["preview"]["url"], timeout=10)  # absolute URL
                assert served.status_code == 200 and served.headers["content-type"] == "image/png"
                fetched[served.headers["X-Preview-Step"]] = served.content
            if body["type"] in ("job.succeeded", "job.failed", "job.canceled"):
                assert body["type"] == "job.succeeded", body
                break
    assert len(previews) >= 2, previews
    steps = [p["step"] for p in previews]
    assert steps == sorted(steps) and all(1 <= s <= 40 for s in steps)
    # The preview changes across steps (two late steps of a tiny model may round to the same pixels).
    assert len(fetched) >= 2 and len(set(fetched.values())) >= 2, sorted(fetched)
    for png in fetched.values():
        assert Image.open(io.BytesIO(png)).size == (16, 16)  # 128 px at the VAE's 8x: latent resolution


def test_no_preview_unless_asked_and_the_limits(api_client, worker) -> None:  # type: ignore[no-untyped-def]
    base = api_client.base_url
    job = jobs.submit(api_client, {**BODY, "steps": 2})
    jobs.wait_done(api_client, job["id"])
    resp = api_client.get(f"{base}/v1/jobs/{job['id']}/preview", timeout=10)
    assert resp.status_code == 404 and resp.json()["error"]["code"] == "preview_not_found"
    types = [
        e["type"] for e in api_client.get(f"{base}/v1/jobs/{job['id']}/events", timeout=10).json()["events"]
    ]
    assert "job.preview" not in types
    for preview, status, code in (
        ({"every_steps": 0}, 422, "validation_error"),
        ({"every_steps": 3}, 400, "invalid_preview"),  # more than the job's 2 steps
        ({"every_steps": 1, "size": 64}, 422, "validation_error"),
    ):
        resp = api_client.post(f"{base}/v1/jobs", json={**BODY, "steps": 2, "preview": preview}, timeout=10)
        assert resp.status_code == status and resp.json()["error"]["code"] == code, resp.text
