"""What previews cost the denoising loop: seconds per step of a tiny-model job with a preview every
step against none, per family, in-process (the engine alone, as a worker child runs it).

    python benchmarks/previews.py [--size 256] [--steps 12] [--repeat 3] [--family sd15 --family flux]

"in the loop" is what the loop itself pays with previews on: the latents' projection to RGB and
the hand-off (the same ``LatestPreview.offer`` the worker uses). The PNG encoding and upload happen
on the worker's progress thread; the encoding is timed apart ("side thread"), the upload is a
storage round trip, also off the loop. Medians over --repeat runs.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--size", type=int, default=256)
    parser.add_argument("--steps", type=int, default=12)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--family", action="append", help="only these families (default: sd15, flux)")
    args = parser.parse_args()
    import torch

    torch.set_num_threads(1)
    from inference_server.engine.preview import latent_preview
    from inference_server.engine.runner import Engine, GenerationRequest
    from inference_server.engine.tiny import build_tiny_models
    from inference_server.registry import load_registry
    from workers.previews import LatestPreview

    families = args.family or ["sd15", "flux"]
    tmp = tempfile.TemporaryDirectory()
    registry = load_registry(build_tiny_models(Path(tmp.name), families=families))
    engine = Engine(registry, device="cpu")

    class NoStorage:
        root = "mem://"

        def put(self, key: str, data: bytes, content_type: str) -> str:
            return key

    for family in families:
        def run(every: int, family: str = family) -> tuple[float, LatestPreview]:
            stamps: list[float] = []
            sink = LatestPreview(NoStorage(), "bench")  # type: ignore[arg-type]

            def on_step(step: int, total: int) -> bool:
                stamps.append(time.perf_counter())
                return False

            req = GenerationRequest(
                family=family, model=None, task="txt2img", prompt="a lighthouse", negative_prompt=None,
                width=args.size, height=args.size, steps=args.steps, guidance_scale=None, seeds=[1],
                preview_every=every,
            )  # fmt: skip
            engine.generate(req, on_step=on_step, on_preview=sink.offer if every else None)
            gaps = [b - a for a, b in zip(stamps, stamps[1:], strict=False)]
            return statistics.mean(gaps), sink

        run(0)  # warm: load and first call
        off = statistics.median(run(0)[0] for _ in range(args.repeat))
        on_runs = [run(1) for _ in range(args.repeat)]
        on = statistics.median(r[0] for r in on_runs)
        latest = on_runs[-1][1].take()
        assert latest is not None, "no preview was offered"
        t = time.perf_counter()
        for _ in range(20):
            on_runs[-1][1].store(latest[1])
        encode = (time.perf_counter() - t) / 20
        h, w = latest[1].shape[:2]
        print(f"{family} {args.size}x{args.size}, {args.steps} steps: per step {off * 1000:.1f} ms without "
              f"previews, {on * 1000:.1f} ms with one every step (in the loop: {(on - off) * 1000:+.2f} ms, "
              f"{(on - off) / off * 100:+.1f} %)")  # fmt: skip
        print(f"    side thread: PNG {w}x{h} encode {encode * 1000:.2f} ms per preview")
        # The loop's share alone, timed directly (the difference above is within the host's noise).
        pipe = engine._variant(engine._entry(registry.family(family).model(None, "txt2img")), "txt2img")
        side = args.size // 8
        shape = (1, (side // 2) ** 2, 64) if family == "flux" else (1, 4, side, side)
        latents = torch.randn(*shape)
        t = time.perf_counter()
        for _ in range(200):
            sink = LatestPreview(NoStorage(), "bench")  # type: ignore[arg-type]
            sink.offer(1, latent_preview(pipe, latents, args.size, args.size))
        direct = (time.perf_counter() - t) / 200
        print(f"    in the loop, timed directly: {direct * 1000:.3f} ms per preview "
              f"({direct / off * 100:.2f} % of a step)")  # fmt: skip


if __name__ == "__main__":
    main()
