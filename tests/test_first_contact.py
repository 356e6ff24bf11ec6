"""The README's first command, as a newcomer runs it: `inference-server up --once PROMPT` in a
fresh home directory. It prints a few clean lines (no library warnings), says it made a 64x64
image from random weights, and saves the image outside the working directory."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

from PIL import Image

from inference_server.devtools.services import free_port
from tests.support.system import ROOT, base_env


def test_up_once_prints_a_short_clean_log_and_saves_outside_the_repository(
    tiny_models: Path, tmp_path: Path
) -> None:
    home = tmp_path / "home"
    # The tiny models `up` would build on a first run, already built: the same files, in the place
    # `up` looks for them (the build itself is tested in test_engine_tiny.py).
    (home / ".inference-server").mkdir(parents=True)
    os.symlink(tiny_models.parent, home / ".inference-server" / "tiny-models")
    env = base_env(HOME=str(home))
    for name in ("MODELS_FILE", "INFERENCE_SERVER_HOME", "LOG_LEVEL", "LOG_FORMAT", "API_URL", "API_PORT"):
        env.pop(name, None)
    before = set(os.listdir(ROOT))
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "inference_server.cli.main",
            "up",
            "--port",
            str(free_port()),
            "--once",
            "a lighthouse",
        ],
        env=env,
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=240,
    )
    out = result.stdout + result.stderr
    assert result.returncode == 0, out
    lines = [line for line in out.splitlines() if line.strip()]
    assert len(lines) <= 8, out
    assert not re.search(r"warn(ing)?\b", out, re.IGNORECASE), out
    assert "Traceback" not in out and "%|" not in out, out  # no traceback, no progress bars in a pipe
    assert "made a 64x64 image from random weights" in result.stderr
    saved = Path(result.stdout.strip().splitlines()[-1])
    assert saved.is_file() and saved.is_relative_to(home / ".inference-server" / "outputs"), saved
    with Image.open(saved) as image:
        assert image.size == (64, 64)
    assert set(os.listdir(ROOT)) == before, "nothing new in the repository"


def test_the_makefile_has_the_targets_the_readme_names() -> None:
    text = (ROOT / "Makefile").read_text()
    for target in ("up", "test", "lint", "bench"):
        assert re.search(rf"^{target}:", text, re.M), target
    result = subprocess.run(["make", "-n", "lint", "bench", "up"], cwd=ROOT, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert "ruff check" in result.stdout and "mypy" in result.stdout and "benchmarks/" in result.stdout
    readme = (ROOT / "README.md").read_text()
    assert "uuidgen" not in readme and "lighthouse.png" not in readme
    assert "make up" in readme and "make test" in readme
