"""LoRA switch benchmark: jobs alternating between K resident LoRAs on one engine (a worker's).

    python benchmarks/loras.py [--models-file FILE] [--family sd15] [--k 1,4,16] [--jobs 32]
                               [--steps 4] [--size 64] [--threads 1] [--modes adapters,hotswap]

Without --models-file (or MODELS_FILE) it builds the tiny models into a temporary folder, and K
random LoRAs for the family's default model either way. Per mode and K, after one warm-up pass
that makes every LoRA resident, --jobs jobs cycle through the K LoRAs (each job a different LoRA
from the one before, for K > 1), interleaved with jobs without LoRA on the same engine:
- switch: the engine's ``last_lora_seconds`` for a LoRA job (putting its LoRA in place before the
  pipeline call and turning it off after it), the value a worker reports as the histogram
  ``inference_lora_switch_seconds``;
- pipeline: the pipeline call alone, for the LoRA jobs and for the jobs without LoRA;
- added: (switch + LoRA job pipeline - no-LoRA pipeline) / no-LoRA pipeline, the cost of the LoRA
  job over a plain one, and switch / no-LoRA pipeline, the switch alone.
Modes: ``adapters`` keeps one peft adapter per LoRA and activates the job's; ``hotswap`` copies the
job's LoRA into one adapter slot with diffusers' ``hotswap=True``. Medians.
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
    parser.add_argument("--family", default="sd15")
    parser.add_argument("--k", default="1,4,16", help="comma-separated numbers of resident LoRAs")
    parser.add_argument("--jobs", type=int, default=32, help="LoRA jobs measured per (mode, K)")
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--size", type=int, default=64)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--modes", default="adapters,hotswap")
    args = parser.parse_args()

    import torch

    torch.set_num_threads(args.threads)
    from inference_server.engine.runner import Engine, GenerationRequest, LoraRef
    from inference_server.engine.tiny.loras import build_lora
    from inference_server.registry import load_registry

    tmp = tempfile.TemporaryDirectory()
    if args.models_file is None:
        from inference_server.engine.tiny import build_tiny_models

        args.models_file = build_tiny_models(Path(tmp.name) / "models", [args.family])
    registry = load_registry(args.models_file)
    family = registry.family(args.family)
    model = family.model(None, "txt2img")
    ks = [int(k) for k in args.k.split(",")]
    started = time.perf_counter()
    uris = []
    for i in range(max(ks)):
        folder = Path(tmp.name) / "loras" / f"lora-{i}"
        build_lora(Path(registry.resolve_source(model.source)), folder, seed=1000 + i)
        uris.append(f"file://{folder}")
    print(
        f"{args.family}/{model.id}: {max(ks)} LoRAs built in {time.perf_counter() - started:.1f} s; "
        f"jobs of {args.steps} steps at {args.size}x{args.size}, {args.threads} thread(s)"
    )

    def request(lora: str | None, seed: int) -> GenerationRequest:
        return GenerationRequest(
            family=args.family,
            model=model.id,
            task="txt2img",
            prompt="a cat",
            negative_prompt=None,
            width=args.size,
            height=args.size,
            steps=args.steps,
            guidance_scale=None,
            seeds=[seed],
            loras=[LoraRef(lora, 1.0)] if lora else [],
        )

    header = (
        f"{'mode':<9} {'K':>3} {'switch ms':>10} {'LoRA pipe ms':>13} {'plain pipe ms':>14} "
        f"{'switch %':>9} {'added %':>8}"
    )
    print(header)
    print("-" * len(header))
    for mode in args.modes.split(","):
        for k in ks:
            engine = Engine(registry, lora_hotswap=(mode == "hotswap"), max_loras=max(k, 1))
            engine.generate(request(None, 0))
            for uri in uris[:k]:  # warm-up: every LoRA resident
                engine.generate(request(uri, 0))
            switch, lora_pipe, plain_pipe = [], [], []
            for j in range(args.jobs):
                engine.generate(request(uris[j % k], j))
                assert engine.last_lora_seconds is not None
                switch.append(engine.last_lora_seconds)
                lora_pipe.append(engine.last_pipeline_seconds)
                if j % 2 == 0:
                    engine.generate(request(None, j))
                    plain_pipe.append(engine.last_pipeline_seconds)
            s, lp, pp = (statistics.median(x) * 1000 for x in (switch, lora_pipe, plain_pipe))
            print(
                f"{mode:<9} {k:>3} {s:>10.2f} {lp:>13.1f} {pp:>14.1f} {100 * s / pp:>8.1f}% "
                f"{100 * (s + lp - pp) / pp:>7.1f}%"
            )
    tmp.cleanup()


if __name__ == "__main__":
    main()
