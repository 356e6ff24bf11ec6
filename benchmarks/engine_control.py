"""ControlNet benchmark rows: load time, per-step cost with none, one and two ControlNets, and each
preprocessor's time per image.

    python benchmarks/engine_control.py [--repeat 5] [--threads 1]

``rows(models_dir)`` is what ``benchmarks/engine.py`` calls: ``models_dir`` holds the tiny families
(``build_tiny_models``); the ControlNets and preprocessor models are read from
``models_dir/controlnets/<family>-{a,b}``, ``models_dir/preprocessors/{depth,pose}`` when present and
built there otherwise. The ``__main__`` builds everything in a temporary folder and prints the rows.
- load: ``load_controlnet`` from disk (page cache warm, as on a worker's second job)
- per step: txt2img at --size and --steps, the mean time between step callbacks after the first,
  plain pipeline, one ControlNet, two ControlNets, in the same run
- preprocess: ``preprocess(kind, ...)`` of one image at the job's size (the model already loaded)
Medians over ``repeat`` runs.
"""

from __future__ import annotations

import argparse
import functools
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

FAMILIES = ("sd15", "sdxl")


def _median(fn: Callable[[], float], repeat: int) -> float:
    return statistics.median(fn() for _ in range(repeat))


def _timed(fn: Callable[[], Any]) -> float:
    started = time.perf_counter()
    fn()
    return time.perf_counter() - started


def _median_seconds(fn: Callable[[], Any], repeat: int) -> float:
    return statistics.median(_timed(fn) for _ in range(repeat))


def _ensure_models(models_dir: Path) -> tuple[Path, Path]:
    from inference_server.engine.tiny.control import (
        build_controlnet,
        build_depth_estimator,
        build_pose_estimator,
    )

    nets, pre = models_dir / "controlnets", models_dir / "preprocessors"
    for family in FAMILIES:
        for i, tag in enumerate("ab"):
            if not (nets / f"{family}-{tag}" / "config.json").exists():
                build_controlnet(models_dir / family, nets / f"{family}-{tag}", seed=100 + i)
    if not (pre / "depth" / "config.json").exists():
        build_depth_estimator(pre / "depth", seed=200)
    if not (pre / "pose" / "config.json").exists():
        build_pose_estimator(pre / "pose", seed=201)
    return nets, pre


def rows(models_dir: Path, *, size: int = 64, steps: int = 4, repeat: int = 5) -> list[dict]:
    """Timing rows, one dict each: ``component``, ``family``, ``case``, ``seconds``."""
    import torch
    from diffusers import DiffusionPipeline
    from PIL import Image

    from inference_server.engine import control, preprocess, variants
    from inference_server.engine.runner import GenerationRequest

    models_dir = Path(models_dir)
    nets_dir, pre_dir = _ensure_models(models_dir)
    image = Image.new("RGB", (size, size), (200, 40, 30))
    image.paste((20, 90, 200), (0, 0, size // 2, size))
    out: list[dict] = []

    loaded = {
        kind: preprocess.load_preprocessor(kind, str(pre_dir / kind), "cpu") for kind in ("depth", "pose")
    }
    for kind in preprocess.KINDS:
        job = functools.partial(preprocess.preprocess, kind, loaded.get(kind), image, size, size)
        seconds = _median_seconds(job, repeat)
        out.append(dict(component="preprocess", family="-", case=f"{kind} {size}x{size}", seconds=seconds))
    control_image = preprocess.preprocess("canny", None, image, size, size)

    for family in FAMILIES:
        base = DiffusionPipeline.from_pretrained(str(models_dir / family), dtype=torch.float32)
        paths = [str(nets_dir / f"{family}-{tag}") for tag in "ab"]
        seconds = _median_seconds(functools.partial(control.load_controlnet, paths[0], torch.float32), repeat)
        out.append(dict(component="controlnet", family=family, case="load", seconds=seconds))
        nets = [control.load_controlnet(p, torch.float32) for p in paths]
        req = GenerationRequest(
            family=family,
            model=None,
            task="txt2img",
            prompt="a cat",
            negative_prompt=None,
            width=size,
            height=size,
            steps=steps,
            guidance_scale=5.0,
            seeds=[1],
        )
        for count in (0, 1, 2):
            pipe = (
                control.control_pipeline(base, "txt2img", nets[:count])
                if count
                else variants.variant(base, "txt2img")
            )
            stamps: list[float] = []

            def on_step(p: Any, i: int, t: Any, kw: dict, stamps: list[float] = stamps) -> dict:
                stamps.append(time.perf_counter())
                return kw

            kwargs = variants.call_kwargs(pipe, req, req.seeds, on_step)
            if count:
                controls = [control.ControlInput(control_image, 1.0)] * count
                kwargs.update(control.control_kwargs(pipe, "txt2img", controls, 1))

            def per_step(pipe: Any = pipe, kwargs: dict = kwargs, stamps: list[float] = stamps) -> float:
                stamps.clear()
                pipe(**kwargs)
                return (stamps[-1] - stamps[0]) / (len(stamps) - 1)

            per_step()  # warm-up: first call allocates
            case = {0: "per step, plain", 1: "per step, 1 ControlNet", 2: "per step, 2 ControlNets"}[count]
            out.append(
                dict(component="controlnet", family=family, case=case, seconds=_median(per_step, repeat))
            )
    return out


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
        started = time.perf_counter()
        build_tiny_models(Path(tmp), list(FAMILIES))
        _ensure_models(Path(tmp))
        print(f"built tiny models in {time.perf_counter() - started:.1f} s; {args.threads} thread(s)")
        table = rows(Path(tmp), size=args.size, steps=args.steps, repeat=args.repeat)
    print(f"{'component':<12} {'family':<6} {'case':<26} {'ms':>8}")
    for row in table:
        print(f"{row['component']:<12} {row['family']:<6} {row['case']:<26} {row['seconds'] * 1000:>8.2f}")


if __name__ == "__main__":
    main()
