"""The outage tests' helpers: a database URL through a proxy that can blackhole (the fault
harness's ``TcpProxy``: a peer that stops answering without closing anything, so only a
client-side limit can notice), and a one-family registry."""

from __future__ import annotations

from pathlib import Path

from inference_server.devtools.faults.proxy import TcpProxy


def through(url: str, proxy: TcpProxy) -> str:
    """``url`` (a database URL) with its host and port replaced by the proxy's."""
    from sqlalchemy import make_url

    return make_url(url).set(host="127.0.0.1", port=proxy.port).render_as_string(hide_password=False)


def proxy_for(url: str) -> TcpProxy:
    """A proxy to the host and port of ``url`` (a database URL)."""
    from sqlalchemy import make_url

    parsed = make_url(url)
    return TcpProxy((parsed.host or "127.0.0.1", parsed.port or 5432))


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
