"""Composition jobs through the running system (API, PostgreSQL, RabbitMQ, a CPU worker) on the
tiny models: ControlNets with each preprocessor, two at once and at scale 0, the IP-Adapter on and
then off, masks from words, the safety checker's flag and block, every route of task "auto", and
the submit-time refusals."""

from __future__ import annotations

from typing import Any

import pytest
import requests
from PIL import Image, ImageDraw

from tests.support.jobs import data_uri, get, submit, wait_done

BASE = {"prompt": "a figure on a plain ground", "width": 64, "height": 64, "steps": 4, "seed": 7}


def scene() -> Image.Image:
    """A synthetic picture with edges, a figure and a red square the detector can be asked for."""
    image = Image.new("RGB", (64, 64), (235, 235, 230))
    draw = ImageDraw.Draw(image)
    draw.rectangle((8, 36, 28, 58), fill=(200, 30, 30))
    draw.ellipse((36, 6, 52, 22), fill=(40, 60, 160))
    draw.line((44, 22, 44, 44), fill=(20, 20, 20), width=3)
    draw.line((44, 44, 36, 60), fill=(20, 20, 20), width=3)
    draw.line((44, 44, 54, 60), fill=(20, 20, 20), width=3)
    return image


def square_mask() -> Image.Image:
    mask = Image.new("L", (64, 64), 0)
    mask.paste(255, (8, 36, 28, 58))
    return mask


SCENE = data_uri(scene())
MASK = data_uri(square_mask())


def run(http: requests.Session, body: dict[str, Any]) -> dict[str, Any]:
    job = submit(http, body)
    return wait_done(http, job["id"])


def succeeded(http: requests.Session, body: dict[str, Any]) -> dict[str, Any]:
    done = run(http, body)
    assert done["status"] == "succeeded", done
    return done


def refused(http: requests.Session, body: dict[str, Any], status: int, code: str) -> str:
    resp = http.post(f"{http.base_url}/v1/jobs", json=body, timeout=30)  # type: ignore[attr-defined]
    assert resp.status_code == status, resp.text
    error = resp.json()["error"]
    assert error["code"] == code, error
    return str(error["message"])


def digests(job: dict[str, Any], kind: str = "image") -> list[str]:
    return [o["sha256"] for o in job["outputs"] if o["kind"] == kind]


@pytest.mark.parametrize("family", ["sd15", "sdxl"])
def test_each_preprocessor_steers_a_controlnet_job_and_returns_its_control_image(api_client, worker, family):
    seen: dict[str, str] = {}
    for kind in ("canny", "depth", "pose"):
        control = {"name": f"tiny-{kind}", "image": SCENE, "preprocess": kind}
        done = succeeded(
            api_client, {**BASE, "family": family, "controlnets": [control], "return_control": True}
        )
        assert [o["kind"] for o in done["outputs"]] == ["image", "control"]
        image, ctrl = done["outputs"]
        assert image["seed"] == 7 and ctrl["seed"] is None
        assert (ctrl["width"], ctrl["height"]) == (64, 64)
        assert api_client.get(ctrl["url"], timeout=30).status_code == 200
        seen[kind] = ctrl["sha256"]
        assert done["params"]["controlnets"][0]["preprocess"] == kind
    assert len(set(seen.values())) == 3, "each preprocessor makes its own control image"


def test_two_controlnets_at_once_and_scale_zero_is_the_plain_pipeline(api_client, worker):
    plain = succeeded(api_client, {**BASE, "family": "sd15"})
    zero = succeeded(
        api_client,
        {**BASE, "family": "sd15", "controlnets": [{"name": "tiny-canny", "image": SCENE, "scale": 0}]},
    )
    # diffusers adds the ControlNet's residuals times its scale: 0 leaves the UNet's exact result.
    assert digests(zero) == digests(plain)
    one = succeeded(
        api_client, {**BASE, "family": "sd15", "controlnets": [{"name": "tiny-depth", "image": SCENE}]}
    )
    two = succeeded(
        api_client,
        {
            **BASE,
            "family": "sd15",
            "controlnets": [
                {"name": "tiny-depth", "image": SCENE},
                {"name": "tiny-pose", "image": SCENE, "scale": 0.7, "start": 0.0, "end": 0.5},
            ],
            "return_control": True,
        },
    )
    assert [o["kind"] for o in two["outputs"]] == ["image", "control", "control"]
    assert len({digests(plain)[0], digests(one)[0], digests(two)[0]}) == 3


