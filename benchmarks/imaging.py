"""How much of a job's time image handling takes.

Measures, on photo-like synthetic images (smooth shapes, texture, fine grain; no files needed):
- input side: validation at submit, then decode-and-validate of a 4-megapixel JPEG (with EXIF
  orientation and an sRGB ICC profile, as phones send them) and fitting to 1024x1024 (also from
  a 12-megapixel photo, where JPEG draft decoding helps), and the same input normalized at submit
  (``normalize_input``: the worker then decodes a 1024x1024 PNG);
- output side: signature compositing, metadata and encoding of a 1024x1024 output, per format.

Then compares with the denoising time of a job: the tiny SD 1.5 model here (0.09 s/step at 64x64 on
one thread, ENGINE_FACTS.md) and an assumed production GPU (SDXL 1024x1024, 30 steps at
0.075 s/step on an A100: 2.25 s). Goal: image handling under 5% of a job's time.

    python benchmarks/imaging.py [--repeat 7] [--json]
"""

from __future__ import annotations

import argparse
import base64
import io
import json
import os
import statistics
import time
from collections.abc import Callable

import numpy as np
from PIL import Image, ImageCms, ImageDraw, ImageFilter

from inference_server.imaging import (
    composite_signature,
    decode_image,
    encode_output,
    fit_input,
    normalize_input,
    parse_data_uri,
    validate_image,
)

TINY_SD_STEP_S = 0.09  # ENGINE_FACTS.md: tiny SD 1.5, 64x64, one thread, this machine
GPU_STEP_S = 0.075  # assumption: SDXL 1024x1024 on an A100, middle of the 0.05-0.1 s/step range
GPU_STEPS = 30
FORMATS = ("png", "jpeg", "webp")
MAX_BYTES = 20 * 1024 * 1024  # the Settings defaults
MAX_PIXELS = 16_000_000
METADATA = {"artist_id": "artist_7f3a", "model_id": "sdxl/base-1.0", "collection": "autumn"}
PARAMETERS = {
    "prompt": "a watercolour fox in an autumn forest, soft light",
    "negative_prompt": "blurry",
    "seed": 1234567,
    "model": "sdxl/base-1.0",
    "steps": 30,
    "guidance_scale": 7.0,
    "width": 1024,
    "height": 1024,
}


def photo_like(width: int, height: int, seed: int = 0) -> Image.Image:
    """Smooth colour fields, blurred shapes and fine grain: compresses like a photo, not like noise."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:height, 0:width].astype(np.float32)
    channels = []
    for c in range(3):
        field = 128 + 60 * np.sin(x / (90 + 30 * c) + c) * np.cos(y / (140 - 20 * c))
        channels.append(field)
    image = Image.fromarray(np.stack(channels, -1).clip(0, 255).astype(np.uint8))
    draw = ImageDraw.Draw(image)
    for _ in range(60):
        x0, y0 = int(rng.integers(0, width)), int(rng.integers(0, height))
        r = int(rng.integers(10, max(11, width // 8)))
        draw.ellipse((x0 - r, y0 - r, x0 + r, y0 + r), fill=tuple(int(v) for v in rng.integers(0, 256, 3)))
    image = image.filter(ImageFilter.GaussianBlur(2))
    grain = rng.normal(0, 3, (height, width, 3))
    return Image.fromarray((np.asarray(image, dtype=np.float32) + grain).clip(0, 255).astype(np.uint8))


def phone_jpeg(width: int, height: int) -> bytes:
    """A JPEG like a phone's: EXIF orientation 6 and an embedded ICC profile."""
    exif = Image.Exif()
    exif[0x0112] = 6
    exif[0x010F] = "PhoneMaker"
    icc = ImageCms.ImageCmsProfile(ImageCms.createProfile("sRGB")).tobytes()
    buf = io.BytesIO()
    photo_like(width, height).save(buf, "JPEG", quality=92, exif=exif.tobytes(), icc_profile=icc)
    return buf.getvalue()


def timed(fn: Callable[[], object], repeat: int) -> dict[str, float]:
    fn()  # warm-up: first calls pay for lazy plugin imports
    runs = []
    for _ in range(repeat):
        started = time.perf_counter()
        fn()
        runs.append(time.perf_counter() - started)
    return {"median_s": statistics.median(runs), "min_s": min(runs)}


