"""A fast PNG writer for 8-bit RGB, RGBA and L images with text chunks.

Why not Pillow's: its encoder tries five filters on every row and keeps the best, which alone takes
about 100 ms on a 1024x1024 output here, and its default zlib level 6 brings the whole save to about
0.8 s. Diffusion outputs are smooth photographs: the "Up" filter on every row (one numpy
subtraction) with zlib level 1 and the run-length strategy gives files within about 1% of Pillow's
best size in about 45 ms (see benchmarks/imaging.py). The encode runs on the GPU worker's critical
path, so this matters more than the last percent of size.

The output is a plain, non-interlaced PNG that any decoder reads; tests read it back with Pillow.
"""

from __future__ import annotations

import struct
import zlib
from collections.abc import Sequence

import numpy as np
from PIL import Image

_SIGNATURE = b"\x89PNG\r\n\x1a\n"
_COLOR_TYPES = {"L": 0, "RGB": 2, "RGBA": 6}
_FILTER_UP = 2
ZLIB_LEVEL = 1


def _chunk(kind: bytes, body: bytes) -> bytes:
    return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(body, zlib.crc32(kind)))


def text_chunk(key: str, value: str) -> bytes:
    """tEXt when the value is Latin-1, otherwise an uncompressed iTXt holding UTF-8."""
    keyword = key.encode("latin-1")
    try:
        return _chunk(b"tEXt", keyword + b"\0" + value.encode("latin-1"))
    except UnicodeEncodeError:
        # keyword, compression flag 0, method 0, empty language tag, empty translated keyword, text
        return _chunk(b"iTXt", keyword + b"\0\0\0\0\0" + value.encode("utf-8"))


def _up_filtered(image: Image.Image) -> bytes:
    """The scanlines, each prefixed with filter type 2 and holding its difference to the row above."""
    pixels = np.asarray(image, dtype=np.uint8)
    rows = pixels.reshape(image.height, -1)
    out = np.empty((rows.shape[0], rows.shape[1] + 1), dtype=np.uint8)
    out[:, 0] = _FILTER_UP
    out[0, 1:] = rows[0]
    # uint8 arithmetic wraps modulo 256, exactly what the PNG filter specifies.
    np.subtract(rows[1:], rows[:-1], out=out[1:, 1:])
    return out.tobytes()


def write_png(image: Image.Image, text: Sequence[tuple[str, str]] = ()) -> bytes:
    """Encode an "L", "RGB" or "RGBA" image as PNG bytes, with ``text`` chunks before the pixels."""
    if image.mode not in _COLOR_TYPES:
        raise ValueError(f"write_png takes L, RGB or RGBA, not {image.mode}")
    header = struct.pack(">IIBBBBB", image.width, image.height, 8, _COLOR_TYPES[image.mode], 0, 0, 0)
    packer = zlib.compressobj(ZLIB_LEVEL, zlib.DEFLATED, 15, 9, zlib.Z_RLE)
    idat = packer.compress(_up_filtered(image)) + packer.flush()
    parts = [_SIGNATURE, _chunk(b"IHDR", header)]
    parts.extend(text_chunk(key, value) for key, value in text)
    parts += [_chunk(b"IDAT", idat), _chunk(b"IEND", b"")]
    return b"".join(parts)
