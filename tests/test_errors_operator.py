"""Operator mistakes (settings, --device, --families, MODELS_FILE, the registry, STORAGE_URL) are
ConfigurationErrors, not a client's InvalidRequest, and the command line prints them as one line
`Error: code: message` with exit status 1. The API still starts without a registry."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from inference_server.errors import ConfigurationError, InvalidRequest, RegistryError
from inference_server.registry import load_registry
from inference_server.settings import Settings
from inference_server.storage import open_storage
from tests.support.system import ROOT, base_env


def cli(*args: str, **env: str) -> subprocess.CompletedProcess[str]:
    run_env = base_env(**env)
    if "MODELS_FILE" not in env:
        run_env.pop("MODELS_FILE", None)
    return subprocess.run(
        [sys.executable, "-m", "inference_server.cli.main", *args],
        env=run_env,
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )


def one_line_error(result: subprocess.CompletedProcess[str]) -> str:
    """The single `Error: ...` line of a failed command; nothing that looks like a traceback."""
    assert result.returncode == 1, (result.returncode, result.stderr)
    assert "Traceback" not in result.stderr, result.stderr
    lines = [line for line in result.stderr.splitlines() if line.startswith("Error: ")]
    assert len(lines) == 1, result.stderr
    return lines[0]


@pytest.fixture
def registry_file(tmp_path: Path) -> Path:
    path = tmp_path / "models.toml"
    path.write_text(
        "[families.sd15]\ntasks = ['txt2img']\n[[families.sd15.models]]\nid = 'a'\nsource = 'b'\n"
    )
    return path


def test_worker_start_mistakes_print_one_line_with_their_code(tmp_path: Path, registry_file: Path) -> None:
    bad_toml = tmp_path / "bad.toml"
    bad_toml.write_text("[families\n")
    good, home = str(registry_file), str(tmp_path / "home")
    cases = [
        ("", "cpu", {"MODELS_FILE": good}, "invalid_families: --families needs at least one family"),
        ("sd15", "cpu", {}, "no_registry: MODELS_FILE is not set"),
        ("sd15", "cpu", {"MODELS_FILE": str(tmp_path / "absent.toml")}, "registry_error: "),
        ("sd15", "cpu", {"MODELS_FILE": str(bad_toml)}, "registry_error: "),
        ("sdxl", "cpu", {"MODELS_FILE": good}, "unknown_family: unknown families sdxl"),
        ("sd15", "gpu0", {"MODELS_FILE": good}, "invalid_device: --device must be"),
    ]
    for families, device, env, expected in cases:
        result = cli("worker", "--families", families, "--device", device, INFERENCE_SERVER_HOME=home, **env)
        line = one_line_error(result)
        assert line.startswith(f"Error: {expected}"), (families, device, env, line)


def test_invalid_settings_name_the_variable_on_one_line(tmp_path: Path) -> None:
    result = cli("migrate", API_PORT="eighty", INFERENCE_SERVER_HOME=str(tmp_path))
    line = one_line_error(result)
    assert line.startswith("Error: invalid_settings: API_PORT: "), line
    assert "errors.pydantic.dev" not in line


def test_operator_errors_are_configuration_errors(tmp_path: Path) -> None:
    with pytest.raises(RegistryError) as missing:
        load_registry(tmp_path / "absent.toml")
    assert isinstance(missing.value, ConfigurationError) and not isinstance(missing.value, InvalidRequest)
    settings = Settings(storage_url="ftp://files.example.com/x", home=tmp_path)
    with pytest.raises(ConfigurationError) as storage:
        open_storage(settings)
    assert storage.value.code == "invalid_storage_url"


def test_a_worker_child_without_models_file_is_a_configuration_error(tmp_path: Path) -> None:
    from workers.child import build_runner

    settings = Settings(models_file=None, home=tmp_path, storage_url=(tmp_path / "s").as_uri(), device="cpu")
    with pytest.raises(ConfigurationError) as exc:
        build_runner(settings)
    assert exc.value.code == "no_registry"


def test_the_api_still_starts_without_a_registry(settings, tenant) -> None:  # type: ignore[no-untyped-def]
    from fastapi.testclient import TestClient

    from api.app import create_app

    app = create_app(settings.model_copy(update={"models_file": None}), run_relay=False)
    with TestClient(app) as http:
        assert http.get("/healthz").status_code == 200
        models = http.get("/v1/models", headers={"Authorization": f"Bearer {tenant.api_key}"})
    assert models.status_code == 200 and models.json() == {"families": []}
