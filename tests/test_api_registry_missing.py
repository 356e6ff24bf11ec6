"""An API whose MODELS_FILE does not exist yet starts, says it is not ready, and becomes ready
when the file appears (the compose GPU flow writes it after the API starts)."""

from __future__ import annotations

import os
from pathlib import Path

import requests

from tests.support.system import start_api
from tests.support.waiting import wait_for


def test_the_api_waits_for_its_registry_file_instead_of_exiting(
    system_env: dict[str, str], logs_dir: Path, tiny_models: Path, tmp_path: Path
) -> None:
    later = tmp_path / "models.toml"  # a link to the real file, made once the API runs
    api, url = start_api(dict(system_env, MODELS_FILE=str(later)), logs_dir, name="api-no-registry")
    try:
        ready = requests.get(f"{url}/readyz", timeout=10)
        assert ready.status_code == 503, ready.text
        body = ready.json()
        assert body["error"]["code"] == "dependency_unavailable" and "registry" in body["error"]["message"]
        assert body["checks"] == {"database": True, "broker": True, "registry": False}, body
        assert api.proc.poll() is None
        assert "does not exist yet" in api.output()

        os.symlink(tiny_models, later)
        answer = wait_for(
            lambda: (r := requests.get(f"{url}/readyz", timeout=10)).status_code == 200 and r,
            10,
            what="readiness once the registry file exists",
        )
        assert answer.json()["checks"]["registry"] is True
        metrics = requests.get(f"{url}/metrics", timeout=10).text
        assert 'inference_registry_families{family="sd15"} 1.0' in metrics
    finally:
        api.kill(15)
