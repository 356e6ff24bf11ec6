"""A PostgreSQL cluster of the harness's own, on its own port and data directory, that scenarios
stop, restart and kill at will without disturbing the machine's shared server."""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
import tempfile
import time
import uuid
from pathlib import Path

from inference_server.devtools.faults.common import (
    as_user,
    children,
    chown,
    forget,
    free_port,
    on_exit,
    pid_alive,
    wait_until,
)

PG_BIN = Path(os.environ.get("FAULTS_PG_BIN", "/usr/lib/postgresql/15/bin"))
USER = "postgres"


class PrivatePostgres:
    """``start()`` initialises the cluster on first use; ``close()`` stops it and deletes its files."""

    def __init__(self, port: int | None = None) -> None:
        self.port = port or free_port()
        self.root = Path(tempfile.mkdtemp(prefix="faults-pg-"))
        chown(self.root, USER)
        self.data = self.root / "data"
        self.logfile = self.root / "postgres.log"
        self._cleanup = on_exit(self.close)

    @property
    def admin_url(self) -> str:
        return self.url("postgres")

    def url(self, database: str, *, port: int | None = None) -> str:
        """A SQLAlchemy URL; ``port`` puts a proxy in between."""
        return f"postgresql+psycopg2://{USER}@127.0.0.1:{port or self.port}/{database}"

    def start(self) -> None:
        if not self.data.exists():
            self._run("initdb", "-D", str(self.data), "-A", "trust", "-U", USER, "-E", "UTF8", "--no-sync")
        options = " ".join(
            [
                "-c listen_addresses=127.0.0.1",
                f"-p {self.port}",
                f"-k {self.root}",  # the unix socket stays in our folder, never /var/run/postgresql
                # fsync off loses nothing when processes die, only when the machine does; a commit
                # must still reach the kernel before it returns (synchronous_commit stays on), or a
                # killed server would lose jobs the API had accepted.
                "-c fsync=off -c full_page_writes=off",
                "-c max_connections=200",
            ]
        )
        self._run(
            "pg_ctl", "-D", str(self.data), "-l", str(self.logfile), "-w", "-t", "60", "-o", options, "start"
        )

    def stop(self, mode: str = "fast") -> None:
        """Stop the cluster (``fast``: sessions are disconnected; ``immediate``: no shutdown checkpoint)."""
        if self.postmaster_pid() is not None:
            self._run("pg_ctl", "-D", str(self.data), "-m", mode, "-w", "-t", "60", "stop")

    def kill(self) -> None:
        """SIGKILL the postmaster and every backend at once: the machine lost power."""
        pid = self.postmaster_pid()
        if pid is None:
            return
        victims = [pid, *children(pid)]
        for victim in victims:
            with contextlib.suppress(ProcessLookupError):
                os.kill(victim, signal.SIGKILL)
        wait_until(lambda: not any(pid_alive(v) for v in victims), 30, what="the killed PostgreSQL to exit")
        # A new postmaster refuses lock files naming a live pid, and a zombie still counts as one
        # until whatever adopted it reaps it: the lock files are stale, so let them go.
        lock = self.data / "postmaster.pid"
        with contextlib.suppress(OSError, ValueError, IndexError):
            shmid = lock.read_text().splitlines()[6].split()[1]  # "key id" of the SysV segment
            subprocess.run(["ipcrm", "-m", shmid], capture_output=True, timeout=10)
        for stale in (lock, self.root / f".s.PGSQL.{self.port}.lock", self.root / f".s.PGSQL.{self.port}"):
            with contextlib.suppress(FileNotFoundError):
                stale.unlink()

    def restart(self, down_for: float = 0.0, *, mode: str = "fast") -> None:
        self.stop(mode)
        time.sleep(down_for)
        self.start()

    def postmaster_pid(self) -> int | None:
        try:
            pid = int((self.data / "postmaster.pid").read_text().split()[0])
        except (OSError, ValueError, IndexError):
            return None
        return pid if pid_alive(pid) else None

    def create_database(self, prefix: str = "faults") -> str:
        """A new database at migration head; its URL."""
        from sqlalchemy import create_engine, text

        from inference_server.migrate import upgrade

        name = f"{prefix}_{uuid.uuid4().hex[:8]}"
        admin = create_engine(self.admin_url, isolation_level="AUTOCOMMIT")
        try:
            with admin.connect() as conn:
                conn.execute(text(f'CREATE DATABASE "{name}"'))
        finally:
            admin.dispose()
        upgrade(self.url(name))
        return self.url(name)

    def close(self) -> None:
        forget(self._cleanup)
        try:
            self.stop("immediate")
        except (OSError, subprocess.SubprocessError):
            self.kill()
        shutil.rmtree(self.root, ignore_errors=True)

    def _run(self, program: str, *args: str) -> None:
        proc = subprocess.run(
            [*as_user(USER), str(PG_BIN / program), *args],
            cwd=self.root,
            capture_output=True,
            text=True,
            timeout=90,
        )
        if proc.returncode != 0:
            tail = self.logfile.read_text(errors="replace")[-2000:] if self.logfile.exists() else ""
            raise RuntimeError(f"{program} failed ({proc.returncode}): {proc.stderr.strip()}\n{tail}")
