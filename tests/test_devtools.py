"""The suite's own safety nets on the real services: a private vhost is a vhost of its own, and
the queue listing that guards the default vhost sees a queue appear."""

from __future__ import annotations

from urllib.parse import unquote, urlsplit

from kombu import Connection

from inference_server.devtools import services


def test_a_private_vhost_holds_its_queues_and_goes_away_with_them(broker_url: str) -> None:
    with services.private_vhost("is_devtools", broker_url) as url:
        vhost = unquote(urlsplit(url).path[1:])
        assert vhost.startswith("is_devtools_") and urlsplit(url).netloc == urlsplit(broker_url).netloc
        assert services.vhost_queues(vhost) == []
        with Connection(url, connect_timeout=5) as conn:
            conn.default_channel.queue_declare("devtools.probe", durable=False, auto_delete=False)
        # What the default-vhost guard relies on: a new queue shows in the listing.
        assert services.vhost_queues(vhost) == ["devtools.probe"]
    assert vhost not in services.rabbitmqctl("list_vhosts", "--no-table-headers", "name").split()
