"""Signature compositing checked at pixel level against the documented rule."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from inference_server.errors import InvalidRequest
from inference_server.imaging import composite_signature, signature_box

BLUE = (0, 0, 255)
RED = (255, 0, 0)
FRACTIONS = {"small": 0.10, "medium": 0.20, "large": 0.30}


def expected_box(out_w: int, out_h: int, sig_w: int, sig_h: int, position: str, size: str) -> tuple[int, ...]:
    """The rule from the issue, computed independently of the implementation."""
    w = out_w * FRACTIONS[size]
    h = w * sig_h / sig_w
    gap = max(1.0, out_w * 0.02)
    y = out_h - gap - h
    x = {"bottom-left": gap, "bottom-right": out_w - gap - w, "bottom-center": (out_w - w) / 2}[position]
    return round(x), round(y), round(w), round(h)


def changed_box(before: Image.Image, after: Image.Image) -> tuple[int, int, int, int]:
    """Bounding box (x, y, w, h) of the pixels that differ."""
    diff = np.abs(np.asarray(after, dtype=int) - np.asarray(before, dtype=int)).sum(axis=2) > 0
    ys, xs = np.nonzero(diff)
    assert len(xs), "the signature left no trace"
    return int(xs.min()), int(ys.min()), int(xs.max() - xs.min() + 1), int(ys.max() - ys.min() + 1)


@pytest.mark.parametrize("out_size", [(512, 384), (1024, 1024), (300, 700)])
@pytest.mark.parametrize("position", ["bottom-left", "bottom-center", "bottom-right"])
@pytest.mark.parametrize("size", ["small", "medium", "large"])
def test_signature_lands_where_the_rule_says(out_size: tuple[int, int], position: str, size: str) -> None:
    out = Image.new("RGB", out_size, BLUE)
    signature = Image.new("RGBA", (200, 80), RED + (255,))
    result = composite_signature(out, signature, position=position, opacity=1.0, size=size)
    want = expected_box(*out_size, 200, 80, position, size)
    got = changed_box(out, result)
    assert all(abs(g - w) <= 5 for g, w in zip(got, want, strict=True)), (got, want)
    assert signature_box(*out_size, 200, 80, position=position, size=size) == pytest.approx(want, abs=1)
    # Inside the box, an opaque signature replaces the output entirely.
    x, y, w, h = got
    assert result.getpixel((x + w // 2, y + h // 2)) == RED
    assert result.size == out.size and result.mode == "RGB"
    assert out.getpixel((x + w // 2, y + h // 2)) == BLUE  # the input image is not modified


def test_opacity_half_blends_halfway() -> None:
    out = Image.new("RGB", (400, 400), BLUE)
    signature = Image.new("RGBA", (100, 50), RED + (255,))
    result = composite_signature(out, signature, position="bottom-center", opacity=0.5, size="large")
    x, y, w, h = signature_box(400, 400, 100, 50, position="bottom-center", size="large")
    r, g, b = result.getpixel((x + w // 2, y + h // 2))
    assert abs(r - 127.5) <= 1.5 and g == 0 and abs(b - 127.5) <= 1.5


def test_signature_alpha_respected_and_multiplied_by_opacity() -> None:
    out = Image.new("RGB", (500, 500), BLUE)
    signature = Image.new("RGBA", (100, 40), RED + (0,))  # left half transparent
    signature.paste(RED + (128,), (50, 0, 100, 40))  # right half half-transparent
    result = composite_signature(out, signature, position="bottom-right", opacity=0.5, size="large")
    x, y, w, h = signature_box(500, 500, 100, 40, position="bottom-right", size="large")
    assert result.getpixel((x + w // 4, y + h // 2)) == BLUE
    r, _, b = result.getpixel((x + 3 * w // 4, y + h // 2))
    # alpha 128/255 * 0.5 = about 25% red
    assert abs(r - 64) <= 2 and abs(b - 191) <= 2


def test_opacity_zero_leaves_output_unchanged() -> None:
    out = Image.new("RGB", (200, 200), BLUE)
    signature = Image.new("RGBA", (10, 10), RED + (255,))
    result = composite_signature(out, signature, position="bottom-left", opacity=0.0, size="small")
    assert np.array_equal(np.asarray(result), np.asarray(out))


def test_rgb_signature_and_rgba_output() -> None:
    out = Image.new("RGBA", (300, 300), BLUE + (255,))
    result = composite_signature(
        out, Image.new("RGB", (60, 30), RED), position="bottom-left", opacity=1.0, size="medium"
    )
    x, y, w, h = signature_box(300, 300, 60, 30, position="bottom-left", size="medium")
    assert result.mode == "RGBA" and result.getpixel((x + 1, y + 1)) == RED + (255,)


def test_tall_signature_fits_output_height() -> None:
    x, y, w, h = signature_box(1000, 200, 100, 1000, position="bottom-left", size="large")
    assert y >= 0 and y + h <= 200 - 20 and w < 300
    assert abs(w / h - 0.1) < 0.02


def test_tiny_output_keeps_at_least_one_pixel() -> None:
    x, y, w, h = signature_box(8, 8, 500, 20, position="bottom-right", size="small")
    assert w >= 1 and h >= 1 and x + w <= 8 and y + h <= 8


@pytest.mark.parametrize(
    "kwargs",
    [
        {"position": "top-left", "opacity": 1.0, "size": "small"},
        {"position": "bottom-left", "opacity": 1.5, "size": "small"},
        {"position": "bottom-left", "opacity": 1.0, "size": "huge"},
    ],
)
def test_invalid_signature_options_refused(kwargs: dict) -> None:
    with pytest.raises(InvalidRequest) as info:
        composite_signature(Image.new("RGB", (64, 64)), Image.new("RGBA", (8, 8)), **kwargs)
    assert info.value.code == "invalid_signature"