def main() -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--repeat", type=int, default=7)
    parser.add_argument("--json", action="store_true", help="print the figures as JSON")
    args = parser.parse_args()
    repeat = args.repeat

    jpeg = phone_jpeg(2448, 1632)  # 4.0 megapixels
    jpeg_12mp = phone_jpeg(4032, 3024)  # a phone's full-size photo
    uri = "data:image/jpeg;base64," + base64.b64encode(jpeg).decode()
    normalized = normalize_input(jpeg, width=1024, height=1024, max_bytes=MAX_BYTES, max_pixels=MAX_PIXELS)
    output = photo_like(1024, 1024, seed=1)
    signature = Image.new("RGBA", (600, 200), (0, 0, 0, 0))
    ImageDraw.Draw(signature).text((20, 60), "A. Artist", fill=(255, 255, 255, 255), font_size=90)

    def sign() -> Image.Image:
        return composite_signature(output, signature, position="bottom-right", opacity=0.8, size="medium")

    def output_path(fmt: str) -> Callable[[], tuple[bytes, str]]:
        return lambda: encode_output(sign(), fmt=fmt, quality=90, metadata=METADATA, parameters=PARAMETERS)

    def input_path(data: bytes) -> Callable[[], Image.Image]:
        return lambda: fit_input(
            decode_image(data, max_bytes=MAX_BYTES, max_pixels=MAX_PIXELS, draft_size=(1024, 1024)),
            1024,
            1024,
        )

    results: dict[str, dict[str, float]] = {
        "api_parse_data_uri_4mp": timed(lambda: parse_data_uri(uri, max_bytes=MAX_BYTES), repeat),
        "api_validate_image_4mp": timed(
            lambda: validate_image(jpeg, max_bytes=MAX_BYTES, max_pixels=MAX_PIXELS), repeat
        ),
        "decode_4mp_jpeg": timed(
            lambda: decode_image(jpeg, max_bytes=MAX_BYTES, max_pixels=MAX_PIXELS), repeat
        ),
        "decode_and_fit_4mp_to_1024": timed(input_path(jpeg), repeat),
        "decode_and_fit_12mp_to_1024": timed(input_path(jpeg_12mp), repeat),
        "api_normalize_input_4mp": timed(
            lambda: normalize_input(
                jpeg, width=1024, height=1024, max_bytes=MAX_BYTES, max_pixels=MAX_PIXELS
            ),
            repeat,
        ),
        "decode_and_fit_normalized_1024": timed(input_path(normalized), repeat),
        "signature_only_1024": timed(sign, repeat),
    }
    for fmt in FORMATS:
        results[f"sign_metadata_encode_1024_{fmt}"] = timed(output_path(fmt), repeat)
    sizes = {fmt: len(output_path(fmt)()[0]) for fmt in FORMATS}

    gpu_job_s = GPU_STEP_S * GPU_STEPS
    input_s = results["decode_and_fit_4mp_to_1024"]["median_s"]
    normalized_s = results["decode_and_fit_normalized_1024"]["median_s"]
    shares = {}
    for fmt in FORMATS:
        out_s = results[f"sign_metadata_encode_1024_{fmt}"]["median_s"]
        shares[f"txt2img_{fmt}"] = out_s / gpu_job_s
        shares[f"img2img_4mp_{fmt}"] = (input_s + out_s) / gpu_job_s
        shares[f"img2img_normalized_{fmt}"] = (normalized_s + out_s) / gpu_job_s
    report = {
        "load_average_1min": os.getloadavg()[0],
        "cpus": os.cpu_count(),
        "input_jpeg_bytes": len(jpeg),
        "output_bytes": sizes,
        "timings": results,
        "assumptions": {"tiny_sd_step_s": TINY_SD_STEP_S, "gpu_step_s": GPU_STEP_S, "gpu_steps": GPU_STEPS},
        "share_of_gpu_job": shares,
    }
    if args.json:
        print(json.dumps(report, indent=2))
        return
    print(
        f"load average {report['load_average_1min']:.1f} on {report['cpus']} CPUs; "
        f"input 4.0 MP phone JPEG {len(jpeg) / 1e6:.2f} MB; 1024x1024 output "
        + ", ".join(f"{k} {v / 1e6:.2f} MB" for k, v in sizes.items())
    )
    print(f"{'operation':34} {'median':>9} {'min':>9} {'tiny-SD steps':>14} {'% of GPU job':>13}")
    for name, t in results.items():
        print(
            f"{name:34} {t['median_s'] * 1000:7.1f}ms {t['min_s'] * 1000:7.1f}ms "
            f"{t['median_s'] / TINY_SD_STEP_S:14.2f} {100 * t['median_s'] / gpu_job_s:12.1f}%"
        )
    print(f"GPU job assumed: SDXL 1024x1024, {GPU_STEPS} steps x {GPU_STEP_S} s = {gpu_job_s:.2f} s (A100)")
    for name, share in shares.items():
        print(f"  {name:22} image handling = {100 * share:4.1f}% of the GPU time (goal < 5%)")


if __name__ == "__main__":
    main()
