"""The command line as a user runs it: clear errors, keys as JSON, `generate` against the running
system, and `up --once` (the README's first command) end to end on embedded defaults."""

from __future__ import annotations

import json
import os

from PIL import Image

from inference_server.devtools.services import free_port
from tests.support.system import base_env, cli


def test_worker_refuses_bad_setups_clearly(tiny_models, broker_url):
    env = base_env(MODELS_FILE=str(tiny_models), BROKER_URL=broker_url)  # never the default vhost
    for args, message in [
        (("worker", "--families", "sd15", "--device", "cuda:0"), "no_gpu"),
        (("worker", "--families", "nope", "--device", "cpu"), "unknown_family"),
        (("worker", "--families", "sd15", "--device", "tpu"), "invalid_device"),
        (("workers", "--gpus", "all"), "no_gpu"),
    ]:
        result = cli(*args, env=env)
        assert result.returncode == 1 and message in result.stderr, (args, result.stderr)
        assert "Traceback" not in result.stderr


def test_keys_create_prints_json(system_env):
    result = cli("keys", "create", "--tenant", "cli-test", env=system_env)
    assert result.returncode == 0, result.stderr
    out = json.loads(result.stdout)
    assert out["api_key"].startswith("isk_") and out["webhook_secret"].startswith("whsec_")


def test_generate_saves_the_image(api_client, worker, tenant, system_env, tmp_path):
    target = tmp_path / "fox.png"
    result = cli(
        "generate",
        "a fox",
        "-o",
        str(target),
        "--steps",
        "4",
        "--width",
        "64",
        "--height",
        "64",
        "--preview",
        "4",
        "--api-url",
        api_client.base_url,
        "--api-key",
        tenant.api_key,
        env=system_env,
    )
    assert result.returncode == 0, result.stderr
    assert Image.open(target).size == (64, 64)
    assert "4/4" in result.stderr and "succeeded" in result.stderr  # the bar, fed by the job's event stream
    assert "/preview" in result.stderr  # the previews' URLs, as job.preview events came


def test_generate_sends_an_inpaint_job_with_every_option(api_client, worker, tenant, system_env, tmp_path):
    Image.new("RGB", (64, 64), "navy").save(tmp_path / "in.png")
    mask = Image.new("L", (64, 64), 0)
    mask.paste(255, (16, 16, 48, 48))
    mask.save(tmp_path / "mask.png")
    target = tmp_path / "fox.webp"
    options = {
        "--image": tmp_path / "in.png",
        "--mask": tmp_path / "mask.png",
        "--num-images": 2,
        "--lora": "tiny-style:0.5",
        "--negative-prompt": "blurry",
        "--guidance": 4.5,
        "--seed": 11,
        "--format": "webp",
        "--steps": 3,
        "--width": 64,
        "--height": 64,
        "--strength": 0.8,
    }
    args = [str(a) for kv in options.items() for a in kv]
    common = ["--api-url", api_client.base_url, "--api-key", tenant.api_key, "--quiet"]
    result = cli("generate", "a fox", *args, "-o", str(target), *common, env=system_env)
    assert result.returncode == 0, result.stderr
    paths = result.stdout.split()
    assert paths == [str(target), str(tmp_path / "fox-1.webp")]
    for path in paths:
        assert Image.open(path).format == "WEBP" and Image.open(path).size == (64, 64)
    job = api_client.get(f"{api_client.base_url}/v1/jobs", timeout=10).json()["jobs"][0]
    params = job["params"]
    assert job["task"] == "inpaint" and job["status"] == "succeeded"
    assert params["seed"] == 11 and params["num_images"] == 2 and params["steps"] == 3
    assert params["negative_prompt"] == "blurry" and params["guidance_scale"] == 4.5
    assert params["loras"] == [{"name": "tiny-style", "scale": 0.5}]
    assert params["output"]["format"] == "webp" and params["mask"] and params["image"]

    bad = cli("generate", "a fox", "--lora", "missing", "--steps", "2", *common, env=system_env)
    assert bad.returncode == 1 and "unknown_lora:" in bad.stderr, bad.stderr
    bad = cli("generate", "a fox", "--num-images", "9", *common, env=system_env)
    assert bad.returncode == 1 and "validation_error: num_images" in bad.stderr, bad.stderr


def test_up_once_on_embedded_defaults(tiny_models, tmp_path):
    env = base_env(
        INFERENCE_SERVER_HOME=str(tmp_path / "home"), MODELS_FILE=str(tiny_models), API_PORT=str(free_port())
    )
    for key in ("BROKER_URL", "DATABASE_URL", "STORAGE_URL"):
        env.pop(key, None)
    target = tmp_path / "lighthouse.png"
    result = cli("up", "--once", "a lighthouse at dusk", "-o", str(target), env=env, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert Image.open(target).size == (64, 64)
    assert (tmp_path / "home" / "inference-server.db").exists()  # SQLite, the embedded default
    assert os.path.exists(tmp_path / "home" / "storage")
    # API, dispatcher and worker in one process: the worker's app registers the job task once.
    output = result.stdout + result.stderr
    assert "DuplicateTaskNameWarning" not in output and "already registered" not in output, output[-3000:]
