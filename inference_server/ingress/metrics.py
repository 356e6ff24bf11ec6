"""Prometheus metrics of an ingress process, served with its probes (``health``)."""

from __future__ import annotations

from prometheus_client import Counter, Histogram

MESSAGES = Counter(
    "inference_ingress_messages_total",
    "Messages the ingress took from its queue, by outcome (created, replayed, rejected)",
    ["outcome"],
)
REJECTED = Counter(
    "inference_ingress_rejected_total",
    "Messages the ingress refused to the dead-letter queue, by error code",
    ["code"],
)
ACK_SECONDS = Histogram(
    "inference_ingress_ack_seconds",
    "Time from a message's arrival in the ingress to its acknowledgement (after its job committed)",
    buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10),
)
BATCH_SIZE = Histogram(
    "inference_ingress_batch_messages",
    "Messages written per database transaction",
    buckets=(1, 2, 5, 10, 25, 50, 100, 200, 500, 1000),
)
DATABASE_ERRORS = Counter(
    "inference_ingress_database_errors_total",
    "Batches given back to the broker because the database was unavailable",
)
