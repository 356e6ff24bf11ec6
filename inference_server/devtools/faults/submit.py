"""Submitting jobs as a careful client does: over HTTP, one Idempotency-Key per job, retried while the
API answers 503 or not at all, so a job is accepted once however often its submit is tried."""

from __future__ import annotations

import threading
import time
import uuid
from collections import Counter
from typing import Any

import requests


class Submitter(threading.Thread):
    """Posts ``bodies`` in order, ``interval`` seconds apart; accepted ids go into ``accepted``."""

    def __init__(
        self,
        api_url: str,
        api_key: str,
        bodies: list[dict[str, Any]],
        accepted: dict[str, float],
        lock: threading.Lock,
        *,
        interval: float = 0.0,
        give_up_after: float = 120.0,
        request_timeout: float = 10.0,
    ) -> None:
        super().__init__(name="submitter", daemon=True)
        self.api_url = api_url
        self.bodies = bodies
        self.accepted = accepted
        self.lock = lock
        self.interval = interval
        self.give_up_after = give_up_after
        self.request_timeout = request_timeout
        self.http = requests.Session()
        self.http.headers["Authorization"] = f"Bearer {api_key}"
        self.refused = 0  # 503 answers
        self.statuses: Counter[str] = Counter()  # every answer (or "timeout", "conn") seen
        self.given_up = 0  # jobs never accepted within give_up_after
        self.seconds: list[float] = []  # how long each answer took
        self.errors: list[str] = []  # answers that no retry can fix (a 4xx): the body was wrong

    def run(self) -> None:
        try:
            for body in self.bodies:
                self._submit(body)
                if self.interval:
                    time.sleep(self.interval)
        finally:
            self.http.close()

    def _submit(self, body: dict[str, Any]) -> None:
        key = uuid.uuid4().hex
        deadline = time.monotonic() + self.give_up_after
        while time.monotonic() < deadline:
            t0 = time.monotonic()
            try:
                resp = self.http.post(
                    f"{self.api_url}/v1/jobs",
                    json=body,
                    headers={"Idempotency-Key": key},
                    timeout=self.request_timeout,
                )
            except requests.Timeout:
                self.statuses["timeout"] += 1
            except requests.ConnectionError:
                self.statuses["conn"] += 1
            else:
                self.seconds.append(time.monotonic() - t0)
                self.statuses[str(resp.status_code)] += 1
                if resp.status_code in (200, 201, 202):
                    with self.lock:
                        self.accepted.setdefault(resp.json()["id"], time.monotonic())
                    return
                if resp.status_code == 503:
                    self.refused += 1
                elif resp.status_code < 500:
                    self.errors.append(f"{resp.status_code}: {resp.text[:300]}")
                    return
            time.sleep(0.2)
        self.given_up += 1
