"""What the tests import; the fixtures themselves are in ``tests/conftest.py``.

- ``receiver``: ``Receiver``, the one real HTTP webhook receiver
- ``waiting``: ``wait_for``, the one way a test waits for something
- ``system``: the processes of the system under test (``Proc``, ``start_worker``, ``base_env``)
- ``seed``: settings and rows for tests that run components in-process on a scratch database
- ``jobs``: a job seen from the HTTP side (``submit``, ``get``, ``wait_done``, ...)
- ``engine``: engine requests for the tiny models

Scratch databases, private vhosts and free ports come from ``inference_server.devtools``, which the
benchmarks share."""
