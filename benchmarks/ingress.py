"""Ingress: job requests turned into jobs per second by one `inference-server ingress` process from a
backlog already in RabbitMQ (goal: 300/s or more from 5,000), then the time from publish to the job's
``job.queued`` event at a steady rate. No workers run; the ingress's outbox relay does (the jobs are
published to their family queue as they would be in production).

    python benchmarks/ingress.py [--backlog 5000] [--rate 100] [--latency-messages 300]
    python benchmarks/ingress.py --backlog 500 --latency-messages 50     # a quick run
    INGRESS_RELAY=false python benchmarks/ingress.py                     # the ingress without its relay

Throughput is counted from the first job's ``created_at`` to the last (process start-up excluded);
latency compares each message's publish time with its ``job.queued`` event (one machine, one clock)."""

from __future__ import annotations

import argparse
import json
import os
import signal
import statistics
import sys
import tempfile
import time
import uuid
from pathlib import Path

import pika

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from benchmarks._system import broker, create_key, database, free_port, start, tiny_models, wait_http  # noqa: E402
from inference_server.ingress.broker import connection_parameters, declare  # noqa: E402
from inference_server.settings import Settings  # noqa: E402

BODY = {"family": "sd15", "prompt": "a lighthouse at dusk", "width": 64, "height": 64, "steps": 4}


def publisher(
    broker_url: str,
) -> tuple[pika.BlockingConnection, pika.adapters.blocking_connection.BlockingChannel]:
    connection = pika.BlockingConnection(connection_parameters(broker_url))
    channel = connection.channel()
    declare(channel, Settings(broker_url=broker_url))  # the queue exists before the ingress starts
    channel.confirm_delivery()
    return connection, channel


def publish(channel, key: str, message_id: str) -> None:  # type: ignore[no-untyped-def]
    properties = pika.BasicProperties(
        content_type="application/json",
        delivery_mode=pika.DeliveryMode.Persistent,
        message_id=message_id,
        headers={"authorization": f"Bearer {key}"},
    )
    channel.basic_publish("inference.requests", "sd15", json.dumps(BODY).encode(), properties)


def counts(db: str, prefix: str) -> tuple[int, float | None, float | None]:
    """Jobs whose key starts with ``prefix``: how many, first and last created_at (unix seconds)."""
    from sqlalchemy import create_engine, text

    engine = create_engine(db)
    with engine.connect() as conn:
        row = conn.execute(
            text("SELECT count(*), min(created_at), max(created_at) FROM jobs WHERE idempotency_key LIKE :p"),
            {"p": prefix + "%"},
        ).one()
    engine.dispose()
    return int(row[0]), row[1].timestamp() if row[1] else None, row[2].timestamp() if row[2] else None


def queued_times(db: str, prefix: str) -> dict[str, float]:
    from sqlalchemy import create_engine, text

    engine = create_engine(db)
    with engine.connect() as conn:
        rows = conn.execute(
            text(
                "SELECT j.idempotency_key, e.created_at FROM jobs j JOIN job_events e ON e.job_id = j.id "
                "WHERE e.type = 'job.queued' AND j.idempotency_key LIKE :p"
            ),
            {"p": prefix + "%"},
        ).all()
    engine.dispose()
    return {key: created.timestamp() for key, created in rows}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--backlog", type=int, default=5000)
    parser.add_argument("--rate", type=float, default=100.0, help="messages/s in the latency phase")
    parser.add_argument("--latency-messages", type=int, default=300)
    args = parser.parse_args()
    models = tiny_models()
    logs = Path(tempfile.mkdtemp(prefix="bench-ingress-"))
    with database() as db, broker() as broker_url:
        key = create_key(db)
        connection, channel = publisher(broker_url)
        run = uuid.uuid4().hex[:6]
        t0 = time.monotonic()
        for i in range(args.backlog):
            publish(channel, key, f"backlog-{run}-{i}")
        print(f"published a backlog of {args.backlog} in {time.monotonic() - t0:.1f}s (confirmed)")

        port = free_port()
        env = dict(
            os.environ,
            DATABASE_URL=db,
            BROKER_URL=broker_url,
            MODELS_FILE=str(models),
            INFERENCE_SERVER_HOME=str(logs),
            INGRESS_METRICS_PORT=str(port),
            STORAGE_URL=(logs / "storage").as_uri(),
        )
        proc = start(["ingress"], env, logs / "ingress.log")
        try:
            wait_http(f"http://127.0.0.1:{port}/healthz")
            started = time.monotonic()
            while counts(db, f"backlog-{run}")[0] < args.backlog:
                if proc.poll() is not None or time.monotonic() - started > 600:
                    raise RuntimeError(f"the ingress stopped or stalled; see {logs / 'ingress.log'}")
                time.sleep(0.2)
            n, first, last = counts(db, f"backlog-{run}")
            assert first is not None and last is not None
            span = max(last - first, 1e-6)
            print(f"backlog: {n} jobs in {span:.2f}s = {n / span:.0f} jobs/s (one ingress process)")

            sent: dict[str, float] = {}
            gap = 1.0 / args.rate
            next_at = time.monotonic()
            for i in range(args.latency_messages):
                message_id = f"steady-{run}-{i}"
                sent[message_id] = time.time()
                publish(channel, key, message_id)
                next_at += gap
                time.sleep(max(0.0, next_at - time.monotonic()))
            deadline = time.monotonic() + 60
            while len(queued_times(db, f"steady-{run}")) < len(sent) and time.monotonic() < deadline:
                time.sleep(0.2)
            queued = queued_times(db, f"steady-{run}")
            latencies = sorted((queued[m] - sent[m]) * 1000 for m in sent if m in queued)
            if latencies:
                p95 = latencies[int(0.95 * (len(latencies) - 1))]
                print(
                    f"publish -> job.queued at {args.rate:.0f} msg/s ({len(latencies)} messages): "
                    f"p50 {statistics.median(latencies):.1f} ms, p95 {p95:.1f} ms, max {latencies[-1]:.1f} ms"
                )
        finally:
            os.killpg(proc.pid, signal.SIGTERM)
            proc.wait()
            connection.close()


if __name__ == "__main__":
    main()
