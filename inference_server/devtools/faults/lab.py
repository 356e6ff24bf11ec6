"""The services every scenario shares (``Lab``): a private PostgreSQL cluster, a private RabbitMQ
node, a moto S3 server and the tiny models; and the system under test that runs on them (one
``System``, kept across scenarios while it stays healthy). ``lab.run(name)`` hands a scenario its
tenant on that system."""

from __future__ import annotations

import os
import re
import shutil
import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

from inference_server.devtools.faults.common import forget, interrupt_on_sigterm, log, on_exit
from inference_server.devtools.faults.postgres import PrivatePostgres
from inference_server.devtools.faults.procs import Proc, start_moto
from inference_server.devtools.faults.rabbitmq import PrivateRabbit
from inference_server.devtools.faults.run import Run
from inference_server.devtools.faults.system import SECOND_FAMILY, System

WORKERS = 2  # two jobs can be mid-run at once (the PostgreSQL outage scenario wants that)


class Lab:
    """``Lab.open()`` starts everything (about 15 s); ``close()`` stops and deletes all of it."""

    def __init__(
        self, root: Path, pg: PrivatePostgres, rabbit: PrivateRabbit, moto: Proc, s3: str, models: Path
    ):
        self.root = root
        self.pg = pg
        self.rabbit = rabbit
        self.moto = moto
        self.s3 = s3
        self.models = models
        self._extra_rabbits: list[PrivateRabbit] = []
        self._system: System | None = None
        self._systems = 0
        self.owns_root = False  # a folder it made itself is deleted on close (FAULTS_KEEP_LOGS keeps it)
        self._cleanup = on_exit(self.close)

    @classmethod
    def open(cls, root: Path | None = None) -> Lab:
        interrupt_on_sigterm()
        owns_root = root is None
        root = root or Path(tempfile.mkdtemp(prefix="faults-lab-"))
        (root / "logs").mkdir(parents=True, exist_ok=True)
        undo: list[Callable[[], None]] = []
        try:
            pg = PrivatePostgres()
            undo.append(pg.close)
            pg.start()
            rabbit = PrivateRabbit()
            undo.append(rabbit.close)
            rabbit.start()
            moto, s3 = start_moto(root / "logs")
            undo.append(moto.stop)
            models = lab_registry(root)
        except BaseException:
            for step in reversed(undo):
                step()
            raise
        log.info("lab up: postgres :%s, rabbitmq %s :%s, s3 %s", pg.port, rabbit.node, rabbit.port, s3)
        lab = cls(root, pg, rabbit, moto, s3, models)
        lab.owns_root = owns_root
        return lab

    def new_system(self, rabbit: PrivateRabbit | None = None, workers: int = WORKERS) -> System:
        self._systems += 1
        system = System(
            pg=self.pg,
            rabbit=rabbit or self.rabbit,
            s3=self.s3,
            models=self.models,
            logs=self.root / "logs" / f"system-{self._systems}",
        )
        try:
            return system.start(workers=workers)
        except BaseException:
            system.close()
            raise

    def system(self) -> System:
        """The shared system, new if there is none or the last scenario left it broken."""
        if self._system is not None and (self._system.broken or not self._system.live_workers()):
            log.warning("starting a new system: the last scenario left this one unable to run jobs")
            self._system.close()
            self._system = None
        if self._system is None:
            self._system = self.new_system()
        return self._system

    @contextmanager
    def run(self, name: str, *, system: System | None = None, **kwargs: object) -> Iterator[Run]:
        """One scenario as a tenant of ``system`` (default: the shared one). Whatever it broke and did
        not mend (a service left down, a proxy left cut) is mended afterwards."""
        run = Run(system or self.system(), name, **kwargs)  # type: ignore[arg-type]
        try:
            yield run
        except BaseException:
            run.system.broken = True
            raise
        finally:
            run.close()
            if self.pg.postmaster_pid() is None:
                self.pg.start()
            if self.rabbit.pid() is None:
                self.rabbit.start()

    @contextmanager
    def own_system(self, rabbit: PrivateRabbit | None = None, workers: int = WORKERS) -> Iterator[System]:
        """A system for one scenario alone (on another broker node, say)."""
        system = self.new_system(rabbit, workers)
        try:
            yield system
        finally:
            system.close()

    @contextmanager
    def extra_rabbit(self, consumer_timeout_ms: int) -> Iterator[PrivateRabbit]:
        """Another node for one scenario, whose global ``consumer_timeout`` is ``consumer_timeout_ms``
        (the only such knob RabbitMQ 3.10 has)."""
        node = PrivateRabbit(consumer_timeout_ms=consumer_timeout_ms)
        self._extra_rabbits.append(node)
        try:
            node.start()
            yield node
        finally:
            node.close()
            self._extra_rabbits.remove(node)

    def close(self) -> None:
        forget(self._cleanup)
        if self._system is not None:
            self._system.close()
            self._system = None
        for rabbit in [*self._extra_rabbits, self.rabbit]:
            rabbit.close()
        self.moto.stop(5)
        self.pg.close()
        if self.owns_root and not os.environ.get("FAULTS_KEEP_LOGS"):
            shutil.rmtree(self.root, ignore_errors=True)


def lab_registry(root: Path) -> Path:
    """The tiny sd15 model (built once, or taken from FAULTS_TINY_MODELS / TEST_TINY_MODELS) in a
    registry of the lab's own with absolute paths and the second family beside it."""
    source = None
    for var in ("FAULTS_TINY_MODELS", "TEST_TINY_MODELS"):
        folder = os.environ.get(var)
        if folder and "[families.sd15]" in _read(Path(folder, "models.toml")):
            source = Path(folder, "models.toml")
            break
    if source is None:
        import torch

        torch.set_num_threads(1)
        from inference_server.engine.tiny import build_tiny_models

        source = build_tiny_models(root / "tiny", families=["sd15"])
    text = source.read_text()
    base = source.parent.resolve()
    text = re.sub(
        r'(source|segmenter|image_encoder) = "([^":]+)"',
        lambda m: f'{m.group(1)} = "{(base / m.group(2)).as_posix()}"',
        text,
    )
    block = _family_block(text, "sd15")
    second = block.replace("families.sd15", f"families.{SECOND_FAMILY}").replace(
        'queue = "jobs.sd15"', f'queue = "jobs.{SECOND_FAMILY}"'
    )
    out = root / "models.toml"
    out.write_text(f"{block}\n{second}\n{_shared_blocks(text)}")
    return out


def _shared_blocks(text: str) -> str:
    """The tables every family shares (detector, preprocessors, safety checkers): not families'."""
    lines, keep = [], False
    for line in text.splitlines():
        if line.startswith("["):
            keep = not line.lstrip("[").startswith("families.")
        if keep:
            lines.append(line)
    return "\n".join(lines) + "\n"


def _family_block(text: str, family: str) -> str:
    lines, keep = [], False
    for line in text.splitlines():
        if line.startswith("["):
            keep = re.match(rf"^\[+families\.{re.escape(family)}[\].]", line) is not None
        if keep:
            lines.append(line)
    return "\n".join(lines) + "\n"


def _read(path: Path) -> str:
    try:
        return path.read_text()
    except OSError:
        return ""
