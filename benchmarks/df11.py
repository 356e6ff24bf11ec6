"""DFloat11 on this CPU: encode and decode throughput (weights/s) and the memory of DF11 models
against their BF16 twins (goal: at most 0.72).

    python benchmarks/df11.py            # full run (a ~70 M-weight FLUX-shaped stack; ~1-2 min)
    python benchmarks/df11.py --quick    # small sizes only

Weights are N(0, 0.02), like trained transformer weights. One torch thread.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from accelerate import init_empty_weights
from diffusers import FluxTransformer2DModel, QwenImageTransformer2DModel

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from inference_server.devtools.df11_models import FLUX_CONFIG, QWEN_CONFIG, seeded_transformer  # noqa: E402
from inference_server.engine.df11 import compress_transformer, df11_memory_bytes, load_df11  # noqa: E402
from inference_server.engine.df11.codec import encode_weights  # noqa: E402
from inference_server.engine.df11.decoder import BlockDecoder  # noqa: E402

# FLUX-shaped, hidden 512: ~9.5 M weights per double block, ~3.9 M per single block.
STACK_FLUX = dict(
    patch_size=1,
    in_channels=64,
    num_layers=4,
    num_single_layers=8,
    attention_head_dim=64,
    num_attention_heads=8,
    joint_attention_dim=512,
    pooled_projection_dim=256,
    axes_dims_rope=(16, 24, 24),
)


def best_of(fn, repeats: int) -> float:  # type: ignore[no-untyped-def]
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return min(times)


def codec_throughput(n: int, repeats: int) -> dict[str, Any]:
    weights = (torch.randn(n, generator=torch.Generator().manual_seed(0)) * 0.02).to(torch.bfloat16)
    bits = weights.view(torch.int16).numpy().view(np.uint16)
    start = time.perf_counter()
    block = encode_weights([bits])
    encode_s = time.perf_counter() - start
    decoder = BlockDecoder(
        block.luts, block.encoded_exponent, block.sign_mantissa, block.output_positions, block.gaps
    )
    out = np.empty(n, dtype=np.uint16)
    decode_s = best_of(lambda: decoder.decode_into(out), repeats)
    assert np.array_equal(out, bits), "decode is not bit-exact"
    return {"n": n, "encode_wps": n / encode_s, "decode_wps": n / decode_s, "ratio": block.nbytes / (2 * n)}


def flux_inputs(config: dict, seq: int = 256, txt: int = 32) -> dict[str, Any]:
    g = torch.Generator().manual_seed(0)
    return dict(
        hidden_states=torch.randn(1, seq, config["in_channels"], generator=g).to(torch.bfloat16),
        encoder_hidden_states=torch.randn(1, txt, config["joint_attention_dim"], generator=g).to(
            torch.bfloat16
        ),
        pooled_projections=torch.randn(1, config["pooled_projection_dim"], generator=g).to(torch.bfloat16),
        timestep=torch.tensor([0.5], dtype=torch.bfloat16),
        img_ids=torch.zeros(seq, 3),
        txt_ids=torch.zeros(txt, 3),
        return_dict=False,
    )


def model_memory(name: str, cls, config: dict, time_forward: bool) -> dict[str, Any]:  # type: ignore[no-untyped-def]
    reference = seeded_transformer(cls, config, seed=0)
    bf16 = df11_memory_bytes(reference)
    n_params = sum(p.numel() for p in reference.parameters())
    row: dict[str, Any] = {"model": name, "params": n_params}
    with tempfile.TemporaryDirectory() as tmp:
        start = time.perf_counter()
        compress_transformer(reference, Path(tmp))
        row["compress_s"] = time.perf_counter() - start
        row["disk_mb"] = sum(p.stat().st_size for p in Path(tmp).glob("*.safetensors")) / 1e6
        with init_empty_weights():  # parameters on meta: the BF16 weights are never allocated
            empty = cls(**config).to(torch.bfloat16)
        model = load_df11(empty, Path(tmp), "cpu")
        if time_forward:
            with init_empty_weights():
                empty = cls(**config).to(torch.bfloat16)
            eager = load_df11(empty, Path(tmp), "cpu", mode="eager")
    df11 = df11_memory_bytes(model)
    row.update(
        bf16_mb=bf16 / 1e6,
        df11_mb=df11 / 1e6,
        ratio=df11 / bf16,
        ratio_with_buffer=df11_memory_bytes(model, include_decode_buffer=True) / bf16,
    )
    if time_forward:
        inputs = flux_inputs(config)
        with torch.no_grad():
            expected = reference(**inputs)[0]
            for label, m in (("bf16", reference), ("df11", model), ("eager", eager)):
                out = m(**inputs)[0]
                assert torch.equal(out.view(torch.int16), expected.view(torch.int16)), label
                row[f"fwd_{label}_s"] = best_of(lambda m=m: m(**inputs), 3)
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="small sizes only")
    args = parser.parse_args()
    torch.set_num_threads(1)

    print("Codec on one block of N(0, 0.02) BF16 weights (numpy, one thread)")
    print(f"{'weights':>12} {'encode Mw/s':>12} {'decode Mw/s':>12} {'DF11/BF16':>10}")
    sizes = [1 << 20] if args.quick else [1 << 20, 1 << 24]
    for n in sizes:
        r = codec_throughput(n, repeats=3)
        print(
            f"{r['n']:>12,} {r['encode_wps'] / 1e6:>12.1f} {r['decode_wps'] / 1e6:>12.1f} {r['ratio']:>10.4f}"
        )

    print("\nModels: memory of the DF11-loaded model / its BF16 twin (goal <= 0.72)")
    print(
        f"{'model':<22} {'params':>12} {'BF16 MB':>9} {'DF11 MB':>9} {'ratio':>7} {'+buffer':>8}"
        f" {'disk MB':>8} {'compress s':>11}"
    )
    models = [
        ("tiny FLUX", FluxTransformer2DModel, FLUX_CONFIG),
        ("tiny Qwen-Image", QwenImageTransformer2DModel, QWEN_CONFIG),
    ]
    if not args.quick:
        models.append(("FLUX-shaped stack", FluxTransformer2DModel, STACK_FLUX))
    timed = []
    for name, cls, config in models:
        r = model_memory(name, cls, config, time_forward=name == "FLUX-shaped stack")
        print(
            f"{r['model']:<22} {r['params']:>12,} {r['bf16_mb']:>9.2f} {r['df11_mb']:>9.2f}"
            f" {r['ratio']:>7.3f} {r['ratio_with_buffer']:>8.3f} {r['disk_mb']:>8.2f}"
            f" {r['compress_s']:>11.2f}"
        )
        if "fwd_bf16_s" in r:
            timed.append(r)
    print("\nratio: parameters + DF11 tensors; +buffer: also the shared decode buffer (largest block, BF16).")
    for r in timed:
        print(
            f"\nOne forward of the {r['model']} (256 image + 32 text tokens), outputs bit-identical:"
            f"\n  BF16 {r['fwd_bf16_s']:.3f} s | DF11 per_block {r['fwd_df11_s']:.3f} s (decodes every block)"
            f" | DF11 eager {r['fwd_eager_s']:.3f} s"
        )


if __name__ == "__main__":
    main()
