"""Helpers for the test suite and the benchmarks, never imported by the running system: free
ports, scratch PostgreSQL databases, private RabbitMQ vhosts, tiny DF11 model configs, and the
fault harness (private PostgreSQL and RabbitMQ instances, a TCP proxy that cuts and blackholes).

They live here rather than under ``tests/`` so that ``benchmarks/`` does not import the tests.
``services`` needs only the standard library and SQLAlchemy; ``df11_models`` imports torch."""
