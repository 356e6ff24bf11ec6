"""decode_image: only PNG, JPEG and WebP; limits before pixels; hostile files refused with a code."""

from __future__ import annotations

import io
import random
import resource
import struct
import time
import zlib

import numpy as np
import pytest
from PIL import Image, ImageCms

from inference_server.errors import InputTooLarge, InvalidInput
from inference_server.imaging import decode_image, validate_image

MB = 1024 * 1024
LIMITS = {"max_bytes": 20 * MB, "max_pixels": 16_000_000}


def encode(image: Image.Image, fmt: str, **kw: object) -> bytes:
    buf = io.BytesIO()
    image.save(buf, fmt, **kw)
    return buf.getvalue()


def noise(size: tuple[int, int] = (128, 96), mode: str = "RGB", seed: int = 0) -> Image.Image:
    rng = np.random.default_rng(seed)
    bands = len(mode)
    return Image.fromarray(rng.integers(0, 256, (size[1], size[0], bands), dtype=np.uint8), mode)


def png_chunk(kind: bytes, body: bytes) -> bytes:
    return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))


def png_bomb(side: int = 20_000) -> bytes:
    """A real 1-bit PNG of side x side black pixels: ~50 KB that would inflate to side² pixels."""
    row = b"\x00" * (1 + (side + 7) // 8)
    packer = zlib.compressobj(9)
    idat = b"".join(packer.compress(row * 1000) for _ in range(side // 1000)) + packer.flush()
    ihdr = struct.pack(">IIBBBBB", side, side, 1, 0, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n" + png_chunk(b"IHDR", ihdr) + png_chunk(b"IDAT", idat) + png_chunk(b"IEND", b"")
    )


def jpeg_with_size(width: int, height: int) -> bytes:
    """A small JPEG whose SOF header is patched to declare width x height."""
    data = bytearray(encode(noise((16, 16)), "JPEG"))
    sof = data.find(b"\xff\xc0")
    data[sof + 5 : sof + 9] = struct.pack(">HH", height, width)
    return bytes(data)


def refused(data: bytes, **limits: int) -> InvalidInput:
    with pytest.raises(InvalidInput) as info:
        decode_image(data, **{**LIMITS, **limits})
    return info.value


# -- what is accepted -----------------------------------------------------------------------------


@pytest.mark.parametrize("fmt", ["PNG", "JPEG", "WEBP"])
def test_supported_formats_decode_to_rgb(fmt: str) -> None:
    image = decode_image(encode(noise(), fmt, **({"quality": 95} if fmt != "PNG" else {})), **LIMITS)
    assert image.mode == "RGB" and image.size == (128, 96)
    assert image.info == {}


def test_transparency_kept_as_rgba() -> None:
    rgba = noise(mode="RGBA")
    assert decode_image(encode(rgba, "PNG"), **LIMITS).mode == "RGBA"
    assert decode_image(encode(rgba, "WEBP", lossless=True), **LIMITS).mode == "RGBA"
    palette = Image.new("P", (8, 8), 0)
    palette.info["transparency"] = 0
    assert decode_image(encode(palette, "PNG", transparency=0), **LIMITS).mode == "RGBA"
    assert decode_image(encode(Image.new("L", (8, 8), 7), "PNG"), **LIMITS).mode == "RGB"


def test_sixteen_bit_grey_scaled_not_clipped() -> None:
    grey16 = Image.fromarray(np.full((4, 4), 32768, dtype=np.uint16))
    image = decode_image(encode(grey16, "PNG"), **LIMITS)
    assert image.mode == "RGB"
    assert abs(image.getpixel((0, 0))[0] - 128) <= 1


def test_exif_orientation_applied_and_metadata_dropped() -> None:
    # Stored 40x20: left half red, right half blue. Orientation 6 means "rotate 90° clockwise to view",
    # so the viewed image is 20x40 with red on top.
    stored = Image.new("RGB", (40, 20), (255, 0, 0))
    stored.paste((0, 0, 255), (20, 0, 40, 20))
    exif = Image.Exif()
    exif[0x0112] = 6
    exif[0x013B] = "someone"
    exif[0x8825] = {2: (1.0, 2.0, 3.0)}  # GPS: must not survive
    data = encode(stored, "JPEG", quality=95, exif=exif.tobytes(), comment=b"secret")
    image = decode_image(data, **LIMITS)
    assert image.size == (20, 40)
    red_top, blue_bottom = image.getpixel((10, 5)), image.getpixel((10, 35))
    assert red_top[0] > 200 and red_top[2] < 60
    assert blue_bottom[2] > 200 and blue_bottom[0] < 60
    assert image.info == {} and len(image.getexif()) == 0


@pytest.mark.parametrize("renamed", [False, True])
@pytest.mark.parametrize("mode", ["RGB", "RGBA"])
def test_icc_profile_applied_then_dropped(renamed: bool, mode: str) -> None:
    """An sRGB profile is recognised and skipped; any other one is converted to sRGB.

    With no other profile at hand offline, the "other" one is sRGB under another name: the full
    conversion path runs and must give back the same colours (and keep the alpha).
    """
    icc = ImageCms.ImageCmsProfile(ImageCms.createProfile("sRGB")).tobytes()
    if renamed:
        icc = icc.replace("sRGB".encode("utf-16-be"), "test".encode("utf-16-be"))
        assert "srgb" not in ImageCms.getProfileDescription(ImageCms.ImageCmsProfile(io.BytesIO(icc))).lower()
    color = (10, 120, 240, 77)[: len(mode)]
    image = decode_image(encode(Image.new(mode, (8, 8), color), "PNG", icc_profile=icc), **LIMITS)
    assert image.mode == mode
    assert all(abs(a - b) <= 2 for a, b in zip(image.getpixel((0, 0)), color, strict=True))
    assert image.info == {}


def test_jpeg_draft_decodes_smaller_but_covers_target() -> None:
    data = encode(noise((2048, 1024)), "JPEG", quality=90)
    image = decode_image(data, **LIMITS, draft_size=(512, 256))
    assert image.width >= 512 and image.height >= 512 and image.size != (2048, 1024)


# -- what is refused -------------------------------------------------------------------------------


@pytest.mark.parametrize("side", [5_000, 20_000])  # over our 16 MP limit; over Pillow's own 179 MP
def test_png_bomb_refused_before_decoding(side: int) -> None:
    data = png_bomb(side)
    assert len(data) < 200_000
    rss_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    started = time.perf_counter()
    error = refused(data)
    assert isinstance(error, InputTooLarge) and error.code == "decompression_bomb"
    assert time.perf_counter() - started < 0.5
    # ru_maxrss is in KB on Linux: no 400-megapixel buffer was ever allocated.
    assert resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - rss_before < 50_000


def test_jpeg_bomb_refused() -> None:
    error = refused(jpeg_with_size(60_000, 60_000))
    assert isinstance(error, InputTooLarge) and error.code == "decompression_bomb"


def test_jpeg_scan_bomb_refused_and_progressive_accepted() -> None:
    progressive = encode(noise((64, 64)), "JPEG", progressive=True)
    assert decode_image(progressive, **LIMITS).size == (64, 64)
    # Scan markers stand in for the thousands of tiny scans of a real CPU bomb: the count is the check.
    error = refused(encode(noise((64, 64)), "JPEG", progressive=True, comment=b"\xff\xda" * 200))
    assert isinstance(error, InputTooLarge) and error.code == "decompression_bomb"


def test_large_image_over_pixel_limit() -> None:
    error = refused(encode(noise((128, 96)), "PNG"), max_pixels=10_000)
    assert isinstance(error, InputTooLarge) and error.code == "input_too_large"


def test_over_byte_limit() -> None:
    error = refused(encode(noise(), "PNG"), max_bytes=1000)
    assert isinstance(error, InputTooLarge) and error.code == "input_too_large"


@pytest.mark.parametrize("fmt", ["PNG", "JPEG", "WEBP"])
@pytest.mark.parametrize("fraction", [0.3, 0.7, 0.95])
def test_truncated_refused(fmt: str, fraction: float) -> None:
    data = encode(noise((256, 256)), fmt)
    assert refused(data[: int(len(data) * fraction)]).code == "truncated_image"


def test_gif_refused() -> None:
    assert refused(encode(noise(), "GIF")).code == "unsupported_format"


@pytest.mark.parametrize("fmt", ["BMP", "TIFF"])
def test_other_formats_refused(fmt: str) -> None:
    assert refused(encode(noise(), fmt)).code == "unsupported_format"


def test_text_posing_as_png_refused() -> None:
    assert refused(b"This is a text file called photo.png\n" * 10).code == "not_an_image"
    assert refused(b"").code == "not_an_image"


def test_png_magic_with_garbage_refused() -> None:
    assert refused(b"\x89PNG\r\n\x1a\n" + b"garbage" * 50).code in ("corrupt_image", "truncated_image")


def test_bad_crc_refused() -> None:
    data = bytearray(encode(noise(), "PNG"))
    idat = data.find(b"IDAT")
    data[idat + 10] ^= 0xFF  # flip bits inside the compressed stream
    assert refused(bytes(data)).code in ("corrupt_image", "truncated_image")


def test_mutated_files_never_escape_as_other_exceptions() -> None:
    """Random byte damage gives either a valid image or InvalidInput: nothing can crash a worker."""
    rng = random.Random(1234)
    originals = [encode(noise((64, 48), seed=s), fmt) for s, fmt in enumerate(["PNG", "JPEG", "WEBP"])]
    outcomes = {"ok": 0, "refused": 0}
    for i in range(240):
        data = bytearray(originals[i % 3])
        for _ in range(rng.randint(1, 8)):
            data[rng.randrange(len(data))] = rng.randrange(256)
        if rng.random() < 0.3:
            del data[rng.randrange(len(data)) :]
        try:
            decode_image(bytes(data), **LIMITS)
            outcomes["ok"] += 1
        except InvalidInput:
            outcomes["refused"] += 1
    assert outcomes["refused"] > 0


def test_validate_image_reports_displayed_size_and_refuses_the_same() -> None:
    exif = Image.Exif()
    exif[0x0112] = 6
    info = validate_image(encode(noise((40, 20)), "JPEG", exif=exif.tobytes()), **LIMITS)
    assert (info.format, info.width, info.height, info.has_alpha) == ("JPEG", 20, 40, False)
    assert validate_image(encode(noise(mode="RGBA"), "PNG"), **LIMITS).has_alpha
    data = encode(noise((256, 256)), "PNG")
    with pytest.raises(InvalidInput) as info_error:
        validate_image(data[: len(data) // 2], **LIMITS)
    assert info_error.value.code == "truncated_image"
    with pytest.raises(InputTooLarge) as too_large:
        validate_image(png_bomb(5_000), **LIMITS)
    assert too_large.value.code == "decompression_bomb"
