"""A TCP proxy on 127.0.0.1 in front of one ``host:port`` whose link can be cut, blackholed or reset,
and healed: a network fault as the process behind it sees it, without touching the real service.

- ``cut()``: every connection is closed (FIN) and new ones are refused, as when the service is down.
- ``blackhole()``: connections stay open and new ones are accepted, but nothing is forwarded until
  ``heal()``; what was sent meanwhile is held, as TCP retransmits through a partition.
- ``reset()``: every connection, and every new one until ``heal()``, is reset (RST).
- ``slow(rtt)``: everything is forwarded, ``rtt / 2`` late in each direction, so a request and its
  answer take ``rtt`` longer, as from a server that far away (``heal()`` or ``slow(0)`` ends it).
"""

from __future__ import annotations

import contextlib
import enum
import select
import socket
import struct
import threading
import time
from collections import deque

TICK = 0.05  # how often a link notices a change of mode


class Mode(enum.Enum):
    PASS = "pass"
    CUT = "cut"
    BLACKHOLE = "blackhole"
    RESET = "reset"


class TcpProxy:
    """Forwards ``127.0.0.1:port`` to ``upstream``. ``port=0`` picks a free port."""

    def __init__(self, upstream: tuple[str, int], port: int = 0, *, name: str = "proxy") -> None:
        self.upstream = upstream
        self.name = name
        self._mode = Mode.PASS
        self._lock = threading.Lock()
        self._links: set[_Link] = set()
        self._closed = threading.Event()
        self._listener: socket.socket | None = None
        self._generation = 0  # mode changes asked for
        self._applied = 0  # mode changes the accept loop has carried out
        self.accepted = 0  # connections accepted, in any mode
        self.one_way = 0.0  # seconds every chunk is held, each direction (``slow``)
        self.port = self._listen(port)
        self._acceptor = threading.Thread(target=self._accept_loop, name=f"{name}-accept", daemon=True)
        self._acceptor.start()

    @property
    def mode(self) -> Mode:
        return self._mode

    @property
    def address(self) -> tuple[str, int]:
        return ("127.0.0.1", self.port)

    def cut(self) -> None:
        self._set(Mode.CUT)

    def blackhole(self) -> None:
        self._set(Mode.BLACKHOLE)

    def reset(self) -> None:
        self._set(Mode.RESET)

    def heal(self) -> None:
        self.one_way = 0.0
        self._set(Mode.PASS)

    def slow(self, rtt: float) -> None:
        """Forward everything, adding ``rtt`` seconds to each round trip (half each way)."""
        self.one_way = max(0.0, rtt) / 2
        self._set(Mode.PASS)

    def close(self) -> None:
        self._closed.set()
        self._set(Mode.CUT)
        self._acceptor.join(5)
        if self._listener is not None:
            self._listener.close()

    def _set(self, mode: Mode) -> None:
        """Switch to ``mode``; returns once the accept loop has applied it (a cut refuses from then on)."""
        with self._lock:
            self._mode = mode
            self._generation += 1
            wanted = self._generation
            links = list(self._links)
        for link in links:
            if mode is Mode.CUT:
                link.end(rst=False)
            elif mode is Mode.RESET:
                link.end(rst=True)
        deadline = time.monotonic() + 5
        while self._applied < wanted and self._acceptor.is_alive() and time.monotonic() < deadline:
            time.sleep(TICK / 5)

    def _listen(self, port: int) -> int:
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(("127.0.0.1", port))
        sock.listen(128)
        sock.settimeout(TICK)
        self._listener = sock
        return int(sock.getsockname()[1])

    def _accept_loop(self) -> None:
        """Owns the listening socket: only this thread opens and closes it, between two accepts, so
        a cut is in force when ``_set`` returns (no accept in flight keeps the port listening)."""
        while True:
            with self._lock:
                generation, mode = self._generation, self._mode
            if mode is Mode.CUT and self._listener is not None:
                self._listener.close()  # pending and new connections are refused from now on
                self._listener = None
            elif mode is not Mode.CUT and self._listener is None:
                self._listen(self.port)
            self._applied = generation
            if self._closed.is_set():
                return
            if self._listener is None:
                time.sleep(TICK)
                continue
            try:
                client, _ = self._listener.accept()
            except (TimeoutError, OSError):
                continue
            self.accepted += 1
            if self._mode is Mode.RESET:
                _close(client, rst=True)
                continue
            link = _Link(self, client)
            with self._lock:  # a cut or reset asked for since the accept did not see this link
                mode = self._mode
                if mode in (Mode.PASS, Mode.BLACKHOLE):
                    self._links.add(link)
            if mode in (Mode.CUT, Mode.RESET):
                _close(client, rst=mode is Mode.RESET)
                continue
            threading.Thread(target=link.run, name=f"{self.name}-link", daemon=True).start()

    def _forget(self, link: _Link) -> None:
        with self._lock:
            self._links.discard(link)


class _Link:
    """One client connection and its upstream, served by one thread that checks the mode each tick."""

    def __init__(self, proxy: TcpProxy, client: socket.socket) -> None:
        self.proxy = proxy
        self.client = client
        self.upstream: socket.socket | None = None
        self._end: bool | None = None  # None: live; else end with RST (True) or FIN (False)

    def end(self, *, rst: bool) -> None:
        self._end = rst

    def run(self) -> None:
        try:
            self._pump()
        except OSError:
            self._end = self._end if self._end is not None else False
        finally:
            rst = bool(self._end)
            _close(self.client, rst=rst)
            if self.upstream is not None:
                _close(self.upstream, rst=rst)
            self.proxy._forget(self)

    def _pump(self) -> None:
        open_from = {self.client}
        # What was read and is due to be forwarded (``slow``): (when, to, data or None for EOF),
        # in the order it was read; each is due one fixed delay after it was read, so in order too.
        held: deque[tuple[float, socket.socket, bytes | None]] = deque()
        while self._end is None:
            if self.proxy.mode is Mode.BLACKHOLE:
                time.sleep(TICK)  # hold everything: the kernel buffers what the peers send
                continue
            if self.upstream is None:
                self.upstream = socket.create_connection(self.proxy.upstream, timeout=5)
                open_from.add(self.upstream)
            peer = {self.client: self.upstream, self.upstream: self.client}
            wait = TICK if not held else min(TICK, max(0.0, held[0][0] - time.monotonic()))
            readable, _, _ = select.select(list(open_from), [], [], wait)
            due = time.monotonic() + self.proxy.one_way
            for sock in readable:
                data = sock.recv(65536)
                if not data:
                    open_from.discard(sock)
                held.append((due, peer[sock], data or None))
            while held and held[0][0] <= time.monotonic() and self._end is None:
                _, to, chunk = held.popleft()
                if chunk is None:
                    with contextlib.suppress(OSError):
                        to.shutdown(socket.SHUT_WR)
                else:
                    self._send(to, chunk)
            if not open_from and not held:
                return

    def _send(self, sock: socket.socket, data: bytes) -> None:
        view = memoryview(data)
        while view and self._end is None:
            if self.proxy.mode is Mode.BLACKHOLE:
                time.sleep(TICK)
                continue
            _, writable, _ = select.select([], [sock], [], TICK)
            if writable:
                view = view[sock.send(view) :]


def _close(sock: socket.socket, *, rst: bool) -> None:
    with contextlib.suppress(OSError):
        if rst:  # linger 0: close() sends RST instead of FIN
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        else:
            sock.shutdown(socket.SHUT_RDWR)
    with contextlib.suppress(OSError):
        sock.close()
