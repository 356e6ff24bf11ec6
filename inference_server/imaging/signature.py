"""An artist's signature composited onto every output of a job.

The rule (documented for clients):
- the signature is scaled to 10% (``small``), 20% (``medium``) or 30% (``large``) of the output width,
  keeping its aspect ratio (at least 1 px each way); if it would then be taller than the output
  minus the margins, it is scaled down further to fit that height;
- the margin is 2% of the output width, at least 1 px, from the bottom edge and, for
  ``bottom-left`` / ``bottom-right``, from that side edge; ``bottom-center`` is centred horizontally;
- the signature's own alpha is respected and multiplied by ``opacity`` (0 to 1).
"""

from __future__ import annotations

from PIL import Image

from inference_server.errors import InvalidRequest

POSITIONS = ("bottom-left", "bottom-center", "bottom-right")
SIZES = {"small": 0.10, "medium": 0.20, "large": 0.30}
MARGIN_FRACTION = 0.02


def validate_signature(*, position: str, opacity: float, size: str) -> None:
    """Raise ``InvalidRequest`` (code ``invalid_signature``) for values outside the contract."""
    if position not in POSITIONS:
        raise InvalidRequest(
            f"signature.position must be one of {', '.join(POSITIONS)}", code="invalid_signature"
        )
    if size not in SIZES:
        raise InvalidRequest(f"signature.size must be one of {', '.join(SIZES)}", code="invalid_signature")
    if not 0.0 <= opacity <= 1.0:
        raise InvalidRequest("signature.opacity must be between 0 and 1", code="invalid_signature")


def margin(out_w: int) -> int:
    """The gap between the signature and the output's edges, in pixels."""
    return max(1, round(out_w * MARGIN_FRACTION))


def signature_box(
    out_w: int, out_h: int, sig_w: int, sig_h: int, *, position: str, size: str
) -> tuple[int, int, int, int]:
    """Where the signature goes on an ``out_w`` x ``out_h`` output: (x, y, width, height)."""
    validate_signature(position=position, opacity=1.0, size=size)
    if sig_w <= 0 or sig_h <= 0:
        raise InvalidRequest("the signature image is empty", code="invalid_signature")
    gap = margin(out_w)
    w = max(1, round(out_w * SIZES[size]))
    h = max(1, round(sig_h * w / sig_w))
    max_h = max(1, out_h - 2 * gap)
    if h > max_h:
        # A tall, narrow signature on a wide output: fit the height, keep the aspect ratio.
        h = max_h
        w = max(1, round(sig_w * h / sig_h))
    y = out_h - gap - h
    if position == "bottom-left":
        x = gap
    elif position == "bottom-right":
        x = out_w - gap - w
    else:
        x = (out_w - w) // 2
    return x, max(0, y), w, h


def prepare_signature(
    signature: Image.Image, out_w: int, out_h: int, *, opacity: float, size: str, position: str
) -> tuple[Image.Image, tuple[int, int]]:
    """The signature scaled and with opacity applied to its alpha, and its top-left corner.

    Split from ``composite_signature`` so a job with several outputs of one size prepares it once.
    """
    validate_signature(position=position, opacity=opacity, size=size)
    x, y, w, h = signature_box(out_w, out_h, signature.width, signature.height, position=position, size=size)
    rgba = signature.convert("RGBA") if signature.mode != "RGBA" else signature
    # Pillow resizes RGBA in premultiplied form, so transparent pixels do not bleed their colour.
    scaled = (
        rgba.resize((w, h), Image.Resampling.LANCZOS, reducing_gap=3.0)
        if rgba.size != (w, h)
        else rgba.copy()
    )
    if opacity < 1.0:
        lut = [round(a * opacity) for a in range(256)]
        scaled.putalpha(scaled.getchannel("A").point(lut))
    return scaled, (x, y)


def composite_signature(
    image: Image.Image, signature: Image.Image, *, position: str, opacity: float, size: str
) -> Image.Image:
    """Return a copy of ``image`` with ``signature`` blended in per the rule above (same mode as input)."""
    scaled, corner = prepare_signature(
        signature, image.width, image.height, opacity=opacity, size=size, position=position
    )
    out = image.copy()
    if opacity <= 0.0:
        return out
    if out.mode == "RGBA":
        out.alpha_composite(scaled, corner)
    else:
        base = out if out.mode == "RGB" else out.convert("RGB")
        # paste with a mask blends: result = sig * a + base * (1 - a), a = alpha / 255.
        base.paste(scaled.convert("RGB"), corner, mask=scaled.getchannel("A"))
        out = base
    return out
