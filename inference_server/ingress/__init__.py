"""The AMQP front door: `inference-server ingress` turns messages on ``inference.requests`` into jobs
through the same job service as the HTTP API (``broker`` declares the topology, ``messages`` reads a
delivery, ``consumer`` writes batches and acknowledges them, ``replies`` publishes answers)."""
