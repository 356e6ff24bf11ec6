"""benchmarks/gpu_check.py runs here as it is documented: without CUDA it says so and exits 0, and
its CPU dry run goes through the same checks (the engine on each family's tiny model, the attention
backend switch, the table), skipping only what needs CUDA."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import torch

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "gpu_check.py"


def _run(*args: str) -> subprocess.CompletedProcess[str]:
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(SCRIPT.parents[1]))
    return subprocess.run(
        [sys.executable, str(SCRIPT), *args], env=env, capture_output=True, text=True, timeout=300
    )


def test_without_cuda_it_says_so_and_exits_zero() -> None:
    assert not torch.cuda.is_available(), "this test is for a machine without CUDA"
    done = _run()
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == (
        "no CUDA device: nothing to check here (run it on a GPU machine; --device cpu is a dry run)"
    )


def test_the_cpu_dry_run_checks_each_family_and_skips_what_needs_cuda(tiny_models: Path) -> None:
    done = _run("--device", "cpu", "--families", "sd15,flux", "--models", str(tiny_models.parent))
    assert done.returncode == 0, done.stdout + done.stderr
    rows = {line[:40].strip(): line[40:].split() for line in done.stdout.splitlines()[3:-1]}
    assert rows["sd15 on cpu"][0] == rows["flux on cpu"][0] == "ok"
    assert rows["attention backend, flux"][0] == "ok"
    for cuda_only in ("dfloat11 flux", "model CPU offload", "sequential CPU offload", "torch.compile"):
        assert rows[cuda_only][0] == "skipped" and "needs CUDA" in " ".join(rows[cuda_only])
    assert done.stdout.splitlines()[-1].startswith(f"{len(rows)} checks in ")
