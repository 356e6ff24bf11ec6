"""The API's contract without workers: validation errors, auth, idempotency, tenant isolation,
pagination, the catalog and the probes. Every bad input gets a 4xx in the JSON error shape."""

from __future__ import annotations

import base64
import uuid

import pytest
import requests

from tests.support.jobs import submit

OK = {"family": "sd15", "prompt": "a lighthouse", "width": 64, "height": 64, "steps": 4}
PNG_1PX = base64.b64decode(
    "iVBORw0KGgoAAAANSUhEUgAAAAEAAAABCAYAAAAfFcSJAAAADUlEQVR4nGP4z8DwHwAFAAH/iZk9HQAAAABJRU5ErkJggg=="
)


def post(http, body, **headers):
    return http.post(f"{http.base_url}/v1/jobs", json=body, headers=headers, timeout=30)


def error_of(resp):
    body = resp.json()
    assert set(body) >= {"error"} and {"code", "message"} <= set(body["error"]), body
    return body["error"]["code"]


BAD = [
    ({**OK, "width": 65}, 422, "validation_error"),
    ({**OK, "width": 4096}, 400, "invalid_size"),
    ({**OK, "height": 32}, 400, "invalid_size"),
    ({**OK, "steps": 0}, 422, "validation_error"),
    ({**OK, "steps": 151}, 422, "validation_error"),
    ({**OK, "guidance_scale": 31}, 422, "validation_error"),
    ({**OK, "guidance_scale": -1}, 422, "validation_error"),
    ({**OK, "num_images": 5}, 422, "validation_error"),
    ({**OK, "num_images": 0}, 422, "validation_error"),
    ({**OK, "prompt": "x" * 2001}, 422, "validation_error"),
    ({**OK, "family": "nope"}, 400, "unknown_family"),
    ({**OK, "task": "paint"}, 422, "validation_error"),
    ({**OK, "task": "edit"}, 400, "unsupported_task"),
    ({**OK, "model": "missing"}, 400, "unknown_model"),
    ({**OK, "task": "img2img"}, 400, "missing_image"),
    (
        {**OK, "task": "inpaint", "image": "data:image/png;base64," + base64.b64encode(PNG_1PX).decode()},
        400,
        "missing_mask",
    ),
    ({**OK, "task": "img2img", "image": "data:image/png;base64,!!!"}, 400, "invalid_data_uri"),
    (
        {
            **OK,
            "task": "img2img",
            "image": "data:image/png;base64," + base64.b64encode(b"not an image").decode(),
        },
        400,
        None,
    ),
    ({**OK, "task": "img2img", "image": "ftp://example.com/x.png"}, 400, "unsupported_input_uri"),
    ({**OK, "loras": [{"name": "nope"}]}, 400, "unknown_lora"),
    ({**OK, "seed": 2**40}, 422, "validation_error"),
    ({**OK, "unexpected": 1}, 422, "validation_error"),
    ({**OK, "output": {"format": "gif"}}, 422, "validation_error"),
    ({**OK, "signature": {"image": "x", "position": "top-left"}}, 422, "validation_error"),
    ({**OK, "webhook": {"url": "http://x", "events": ["job.exploded"]}}, 422, "validation_error"),
]


@pytest.mark.parametrize("body,status,code", BAD, ids=[f"{i}-{b[2]}" for i, b in enumerate(BAD)])
def test_bad_input_is_a_4xx_with_a_code(api_client, body, status, code):
    resp = post(api_client, body)
    assert resp.status_code == status, resp.text
    got = error_of(resp)
    if code:
        assert got == code


def test_malformed_json_and_huge_inputs(api_client):
    resp = api_client.post(
        f"{api_client.base_url}/v1/jobs",
        data=b"{not json",
        timeout=10,
        headers={"content-type": "application/json"},
    )
    assert resp.status_code == 422 and error_of(resp) == "validation_error"
    huge = "data:image/png;base64," + base64.b64encode(b"\0" * (21 * 1024 * 1024)).decode()
    resp = post(api_client, {**OK, "task": "img2img", "image": huge})
    assert resp.status_code == 413, resp.text[:200]


def test_auth_required_and_checked(api_server):
    resp = requests.post(f"{api_server}/v1/jobs", json=OK, timeout=10)
    assert resp.status_code == 401 and error_of(resp) == "missing_api_key"
    resp = requests.get(f"{api_server}/v1/jobs", headers={"Authorization": "Bearer isk_wrong"}, timeout=10)
    assert resp.status_code == 401 and error_of(resp) == "invalid_api_key"


