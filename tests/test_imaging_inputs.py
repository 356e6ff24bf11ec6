"""Inputs: data: URIs, URLs and storage URIs resolved to bytes, each hostile input refused with a code."""

from __future__ import annotations

import base64
import http.server
import io
import threading
from collections.abc import Iterator
from urllib.parse import quote_from_bytes

import pytest
from PIL import Image

from inference_server.errors import InputFetchFailed, InputTooLarge, InvalidInput, UnsafeURL
from inference_server.imaging import decode_image, input_kind, load_image, parse_data_uri, resolve_input

MB = 1024 * 1024


def png_bytes(size: tuple[int, int] = (32, 16), color: tuple[int, int, int] = (200, 10, 10)) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", size, color).save(buf, "PNG")
    return buf.getvalue()


def no_storage(ref: str) -> bytes:
    raise AssertionError(f"storage must not be read for {ref}")


def resolve(ref: str, **kw: object) -> bytes:
    args: dict = {"read_storage": no_storage, "allow_private": False, "timeout": 5.0, "max_bytes": 20 * MB}
    args.update(kw)
    return resolve_input(ref, **args)


# -- data: URIs ---------------------------------------------------------------------------------


def test_data_uri_base64_round_trip() -> None:
    data = png_bytes()
    encoded = base64.b64encode(data).decode()
    assert parse_data_uri(f"data:image/png;base64,{encoded}") == data
    # Unpadded, URL-safe, wrapped in whitespace, and a lying media type all decode the same.
    assert parse_data_uri("data:image/png;base64," + encoded.rstrip("=")) == data
    assert parse_data_uri("data:image/png;base64," + base64.urlsafe_b64encode(data).decode()) == data
    wrapped = "\n".join(encoded[i : i + 76] for i in range(0, len(encoded), 76))
    assert parse_data_uri(f"data:text/plain;base64,{wrapped}") == data


def test_data_uri_percent_encoded() -> None:
    data = png_bytes()
    assert parse_data_uri("data:image/png," + quote_from_bytes(data)) == data


@pytest.mark.parametrize(
    "uri",
    [
        "data:image/png;base64",
        "image/png;base64,AAAA",
        "data:image/png;base64,@@@@",
        "data:image/png;base64,",
        "data:image/png;base64,é",
    ],
)
def test_malformed_data_uri_refused(uri: str) -> None:
    with pytest.raises(InvalidInput) as info:
        parse_data_uri(uri)
    assert info.value.code == "invalid_data_uri"


def test_data_uri_over_limit_refused_before_decoding() -> None:
    uri = "data:image/png;base64," + "A" * (4 * 1024)
    with pytest.raises(InputTooLarge) as info:
        parse_data_uri(uri, max_bytes=1024)
    assert info.value.code == "input_too_large"
    with pytest.raises(InputTooLarge):
        resolve(uri, max_bytes=1024)


# -- schemes and storage ------------------------------------------------------------------------


def test_input_kinds() -> None:
    assert input_kind("data:image/png;base64,AA") == "data"
    assert input_kind("HTTPS://example.com/a.png") == "url"
    assert input_kind("s3://bucket/uploads/a") == "storage"
    assert input_kind("gs://bucket/uploads/a") == "storage"
    assert input_kind("file:///srv/storage/uploads/a") == "storage"


@pytest.mark.parametrize(
    "ref", ["ftp://example.com/a.png", "/etc/passwd", "a.png", "javascript:alert(1)", ""]
)
def test_unknown_scheme_refused(ref: str) -> None:
    with pytest.raises(InvalidInput) as info:
        resolve(ref)
    assert info.value.code == "unsupported_input_uri"


def test_storage_uri_goes_to_reader() -> None:
    stored = {"s3://bucket/uploads/abc": png_bytes()}

    def read(ref: str) -> bytes:
        if ref not in stored:
            raise FileNotFoundError(ref)
        return stored[ref]

    assert resolve("s3://bucket/uploads/abc", read_storage=read) == stored["s3://bucket/uploads/abc"]
    with pytest.raises(InvalidInput) as info:
        resolve("s3://bucket/uploads/missing", read_storage=read)
    assert info.value.code == "input_not_found"
    with pytest.raises(InputTooLarge):
        resolve("s3://bucket/uploads/abc", read_storage=read, max_bytes=10)


def test_storage_not_found_is_an_input_error(tmp_path) -> None:
    from inference_server.storage.local import FileStorage

    storage = FileStorage(tmp_path.as_uri())
    uri = storage.put("uploads/t/a.png", png_bytes(), "image/png")
    assert resolve(uri, read_storage=storage.get) == png_bytes()
    with pytest.raises(InvalidInput) as info:
        resolve(uri.replace("a.png", "b.png"), read_storage=storage.get)
    assert info.value.code == "input_not_found"


# -- URLs: the private-address guard and a real local HTTP server --------------------------------


@pytest.mark.parametrize(
    "url",
    [
        "https://127.0.0.1/x.png",
        "https://10.0.0.1/x.png",
        "https://[::1]/x.png",
        "https://169.254.169.254/latest/meta-data",
        "https://localhost/x.png",
    ],
)
def test_private_url_refused(url: str) -> None:
    with pytest.raises(UnsafeURL) as info:
        resolve(url, allow_private=False)
    assert info.value.code == "unsafe_url"


def test_plain_http_refused_unless_private_allowed() -> None:
    with pytest.raises(UnsafeURL) as info:
        resolve("http://example.com/x.png", allow_private=False)
    assert info.value.code == "unsafe_url"


class _Handler(http.server.BaseHTTPRequestHandler):
    files: dict[str, bytes] = {}

    def do_GET(self) -> None:  # noqa: N802 (http.server's naming)
        body = self.files.get(self.path)
        if body is None:
            self.send_response(404)
            self.end_headers()
            return
        self.send_response(200)
        self.send_header("Content-Type", "image/png")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args: object) -> None:
        pass


@pytest.fixture
def image_server() -> Iterator[str]:
    _Handler.files = {"/ok.png": png_bytes((40, 30)), "/big.png": png_bytes((600, 600)) + b"\0" * 300_000}
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()


def test_url_fetched_when_private_allowed(image_server: str) -> None:
    image = load_image(
        f"{image_server}/ok.png",
        read_storage=no_storage,
        allow_private=True,
        timeout=5.0,
        max_bytes=MB,
        max_pixels=1_000_000,
    )
    assert image.size == (40, 30)


def test_local_server_refused_without_allow_private(image_server: str) -> None:
    with pytest.raises(UnsafeURL):
        resolve(f"{image_server}/ok.png", allow_private=False)


def test_url_over_byte_limit_and_missing(image_server: str) -> None:
    with pytest.raises(InputTooLarge):
        resolve(f"{image_server}/big.png", allow_private=True, max_bytes=100_000)
    with pytest.raises(InputFetchFailed) as info:
        resolve(f"{image_server}/nope.png", allow_private=True)
    assert info.value.code == "input_fetch_failed"


def test_decode_after_resolve_of_data_uri() -> None:
    uri = "data:image/png;base64," + base64.b64encode(png_bytes((8, 4))).decode()
    image = decode_image(resolve(uri), max_bytes=MB, max_pixels=1000)
    assert image.size == (8, 4) and image.mode == "RGB"


def test_imaging_does_not_import_torch() -> None:
    """The API imports this package: it must stay free of torch and diffusers."""
    import subprocess
    import sys

    code = (
        "import sys, inference_server.imaging\n"
        "print(sorted(m for m in ('torch', 'diffusers') if m in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=True)
    assert out.stdout.strip() == "[]"
