"""IP-Adapter rows of the engine benchmark: what a reference image costs on a cached pipeline.

    python benchmarks/engine_ip_adapter.py [--size 64] [--steps 4] [--repeat 5] [--threads 1]

``rows(models_dir)`` takes a folder written by ``build_tiny_models`` (its ``sd15``) and builds the
tiny IP-Adapter for it in a temporary folder. Measured on the txt2img variant, as the engine calls
it (``engine.ip_adapter``), medians over ``repeat``:
- first apply: a pipeline that never had the adapter: reading the weights, diffusers building the
  processors and projection, loading the image encoder;
- apply (resident): the next job's apply, the modules kept on the denoiser swapped back in;
- reset: putting the denoiser's own processors back after a job;
- s/step plain and with the adapter: time between step callbacks after the first;
- job plain and with the adapter: the whole call, which also encodes the reference image once.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

FAMILY = "sd15"


def rows(models_dir: Path, *, size: int = 64, steps: int = 4, repeat: int = 5) -> list[dict[str, Any]]:
    """Timing rows for the tiny sd15 in ``models_dir``: dicts of family, component, measure, seconds."""
    import torch
    from diffusers import DiffusionPipeline
    from PIL import Image

    from inference_server.engine import ip_adapter, variants
    from inference_server.engine.runner import GenerationRequest
    from inference_server.engine.tiny.ip_adapter import WEIGHT_NAME, build_ip_adapter

    reference = Image.linear_gradient("L").resize((48, 48)).convert("RGB")
    req = GenerationRequest(
        family=FAMILY,
        model=None,
        task="txt2img",
        prompt="a photo of the cat",
        negative_prompt=None,
        width=size,
        height=size,
        steps=steps,
        guidance_scale=None,
        seeds=[0],
    )
    times: dict[str, list[float]] = {}

    def timed(measure: str, started: float) -> None:
        times.setdefault(measure, []).append(time.perf_counter() - started)

    with tempfile.TemporaryDirectory() as tmp:
        folder = str(build_ip_adapter(Path(models_dir) / FAMILY, Path(tmp) / "ip"))

        def apply(pipe: Any) -> None:
            ip_adapter.apply(
                pipe, folder, weight_name=WEIGHT_NAME, image_encoder=None, scale=1.0, dtype=torch.float32
            )

        def job(pipe: Any, with_adapter: bool) -> tuple[float, list[float]]:
            marks: list[float] = []

            def mark(p: Any, step: int, timestep: Any, kwargs: dict[str, Any]) -> dict[str, Any]:
                marks.append(time.perf_counter())
                return kwargs

            kwargs = variants.call_kwargs(pipe, req, req.seeds, mark)
            if with_adapter:
                kwargs.update(ip_adapter.call_kwargs(reference, len(req.seeds)))
            started = time.perf_counter()
            with torch.inference_mode():
                pipe(**kwargs)
            elapsed = time.perf_counter() - started
            return elapsed, [b - a for a, b in zip(marks, marks[1:], strict=False)]

        for _ in range(repeat):
            base = DiffusionPipeline.from_pretrained(str(Path(models_dir) / FAMILY), dtype=torch.float32)
            base.set_progress_bar_config(disable=True)
            pipe = variants.variant(base, "txt2img")
            job(pipe, False)  # warm-up: allocator, lazy paths
            started = time.perf_counter()
            apply(pipe)
            timed("first apply (load) s", started)
            job(pipe, True)
            started = time.perf_counter()
            ip_adapter.reset(pipe)
            timed("reset s", started)
            for with_adapter in (False, True):
                if with_adapter:
                    started = time.perf_counter()
                    apply(pipe)
                    timed("apply (resident) s", started)
                try:
                    elapsed, gaps = job(pipe, with_adapter)
                finally:
                    if with_adapter:
                        ip_adapter.reset(pipe)
                label = "with adapter" if with_adapter else "plain"
                times.setdefault(f"job {label} s", []).append(elapsed)
                times.setdefault(f"s/step {label}", []).extend(gaps)
    order = ["first apply (load) s", "apply (resident) s", "reset s", "s/step plain", "s/step with adapter"]
    order += ["job plain s", "job with adapter s"]
    return [
        {"family": FAMILY, "component": "ip-adapter", "measure": m, "seconds": statistics.median(times[m])}
        for m in order
    ]


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--size", type=int, default=64)
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()

    import torch

    torch.set_num_threads(args.threads)
    from inference_server.engine.tiny import build_tiny_models

    with tempfile.TemporaryDirectory() as tmp:
        build_tiny_models(Path(tmp), [FAMILY])
        found = rows(Path(tmp), size=args.size, steps=args.steps, repeat=args.repeat)
    print(
        f"\n{FAMILY} at {args.size}x{args.size}, {args.steps} steps, {args.threads} thread(s), "
        f"median of {args.repeat}"
    )
    print("| family | component | measure | seconds |")
    print("|---|---|---|---|")
    for row in found:
        print(f"| {row['family']} | {row['component']} | {row['measure']} | {row['seconds']:.4f} |")


if __name__ == "__main__":
    main()
