"""One call per input for the worker, and the option to do the heavy part at submit instead.

Decoding a phone photo and fitting it to the job's size costs 80-120 ms of CPU here (see
benchmarks/imaging.py), time in which the GPU waits. When the API knows the job's size at submit,
``normalize_input`` does that work there and stores a PNG already at the right size, oriented, in
sRGB and without metadata; the worker's ``load_image`` + ``fit_input`` on it then cost about 25 ms
(fitting an image that already has the target size is a copy).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Literal

from PIL import Image

from inference_server.imaging.decode import decode_image
from inference_server.imaging.fit import fit_input, fit_mask
from inference_server.imaging.inputs import resolve_input
from inference_server.imaging.png import write_png


def load_image(
    ref: str,
    *,
    read_storage: Callable[[str], bytes],
    allow_private: bool,
    timeout: float,
    max_bytes: int,
    max_pixels: int,
    draft_size: tuple[int, int] | None = None,
    attempts: int = 3,
) -> Image.Image:
    """``resolve_input`` then ``decode_image``: the one call a worker needs per input reference.

    Pass the job's (width, height) as ``draft_size`` when the image will be fitted to it: large
    JPEGs then decode at a reduced scale that still covers it.
    """
    data = resolve_input(
        ref,
        read_storage=read_storage,
        allow_private=allow_private,
        timeout=timeout,
        max_bytes=max_bytes,
        attempts=attempts,
    )
    return decode_image(data, max_bytes=max_bytes, max_pixels=max_pixels, draft_size=draft_size)


def normalize_input(
    data: bytes,
    *,
    width: int,
    height: int,
    kind: Literal["image", "mask"] = "image",
    max_bytes: int,
    max_pixels: int,
) -> bytes:
    """Validate ``data`` and return it as a PNG fitted to ``width`` x ``height`` (RGB, or "L" for a mask).

    Raises the same errors as ``decode_image``. The result is a valid input in its own right: the
    worker loads and fits it like any other, and the fit is then a copy.
    """
    image = decode_image(data, max_bytes=max_bytes, max_pixels=max_pixels, draft_size=(width, height))
    fitted = fit_mask(image, width, height) if kind == "mask" else fit_input(image, width, height)
    return write_png(fitted)
