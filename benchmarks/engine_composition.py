"""Composition rows of ``benchmarks/engine.py``: each component through the engine, as a worker runs
it, against the plain pipeline in the same run.

    python benchmarks/engine.py --composition [--size 64] [--steps 8] [--repeat 3]

Per family with ControlNets (sd15, sdxl): a plain txt2img job, then with one ControlNet (canny),
two (depth and pose), and the IP-Adapter; each row gives the job's time and its seconds per step.
Then per image: each preprocessor (canny, depth, pose), detector + SAM for a mask prompt, and the
safety checker. ``load s`` is the component's first use on a fresh engine (its load through the
pipeline cache, page cache warm); the other columns are medians of warm runs."""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from typing import Any

from PIL import Image, ImageDraw


def scene(size: int) -> Image.Image:
    image = Image.new("RGB", (size, size), (235, 235, 230))
    draw = ImageDraw.Draw(image)
    s = size / 64
    draw.rectangle((8 * s, 36 * s, 28 * s, 58 * s), fill=(200, 30, 30))
    draw.ellipse((36 * s, 6 * s, 52 * s, 22 * s), fill=(40, 60, 160))
    return image


def rows(registry: Any, *, size: int, steps: int, repeat: int, device: str = "cpu") -> list[tuple]:
    """(family, component, load s, job s, s/step, s/image) rows; NaN where a column does not apply."""
    from inference_server.engine.compose import ControlRef, IpAdapterRef
    from inference_server.engine.runner import Engine, GenerationRequest

    image = scene(size)
    out: list[tuple] = []
    nan = float("nan")

    def request(family: str, **kw: Any) -> GenerationRequest:
        fields: dict[str, Any] = dict(
            family=family,
            model=None,
            task="txt2img",
            prompt="a figure on a plain ground",
            negative_prompt=None,
            width=size,
            height=size,
            steps=steps,
            guidance_scale=None,
            seeds=[1],
        )
        return GenerationRequest(**{**fields, **kw})

    def composed(family: Any, label: str) -> GenerationRequest:
        """A fresh request of the case ``label`` (prepare replaces its control images)."""
        names = {c.preprocess: c.name for c in family.controlnets}
        if label == "1 ControlNet":
            return request(family.name, controls=[ControlRef(names["canny"], image, 1.0, "canny")])
        if label == "2 ControlNets":
            controls = [ControlRef(names[k], image, 1.0, k) for k in ("depth", "pose")]
            return request(family.name, controls=controls)
        if label == "IP-Adapter":
            return request(family.name, ip_adapter=IpAdapterRef(family.ip_adapters[0].name, image, 1.0))
        return request(family.name)

    for family in (f for f in registry.families.values() if f.controlnets):
        kinds = {c.preprocess for c in family.controlnets}
        labels = ["plain"]
        labels += ["1 ControlNet"] if "canny" in kinds else []
        labels += ["2 ControlNets"] if {"depth", "pose"} <= kinds else []
        labels += ["IP-Adapter"] if family.ip_adapters else []
        base_engine = Engine(registry, device=device)
        base_engine.warm(family.name)
        for label in labels:
            engine = Engine(registry, device=device)
            engine.cache = base_engine.cache  # the model loaded once; a component's first use is its load
            t0 = time.perf_counter()
            first = composed(family, label)
            engine.prepare(first)
            engine.generate(first)
            cold = time.perf_counter() - t0
            jobs, per_step = [], []
            for _ in range(repeat):
                req = composed(family, label)
                marks: list[float] = []

                def mark(done: int, total: int, marks: list[float] = marks) -> bool:
                    marks.append(time.perf_counter())
                    return False

                t0 = time.perf_counter()
                engine.prepare(req)
                engine.generate(req, on_step=mark)
                jobs.append(time.perf_counter() - t0)
                if len(marks) > 1:
                    per_step.append((marks[-1] - marks[0]) / (len(marks) - 1))
            job = statistics.median(jobs)
            step = statistics.median(per_step) if per_step else nan
            out.append((family.name, label, cold - job if label != "plain" else nan, job, step, nan))

    # Per image: the tools every family shares.
    tools = registry.tools
    family = next(iter(f for f in registry.families.values() if f.safety_checker), None)
    engine = Engine(registry, device=device)
    per_image: list[tuple[str, Callable[[], Any]]] = []
    for kind in ("canny", *(k for k in ("depth", "pose") if k in tools.preprocessors)):
        per_image.append(
            (
                f"preprocess {kind}",
                lambda k=kind: engine.composer._control_image(ControlRef("-", image, 1.0, k), size, size),
            )
        )
    if tools.detector is not None:
        fam = next(iter(registry.families))
        per_image.append(
            (
                "detector + SAM" if tools.detector.segmenter else "detector",
                lambda: engine.prepare(
                    request(fam, task="inpaint", image=image, mask_prompt="the red box", mask_threshold=0.0)
                ),
            )
        )
    if family is not None:
        per_image.append(("safety checker", lambda: engine.verdicts(family.name, [image])))
    for label, run in per_image:
        t0 = time.perf_counter()
        run()
        cold = time.perf_counter() - t0
        times = []
        for _ in range(repeat):
            t0 = time.perf_counter()
            run()
            times.append(time.perf_counter() - t0)
        warm = statistics.median(times)
        out.append(("all", label, cold - warm, nan, nan, warm))
    return out


def print_rows(found: list[tuple], *, size: int, steps: int, repeat: int) -> None:
    print(f"\ncomposition, {size}x{size}, {steps} steps, median of {repeat}")
    print("| family | component | load s | job s | s/step | s/image |")
    print("|---|---|---|---|---|---|")

    def cell(value: float, digits: int) -> str:
        return "-" if value != value else f"{value:.{digits}f}"

    for fam, label, load, job, step, image in found:
        print(f"| {fam} | {label} | {cell(load, 3)} | {cell(job, 3)} | {cell(step, 4)} | {cell(image, 4)} |")
