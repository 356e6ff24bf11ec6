# Shortcuts for the commands the README gives. Run them from the repository root, in the venv
# that has the project installed (`pip install -e ".[dev]"`).
PYTHON ?= python

.PHONY: up test lint bench

# The whole system in one process, on embedded defaults (SQLite, an in-process broker, tiny
# random-weight models built on first run); serves http://127.0.0.1:8000 until Ctrl-C.
up:
	$(PYTHON) -m inference_server.cli.main up

# The suite: needs PostgreSQL on 127.0.0.1:5432 and RabbitMQ on 127.0.0.1:5672 (README).
test:
	$(PYTHON) -m pytest -q

lint:
	$(PYTHON) -m ruff check .
	$(PYTHON) -m mypy api workers webhooks inference_server

# A short, representative set: the engine on tiny models, the job path overhead, submit
# throughput and webhook delivery, each at a small size (a few minutes in all). Each script
# takes larger sizes for real figures: see benchmarks/ and README.
bench:
	$(PYTHON) benchmarks/engine.py --size 64 --steps 4 --repeat 2
	$(PYTHON) benchmarks/overhead.py --jobs 10
	$(PYTHON) benchmarks/ingest.py --seconds 5
	$(PYTHON) benchmarks/webhooks.py --events 500
