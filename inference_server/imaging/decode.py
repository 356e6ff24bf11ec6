"""Turn untrusted bytes into a clean Pillow image, or refuse them with a stable error code.

The order matters: the byte limit, then the format from the magic bytes, then the pixel limit read
from the header, and only then the pixels are decoded. A decompression bomb is therefore refused
before any large buffer exists, and Pillow only ever runs the decoder of the sniffed format (never
EPS, TIFF or any of the other plugins it could otherwise pick).

Codes: ``input_too_large`` and ``decompression_bomb`` (``InputTooLarge``, HTTP 413);
``unsupported_format``, ``not_an_image``, ``corrupt_image``, ``truncated_image`` (``InvalidInput``).
"""

from __future__ import annotations

import io
from dataclasses import dataclass

from PIL import Image, ImageCms

from inference_server.errors import InputTooLarge, InvalidInput

SUPPORTED_FORMATS = ("PNG", "JPEG", "WEBP")

# Formats recognised only to give a better message than "not an image".
_KNOWN_UNSUPPORTED = (
    (b"GIF87a", "GIF"),
    (b"GIF89a", "GIF"),
    (b"BM", "BMP"),
    (b"II*\x00", "TIFF"),
    (b"MM\x00*", "TIFF"),
    (b"\x00\x00\x01\x00", "ICO"),
    (b"8BPS", "PSD"),
    (b"%!PS", "PostScript"),
    (b"%PDF", "PDF"),
)

# Over the pixel limit, a file that declares more than this many pixels per byte is a bomb rather
# than a big photo: camera JPEGs are 2 to 10 pixels per byte, even flat PNGs rarely pass 100.
BOMB_PIXELS_PER_BYTE = 200
# A progressive JPEG is decoded scan by scan, each pass over the whole image: thousands of tiny
# scans in a small file make a CPU bomb (libjpeg-turbo's own answer is a scan limit, which Pillow
# does not set). Encoders write about 10; 0xFFDA cannot occur in entropy-coded data (0xFF is
# stuffed), so counting the markers is exact but for comments and thumbnails, which stay far below.
MAX_JPEG_SCANS = 100

_SRGB = ImageCms.createProfile("sRGB")


def sniff_format(data: bytes) -> str:
    """Name the format from the magic bytes (``PNG``, ``JPEG``, ``WEBP``) or raise ``InvalidInput``."""
    if data.startswith(b"\x89PNG\r\n\x1a\n"):
        return "PNG"
    if data.startswith(b"\xff\xd8\xff"):
        return "JPEG"
    if len(data) >= 12 and data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        return "WEBP"
    for magic, name in _KNOWN_UNSUPPORTED:
        if data.startswith(magic):
            raise InvalidInput(
                f"{name} images are not accepted: use PNG, JPEG or WebP", code="unsupported_format"
            )
    if data[4:12] in (b"ftypavif", b"ftypheic", b"ftypheix", b"ftypmif1"):
        raise InvalidInput(
            "AVIF/HEIC images are not accepted: use PNG, JPEG or WebP", code="unsupported_format"
        )
    raise InvalidInput("the input is not a PNG, JPEG or WebP image", code="not_an_image")


def check_pixels(width: int, height: int, n_bytes: int, *, max_pixels: int) -> None:
    """Refuse a declared size over ``max_pixels``; the code tells a bomb from a merely large image."""
    pixels = width * height
    if width <= 0 or height <= 0:
        raise InvalidInput(f"the image declares an empty size {width}x{height}", code="corrupt_image")
    if pixels <= max_pixels:
        return
    if pixels > BOMB_PIXELS_PER_BYTE * max(n_bytes, 1):
        raise InputTooLarge(
            f"{width}x{height} image in {n_bytes} bytes looks like a decompression bomb",
            code="decompression_bomb",
        )
    raise InputTooLarge(f"{width}x{height} is over the limit of {max_pixels} pixels", code="input_too_large")


@dataclass(frozen=True)
class ImageInfo:
    """What ``validate_image`` learnt: the sniffed format and the size as displayed (EXIF applied)."""

    format: str
    width: int
    height: int
    has_alpha: bool


def decode_image(
    data: bytes,
    *,
    max_bytes: int,
    max_pixels: int,
    draft_size: tuple[int, int] | None = None,
) -> Image.Image:
    """Validate and fully decode ``data``; return a metadata-free RGB or RGBA image.

    PNG, JPEG and WebP only, sniffed from the bytes. Limits are checked before any pixel is decoded.
    Truncated or corrupt files raise instead of returning a grey-filled image. EXIF orientation is
    applied, an embedded ICC profile other than sRGB is converted to sRGB, then all metadata is
    dropped. RGBA is returned only when the input has transparency.

    ``draft_size`` (optional) lets a JPEG decode at a reduced DCT scale that still covers that size
    in both dimensions, whatever the EXIF rotation: several times faster for large photos that are
    about to be downscaled anyway.
    """
    with _open_loaded(data, max_bytes=max_bytes, max_pixels=max_pixels, draft_size=draft_size) as image:
        return _clean(image)


def validate_image(data: bytes, *, max_bytes: int, max_pixels: int) -> ImageInfo:
    """Every check of ``decode_image`` (pixels fully decoded, so truncation is caught), no conversion.

    For the API at submit and in ``POST /v1/uploads`` when it stores the bytes as sent: orientation,
    colour conversion and the clean copy are left to the worker.
    """
    with _open_loaded(data, max_bytes=max_bytes, max_pixels=max_pixels, draft_size=None) as image:
        width, height = image.size
        if _orientation(image) in (5, 6, 7, 8):
            width, height = height, width
        return ImageInfo(image.format or "", width, height, _has_alpha(image))


