"""Helpers for the test suite and the benchmarks, never imported by the running system: free
ports, scratch PostgreSQL databases, private RabbitMQ vhosts, and tiny DF11 model configs.

They live here rather than under ``tests/`` so that ``benchmarks/`` does not import the tests.
``services`` needs only the standard library and SQLAlchemy; ``df11_models`` imports torch."""
