"""A GPU self-check, right after ``pip install -e '.[gpu]'`` on a CUDA machine:

    python benchmarks/gpu_check.py [--families sd15,flux] [--device cuda]

It builds every family's tiny random-weight model (``models tiny``) and runs, on the GPU:
each family's model through the engine; DFloat11 weights decoded by the ``dfloat11`` package's
CUDA kernel against this project's decoder (the same pixels, or it fails); model CPU offload and
sequential CPU offload; an attention backend switch; and ``torch.compile`` of the denoiser. One
table: first call (load included) and second call times, peak GPU memory. It exits 1 when a check
fails, 0 otherwise.

Without CUDA it says so and exits 0. ``--device cpu`` is a dry run of the same checks on the CPU,
skipping those only CUDA can run (the dfloat11 kernel, offload, compile)."""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

SIZE, STEPS = 64, 3
# An attention backend of torch's own SDPA kernels: present on any CUDA build, no extra package.
CUDA_ATTENTION = "_native_efficient"


@dataclass
class Row:
    check: str
    result: str = "ok"
    first: float | None = None
    second: float | None = None
    peak_mb: float | None = None
    note: str = ""


@dataclass
class Check:
    name: str
    run: Callable[[Context], Row]
    cuda_only: bool = False


class Context:
    """The device, the tiny models' registry, and the engines built so far."""

    def __init__(self, device: str, models_file: Path, families: list[str]) -> None:
        from inference_server.registry import load_registry

        self.device = device
        self.models_file = models_file
        self.registry = load_registry(models_file)
        self.families = families
        self.cuda = device.startswith("cuda")

    def engine(self, registry: Any = None) -> Any:
        from inference_server.engine.runner import Engine

        return Engine(registry or self.registry, device=self.device, max_edit_pixels=SIZE * SIZE)

    def registry_with(self, family: str, **changes: Any) -> Any:
        """The registry with ``family``'s default model changed by ``changes`` (offload, attention,
        compile), as an operator would write it in models.toml."""
        registry = self.registry
        spec = registry.family(family)
        models = [m.model_copy(update=changes) if m.default else m for m in spec.models]
        families = dict(registry.families)
        families[family] = spec.model_copy(update={"models": models})
        return type(registry)(families=families, path=registry.path)


def request(family: str, *, model: str | None = None, seed: int = 1) -> Any:
    from PIL import Image

    from inference_server.engine.runner import GenerationRequest

    task = "edit" if family.startswith("qwen") else "txt2img"
    return GenerationRequest(
        family=family,
        model=model,
        task=task,
        prompt="a lighthouse at dusk",
        negative_prompt=None,
        width=SIZE,
        height=SIZE,
        steps=STEPS,
        guidance_scale=None,
        seeds=[seed],
        image=Image.new("RGB", (SIZE, SIZE), (180, 60, 40)) if task == "edit" else None,
    )


def timed_twice(ctx: Context, call: Callable[[], Any], row: Row) -> Any:
    """Run ``call`` twice: the first time loads (and compiles), the second is the steady state."""
    import torch

    if ctx.cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    out = None
    for attr in ("first", "second"):
        t = time.perf_counter()
        out = call()
        if ctx.cuda:
            torch.cuda.synchronize()
        setattr(row, attr, time.perf_counter() - t)
    if ctx.cuda:
        row.peak_mb = torch.cuda.max_memory_allocated() / 2**20
    return out


def family_check(family: str) -> Check:
    def run(ctx: Context) -> Row:
        row = Row(f"{family} on {ctx.device}")
        engine = ctx.engine()
        images = timed_twice(ctx, lambda: engine.generate(request(family)), row)
        row.note = f"{images[0].size[0]}x{images[0].size[1]}, {STEPS} steps"
        return row

    return Check(f"family {family}", run)


def _df11_pipe(ctx: Context, spec: Any, decoder: str) -> Any:
    """The DF11 model's pipeline on the GPU, its transformer's weights decoded by ``decoder``:
    "kernel" (the dfloat11 package, on the GPU at each forward) or "ours" (this project's decoder,
    once at load, into BF16 weights moved to the GPU)."""
    import diffusers
    import torch
    from accelerate import init_empty_weights

    from inference_server.engine.df11 import load_df11

    source = ctx.registry.resolve_source(spec.source)
    df11_dir = Path(ctx.registry.resolve_source(spec.df11))
    _library, class_name = diffusers.DiffusionPipeline.load_config(source)["transformer"]
    cls = getattr(diffusers, class_name)
    with init_empty_weights():
        model = cls.from_config(cls.load_config(source, subfolder="transformer")).to(torch.bfloat16)
    if decoder == "kernel":
        transformer = load_df11(model, df11_dir, ctx.device)
    else:
        transformer = load_df11(model, df11_dir, "cpu", mode="eager").to(ctx.device)
    pipe = diffusers.DiffusionPipeline.from_pretrained(source, transformer=transformer, dtype=torch.bfloat16)
    pipe.set_progress_bar_config(disable=True)
    return pipe.to(ctx.device)


def _pipe_call(pipe: Any, family: str) -> Any:
    from inference_server.engine import variants

    req = request(family)
    return pipe(**variants.call_kwargs(pipe, req, req.seeds, None)).images