def _open_loaded(
    data: bytes, *, max_bytes: int, max_pixels: int, draft_size: tuple[int, int] | None
) -> Image.Image:
    if len(data) > max_bytes:
        raise InputTooLarge(
            f"input is {len(data)} bytes, over the limit of {max_bytes}", code="input_too_large"
        )
    fmt = sniff_format(data)
    if fmt == "WEBP" and int.from_bytes(data[4:8], "little") + 8 > len(data):
        # libwebp only says "could not create decoder object"; the RIFF size says what happened.
        raise InvalidInput("the WebP file is shorter than its RIFF header declares", code="truncated_image")
    if fmt == "JPEG" and data.count(b"\xff\xda") > MAX_JPEG_SCANS:
        raise InputTooLarge(f"the JPEG has more than {MAX_JPEG_SCANS} scans", code="decompression_bomb")
    try:
        # Pillow checks its own global limit (about 89 MP warns, 179 MP raises) here; ours follows.
        image = Image.open(io.BytesIO(data), formats=[fmt])
    except Image.DecompressionBombError as exc:
        raise InputTooLarge(
            f"the {fmt} image declares more pixels than the decoder accepts", code="decompression_bomb"
        ) from exc
    except Exception as exc:  # Pillow raises SyntaxError, ValueError, struct.error, OSError...
        raise _refusal(fmt, "header", _open_error_code(exc)) from exc
    try:
        check_pixels(image.width, image.height, len(data), max_pixels=max_pixels)
        if fmt == "JPEG" and draft_size is not None:
            side = max(draft_size)
            image.draft("RGB" if image.mode != "CMYK" else "CMYK", (side, side))
        try:
            image.load()
        except Exception as exc:
            raise _refusal(fmt, "data", _load_error_code(exc)) from exc
    except BaseException:
        image.close()
        raise
    return image


def _has_alpha(image: Image.Image) -> bool:
    return image.mode in ("RGBA", "LA", "PA", "RGBa", "La") or "transparency" in image.info


def _refusal(fmt: str, part: str, code: str) -> InvalidInput:
    """Our own words for a decoder failure: Pillow's messages carry object reprs
    (``cannot identify image file <_io.BytesIO object at 0x...>``) and change between versions."""
    if code == "decompression_bomb":
        return InputTooLarge(f"the {fmt} image needs more memory to decode than is available", code=code)
    what = "is truncated" if code == "truncated_image" else "is corrupt"
    return InvalidInput(f"the {fmt} {part} {what}", code=code)


def _open_error_code(exc: Exception) -> str:
    return "truncated_image" if _looks_truncated(exc) else "corrupt_image"


def _load_error_code(exc: Exception) -> str:
    if isinstance(exc, MemoryError):
        return "decompression_bomb"
    return "truncated_image" if _looks_truncated(exc) else "corrupt_image"


def _looks_truncated(exc: Exception) -> bool:
    text = str(exc).lower()
    return (
        isinstance(exc, EOFError)
        or "truncated" in text
        or "premature end" in text
        or "not enough data" in text
    )


_TRANSPOSE = {
    2: Image.Transpose.FLIP_LEFT_RIGHT,
    3: Image.Transpose.ROTATE_180,
    4: Image.Transpose.FLIP_TOP_BOTTOM,
    5: Image.Transpose.TRANSPOSE,
    6: Image.Transpose.ROTATE_270,
    7: Image.Transpose.TRANSVERSE,
    8: Image.Transpose.ROTATE_90,
}


def _orientation(image: Image.Image) -> int:
    try:
        return int(image.getexif().get(0x0112, 1))
    except Exception:
        # Malformed EXIF is not worth refusing an image over: keep the stored orientation.
        return 1


def _clean(image: Image.Image) -> Image.Image:
    """Orientation, colour profile and mode applied; a new image with no metadata attached."""
    target = "RGBA" if _has_alpha(image) else "RGB"
    icc = image.info.get("icc_profile")
    work = image
    if work.mode in ("I", "F") or work.mode.startswith("I;16"):
        # 16-bit greyscale: scale to 8 bits instead of clipping everything above 255 to white.
        work = work.convert("I").point(lambda v: v * (1 / 256)).convert("L")
    converted = None
    if icc and work.mode in ("RGB", "RGBA", "CMYK") and not _is_srgb(icc):
        converted = _to_srgb(work, icc, target)
    if converted is None:
        converted = work.convert(target) if work.mode != target else None
    transpose = _TRANSPOSE.get(_orientation(image))
    if transpose is not None:
        converted = (converted if converted is not None else work).transpose(transpose)
    if converted is None or converted is image:
        converted = image.copy()
    converted.info = {}
    return converted


def _is_srgb(icc: bytes) -> bool:
    """True for the sRGB profiles cameras and editors embed: converting them would change nothing.

    The check is by description (IEC 61966-2.1, "sRGB built-in", ...): a full conversion costs about
    100 ms on a 4-megapixel photo here, and most inputs carry one of these.
    """
    try:
        description = ImageCms.getProfileDescription(ImageCms.ImageCmsProfile(io.BytesIO(icc)))
    except Exception:
        return False
    return "srgb" in description.lower() or "61966-2" in description


def _to_srgb(image: Image.Image, icc: bytes, target: str) -> Image.Image | None:
    """Convert colours from the embedded profile to sRGB; None when the profile is unusable."""
    try:
        source = ImageCms.ImageCmsProfile(io.BytesIO(icc))
        alpha = image.convert("RGBA").getchannel("A") if target == "RGBA" else None
        base = image.convert("RGB") if image.mode == "RGBA" else image
        out = ImageCms.profileToProfile(base, source, _SRGB, outputMode="RGB")
        if out is None:
            return None
        if alpha is not None:
            out.putalpha(alpha)
        return out
    except Exception:
        return None
