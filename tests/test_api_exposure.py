"""What answers without a key, by setting: by default (development) the probes, /docs,
/openapi.json and /metrics; with DOCS_REQUIRE_KEY the document and its page need a key, and with
API_METRICS_PORT /metrics moves to a listener of its own, off the API's port."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
import requests

from inference_server.devtools.services import free_port
from inference_server.settings import Settings
from tests.support.system import start_api


@pytest.fixture(scope="module")
def guarded_api(system_env: dict[str, str], logs_dir: Path) -> Iterator[tuple[str, int]]:
    metrics_port = free_port()
    env = dict(
        system_env, DOCS_REQUIRE_KEY="true", API_METRICS_PORT=str(metrics_port), API_METRICS_HOST="127.0.0.1"
    )
    proc, url = start_api(env, logs_dir, name="api-guarded")
    yield url, metrics_port
    proc.kill(15)


def test_by_default_docs_and_metrics_answer_without_a_key(api_server: str) -> None:
    assert requests.get(f"{api_server}/openapi.json", timeout=10).json()["openapi"].startswith("3.1")
    assert requests.get(f"{api_server}/docs", timeout=10).status_code == 200
    metrics = requests.get(f"{api_server}/metrics", timeout=10)
    assert metrics.status_code == 200 and "inference_http_request_duration_seconds" in metrics.text


def test_with_docs_require_key_the_document_needs_a_key(guarded_api: tuple[str, int], tenant) -> None:  # type: ignore[no-untyped-def]
    url, _ = guarded_api
    for path in ("/openapi.json", "/docs"):
        refused = requests.get(url + path, timeout=10)
        assert refused.status_code == 401, path
        assert refused.json()["error"]["code"] == "missing_api_key"
    auth = {"Authorization": f"Bearer {tenant.api_key}"}
    assert requests.get(f"{url}/openapi.json", headers=auth, timeout=10).json()["openapi"].startswith("3.1")
    assert requests.get(f"{url}/docs", headers=auth, timeout=10).status_code == 200
    assert requests.get(f"{url}/healthz", timeout=10).status_code == 200  # the probes stay open


def test_with_a_metrics_port_metrics_leave_the_api_port(guarded_api: tuple[str, int], tenant) -> None:  # type: ignore[no-untyped-def]
    url, metrics_port = guarded_api
    auth = {"Authorization": f"Bearer {tenant.api_key}"}
    assert requests.get(f"{url}/v1/jobs", headers=auth, timeout=10).status_code == 200
    on_api_port = requests.get(f"{url}/metrics", timeout=10)
    assert on_api_port.status_code == 404
    assert on_api_port.json()["error"]["code"] == "not_found"
    scraped = requests.get(f"http://127.0.0.1:{metrics_port}/metrics", timeout=10)
    assert scraped.status_code == 200
    # The API's own registry: the request above is counted there.
    assert 'inference_http_request_duration_seconds_count{method="GET",route="/v1/jobs",status="200"}' in (
        scraped.text
    )


def test_production_requires_a_key_for_the_docs_unless_told_otherwise() -> None:
    pg = "postgresql://u@db/x"
    assert Settings(environment="production", database_url=pg).docs_require_key is True
    told = Settings(environment="production", database_url=pg, docs_require_key=False)
    assert told.docs_require_key is False
    assert Settings(environment="development").docs_require_key is False


def test_an_unknown_rate_limit_storage_is_refused_at_start() -> None:
    from pydantic import ValidationError

    with pytest.raises(ValidationError, match="RATE_LIMIT_STORAGE_URL"):
        Settings(rate_limit_storage_url="memcached://127.0.0.1:11211")