@pytest.mark.parametrize("family", ["sd15", "sdxl"])
def test_controlnets_steer_img2img_and_inpaint_and_vanish_at_scale_zero(api_client, worker, family):
    for extra in ({"task": "img2img", "image": SCENE}, {"task": "inpaint", "image": SCENE, "mask": MASK}):
        body = {**BASE, "family": family, **extra}
        plain = succeeded(api_client, body)
        control = {"name": "tiny-canny", "preprocess": "canny"}  # the job's own image as its control
        steered = succeeded(api_client, {**body, "controlnets": [control]})
        zero = succeeded(api_client, {**body, "controlnets": [{**control, "scale": 0}]})
        assert digests(steered) != digests(plain), extra["task"]
        assert digests(zero) == digests(plain), extra["task"]


def test_an_ip_adapter_steers_its_job_and_leaves_the_next_untouched(api_client, worker):
    reference = data_uri(Image.new("RGB", (48, 48), (20, 180, 60)))
    before = succeeded(api_client, {**BASE, "family": "sd15"})
    steered = succeeded(
        api_client,
        {**BASE, "family": "sd15", "ip_adapter": {"name": "tiny-ip", "image": reference, "scale": 1.0}},
    )
    after = succeeded(api_client, {**BASE, "family": "sd15"})
    assert digests(steered) != digests(before)
    assert digests(after) == digests(before), "the adapter was taken out: the next job is a clean run"
    again = succeeded(
        api_client,
        {**BASE, "family": "sd15", "ip_adapter": {"name": "tiny-ip", "image": reference, "scale": 1.0}},
    )
    assert digests(again) == digests(steered)


def test_a_mask_prompt_inpaints_what_it_finds_and_fails_when_it_finds_nothing(api_client, worker):
    body = {**BASE, "family": "sd15", "task": "inpaint", "image": SCENE, "mask_prompt": "the red box"}
    found = succeeded(api_client, {**body, "mask_grow": 2, "mask_blur": 1, "return_mask": True})
    assert [o["kind"] for o in found["outputs"]] == ["image", "mask"]
    mask = api_client.get(found["outputs"][1]["url"], timeout=30)
    assert mask.status_code == 200 and mask.headers["content-type"] == "image/png"
    # The tiny detector's scores are below 1: at that threshold nothing is found.
    missed = run(api_client, {**body, "mask_threshold": 1.0})
    assert missed["status"] == "failed", missed
    assert missed["error"]["code"] == "mask_not_found", missed["error"]
    assert "the red box" in missed["error"]["message"]


def test_safety_flag_records_the_verdict_and_block_keeps_nothing(api_client, worker):
    # The tiny registry's checkers are made with known verdicts: sd15's flags every image, sdxl's none.
    flagged = succeeded(api_client, {**BASE, "family": "sd15", "safety": "flag"})
    out = flagged["outputs"][0]
    assert out["nsfw"] is True and out["nsfw_score"] > 0 and out["url"] and not out.get("blocked")
    clean = succeeded(api_client, {**BASE, "family": "sdxl", "safety": "block", "num_images": 2})
    assert [o["nsfw"] for o in clean["outputs"]] == [False, False] and all(o["url"] for o in clean["outputs"])
    blocked = succeeded(api_client, {**BASE, "family": "sd15", "safety": "block", "num_images": 2})
    for o in blocked["outputs"]:
        assert (
            o["blocked"] is True and o["code"] == "content_blocked" and o["url"] is None and o["nsfw"] is True
        )
        assert o["sha256"] is None
    resp = api_client.get(f"{api_client.base_url}/v1/jobs/{blocked['id']}/outputs/0", timeout=30)
    assert resp.status_code == 404 and resp.json()["error"]["code"] == "content_blocked"
    plain = succeeded(api_client, {**BASE, "family": "sd15"})
    assert "nsfw" not in plain["outputs"][0], "safety off: nothing checked, nothing recorded"


def test_task_auto_records_its_route_and_reason(api_client, worker):
    cases = [
        ({"family": "sd15"}, "txt2img", None),
        ({"family": "sd15", "image": SCENE}, "img2img", None),
        ({"family": "sd15", "image": SCENE, "mask": MASK}, "inpaint", None),
        ({"family": "sd15", "image": SCENE, "mask_prompt": "the red box"}, "inpaint", None),
        ({"family": "sd15", "image": SCENE, "prompt": "the same pose, in armour"}, "txt2img", "tiny-pose"),
        ({"family": "sdxl", "image": SCENE, "prompt": "keep the depth of the room"}, "txt2img", "tiny-depth"),
        ({"family": "sd15", "controlnets": [{"name": "tiny-canny", "image": SCENE}]}, "txt2img", None),
        ({"family": "qwen-image-edit", "image": SCENE, "prompt": "make it blue"}, "edit", None),
    ]
    jobs = []
    for extra, task, controlnet in cases:
        job = submit(api_client, {**BASE, "task": "auto", **extra})
        assert job["task"] == task, (extra, job)
        route = job["route"]
        assert route["task"] == task and route["reason"], route
        assert route.get("controlnet") == controlnet, route
        if controlnet:
            assert job["params"]["controlnets"][0]["name"] == controlnet
        jobs.append(job)
    for job in jobs:
        done = wait_done(api_client, job["id"])
        assert done["status"] == "succeeded", done
        assert get(api_client, job["id"])["route"] == job["route"]


