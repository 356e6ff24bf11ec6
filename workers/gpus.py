"""`inference-server workers`: one worker process per visible GPU, each on the families whose
models fit its memory, supervised until stopped. Each is an ordinary `inference-server worker`."""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import sys
import time

from inference_server.errors import ConfigurationError
from inference_server.settings import Settings

log = logging.getLogger(__name__)


def families_for_gpu(settings: Settings, memory_bytes: int) -> list[str]:
    """Families whose largest model fits a GPU with ``memory_bytes`` (offloaded models always fit)."""
    from inference_server.registry import load_registry

    assert settings.models_file is not None
    registry = load_registry(settings.models_file)
    fits = []
    for fam in registry.families.values():
        offloads = all(m.offload != "none" for m in fam.models)
        if offloads or fam.memory_gb * 1e9 <= memory_bytes * 0.95:
            fits.append(fam.name)
    return fits


def run_gpu_workers(settings: Settings, gpus: str, families: list[str] | None) -> None:
    """Spawn `inference-server worker --device cuda:N` per GPU and supervise them."""
    from workers.device import visible_gpus

    found = visible_gpus()
    if not found:
        raise ConfigurationError(
            "no CUDA GPU is visible: use `inference-server worker --device cpu`", code="no_gpu"
        )
    wanted = [g for g in found if gpus == "all" or str(g[0]) in gpus.split(",")]
    procs: list[subprocess.Popen[bytes]] = []
    for n, (index, memory) in enumerate(wanted):
        fams = [f for f in families_for_gpu(settings, memory) if not families or f in families]
        if not fams:
            log.warning("GPU %d (%.1f GB) fits no family; not starting a worker on it", index, memory / 1e9)
            continue
        cmd = [
            sys.executable,
            "-m",
            "inference_server.cli.main",
            "worker",
            "--device",
            f"cuda:{index}",
            "--families",
            ",".join(fams),
        ]
        log.info("GPU %d: %s", index, " ".join(cmd[3:]))
        env = dict(os.environ)
        if settings.worker_metrics_port:
            env["WORKER_METRICS_PORT"] = str(settings.worker_metrics_port + n)  # one port per GPU worker
        procs.append(subprocess.Popen(cmd, env=env))
    if not procs:
        raise ConfigurationError("no GPU fits any family of the registry", code="no_gpu")

    def forward(signum: int, _frame: object) -> None:
        for p in procs:
            p.send_signal(signum)

    signal.signal(signal.SIGTERM, forward)
    signal.signal(signal.SIGINT, forward)
    while any(p.poll() is None for p in procs):
        time.sleep(1.0)
    sys.exit(max(p.returncode or 0 for p in procs))
