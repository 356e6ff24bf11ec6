"""A TCP proxy on loopback that can blackhole: a peer that stops answering without closing anything.

While blackholed it keeps accepting connections and reading what clients send, forwards nothing
either way and drops the bytes, so the client's kernel sees every byte acknowledged and only a
client-side limit can notice. ``heal`` forwards again; connections that lost bytes meanwhile are
closed (their protocol stream is broken), those that stayed quiet carry on.

Also here: the helpers the outage tests share (a URL through the proxy, a one-family registry)."""

from __future__ import annotations

import socket
import threading
from contextlib import suppress
from pathlib import Path


class _Link:
    """One client connection and, unless it was accepted while blackholed, its upstream."""

    def __init__(self, client: socket.socket, upstream: socket.socket | None) -> None:
        self.client = client
        self.upstream = upstream
        self.lost = upstream is None  # accepted while blackholed: it never reaches the server

    def close(self) -> None:
        for s in (self.client, self.upstream):
            if s is not None:
                with suppress(OSError):
                    s.shutdown(socket.SHUT_RDWR)
                with suppress(OSError):
                    s.close()


class BlackholeProxy:
    def __init__(self, target: tuple[str, int]) -> None:
        self.target = target
        self.server = socket.create_server(("127.0.0.1", 0))
        self.port = self.server.getsockname()[1]
        self.blackholed = False
        self.accepted = 0
        self._links: list[_Link] = []
        self._lock = threading.Lock()
        threading.Thread(target=self._accept, daemon=True).start()

    def blackhole(self) -> None:
        self.blackholed = True

    def heal(self) -> None:
        with self._lock:
            self.blackholed = False
            broken = [link for link in self._links if link.lost]
            self._links = [link for link in self._links if not link.lost]
        for link in broken:
            link.close()

    def close(self) -> None:
        with suppress(OSError):
            self.server.close()
        with self._lock:
            links, self._links = self._links, []
        for link in links:
            link.close()

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self.server.accept()
            except OSError:
                return
            self.accepted += 1
            upstream = None if self.blackholed else socket.create_connection(self.target)
            link = _Link(client, upstream)
            with self._lock:
                self._links.append(link)
            threading.Thread(target=self._pump, args=(link, client, upstream), daemon=True).start()
            if upstream is not None:
                threading.Thread(target=self._pump, args=(link, upstream, client), daemon=True).start()

    def _pump(self, link: _Link, src: socket.socket, dst: socket.socket | None) -> None:
        try:
            while data := src.recv(65536):
                if self.blackholed or link.lost or dst is None:
                    link.lost = True  # dropped on the floor
                    continue
                dst.sendall(data)
        except OSError:
            pass
        link.close()


def through(url: str, proxy: BlackholeProxy) -> str:
    """``url`` (a database URL) with its host and port replaced by the proxy's."""
    from sqlalchemy import make_url

    return make_url(url).set(host="127.0.0.1", port=proxy.port).render_as_string(hide_password=False)


def proxy_for(url: str) -> BlackholeProxy:
    """A proxy to the host and port of ``url`` (a database URL)."""
    from sqlalchemy import make_url

    parsed = make_url(url)
    return BlackholeProxy((parsed.host or "127.0.0.1", parsed.port or 5432))


MINIMAL_REGISTRY = """
[families.sd15]
tasks = ["txt2img"]
[[families.sd15.models]]
id = "base"
source = "sd15"
"""


def minimal_registry(directory: Path) -> Path:
    """A registry naming one family, for processes that validate requests but run no model."""
    (directory / "sd15").mkdir(parents=True, exist_ok=True)
    path = directory / "models.toml"
    path.write_text(MINIMAL_REGISTRY)
    return path