def test_idempotent_resubmit(api_client):
    key = str(uuid.uuid4())
    first = post(api_client, OK, **{"Idempotency-Key": key})
    again = post(api_client, OK, **{"Idempotency-Key": key})
    assert first.status_code == again.status_code == 202
    job_id = first.json()["id"]
    assert str(uuid.UUID(job_id)) == job_id and uuid.UUID(job_id).version == 4  # a canonical UUID4
    assert again.json()["id"] == job_id and again.headers["Idempotent-Replayed"] == "true"
    conflict = post(api_client, {**OK, "prompt": "something else"}, **{"Idempotency-Key": key})
    assert conflict.status_code == 409 and error_of(conflict) == "idempotency_conflict"
    listed = api_client.get(f"{api_client.base_url}/v1/jobs", timeout=10).json()["jobs"]
    assert [j["id"] for j in listed].count(first.json()["id"]) == 1


def test_tenant_isolation(api_client, api_server, system_db):
    from api.auth import create_tenant_key

    job = submit(api_client, OK)
    with system_db() as session:
        _, other_key = create_tenant_key(session, f"other-{uuid.uuid4().hex[:6]}")
    other = requests.Session()
    other.headers["Authorization"] = f"Bearer {other_key}"
    for method, path in [
        ("get", f"/v1/jobs/{job['id']}"),
        ("post", f"/v1/jobs/{job['id']}/cancel"),
        ("get", f"/v1/jobs/{job['id']}/outputs/0"),
    ]:
        resp = getattr(other, method)(f"{api_server}{path}", timeout=10)
        assert resp.status_code == 404 and error_of(resp) == "job_not_found", (path, resp.text)
    assert other.get(f"{api_server}/v1/jobs", timeout=10).json()["jobs"] == []
    # The same Idempotency-Key in two tenants is two jobs.
    key = str(uuid.uuid4())
    a = post(api_client, OK, **{"Idempotency-Key": key}).json()["id"]
    b = other.post(f"{api_server}/v1/jobs", json=OK, headers={"Idempotency-Key": key}, timeout=10).json()[
        "id"
    ]
    assert a != b


def test_list_filters_and_cursor_pagination(api_client):
    ids = [submit(api_client, OK)["id"] for _ in range(5)]
    seen, cursor = [], None
    while True:
        params = {"limit": 2, "family": "sd15"} | ({"cursor": cursor} if cursor else {})
        page = api_client.get(f"{api_client.base_url}/v1/jobs", params=params, timeout=10).json()
        seen += [j["id"] for j in page["jobs"]]
        cursor = page["next_cursor"]
        if not cursor:
            break
    assert seen[:5] == ids[::-1] and len(seen) == len(set(seen))
    bad = api_client.get(f"{api_client.base_url}/v1/jobs", params={"cursor": "garbage"}, timeout=10)
    assert bad.status_code == 400 and error_of(bad) == "invalid_cursor"
    bad = api_client.get(f"{api_client.base_url}/v1/jobs", params={"status": "exploded"}, timeout=10)
    assert bad.status_code == 400


def test_cancel_queued_job_and_unknown_job(api_client):
    # Long enough that a worker, if one runs in this session, cannot finish it first.
    job = submit(api_client, {**OK, "steps": 50, "width": 256, "height": 256})
    resp = api_client.post(f"{api_client.base_url}/v1/jobs/{job['id']}/cancel", timeout=10)
    assert resp.status_code == 200 and resp.json()["status"] == "canceled"
    assert api_client.get(f"{api_client.base_url}/v1/jobs/{uuid.uuid4()}", timeout=10).status_code == 404


def test_models_catalog_probes_and_metrics(api_client, api_server):
    catalog = api_client.get(f"{api_server}/v1/models", timeout=10).json()
    families = {f["name"]: f for f in catalog["families"]}
    assert {"sd15", "sdxl", "flux", "qwen-image-edit"} <= set(families)
    sd15 = families["sd15"]
    assert {"txt2img", "img2img"} <= set(sd15["tasks"]) and "online_workers" in sd15
    assert any(m["default"] for m in sd15["models"]) and {"name": "tiny-style"} in sd15["loras"]
    assert requests.get(f"{api_server}/healthz", timeout=5).json() == {"status": "ok"}
    ready = requests.get(f"{api_server}/readyz", timeout=10)
    assert ready.status_code == 200 and ready.json()["checks"] == {"database": True, "broker": True}
    text = requests.get(f"{api_server}/metrics", timeout=5).text
    assert "inference_jobs_submitted_total" in text and "inference_outbox_unpublished" in text


def test_upload_then_use_as_input(api_client):
    import io

    from PIL import Image

    buf = io.BytesIO()
    Image.new("RGB", (64, 64), "blue").save(buf, "PNG")
    resp = api_client.post(
        f"{api_client.base_url}/v1/uploads", files={"file": ("a.png", buf.getvalue())}, timeout=10
    )
    assert resp.status_code == 201, resp.text
    uri = resp.json()["uri"]
    job = submit(api_client, {**OK, "task": "img2img", "image": uri})
    assert job["params"]["image"] == uri
    bad = api_client.post(
        f"{api_client.base_url}/v1/uploads", files={"file": ("a.png", b"GIF89a....")}, timeout=10
    )
    assert bad.status_code == 400
