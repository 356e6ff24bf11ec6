"""Publishing a batch of messages with one wait for RabbitMQ's publisher confirms.

Celery's ``confirm_publish`` waits for each message's confirm before sending the next: one round
trip per job. Here the channel is put in confirm mode, the whole batch is sent, and the relay waits
once for the acks, which RabbitMQ may also merge (``multiple``)."""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

from kombu import Connection


class ConfirmTimeout(Exception):
    """The broker did not confirm every message of a batch in time."""


class ConfirmingChannel:
    """A broker channel in confirm mode, with the delivery tags still awaiting an answer."""

    def __init__(self, connection: Connection) -> None:
        self.connection = connection
        self.channel = connection.channel()
        self.channel.confirm_select()
        self.channel.events["basic_ack"].add(self._ack)
        self.channel.events["basic_nack"].add(self._nack)
        self._next_tag = 1
        self._pending: set[int] = set()
        self._nacked: set[int] = set()

    def _settle(self, tag: int, multiple: bool, failed: bool) -> None:
        tags = {t for t in self._pending if t <= tag} if multiple else {tag}
        self._pending -= tags
        if failed:
            self._nacked |= tags

    def _ack(self, tag: int, multiple: bool) -> None:
        self._settle(tag, multiple, failed=False)

    def _nack(self, tag: int, multiple: bool) -> None:
        self._settle(tag, multiple, failed=True)

    def publish_all(
        self, items: Iterable[Any], publish: Callable[[Any], None], *, timeout: float = 10.0
    ) -> list[Any]:
        """Call ``publish(item)`` for each item on this channel, then wait for the confirms.

        Returns the items the broker confirmed (acked), in order."""
        sent: list[tuple[int, Any]] = []
        for item in items:
            tag = self._next_tag
            publish(item)
            self._next_tag += 1
            self._pending.add(tag)
            sent.append((tag, item))
        deadline_waits = max(1, int(timeout / 0.5))
        waits = 0
        while self._pending:
            try:
                self.connection.drain_events(timeout=0.5)
            except TimeoutError:
                waits += 1
                if waits >= deadline_waits:
                    raise ConfirmTimeout(
                        f"{len(self._pending)} messages unconfirmed after {timeout}s"
                    ) from None
        confirmed = [item for tag, item in sent if tag not in self._nacked]
        self._nacked.clear()
        return confirmed
