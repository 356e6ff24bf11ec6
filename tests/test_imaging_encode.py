"""encode_output: formats, content types, quality, and metadata read back with Pillow."""

from __future__ import annotations

import io
import json

import numpy as np
import pytest
from PIL import Image

from inference_server.errors import InvalidRequest
from inference_server.imaging import encode_output
from inference_server.imaging.png import write_png

METADATA = {"artist_id": "Zoë Ångström", "model_id": "sd15/base", "note": "日本語も"}
PARAMETERS = {
    "prompt": "a red fox, 🦊",
    "seed": 42,
    "model": "sd15/base",
    "steps": 30,
    "guidance_scale": 7.5,
    "width": 96,
    "height": 64,
}
MAGIC = {"png": b"\x89PNG", "jpeg": b"\xff\xd8\xff", "webp": b"RIFF"}


def output_image(mode: str = "RGB") -> Image.Image:
    rng = np.random.default_rng(3)
    base = np.linspace(0, 255, 96 * 64 * len(mode)).reshape(64, 96, len(mode))
    return Image.fromarray((base + rng.normal(0, 10, base.shape)).clip(0, 255).astype(np.uint8), mode)


def reopen(data: bytes) -> Image.Image:
    image = Image.open(io.BytesIO(data))
    image.load()
    return image


def test_png_has_one_text_chunk_per_key_and_parameters() -> None:
    data, content_type = encode_output(
        output_image(), fmt="png", quality=90, metadata=METADATA, parameters=PARAMETERS
    )
    assert content_type == "image/png" and data.startswith(MAGIC["png"])
    image = reopen(data)
    for key, value in METADATA.items():
        assert image.text[key] == value
    assert json.loads(image.text["parameters"]) == PARAMETERS
    assert set(image.text) == {*METADATA, "parameters"}
    # Lossless: the pixels come back exactly.
    assert np.array_equal(np.asarray(image.convert("RGB")), np.asarray(output_image()))


@pytest.mark.parametrize("fmt", ["jpeg", "webp"])
def test_exif_description_and_artist(fmt: str) -> None:
    data, content_type = encode_output(
        output_image(), fmt=fmt, quality=90, metadata=METADATA, parameters=PARAMETERS
    )
    assert content_type == f"image/{fmt}" and data.startswith(MAGIC[fmt])
    image = reopen(data)
    assert image.format == fmt.upper() and image.size == (96, 64)
    exif = image.getexif()
    description = json.loads(exif[0x010E])
    assert description == {**METADATA, "parameters": PARAMETERS}
    # Pillow reads EXIF ASCII as Latin-1; the Artist bytes are UTF-8.
    assert exif[0x013B].encode("latin-1").decode("utf-8") == METADATA["artist_id"]


@pytest.mark.parametrize("fmt", ["jpeg", "webp"])
def test_no_artist_without_artist_id(fmt: str) -> None:
    data, _ = encode_output(output_image(), fmt=fmt, quality=90, metadata={"model_id": "m"}, parameters={})
    exif = reopen(data).getexif()
    assert 0x013B not in exif and json.loads(exif[0x010E]) == {"model_id": "m", "parameters": {}}


@pytest.mark.parametrize("fmt", ["jpeg", "webp"])
def test_quality_is_applied(fmt: str) -> None:
    low, _ = encode_output(output_image(), fmt=fmt, quality=20, metadata={}, parameters={})
    high, _ = encode_output(output_image(), fmt=fmt, quality=95, metadata={}, parameters={})
    assert len(low) < len(high)


def test_rgba_outputs() -> None:
    rgba = output_image("RGBA")
    png, _ = encode_output(rgba, fmt="png", quality=90, metadata={}, parameters={})
    assert reopen(png).mode == "RGBA"
    jpeg, _ = encode_output(rgba, fmt="jpeg", quality=90, metadata={}, parameters={})
    assert reopen(jpeg).mode == "RGB"


def test_jpg_alias() -> None:
    _, content_type = encode_output(output_image(), fmt="JPG", quality=90, metadata={}, parameters={})
    assert content_type == "image/jpeg"


@pytest.mark.parametrize(
    ("kwargs", "code"),
    [
        ({"fmt": "gif"}, "invalid_output_format"),
        ({"quality": 0}, "invalid_output_quality"),
        ({"quality": 101}, "invalid_output_quality"),
        ({"metadata": {"parameters": "x"}}, "invalid_metadata"),
        ({"metadata": {"": "x"}}, "invalid_metadata"),
        ({"metadata": {" lead": "x"}}, "invalid_metadata"),
        ({"metadata": {"k" * 80: "x"}}, "invalid_metadata"),
        ({"metadata": {"ключ": "x"}}, "invalid_metadata"),
        ({"metadata": {"k": "a\x00b"}}, "invalid_metadata"),
        ({"metadata": {"k": "x" * 20_000}}, "invalid_metadata"),
    ],
)
def test_invalid_output_options_refused(kwargs: dict, code: str) -> None:
    args = {"fmt": "png", "quality": 90, "metadata": {}, "parameters": {}, **kwargs}
    with pytest.raises(InvalidRequest) as info:
        encode_output(output_image(), **args)
    assert info.value.code == code


@pytest.mark.parametrize("mode", ["L", "RGB", "RGBA"])
@pytest.mark.parametrize("size", [(1, 1), (7, 1), (1, 9), (257, 131)])
def test_png_writer_is_lossless_and_valid(mode: str, size: tuple[int, int]) -> None:
    rng = np.random.default_rng(size[0] * 1000 + size[1])
    pixels = rng.integers(0, 256, (size[1], size[0], len(mode)), dtype=np.uint8)
    if mode == "L":
        pixels = pixels[:, :, 0]
    image = Image.fromarray(pixels, mode)
    data = write_png(image, [("k", "v"), ("unicode", "ü→✓")])
    Image.open(io.BytesIO(data)).verify()  # checks every chunk's CRC
    back = reopen(data)
    assert back.mode == mode and back.size == size
    assert np.array_equal(np.asarray(back), np.asarray(image))
    assert back.text == {"k": "v", "unicode": "ü→✓"}


@pytest.mark.parametrize("fmt", ["jpeg", "webp"])
def test_long_non_latin_parameters_still_fit_in_exif(fmt: str) -> None:
    metadata = {f"k{i}": "🦊" * 400 for i in range(10)}  # 16,000 bytes of UTF-8: the submit cap
    parameters = {"prompt": "狐" * 2000, "negative_prompt": "🦊" * 2000, "seed": 1}
    data, _ = encode_output(output_image(), fmt=fmt, quality=90, metadata=metadata, parameters=parameters)
    raw = reopen(data).getexif()[0x010E]
    description = json.loads(raw.encode("latin-1").decode("utf-8"))
    assert description["parameters"] == parameters and description["k3"] == metadata["k3"]
