"""fit_input / fit_mask (cover, then centre-crop) and edit_size."""

from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image

from inference_server.errors import InvalidRequest
from inference_server.imaging import decode_image, edit_size, fit_input, fit_mask, normalize_input

RED, GREEN, BLUE = (255, 0, 0), (0, 255, 0), (0, 0, 255)
LIMITS = {"max_bytes": 10**7, "max_pixels": 10**7}


def three_bands(width: int, height: int, horizontal: bool = True) -> Image.Image:
    """Outer quarters red and blue, the middle half green (along the long side)."""
    image = Image.new("RGB", (width, height), GREEN)
    if horizontal:
        image.paste(RED, (0, 0, width // 4, height))
        image.paste(BLUE, (width - width // 4, 0, width, height))
    else:
        image.paste(RED, (0, 0, width, height // 4))
        image.paste(BLUE, (0, height - height // 4, width, height))
    return image


@pytest.mark.parametrize("horizontal", [True, False])
def test_cover_and_centre_crop_keeps_the_middle(horizontal: bool) -> None:
    source = three_bands(400, 200) if horizontal else three_bands(200, 400, horizontal=False)
    fitted = fit_input(source, 64, 64)
    assert fitted.size == (64, 64) and fitted.mode == "RGB"
    pixels = np.asarray(fitted, dtype=int)
    # The centre square of a 2:1 image is exactly its middle half: green, but for a 1 px resampling seam.
    inner = pixels[1:-1, 1:-1]
    assert (np.abs(inner - np.array(GREEN)).max(axis=2) <= 8).all()


def test_same_aspect_scales_without_cropping() -> None:
    source = three_bands(400, 200)
    fitted = np.asarray(fit_input(source, 128, 64), dtype=int)
    assert tuple(fitted[32, 2]) == RED and tuple(fitted[32, 125]) == BLUE


def test_upscale_small_input() -> None:
    fitted = fit_input(Image.new("RGB", (10, 20), RED), 64, 96)
    assert fitted.size == (64, 96) and fitted.getpixel((32, 48)) == RED


def test_transparent_input_flattened_on_white() -> None:
    source = Image.new("RGBA", (50, 50), (0, 0, 0, 0))
    fitted = fit_input(source, 32, 32)
    assert fitted.mode == "RGB" and fitted.getpixel((16, 16)) == (255, 255, 255)


def test_mask_follows_the_image_geometry() -> None:
    image = three_bands(400, 200)
    mask = Image.new("L", (400, 200), 0)
    mask.paste(255, (100, 0, 300, 200))  # exactly the green middle half
    fitted_mask = fit_mask(mask, 64, 64)
    assert fitted_mask.mode == "L" and fitted_mask.size == (64, 64)
    assert np.asarray(fitted_mask)[1:-1, 1:-1].min() >= 247
    fitted_image = np.asarray(fit_input(image, 64, 64), dtype=int)
    # Wherever the mask says "repaint", the image is the green area the mask was drawn on (the outer
    # 1 px ring is left out: Lanczos there also weighs the red and blue just outside the crop).
    masked = np.asarray(fitted_mask)[1:-1, 1:-1] > 128
    assert masked.all()
    assert (np.abs(fitted_image[1:-1, 1:-1][masked] - np.array(GREEN)).max(axis=1) <= 8).all()


def test_mask_modes() -> None:
    rgb = Image.new("RGB", (20, 20), (255, 255, 255))
    assert fit_mask(rgb, 8, 8).getpixel((4, 4)) == 255
    layer = Image.new("RGBA", (20, 20), (255, 255, 255, 0))  # white but fully transparent: keep
    layer.paste((255, 255, 255, 255), (0, 0, 10, 20))
    fitted = fit_mask(layer, 20, 20)
    assert fitted.getpixel((5, 10)) == 255 and fitted.getpixel((15, 10)) == 0


@pytest.mark.parametrize(
    ("size", "max_pixels", "expected"),
    [
        ((1000, 500), 512 * 512, (720, 352)),
        ((100, 50), 1024 * 1024, (96, 48)),
        ((1024, 1024), 1024 * 1024, (1024, 1024)),
        ((4000, 3000), 1024 * 1024, (1168, 880)),
    ],
)
def test_edit_size(size: tuple[int, int], max_pixels: int, expected: tuple[int, int]) -> None:
    assert edit_size(Image.new("RGB", size), max_pixels=max_pixels) == expected


def test_edit_size_extreme_shapes_stay_within_limits() -> None:
    for size in [(10_000, 10), (10, 10_000), (3, 3)]:
        w, h = edit_size(Image.new("L", size), multiple=8, max_pixels=4096)
        assert w % 8 == 0 and h % 8 == 0 and w * h <= 4096 and w >= 8 and h >= 8


def test_invalid_sizes_refused() -> None:
    with pytest.raises(InvalidRequest):
        fit_input(Image.new("RGB", (8, 8)), 0, 8)
    with pytest.raises(InvalidRequest):
        edit_size(Image.new("RGB", (8, 8)), multiple=16, max_pixels=100)


def test_normalize_input_gives_a_fitted_png_the_worker_loads_unchanged() -> None:
    exif = Image.Exif()
    exif[0x0112] = 6  # stored 400x200 landscape, displayed 200x400 portrait
    buf = io.BytesIO()
    three_bands(400, 200).save(buf, "JPEG", quality=95, exif=exif.tobytes())
    data = normalize_input(buf.getvalue(), width=64, height=128, **LIMITS)
    assert data.startswith(b"\x89PNG")
    image = decode_image(data, **LIMITS)
    assert image.size == (64, 128) and image.mode == "RGB"
    # Oriented first, then fitted: the 200x400 portrait already has the 1:2 shape, nothing is cropped.
    top, bottom = image.getpixel((32, 4)), image.getpixel((32, 123))
    assert top[0] > 200 and bottom[2] > 200
    assert np.array_equal(np.asarray(fit_input(image, 64, 128)), np.asarray(image))
    mask = normalize_input(buf.getvalue(), width=64, height=128, kind="mask", **LIMITS)
    assert Image.open(io.BytesIO(mask)).mode == "L"