def test_composition_fields_are_checked_at_submit(api_client):
    control = {"name": "tiny-canny", "image": SCENE}
    sd15 = {**BASE, "family": "sd15"}
    assert "known: tiny-canny" in refused(
        api_client, {**sd15, "controlnets": [{**control, "name": "nope"}]}, 400, "unknown_controlnet"
    )
    # tiny-depth is sd15's and sdxl's, not flux's: the message says whose it is.
    msg = refused(
        api_client,
        {**BASE, "family": "flux", "controlnets": [{**control, "name": "tiny-depth"}]},
        400,
        "unknown_controlnet",
    )
    assert "belongs to family" in msg
    refused(api_client, {**sd15, "controlnets": [{"name": "tiny-canny"}]}, 400, "missing_control_image")
    refused(api_client, {**sd15, "controlnets": [{**control, "scale": 2.5}]}, 422, "validation_error")
    refused(
        api_client, {**sd15, "controlnets": [{**control, "start": 0.8, "end": 0.2}]}, 422, "validation_error"
    )
    refused(api_client, {**sd15, "ip_adapter": {"name": "nope", "image": SCENE}}, 400, "unknown_ip_adapter")
    refused(api_client, {**sd15, "ip_adapter": {"name": "tiny-ip"}}, 422, "validation_error")
    refused(api_client, {**sd15, "mask_prompt": "the red box"}, 400, "unsupported_composition")
    refused(
        api_client,
        {**sd15, "task": "inpaint", "image": SCENE, "mask": MASK, "mask_prompt": "the red box"},
        400,
        "invalid_request",
    )
    refused(api_client, {**sd15, "return_control": True}, 400, "unsupported_composition")
    refused(api_client, {**BASE, "family": "flux", "safety": "flag"}, 400, "no_safety_checker")
    refused(
        api_client,
        {
            **BASE,
            "family": "qwen-image-edit",
            "task": "edit",
            "image": SCENE,
            "prompt": "x",
            "controlnets": [control],
        },
        400,
        "unsupported_composition",
    )


def test_a_tenants_deny_list_and_default_safety_apply_to_its_jobs(api_server, system_db):
    from api.auth import create_tenant_key
    from inference_server.db import Tenant

    with system_db() as session:
        row, key = create_tenant_key(session, "composition-policy")
        tenant = session.get(Tenant, row.id)
        tenant.deny_words = ["forbidden fruit", "gore"]
        tenant.safety = "flag"
        session.commit()
    http = requests.Session()
    http.headers["Authorization"] = f"Bearer {key}"
    http.base_url = api_server  # type: ignore[attr-defined]
    refused(
        http, {**BASE, "family": "sd15", "prompt": "A Forbidden  Fruit, still life"}, 400, "prompt_denied"
    )
    refused(http, {**BASE, "family": "sd15", "prompt": "gore"}, 400, "prompt_denied")
    job = submit(http, {**BASE, "family": "sd15", "prompt": "gorgeous fruit"})  # whole words only
    assert job["params"]["safety"] == "flag", "the tenant's default safety"
    own = submit(http, {**BASE, "family": "sd15", "safety": "off"})
    assert "safety" not in own["params"]


def test_the_catalog_lists_every_composition_component(api_client):
    families = {
        f["name"]: f
        for f in api_client.get(f"{api_client.base_url}/v1/models", timeout=30).json()["families"]
    }
    sd15 = families["sd15"]
    assert [c["name"] for c in sd15["controlnets"]] == ["tiny-canny", "tiny-depth", "tiny-pose"]
    assert [c["preprocess"] for c in sd15["controlnets"]] == ["canny", "depth", "pose"]
    assert [a["name"] for a in sd15["ip_adapters"]] == ["tiny-ip"]
    assert sd15["tools"] == {
        "preprocessors": ["none", "canny", "depth", "pose"],
        "detector": True,
        "segmenter": True,
        "safety_checker": "tiny-strict",
    }
    assert families["flux"]["tools"]["safety_checker"] is None
    assert families["qwen-image-edit"]["controlnets"] == []
