"""The API's edge, through a real API process with a small size limit and a rate limit: text no
store can hold is a 400 with a code (never a 500), the size limit counts the bytes that arrive
(chunked bodies too), a 429 says when to retry, the OpenAPI document declares the bearer scheme,
and /docs works without a CDN."""

from __future__ import annotations

import socket
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import urlsplit

import pytest
import requests

from tests.support.system import start_api

LIMIT = 100_000
PER_MINUTE = 5
OK = {"family": "sd15", "prompt": "a lighthouse", "width": 64, "height": 64, "steps": 4}


@pytest.fixture(scope="module")
def edge_api(system_env: dict[str, str], logs_dir: Path) -> Iterator[str]:
    env = dict(system_env, MAX_REQUEST_BYTES=str(LIMIT), RATE_LIMIT_PER_MINUTE=str(PER_MINUTE))
    proc, url = start_api(env, logs_dir, name="api-edge")
    yield url
    proc.kill(15)


@pytest.fixture
def http(edge_api: str, tenant) -> Iterator[requests.Session]:  # type: ignore[no-untyped-def]
    session = requests.Session()
    session.headers["Authorization"] = f"Bearer {tenant.api_key}"
    yield session
    session.close()


def code_of(resp: requests.Response) -> str:
    return resp.json()["error"]["code"]


@pytest.mark.parametrize(
    "target",
    [
        "/v1/jobs?family=%00x",
        "/v1/jobs?family=%F4%80%B3%A1%C2%B6a%C2%B9%000",  # the case schemathesis found
        "/v1/jobs?status=%ED%A0%80",  # an encoded lone surrogate
        "/v1/jobs/%00abc",
        "/v1/jobs/%ED%B0%80/cancel",
    ],
)
def test_nul_or_surrogate_in_path_or_query_is_a_400(
    edge_api: str, http: requests.Session, target: str
) -> None:
    resp = (
        http.get(edge_api + target, timeout=10)
        if "cancel" not in target
        else http.post(edge_api + target, timeout=10)
    )
    assert resp.status_code == 400, resp.text
    assert code_of(resp) == "invalid_characters"


@pytest.mark.parametrize(
    "raw",
    [
        b'{"family": "sd15", "prompt": "a\\u0000b"}',
        b'{"family": "sd15", "prompt": "a\\ud800b"}',
        b'{"family": "sd15", "prompt": "ok", "output": {"metadata": {"k\\udfff": "v"}}}',
        b'{"family": "sd15", "prompt": "ok", "loras": [{"name": "\\u0000"}]}',
    ],
)
def test_nul_or_surrogate_in_a_json_body_is_a_400(edge_api: str, http: requests.Session, raw: bytes) -> None:
    resp = http.post(
        f"{edge_api}/v1/jobs", data=raw, headers={"Content-Type": "application/json"}, timeout=10
    )
    assert resp.status_code == 400, resp.text
    assert code_of(resp) == "invalid_characters"


def test_escaped_pairs_and_escaped_backslashes_pass_the_check(edge_api: str, http: requests.Session) -> None:
    # A valid surrogate pair is one emoji, and "\\u0000" is the six characters \u0000, not a NUL: both
    # go on to the schema, which refuses the width (proof that the text check let them through).
    raw = b'{"family": "sd15", "prompt": "\\ud83d\\ude00 \\\\u0000", "width": 65, "height": 64}'
    resp = http.post(
        f"{edge_api}/v1/jobs", data=raw, headers={"Content-Type": "application/json"}, timeout=10
    )
    assert resp.status_code == 422, resp.text
    assert code_of(resp) == "validation_error"


def test_nul_in_a_header_is_refused_without_a_500(edge_api: str, tenant) -> None:  # type: ignore[no-untyped-def]
    # requests and http.client refuse to send such a header, so it goes over a raw socket.
    host, port = urlsplit(edge_api).hostname, urlsplit(edge_api).port
    request = (
        f"GET /v1/jobs HTTP/1.1\r\nHost: {host}\r\nAuthorization: Bearer {tenant.api_key}\r\n"
        "X-Note: a\x00b\r\nConnection: close\r\n\r\n"
    ).encode("latin-1")
    with socket.create_connection((host, port), timeout=10) as sock:
        sock.sendall(request)
        answer = b""
        while chunk := sock.recv(65536):
            answer += chunk
    status_line, _, rest = answer.partition(b"\r\n")
    assert status_line.split()[1] == b"400", answer[:300]
    if b"application/json" in rest:  # the server may refuse it before the app; if the app does, with a code
        assert b'"invalid_characters"' in rest


def _chunks(total: int, size: int = 8192) -> Iterator[bytes]:
    sent = 0
    yield b'{"family": "sd15", "prompt": "'
    while sent < total:
        yield b"x" * size
        sent += size
    yield b'"}'


def test_a_chunked_body_over_the_limit_is_a_413(edge_api: str, http: requests.Session) -> None:
    resp = http.post(
        f"{edge_api}/v1/jobs",
        data=_chunks(3 * LIMIT),
        headers={"Content-Type": "application/json"},
        timeout=30,
    )
    assert resp.request.headers.get("Transfer-Encoding") == "chunked"
    assert "Content-Length" not in resp.request.headers
    assert resp.status_code == 413, resp.text
    assert code_of(resp) == "request_too_large"


