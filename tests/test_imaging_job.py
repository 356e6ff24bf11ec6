"""Images through the whole system: hostile inputs refused at submit or failing the job with a code
while the worker carries on; signatures and metadata on every output of a real job."""

from __future__ import annotations

import base64
import http.server
import io
import json
import threading
from collections.abc import Iterator

import pytest
from PIL import Image

from inference_server.imaging import signature_box
from tests.support.jobs import data_uri, output_bytes, submit, wait_done
from tests.test_imaging_decode import encode, noise, png_bomb

BASE = {"family": "sd15", "prompt": "a lighthouse at dusk", "width": 64, "height": 64, "steps": 2, "seed": 11}


def truncated_png() -> bytes:
    data = encode(noise((128, 128)), "PNG")
    return data[: len(data) // 2]


HOSTILE = {
    "/truncated.png": (truncated_png, "truncated_image", 400),
    "/bomb.png": (lambda: png_bomb(5_000), "decompression_bomb", 413),
    "/animation.gif": (lambda: encode(noise(), "GIF"), "unsupported_format", 400),
    "/notes.png": (lambda: b"just some text, named like a picture\n" * 20, "not_an_image", 400),
}


class _Files(http.server.BaseHTTPRequestHandler):
    files: dict[str, bytes] = {}

    def do_GET(self) -> None:  # noqa: N802 (http.server's naming)
        body = self.files.get(self.path)
        self.send_response(200 if body is not None else 404)
        self.send_header("Content-Length", str(len(body or b"")))
        self.end_headers()
        self.wfile.write(body or b"")

    def log_message(self, *args: object) -> None:
        pass


@pytest.fixture
def hostile_server() -> Iterator[str]:
    _Files.files = {path: make() for path, (make, _, _) in HOSTILE.items()}
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Files)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()


def test_hostile_url_inputs_fail_the_job_with_a_code_and_the_next_job_succeeds(
    api_client, worker, hostile_server
):
    # The test stack sets ALLOW_PRIVATE_NETWORKS=true, so the worker fetches from this local server.
    expected = {path: code for path, (_, code, _) in HOSTILE.items()} | {"/missing.png": "input_fetch_failed"}
    jobs = {
        path: submit(
            api_client, {**BASE, "task": "img2img", "strength": 0.5, "image": hostile_server + path}
        )["id"]
        for path in expected
    }
    for path, job_id in jobs.items():
        done = wait_done(api_client, job_id)
        assert done["status"] == "failed", (path, done)
        assert done["error"]["code"] == expected[path], (path, done["error"])
        assert done["attempts"] == 1 and done["outputs"] == []
    after = wait_done(api_client, submit(api_client, BASE)["id"], timeout=60)
    assert after["status"] == "succeeded", after


@pytest.mark.parametrize("path", list(HOSTILE))
def test_hostile_inline_inputs_refused_at_submit(api_client, path):
    make, code, status = HOSTILE[path]
    uri = "data:image/png;base64," + base64.b64encode(make()).decode()
    for body in (
        {**BASE, "task": "img2img", "image": uri},
        {**BASE, "signature": {"image": uri}},
    ):
        resp = api_client.post(f"{api_client.base_url}/v1/jobs", json=body, timeout=30)
        assert resp.status_code == status, resp.text
        assert resp.json()["error"]["code"] == code
    upload = api_client.post(
        f"{api_client.base_url}/v1/uploads", files={"file": ("x.png", make())}, timeout=30
    )
    assert upload.status_code == status and upload.json()["error"]["code"] == code, upload.text


def test_signature_and_metadata_on_every_output(api_client, worker):
    green = (0, 255, 0)
    signature = Image.new("RGBA", (40, 20), green + (255,))
    metadata = {"artist_id": "artist-42", "model_id": "sd15-tiny"}
    body = {
        **BASE,
        "width": 128,
        "height": 96,
        "num_images": 2,
        "signature": {
            "image": data_uri(signature),
            "position": "bottom-left",
            "size": "large",
            "opacity": 1.0,
        },
        "output": {"format": "png", "metadata": metadata},
    }
    done = wait_done(api_client, submit(api_client, body)["id"])
    assert done["status"] == "succeeded", done
    x, y, w, h = signature_box(128, 96, 40, 20, position="bottom-left", size="large")
    for index, out in enumerate(done["outputs"]):
        image = Image.open(io.BytesIO(output_bytes(api_client, done["id"], index).content))
        assert out["content_type"] == "image/png" and image.size == (128, 96)
        rgb = image.convert("RGB")
        assert rgb.getpixel((x + w // 2, y + h // 2)) == green and rgb.getpixel((x + 1, y + 1)) == green
        assert {k: image.text[k] for k in metadata} == metadata
        parameters = json.loads(image.text["parameters"])
        assert parameters["seed"] == 11 + index and parameters["prompt"] == BASE["prompt"]
        assert (parameters["width"], parameters["height"], parameters["steps"]) == (128, 96, 2)


@pytest.mark.parametrize("fmt", ["jpeg", "webp"])
def test_exif_metadata_in_lossy_outputs(api_client, worker, fmt):
    body = {**BASE, "output": {"format": fmt, "quality": 80, "metadata": {"artist_id": "Zoë"}}}
    done = wait_done(api_client, submit(api_client, body)["id"])
    assert done["status"] == "succeeded", done
    assert done["outputs"][0]["content_type"] == f"image/{fmt}"
    image = Image.open(io.BytesIO(output_bytes(api_client, done["id"]).content))
    assert image.format == fmt.upper()
    exif = image.getexif()
    description = json.loads(exif[0x010E])
    assert description["artist_id"] == "Zoë" and description["parameters"]["seed"] == 11
    assert exif[0x013B].encode("latin-1").decode("utf-8") == "Zoë"
