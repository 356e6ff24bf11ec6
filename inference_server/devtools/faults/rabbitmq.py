"""A RabbitMQ node of the harness's own, beside the machine's shared node: its own node name, AMQP
and distribution ports, data and log folders and configuration (for example a short
``consumer_timeout``). Scenarios stop, restart and kill it; the shared node never notices. With
``management=True`` it also serves the management API (and UI) on ``management_port``."""

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

from inference_server.devtools.faults.common import chown, forget, free_port, on_exit, pid_alive, wait_until

USER = "rabbitmq"


class PrivateRabbit:
    """``start()`` boots the node (with ``rabbitmq-server -detached``); ``close()`` stops it and
    deletes its files. ``consumer_timeout_ms`` is the node-wide delivery acknowledgement timeout."""

    def __init__(
        self, *, consumer_timeout_ms: int | None = None, port: int | None = None, management: bool = False
    ) -> None:
        self.port = port or free_port()
        self.management_port = free_port() if management else None
        self.dist_port = free_port()
        self.node = f"faults_{os.getpid()}_{uuid.uuid4().hex[:6]}@localhost"
        self.root = Path(tempfile.mkdtemp(prefix="faults-rabbit-"))
        os.chmod(self.root, 0o755)
        config = [f"listeners.tcp.default = 127.0.0.1:{self.port}", "log.file.level = info"]
        if consumer_timeout_ms is not None:
            config.append(f"consumer_timeout = {consumer_timeout_ms}")
        if self.management_port:
            config += [f"management.tcp.port = {self.management_port}", "management.tcp.ip = 127.0.0.1"]
            config.append("collect_statistics_interval = 1000")  # queue counts a second old, not five
        (self.root / "rabbitmq.conf").write_text("\n".join(config) + "\n")
        # Without management by default: fewer ports, faster boot.
        (self.root / "enabled_plugins").write_text("[rabbitmq_management].\n" if management else "[].\n")
        # The broker checks consumer timeouts on each channel's tick (a minute by default), so a short
        # timeout needs a short tick to be enforced near the time it says.
        tick = min(1000, consumer_timeout_ms // 4) if consumer_timeout_ms else 60_000
        (self.root / "advanced.config").write_text(f"[{{rabbit, [{{channel_tick_interval, {tick}}}]}}].\n")
        files = ("rabbitmq.conf", "enabled_plugins", "advanced.config")
        for path in (self.root, *(self.root / f for f in files)):
            chown(path, USER)
        self._cleanup = on_exit(self.close)

    def url(self, vhost: str = "", *, port: int | None = None) -> str:
        return f"amqp://guest:guest@127.0.0.1:{port or self.port}/{vhost}"

    @property
    def logfile(self) -> Path:
        return self.root / "log" / f"{self.node}.log"

    def _env(self) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if not k.startswith("RABBITMQ_")}
        env.update(
            RABBITMQ_NODENAME=self.node,
            RABBITMQ_NODE_IP_ADDRESS="127.0.0.1",
            RABBITMQ_NODE_PORT=str(self.port),
            RABBITMQ_DIST_PORT=str(self.dist_port),
            RABBITMQ_MNESIA_BASE=str(self.root / "mnesia"),
            RABBITMQ_LOG_BASE=str(self.root / "log"),
            RABBITMQ_CONFIG_FILE=str(self.root / "rabbitmq"),
            RABBITMQ_ADVANCED_CONFIG_FILE=str(self.root / "advanced.config"),
            RABBITMQ_ENABLED_PLUGINS_FILE=str(self.root / "enabled_plugins"),
            RABBITMQ_PID_FILE=str(self.root / "pid"),
            ERL_CRASH_DUMP=str(self.root / "erl_crash.dump"),
        )
        return env

    def start(self, timeout: float = 120) -> None:
        subprocess.run(["rabbitmq-server", "-detached"], env=self._env(), check=True, timeout=30)
        wait_until(self._accepts_amqp, timeout, interval=0.3, what=f"RabbitMQ node {self.node}")

    def _accepts_amqp(self) -> bool:
        from kombu import Connection

        try:
            with Connection(self.url(), connect_timeout=2) as conn:
                conn.ensure_connection(max_retries=1)
            return True
        except Exception:
            return False

    def stop(self) -> None:
        pid = self.pid()
        if pid is None:
            return
        self.ctl("stop", timeout=60)
        wait_until(lambda: not pid_alive(pid), 60, what="RabbitMQ to stop")

    def kill(self) -> None:
        """SIGKILL the node's Erlang VM: a crash, no clean shutdown."""
        pid = self.pid()
        if pid is None:
            return
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
        wait_until(lambda: not pid_alive(pid), 30, what="the killed RabbitMQ to exit")

    def restart(self, down_for: float = 0.0) -> None:
        self.stop()
        time.sleep(down_for)
        self.start()

    def pid(self) -> int | None:
        try:
            pid = int((self.root / "pid").read_text().split()[0])
        except (OSError, ValueError, IndexError):
            return None
        return pid if pid_alive(pid) else None

    def ctl(self, *args: str, timeout: float = 60) -> str:
        proc = subprocess.run(
            ["rabbitmqctl", "-q", "-n", self.node, *args],
            env=self._env(),
            capture_output=True,
            text=True,
            timeout=timeout,
        )
        if proc.returncode != 0:
            raise RuntimeError(f"rabbitmqctl {' '.join(args)} failed: {proc.stderr.strip() or proc.stdout}")
        return proc.stdout

    def add_vhost(self, prefix: str = "faults") -> str:
        """A new vhost with full rights for guest; its AMQP URL."""
        name = f"{prefix}_{uuid.uuid4().hex[:8]}"
        self.ctl("add_vhost", name)
        self.ctl("set_permissions", "-p", name, "guest", ".*", ".*", ".*")
        return self.url(name)

    def close(self) -> None:
        forget(self._cleanup)
        try:
            self.stop()
        except Exception:
            self.kill()
        shutil.rmtree(self.root, ignore_errors=True)
