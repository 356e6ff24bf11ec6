"""The fault harness: private PostgreSQL and RabbitMQ instances, a TCP proxy that cuts, blackholes
and resets, the system's real processes, a webhook receiver that verifies every signature, and a
tally per scenario. The test suite (tests/faults/) and benchmarks/faults.py both run
``scenarios.SCENARIOS`` on a ``Lab``; only their sizes differ."""
