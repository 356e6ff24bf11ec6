"""The system under test: a database, vhost and bucket of its own on the lab's services, a TcpProxy on
each link a scenario breaks (the API's and the workers' PostgreSQL, the workers' S3), and the real
`api`, `worker` and `dispatcher` processes. Several scenarios run on one system in turn, each as a
tenant of its own (see ``run``); one whose fault leaves it unable to run a job gets a fresh one."""

from __future__ import annotations

import contextlib
import os
import uuid
from pathlib import Path

from inference_server.devtools.faults import procs
from inference_server.devtools.faults.common import log
from inference_server.devtools.faults.postgres import PrivatePostgres
from inference_server.devtools.faults.proxy import TcpProxy
from inference_server.devtools.faults.rabbitmq import PrivateRabbit

# The test tunings of the system (in the spirit of the test suite's): quick polling, and a webhook
# schedule that outlasts the scenarios' outages while fitting their minute.
SYSTEM_ENV = {
    "OMP_NUM_THREADS": "1",
    "TORCH_THREADS": "1",
    "PYTHONUNBUFFERED": "1",
    "ALLOW_PRIVATE_NETWORKS": "true",
    "PROGRESS_INTERVAL": "0.2",
    "CANCEL_POLL_INTERVAL": "0.1",
    "RELAY_INTERVAL": "0.05",
    "WEBHOOK_POLL_INTERVAL": "0.05",
    "WEBHOOK_RETRY_DELAYS": "1,1,2,2,3,5,5,8,8,13,13,21",
    "WEBHOOK_TIMEOUT": "3",  # the dispatcher's delivery lease is 2 x this + 30 s
    # Leases short enough that a lost run is found within the scenarios' minute.
    "JOB_LEASE_SECONDS": "6",
    "RECONCILE_INTERVAL": "1",
    "JOB_RETRY_DELAYS": "1,2,4",
    "JOB_END_RETRY_SECONDS": "10",
    "LOST_MESSAGE_GRACE": "15",
    "AWS_ACCESS_KEY_ID": "test",
    "AWS_SECRET_ACCESS_KEY": "test",
    "AWS_DEFAULT_REGION": "us-east-1",
}
LINKS = ("api_db", "worker_db", "s3")
SECOND_FAMILY = "sd15b"  # see lab.lab_registry: a second worker's node name needs another family


class System:
    """``start()`` brings up the API, ``workers`` workers and a dispatcher; ``close()`` stops them."""

    def __init__(
        self,
        *,
        pg: PrivatePostgres,
        rabbit: PrivateRabbit,
        s3: str,
        models: Path,
        logs: Path,
        env: dict[str, str] | None = None,
    ) -> None:
        self.pg = pg
        self.rabbit = rabbit
        self.s3 = s3
        self.models = models
        self.logs = logs
        self.logs.mkdir(parents=True, exist_ok=True)
        self.database_url = pg.create_database("faults")
        self.broker_url = rabbit.add_vhost("faults")
        self.vhost = self.broker_url.rsplit("/", 1)[1]
        self.bucket = f"faults-{uuid.uuid4().hex[:10]}"
        _create_bucket(s3, self.bucket)
        s3_port = int(s3.rsplit(":", 1)[1])
        self.proxies = {
            link: TcpProxy(("127.0.0.1", s3_port if link == "s3" else pg.port), name=link) for link in LINKS
        }
        self.extra_env = env or {}
        self.workers: list[procs.Proc] = []
        self.others: list[procs.Proc] = []
        self.api_url = ""
        self.broken = False  # set when a scenario left it unable to run a job

    def env(self, role: str) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if not k.startswith(("DATABASE_", "BROKER_", "STORAGE_"))}
        env.update(SYSTEM_ENV)
        db = self.proxies.get(f"{role}_db")
        s3 = self.proxies["s3"] if role == "worker" else None
        env.update(
            DATABASE_URL=self.database_url.replace(f":{self.pg.port}/", f":{db.port}/")
            if db
            else self.database_url,
            BROKER_URL=self.broker_url,
            STORAGE_URL=f"s3://{self.bucket}/outputs",
            S3_ENDPOINT_URL=f"http://127.0.0.1:{s3.port}" if s3 else self.s3,
            MODELS_FILE=str(self.models),
            MODEL_CACHE_DIR=str(self.logs / "model-cache"),
            INFERENCE_SERVER_HOME=str(self.logs / "home"),
        )
        if self.api_url:
            env["API_URL"] = self.api_url
        env.update(self.extra_env)
        return env

    def start(self, *, workers: int = 1) -> System:
        """The API, ``workers`` workers and the dispatcher, started side by side; waits for all."""
        api, self.api_url = procs.start_api(self.env("api"), self.logs)
        self.others.append(api)
        started = [self.add_worker(wait=False, second=i == 1) for i in range(workers)]
        self.start_dispatcher()
        procs.wait_api(api, self.api_url)
        for w in started:
            procs.wait_worker(w)
        return self

    def add_worker(self, *, wait: bool = True, second: bool | None = None) -> procs.Proc:
        """A worker; while another is alive under the first node name, it takes the second."""
        if second is None:
            second = any(w.families == "sd15" for w in self.live_workers())  # type: ignore[attr-defined]
        families = f"sd15,{SECOND_FAMILY}" if second else "sd15"
        worker = procs.start_worker(self.env("worker"), self.logs, families)
        worker.families = families  # type: ignore[attr-defined]
        self.workers.append(worker)
        if wait:
            procs.wait_worker(worker)
        return worker

    def live_workers(self) -> list[procs.Proc]:
        return [w for w in self.workers if w.alive()]

    def replace_worker(self, old: procs.Proc) -> procs.Proc:
        """A new worker under ``old``'s node name, once ``old`` has exited (a supervisor's restart)."""
        with contextlib.suppress(Exception):
            old.proc.wait(60)
        return self.add_worker(second=old.families != "sd15")  # type: ignore[attr-defined]

    def dispatcher(self) -> procs.Proc | None:
        return next((p for p in self.others if p.name == "dispatcher" and p.alive()), None)

    def start_dispatcher(self) -> procs.Proc:
        proc = procs.start_dispatcher(self.env("dispatcher"), self.logs)
        self.others.append(proc)
        return proc

    def heal_all(self) -> None:
        for proxy in self.proxies.values():
            proxy.heal()

    def logs_of(self, role: str) -> str:
        return "\n".join(p.text() for p in [*self.workers, *self.others] if p.name == role)

    def close(self) -> None:
        for p in [*self.others, *self.workers]:
            p.stop(5)
        for proxy in self.proxies.values():
            proxy.close()
        with contextlib.suppress(Exception):
            self.rabbit.ctl("delete_vhost", self.vhost)
        log.info("system closed; logs in %s", self.logs)


def _create_bucket(endpoint: str, bucket: str) -> None:
    import boto3

    s3 = boto3.client(
        "s3",
        endpoint_url=endpoint,
        region_name="us-east-1",
        aws_access_key_id="test",
        aws_secret_access_key="test",
    )
    s3.create_bucket(Bucket=bucket)
