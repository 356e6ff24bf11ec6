"""The fault scenarios at a larger size (500 jobs through a broker restart and a PostgreSQL restart,
more of everything else) on a private PostgreSQL cluster and RabbitMQ node; prints one row of counts
per scenario.

    python benchmarks/faults.py                      # every scenario at its benchmark size
    python benchmarks/faults.py --only broker_restart,pg_restart --size 1000
    python benchmarks/faults.py --small              # the test suite's sizes

Columns: accepted (202s), ok_once (succeeded with one terminal record), failed (per code), lost
(accepted, not in the database), twice (recorded twice), stuck (not terminal at the deadline),
dup_wh (distinct terminal webhook ids per event beyond one), wh_miss (terminal webhook never
received), dead_w (workers that died on their own), reruns (jobs started more than once),
settle_s (last fault healed -> every job terminal and its terminal webhook received), done (the
issue's bar).
Needs root (or the postgres and rabbitmq users) for the private servers, as the test suite does."""

from __future__ import annotations

import argparse
import logging
import sys
import time
import traceback
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from inference_server.devtools.faults.lab import Lab  # noqa: E402
from inference_server.devtools.faults.scenarios import SCENARIOS  # noqa: E402
from inference_server.devtools.faults.tally import Tally, format_table  # noqa: E402


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", default="", help="comma-separated scenario names (default: all)")
    parser.add_argument("--size", type=int, default=0, help="jobs per scenario instead of its own size")
    parser.add_argument("--small", action="store_true", help="the test suite's sizes")
    parser.add_argument("--logs", type=Path, default=None, help="keep the lab's logs in this folder")
    parser.add_argument("-v", "--verbose", action="store_true")
    args = parser.parse_args()
    logging.basicConfig(
        level=logging.INFO if args.verbose else logging.WARNING, format="%(asctime)s %(message)s"
    )
    for noisy in ("pika", "alembic", "botocore", "urllib3"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    names = [n.strip() for n in args.only.split(",") if n.strip()] or list(SCENARIOS)
    unknown = [n for n in names if n not in SCENARIOS]
    if unknown:
        parser.error(f"unknown scenarios {unknown}; known: {', '.join(SCENARIOS)}")
    if args.logs:
        args.logs.mkdir(parents=True, exist_ok=True)
    t0 = time.monotonic()
    lab = Lab.open(args.logs)
    tallies: list[Tally] = []
    try:
        for name in names:
            scenario = SCENARIOS[name]
            size = args.size or (scenario.small if args.small else scenario.large)
            started = time.monotonic()
            try:
                tally = scenario.run(lab, size)
            except Exception as exc:  # one broken scenario must not hide the others' counts
                tally = Tally(name)
                tally.check("ran", False, f"{type(exc).__name__}: {exc}")
                traceback.print_exc()
            tally.notes.append(f"{time.monotonic() - started:.0f} s wall")
            tallies.append(tally)
            print(tally.report(), flush=True)
    finally:
        lab.close()
    print()
    print(format_table(tallies))
    print(f"\n{sum(t.done for t in tallies)}/{len(tallies)} done in {time.monotonic() - t0:.0f} s")
    return 0 if all(t.done for t in tallies) else 1


if __name__ == "__main__":
    sys.exit(main())
