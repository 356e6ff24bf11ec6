"""Engine benchmark: per family and model, cold load, warm start, seconds per step, whole job.

    python benchmarks/engine.py [--models-file FILE] [--size 64] [--steps 8] [--repeat 3] [--threads 1]
                                [--num-images 1] [--family sd15] [--composition]

Without --models-file (or MODELS_FILE) it builds the tiny models into a temporary folder.
- cold load: a fresh engine loading the model from disk (page cache warm, as on a worker's second job)
- warm start: a cached pipeline, from generate() to the end of the first denoising step
- per step: mean time between step callbacks after the first
- job: a whole job of --num-images images at --steps, from generate() to the PIL images
- per image: the job's time over --num-images (compare --num-images 1 and 4 for what batching pays)
Medians over --repeat runs.

--composition: instead, a row per composition component (ControlNets, IP-Adapter, preprocessors,
detector + SAM, safety checker) against the plain pipeline in the same run
(benchmarks/engine_composition.py says what each column is).
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time
from pathlib import Path


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--models-file", type=Path, default=os.environ.get("MODELS_FILE") or None)
    parser.add_argument("--size", type=int, default=64)
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--num-images", type=int, default=1, help="images (seeds) per job")
    parser.add_argument("--family", action="append", help="only these families (repeatable)")
    parser.add_argument("--composition", action="store_true", help="rows of the composition components")
    args = parser.parse_args()

    import torch

    torch.set_num_threads(args.threads)
    from PIL import Image

    from inference_server.engine.runner import Engine, GenerationRequest
    from inference_server.registry import load_registry

    tmp = None
    if args.models_file is None:
        from inference_server.engine.tiny import build_tiny_models

        tmp = tempfile.TemporaryDirectory()
        started = time.perf_counter()
        args.models_file = build_tiny_models(Path(tmp.name))
        print(f"built tiny models in {time.perf_counter() - started:.1f} s")
    registry = load_registry(args.models_file)
    if args.composition:
        import engine_composition

        found = engine_composition.rows(registry, size=args.size, steps=args.steps, repeat=args.repeat)
        engine_composition.print_rows(found, size=args.size, steps=args.steps, repeat=args.repeat)
        if tmp is not None:
            tmp.cleanup()
        return
    image = Image.new("RGB", (args.size, args.size), (120, 80, 40))
    mask = Image.new("L", (args.size, args.size), 255)

    rows = []
    for family in registry.families.values():
        if args.family and family.name not in args.family:
            continue
        for model in family.models:
            task = model.tasks[0]
            req = GenerationRequest(
                family=family.name,
                model=model.id,
                task=task,
                prompt="a photo of the cat",
                negative_prompt=None,
                width=args.size,
                height=args.size,
                steps=args.steps,
                guidance_scale=None,
                seeds=list(range(args.num_images)),
                image=image if task != "txt2img" else None,
                mask=mask if task == "inpaint" else None,
            )
            cold, start, step, job = [], [], [], []
            for _ in range(args.repeat):
                engine = Engine(registry, device=args.device, max_edit_pixels=args.size * args.size)
                t0 = time.perf_counter()
                engine.warm(family.name, model.id)
                cold.append(time.perf_counter() - t0)
                engine.generate(req)  # first call: lazy variants, allocator warm-up
                marks: list[float] = []

                def mark(done: int, total: int, marks: list[float] = marks) -> bool:
                    marks.append(time.perf_counter())
                    return False

                t0 = time.perf_counter()
                engine.generate(req, on_step=mark)
                job.append(time.perf_counter() - t0)
                start.append(marks[0] - t0)
                if len(marks) > 1:
                    step.append((marks[-1] - marks[0]) / (len(marks) - 1))
            rows.append(
                (
                    family.name,
                    model.id,
                    task,
                    statistics.median(cold),
                    statistics.median(start),
                    statistics.median(step) if step else float("nan"),
                    statistics.median(job),
                    statistics.median(job) / args.num_images,
                    engine.cache.used,
                )
            )
    header = (
        *("family", "model", "task", "cold load s", "warm start s"),
        *("s/step", "job s", "s/image", "MB held"),
    )
    print(
        f"\n{args.size}x{args.size}, {args.steps} steps, {args.num_images} image(s) per job, "
        f"{args.threads} thread(s), device {args.device}, "
        f"median of {args.repeat}"
    )
    print("| " + " | ".join(header) + " |")
    print("|" + "---|" * len(header))
    for fam, mid, task, c, s, st, j, per, used in rows:
        print(
            f"| {fam} | {mid} | {task} | {c:.3f} | {s:.3f} | {st:.4f} | {j:.3f} | {per:.4f} "
            f"| {used / 1e6:.2f} |"
        )
    if tmp is not None:
        tmp.cleanup()


if __name__ == "__main__":
    main()