def df11_check(family: str) -> Check:
    def run(ctx: Context) -> Row:
        import numpy as np

        spec = next((m for m in ctx.registry.family(family).models if m.df11), None)
        if spec is None:
            return Row(f"dfloat11 kernel, {family}", "skipped", note="no DF11 model in the registry")
        row = Row(f"dfloat11 kernel vs ours, {family}")
        kernel = _df11_pipe(ctx, spec, "kernel")
        got = timed_twice(ctx, lambda: _pipe_call(kernel, family), row)
        ours = _pipe_call(_df11_pipe(ctx, spec, "ours"), family)
        same = all(np.array_equal(np.asarray(a), np.asarray(b)) for a, b in zip(got, ours, strict=True))
        row.result = "ok" if same else "FAILED"
        row.note = "same pixels" if same else "pixels differ from this project's decoder"
        return row

    return Check(f"dfloat11 {family}", run, cuda_only=True)


def variant_check(name: str, family: str, note: str, **changes: Any) -> Check:
    def run(ctx: Context) -> Row:
        row = Row(f"{name}, {family}", note=note)
        engine = ctx.engine(ctx.registry_with(family, **changes))
        timed_twice(ctx, lambda: engine.generate(request(family)), row)
        if "attention" in changes:
            denoiser = _denoiser(engine)
            if not ctx.cuda:  # the engine switches backends on CUDA only: the dry run does it here
                denoiser.set_attention_backend(changes["attention"])
                engine.generate(request(family))
            backends = {
                getattr(m.processor, "_attention_backend", None)
                for m in denoiser.modules()
                if getattr(m, "processor", None) is not None
            }
            wanted = changes["attention"]
            if wanted not in {str(getattr(b, "value", b)) for b in backends}:
                row.result, row.note = "FAILED", f"backend {wanted} not set (processors: {backends})"
        return row

    return Check(
        name, run, cuda_only=bool(changes.get("offload") not in (None, "none") or changes.get("compile"))
    )


def _denoiser(engine: Any) -> Any:
    pipe = engine.cache.entries()[-1].pipe  # the model the engine loaded last
    return getattr(pipe, "transformer", None) or pipe.unet


def checks(ctx: Context) -> list[Check]:
    out = [family_check(f) for f in ctx.families]
    out += [df11_check(f) for f in ctx.families if any(m.df11 for m in ctx.registry.family(f).models)]
    base = "sd15" if "sd15" in ctx.families else ctx.families[0]
    out.append(variant_check("model CPU offload", base, "enable_model_cpu_offload", offload="model"))
    out.append(
        variant_check("sequential CPU offload", base, "enable_sequential_cpu_offload", offload="sequential")
    )
    flow = "flux" if "flux" in ctx.families else None
    if flow is not None:
        backend = CUDA_ATTENTION if ctx.cuda else "native"
        out.append(
            variant_check("attention backend", flow, f"set_attention_backend({backend!r})", attention=backend)
        )
    out.append(variant_check("torch.compile", base, "denoiser.compile(); first call compiles", compile=True))
    return out


def run_checks(ctx: Context) -> list[Row]:
    rows = []
    for check in checks(ctx):
        if check.cuda_only and not ctx.cuda:
            rows.append(Row(check.name, "skipped", note="needs CUDA"))
            continue
        try:
            rows.append(check.run(ctx))
        except Exception as exc:
            traceback.print_exc()
            rows.append(Row(check.name, "FAILED", note=f"{type(exc).__name__}: {exc}"[:120]))
    return rows


def table(rows: list[Row]) -> str:
    def sec(v: float | None) -> str:
        return f"{v:8.2f} s" if v is not None else f"{'-':>10}"

    head = f"{'check':40} {'result':8} {'first':>10} {'second':>10} {'peak GPU':>10}  note"
    lines = [head, "-" * len(head)]
    for r in rows:
        peak = f"{r.peak_mb:7.0f} MB" if r.peak_mb is not None else f"{'-':>10}"
        lines.append(f"{r.check:40} {r.result:8} {sec(r.first)} {sec(r.second)} {peak}  {r.note}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda", help="cuda (default), cuda:N, or cpu for a dry run")
    parser.add_argument("--families", default="sd15,sdxl,flux,qwen-image-edit")
    parser.add_argument("--models", type=Path, help="a tiny models folder already built (models tiny)")
    args = parser.parse_args(argv)
    import torch

    if args.device.startswith("cuda") and not torch.cuda.is_available():
        print("no CUDA device: nothing to check here (run it on a GPU machine; --device cpu is a dry run)")
        return 0
    if args.device == "cpu":
        torch.set_num_threads(1)
    families = [f for f in args.families.split(",") if f]
    started = time.perf_counter()
    if args.models is not None:
        models_file = args.models / "models.toml"
    else:
        from inference_server.engine.tiny import build_tiny_models

        models_file = build_tiny_models(Path(tempfile.mkdtemp(prefix="gpu-check-")), families=families)
    ctx = Context(args.device, models_file, families)
    name = torch.cuda.get_device_name(ctx.device) if ctx.cuda else "cpu"
    print(f"device: {name}; torch {torch.__version__}; tiny models at {models_file.parent}")
    rows = run_checks(ctx)
    print(table(rows))
    print(f"{len(rows)} checks in {time.perf_counter() - started:.0f} s")
    return 1 if any(r.result == "FAILED" for r in rows) else 0


if __name__ == "__main__":
    sys.exit(main())