def test_a_chunked_upload_over_the_limit_is_a_413(edge_api: str, http: requests.Session) -> None:
    boundary = "edgeboundary"

    def body() -> Iterator[bytes]:
        yield (
            f'--{boundary}\r\nContent-Disposition: form-data; name="file"; filename="a.png"\r\n'
            "Content-Type: image/png\r\n\r\n"
        ).encode()
        for _ in range(3 * LIMIT // 8192 + 1):
            yield b"\x89" * 8192
        yield f"\r\n--{boundary}--\r\n".encode()

    resp = http.post(
        f"{edge_api}/v1/uploads",
        data=body(),
        headers={"Content-Type": f"multipart/form-data; boundary={boundary}"},
        timeout=30,
    )
    assert resp.status_code == 413, resp.text
    assert code_of(resp) == "request_too_large"


def test_a_small_chunked_body_is_read_normally(edge_api: str, http: requests.Session) -> None:
    resp = http.post(
        f"{edge_api}/v1/jobs",
        data=_chunks(LIMIT // 2),
        headers={"Content-Type": "application/json"},
        timeout=30,
    )
    assert resp.status_code == 422, resp.text  # the prompt is too long for the schema: read, then judged
    assert code_of(resp) == "validation_error"


def test_a_429_carries_retry_after(edge_api: str, http: requests.Session) -> None:
    answers = [http.get(f"{edge_api}/v1/jobs", timeout=10) for _ in range(PER_MINUTE + 1)]
    assert [r.status_code for r in answers[:PER_MINUTE]] == [200] * PER_MINUTE
    limited = answers[-1]
    assert limited.status_code == 429, limited.text
    assert code_of(limited) == "rate_limited"
    retry_after = int(limited.headers["Retry-After"])
    # A moving window of a minute: the first of the requests above leaves it in under 61 s.
    assert 50 <= retry_after <= 61


def test_openapi_declares_the_bearer_scheme_on_authenticated_routes(edge_api: str) -> None:
    doc = requests.get(f"{edge_api}/openapi.json", timeout=10).json()
    schemes = doc["components"]["securitySchemes"]
    assert [s for s in schemes.values() if s["type"] == "http" and s["scheme"].lower() == "bearer"]
    paths = doc["paths"]
    for path, method in (
        ("/v1/jobs", "post"),
        ("/v1/jobs", "get"),
        ("/v1/jobs/{job_id}", "get"),
        ("/v1/uploads", "post"),
        ("/v1/models", "get"),
    ):
        assert paths[path][method].get("security"), f"{method.upper()} {path} declares no security"
    assert not paths["/healthz"]["get"].get("security")


def test_the_openapi_document_is_valid_openapi(edge_api: str) -> None:
    from openapi_spec_validator import validate

    doc = requests.get(f"{edge_api}/openapi.json", timeout=10).json()
    assert doc["openapi"].startswith("3.1")
    validate(doc)  # raises on a document a standard client generator would refuse
    ids = [op["operationId"] for item in doc["paths"].values() for op in item.values()]
    assert len(ids) == len(set(ids)), sorted(i for i in ids if ids.count(i) > 1)


def test_docs_serve_swagger_ui_from_local_assets(edge_api: str) -> None:
    page = requests.get(f"{edge_api}/docs", timeout=10)
    assert page.status_code == 200
    assert "cdn." not in page.text and "https://" not in page.text.split("<body>")[-1].split("</body>")[0]
    for asset in ("/docs/assets/swagger-ui-bundle.js", "/docs/assets/swagger-ui.css"):
        assert asset in page.text
        resp = requests.get(edge_api + asset, timeout=10)
        assert resp.status_code == 200 and len(resp.content) > 10_000, asset


def test_wrong_keys_are_limited_per_address(settings, tenant) -> None:  # type: ignore[no-untyped-def]
    from fastapi.testclient import TestClient

    from api.app import create_app

    app = create_app(settings.model_copy(update={"auth_failures_per_minute": 3}), run_relay=False)
    with TestClient(app) as http:
        good = {"Authorization": f"Bearer {tenant.api_key}"}
        assert http.get("/v1/jobs", headers=good).status_code == 200  # now in the key cache
        wrong = [http.get("/v1/jobs", headers={"Authorization": "Bearer isk_guess"}) for _ in range(4)]
        assert [r.status_code for r in wrong] == [401, 401, 401, 429]
        assert wrong[-1].json()["error"]["code"] == "rate_limited"
        assert 50 <= int(wrong[-1].headers["Retry-After"]) <= 61
        assert http.get("/v1/jobs").status_code == 401  # no key is no guess: still its own answer
        assert http.get("/v1/jobs", headers=good).status_code == 200  # a key that works keeps working


def test_an_empty_idempotency_key_is_refused_not_stored(edge_api: str, http: requests.Session) -> None:
    # Schemathesis found it: an empty key was stored, so the next empty-key submit hit the unique
    # index without being seen as a replay, and answered 500.
    answers = [
        http.post(f"{edge_api}/v1/jobs", json=OK, headers={"Idempotency-Key": ""}, timeout=10)
        for _ in range(2)
    ]
    assert [r.status_code for r in answers] == [422, 422], answers[-1].text
    assert code_of(answers[-1]) == "validation_error"


def test_a_form_body_with_a_nul_is_a_400(edge_api: str, http: requests.Session) -> None:
    resp = http.post(
        f"{edge_api}/v1/jobs",
        data=b"family=sd15&prompt=a%00b",
        headers={"Content-Type": "application/x-www-form-urlencoded"},
        timeout=10,
    )
    assert resp.status_code == 400, resp.text
    assert code_of(resp) == "invalid_characters"
