"""Every family and task, the DFloat11 twins and a LoRA, through the running system (API,
PostgreSQL, RabbitMQ, worker, S3)."""

from __future__ import annotations

import pytest
from PIL import Image

from tests.support.jobs import data_uri, output_bytes, submit, wait_done

SOURCE = Image.new("RGB", (64, 64), (40, 120, 200))
MASK = Image.new("L", (64, 64), 0)
MASK.paste(255, (16, 16, 48, 48))

CASES = [
    ("sd15", None, "txt2img"),
    ("sd15", None, "img2img"),
    ("sd15", None, "inpaint"),
    ("sd15", "tiny-sd15-inpaint", "inpaint"),
    ("sdxl", None, "txt2img"),
    ("sdxl", None, "img2img"),
    ("sdxl", None, "inpaint"),
    ("flux", None, "txt2img"),
    ("flux", None, "img2img"),
    ("flux", "tiny-flux-df11", "txt2img"),
    ("qwen-image-edit", None, "edit"),
    ("qwen-image-edit", "tiny-qwen-image-edit-df11", "edit"),
]


def body(family: str, model: str | None, task: str, **extra: object) -> dict:
    b: dict = {
        "family": family,
        "task": task,
        "prompt": "make it a watercolour",
        "width": 64,
        "height": 64,
        "steps": 4,
        "seed": 21,
        **extra,
    }
    if model:
        b["model"] = model
    if task in ("img2img", "inpaint", "edit"):
        b["image"] = data_uri(SOURCE)
    if task == "inpaint":
        b["mask"] = data_uri(MASK)
    return b


def pixels(http, job_id: str) -> bytes:
    import io

    return Image.open(io.BytesIO(output_bytes(http, job_id).content)).convert("RGB").tobytes()


@pytest.mark.parametrize("family,model,task", CASES, ids=[f"{f}-{m or 'default'}-{t}" for f, m, t in CASES])
def test_family_task_through_the_system(api_client, worker, family, model, task):
    done = wait_done(api_client, submit(api_client, body(family, model, task))["id"], timeout=120)
    assert done["status"] == "succeeded", done
    assert (done["outputs"][0]["width"], done["outputs"][0]["height"]) == (64, 64)


@pytest.mark.parametrize(
    "family,twin", [("flux", "tiny-flux-df11"), ("qwen-image-edit", "tiny-qwen-image-edit-df11")]
)
def test_df11_twin_gives_the_same_pixels_with_and_without_lora(api_client, worker, family, twin):
    task = "edit" if family == "qwen-image-edit" else "txt2img"
    for extra in ({}, {"loras": [{"name": "tiny-style", "scale": 1.0}]}):
        base = wait_done(api_client, submit(api_client, body(family, None, task, **extra))["id"])
        df11 = wait_done(api_client, submit(api_client, body(family, twin, task, **extra))["id"])
        assert base["status"] == df11["status"] == "succeeded", (base, df11)
        # Files differ (the PNG's parameters chunk names the model); the pixels must not.
        assert pixels(api_client, base["id"]) == pixels(api_client, df11["id"])


def test_lora_changes_the_image_and_leaves_no_trace(api_client, worker):
    def run(**extra):
        done = wait_done(api_client, submit(api_client, body("sd15", None, "txt2img", **extra))["id"])
        assert done["status"] == "succeeded", done
        return pixels(api_client, done["id"])  # the file's parameters chunk lists the LoRAs

    base = run()
    styled = run(loras=[{"name": "tiny-style", "scale": 1.0}])
    zero = run(loras=[{"name": "tiny-style", "scale": 0.0}])
    after = run()
    assert styled != base and zero == base and after == base
