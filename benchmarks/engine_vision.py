"""Vision benchmark rows: detector, detector + SAM, and safety checker, per image size.

    python benchmarks/engine_vision.py [--repeat 5] [--threads 1] [--device cpu]

builds the tiny vision models in a temporary folder and prints the rows as a table.
``benchmarks/engine.py`` calls :func:`rows` with a folder laid out as :func:`build_models` writes it:
``detector/`` (OWLv2), ``segmenter/`` (SAM) and ``safety/`` (a Stable Diffusion safety checker).

- load s: loading the component from disk (page cache warm, as on a worker's second job)
- s/image: one image through ``mask_from_prompt`` or ``check_images``, after one warm-up call
Medians over ``repeat`` runs.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

SIZES = (64, 256)
PROMPT = "a red square"


def build_models(models_dir: Path) -> Path:
    """Write the tiny detector, segmenter and safety checker under ``models_dir``; return it."""
    from inference_server.engine.tiny.vision import build_detector, build_safety_checker, build_segmenter

    build_detector(models_dir / "detector", seed=1)
    build_segmenter(models_dir / "segmenter", seed=2)
    build_safety_checker(models_dir / "safety", seed=3)
    return models_dir


def rows(models_dir: Path, *, repeat: int = 5, device: str = "cpu") -> list[dict]:
    """One row per component and image size: ``component``, ``size``, ``load_s``, ``per_image_s``.

    Components: ``detector`` (boxes filled), ``detector+sam`` (boxes refined by SAM; its load time
    is the two loads), ``safety`` (one image checked).
    """
    from inference_server.engine.masks import load_detector, load_segmenter, mask_from_prompt
    from inference_server.engine.safety import check_images, load_safety_checker

    def load_detector_alone() -> tuple[Any, Any]:
        return load_detector(str(models_dir / "detector"), device), None

    def load_both() -> tuple[Any, Any]:
        return (
            load_detector(str(models_dir / "detector"), device),
            load_segmenter(str(models_dir / "segmenter"), device),
        )

    def masking(models: tuple[Any, Any]) -> Callable[[Any], object]:
        detector, segmenter = models
        # Threshold 0 keeps every box, so SAM refines the most boxes it can get: the slow side.
        return lambda image: mask_from_prompt(
            detector, segmenter, image, PROMPT, threshold=0.0, grow=4, blur=2
        )

    def checking(checker: Any) -> Callable[[Any], object]:
        return lambda image: check_images(checker, [image])

    components: list[tuple[str, Callable[[], Any], Callable[[Any], Callable[[Any], object]]]] = [
        ("detector", load_detector_alone, masking),
        ("detector+sam", load_both, masking),
        ("safety", lambda: load_safety_checker(str(models_dir / "safety"), device), checking),
    ]
    out = []
    for name, load, make_call in components:
        loads = []
        for _ in range(repeat):
            started = time.perf_counter()
            loaded = load()
            loads.append(time.perf_counter() - started)
        call = make_call(loaded)
        for size in SIZES:
            image = _image(size)
            call(image)  # warm-up: first-call allocations and lazy imports
            times = []
            for _ in range(repeat):
                started = time.perf_counter()
                call(image)
                times.append(time.perf_counter() - started)
            out.append(
                dict(
                    component=name,
                    size=size,
                    load_s=statistics.median(loads),
                    per_image_s=statistics.median(times),
                )
            )
    return out


def _image(size: int) -> Any:
    from PIL import Image

    image = Image.new("RGB", (size, size), "white")
    image.paste((220, 20, 20), (size // 4, size // 4, size * 3 // 4, size * 3 // 4))
    return image


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args()

    import torch

    torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory() as tmp:
        started = time.perf_counter()
        models_dir = build_models(Path(tmp))
        print(f"built tiny vision models in {time.perf_counter() - started:.1f} s")
        table = rows(models_dir, repeat=args.repeat, device=args.device)
    print(f"\n{args.threads} thread(s), device {args.device}, median of {args.repeat}")
    print("| component | image | load s | s/image |")
    print("|---|---|---|---|")
    for row in table:
        print(
            f"| {row['component']} | {row['size']}x{row['size']} | {row['load_s']:.3f} "
            f"| {row['per_image_s']:.4f} |"
        )


if __name__ == "__main__":
    main()
