"""Where a benchmark's CPU went: CPU time (user + system, all threads) of every process on the host,
read from ``/proc`` before and after a window and grouped by role (the worker's main process and its
child apart, PostgreSQL, RabbitMQ, the moto S3 server...). On a small host the system's own
processes compete with the denoising for the cores; this says which ones. Linux only; a process
that starts inside the window is counted from its first sighting, and one that ends inside it is
not counted."""

from __future__ import annotations

import os
import time
from collections import defaultdict
from pathlib import Path

TICK = os.sysconf("SC_CLK_TCK")


def _processes() -> dict[int, tuple[int, str, float]]:
    """pid -> (parent pid, command line, CPU seconds so far)."""
    found = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
            cmdline = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:  # ended meanwhile
            continue
        fields = stat[stat.rindex(")") + 2 :].split()  # after "pid (comm) "
        cpu = (int(fields[11]) + int(fields[12])) / TICK  # utime + stime
        found[int(entry.name)] = (int(fields[1]), cmdline or stat.split()[1], cpu)
    return found


def _role(pid: int, table: dict[int, tuple[int, str, float]]) -> str:
    parent, cmdline, _ = table[pid]
    if pid == os.getpid():
        return "benchmark (in-process calls, HTTP client)"
    if "workers.storing" in cmdline:
        return "worker: storing process"
    if "cli.main worker" in cmdline:
        parent_line = table.get(parent, (0, "", 0.0))[1]
        return "worker: child (denoising)" if "cli.main worker" in parent_line else "worker: main (Celery)"
    if "cli.main api" in cmdline:
        return "api"
    if "postgres" in cmdline:
        return "postgresql"
    if "beam.smp" in cmdline or "rabbitmq" in cmdline:
        return "rabbitmq"
    if "moto" in cmdline:
        return "s3 (moto server)"
    if "redis" in cmdline:
        return "redis"
    return "other"


class CpuWindow:
    """``start()``, run the load, ``stop()``; then ``report(jobs)`` gives the lines to print. The
    share of the cores busy is over the window's own time, the span its CPU times cover."""

    def start(self) -> CpuWindow:
        self._before = _processes()
        self._began = time.monotonic()
        return self

    def stop(self) -> CpuWindow:
        after = _processes()
        self.wall = time.monotonic() - self._began
        self.by_role: dict[str, float] = defaultdict(float)
        for pid, (_, _, cpu) in after.items():
            before = self._before.get(pid)
            self.by_role[_role(pid, after)] += cpu - (before[2] if before else 0.0)
        return self

    def report(self, jobs: int) -> list[str]:
        total = sum(self.by_role.values())
        busy = f"{total / self.wall:.2f} of {os.cpu_count()} cores busy"
        lines = [f"CPU per job over {self.wall:.2f} s ({busy}):"]
        for role, cpu in sorted(self.by_role.items(), key=lambda kv: -kv[1]):
            if cpu >= 0.0005 * jobs:
                lines.append(f"  {role:<44} {cpu / jobs * 1000:7.1f} ms")
        return lines
