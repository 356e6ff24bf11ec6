"""Models and LoRAs named by https:// URLs (#14 item 1): the API's static check, the worker's safe
unpacking, and a model archive and a LoRA file served over HTTP and used by jobs on the running
system (ALLOW_PRIVATE_NETWORKS=true there, so a local http:// server stands in for https://)."""

from __future__ import annotations

import functools
import io
import tarfile
import threading
import uuid
from collections.abc import Iterator
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
import requests

from inference_server.errors import InvalidRequest, ModelError, UnsafeURL
from inference_server.registry.access import check_source
from inference_server.settings import Settings
from tests.support.jobs import submit, wait_done
from tests.support.system import Proc
from tests.test_runtime_registry import _add_model, _code, _job, _lora_file
from workers.url_download import extract, fetch_url_source


class _Quiet(SimpleHTTPRequestHandler):
    def log_message(self, format: str, *args: object) -> None:  # noqa: A002 - the base's signature
        pass


@pytest.fixture
def served(tmp_path: Path) -> Iterator[tuple[str, Path]]:
    """A local HTTP server of a folder: its base URL and the folder."""
    root = tmp_path / "served"
    root.mkdir()
    server = ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(_Quiet, directory=str(root)))
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}", root
    finally:
        server.shutdown()
        server.server_close()
        thread.join(5)


def _tar_with(members: dict[str, bytes], links: dict[str, str] | None = None) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz") as tar:
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
        for name, target in (links or {}).items():
            info = tarfile.TarInfo(name)
            info.type = tarfile.SYMTYPE
            info.linkname = target
            tar.addfile(info)
    return buf.getvalue()


def test_url_sources_are_checked_statically() -> None:
    assert (
        check_source("https://example.com/m/sd15.tar.gz?sig=x") == "https://example.com/m/sd15.tar.gz?sig=x"
    )
    assert check_source("https://example.com/m.tgz") and check_source("https://example.com/m.tar")
    assert check_source("https://example.com/style.safetensors", kind="lora")
    with pytest.raises(InvalidRequest) as plain:
        check_source("http://example.com/m.tar.gz")
    assert plain.value.code == "unsupported_model_source"
    assert check_source("http://127.0.0.1:8000/m.tar.gz", allow_private=True)
    for private in (
        "https://10.0.0.1/m.tar.gz",
        "https://localhost/m.tar",
        "https://[::ffff:127.0.0.1]/m.tgz",
    ):
        with pytest.raises(UnsafeURL):
            check_source(private)
    for wrong, kind in (
        ("https://example.com/model", "model"),
        ("https://example.com/m.tar.gz", "lora"),
        ("https://example.com/w.safetensors", "model"),
        ("ftp://example.com/m.tar", "model"),
    ):
        with pytest.raises(InvalidRequest) as refused:
            check_source(wrong, kind=kind)
        assert refused.value.code == "unsupported_model_source", wrong


@pytest.mark.parametrize(
    "members,links",
    [
        ({"model/model_index.json": b"{}", "../escaped": b"x"}, None),
        ({"/tmp/absolute-escape": b"x"}, None),
        ({"model/model_index.json": b"{}"}, {"model/link": "../../outside"}),
    ],
    ids=["dotdot", "absolute", "link-out"],
)
def test_an_archive_with_an_unsafe_member_is_refused_whole(
    tmp_path: Path, members: dict[str, bytes], links: dict[str, str] | None
) -> None:
    archive = tmp_path / "evil.tar.gz"
    archive.write_bytes(_tar_with(members, links))
    folder = tmp_path / "cache" / "model"
    with pytest.raises(ModelError, match="unsafe member"):
        extract(archive, folder)
    assert not folder.exists()
    assert not (tmp_path / "cache" / "escaped").exists() and not Path("/tmp/absolute-escape").exists()


def test_an_archive_wrapping_one_folder_gives_that_folder(tmp_path: Path) -> None:
    archive = tmp_path / "m.tar.gz"
    archive.write_bytes(_tar_with({"sd15/model_index.json": b"{}", "sd15/unet/config.json": b"{}"}))
    got = extract(archive, tmp_path / "out")
    assert got == tmp_path / "out" / "sd15" and (got / "unet" / "config.json").read_bytes() == b"{}"


def test_a_model_archive_and_a_lora_file_over_http_run_jobs(
    api_client: requests.Session, worker: Proc, tiny_models: Path, served: tuple[str, Path]
) -> None:
    base, root = served
    with tarfile.open(root / "sd15.tar.gz", "w:gz") as tar:
        tar.add(tiny_models.parent / "sd15", arcname="sd15")
    (root / "style.safetensors").write_bytes(_lora_file(tiny_models, "sd15"))
    (root / "evil.tar.gz").write_bytes(_tar_with({"model_index.json": b"{}", "../escaped": b"x"}))

    model_id = f"url-{uuid.uuid4().hex[:6]}"
    _add_model(api_client, model_id, f"{base}/sd15.tar.gz")
    plain = wait_done(api_client, submit(api_client, _job(model_id))["id"])
    assert plain["status"] == "succeeded" and plain["model"] == model_id and plain["outputs"], plain

    name = f"url-style-{uuid.uuid4().hex[:6]}"
    resp = api_client.post(
        f"{api_client.base_url}/v1/loras",  # type: ignore[attr-defined]
        json={"name": name, "family": "sd15", "source": f"{base}/style.safetensors"},
        timeout=30,
    )
    assert resp.status_code == 201, resp.text
    styled_job = submit(api_client, _job(model_id, loras=[{"name": name, "scale": 1.0}]))
    styled = wait_done(api_client, styled_job["id"])
    assert styled["status"] == "succeeded", styled
    assert styled["outputs"][0]["sha256"] != plain["outputs"][0]["sha256"]  # the downloaded LoRA applied

    # A missing archive and an unsafe one fail their jobs with the model-loading code, no traceback.
    for bad in ("missing.tar.gz", "evil.tar.gz"):
        bad_id = f"url-bad-{uuid.uuid4().hex[:6]}"
        _add_model(api_client, bad_id, f"{base}/{bad}")
        job = wait_done(api_client, submit(api_client, _job(bad_id))["id"])
        assert job["status"] == "failed" and job["error"]["code"] == "model_error", job
        assert "Traceback" not in job["error"]["message"]
        assert ("unsafe member" if bad == "evil.tar.gz" else "HTTP 404") in job["error"]["message"], job

    resp = api_client.post(
        f"{api_client.base_url}/v1/models",  # type: ignore[attr-defined]
        json={"family": "sd15", "id": f"url-{uuid.uuid4().hex[:6]}", "source": f"{base}/sd15.zip"},
        timeout=30,
    )
    assert resp.status_code == 400 and _code(resp) == "unsupported_model_source", resp.text


def test_a_download_over_its_cap_or_missing_fails_with_model_error(
    tmp_path: Path, served: tuple[str, Path]
) -> None:
    base, root = served
    (root / "big.tar").write_bytes(b"x" * 4096)
    settings = Settings(allow_private_networks=True, max_model_download_bytes=1000, model_download_attempts=2)
    with pytest.raises(ModelError, match="larger than the limit of 1000 bytes"):
        fetch_url_source(settings, f"{base}/big.tar", tmp_path / "cache")
    assert not (tmp_path / "cache" / ".download").exists()  # nothing half-written is left
    with pytest.raises(ModelError, match="HTTP 404"):
        fetch_url_source(settings, f"{base}/missing.tar", tmp_path / "cache")
