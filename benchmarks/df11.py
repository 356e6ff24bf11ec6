"""DFloat11 on this CPU: encode and decode throughput (weights/s) and the memory of DF11 models
against their BF16 twins (goal: at most 0.72).

    python benchmarks/df11.py            # full run (a ~70 M-weight FLUX-shaped stack; ~1-2 min)
    python benchmarks/df11.py --quick    # small sizes only

Weights are N(0, 0.02), like trained transformer weights. One torch thread.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from diffusers import FluxTransformer2DModel, QwenImageTransformer2DModel

from inference_server.engine.df11 import compress_transformer, df11_memory_bytes, load_df11
from inference_server.engine.df11.codec import encode_weights
from inference_server.engine.df11.decoder import BlockDecoder

TINY_FLUX = dict(
    patch_size=1, in_channels=8, num_layers=2, num_single_layers=2, attention_head_dim=16,
    num_attention_heads=2, joint_attention_dim=32, pooled_projection_dim=32, axes_dims_rope=(4, 6, 6),
)
TINY_QWEN = dict(
    patch_size=2, in_channels=16, out_channels=4, num_layers=2, attention_head_dim=16,
    num_attention_heads=2, joint_attention_dim=32, axes_dims_rope=(4, 6, 6),
)
# FLUX-shaped, hidden 512: ~9.5 M weights per double block, ~3.9 M per single block.
STACK_FLUX = dict(
    patch_size=1, in_channels=64, num_layers=4, num_single_layers=8, attention_head_dim=64,
    num_attention_heads=8, joint_attention_dim=512, pooled_projection_dim=256, axes_dims_rope=(16, 24, 24),
)


def best_of(fn, repeats: int) -> float:  # type: ignore[no-untyped-def]
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return min(times)


def codec_throughput(n: int, repeats: int) -> dict[str, float]:
    weights = (torch.randn(n, generator=torch.Generator().manual_seed(0)) * 0.02).to(torch.bfloat16)
    bits = weights.view(torch.int16).numpy().view(np.uint16)
    start = time.perf_counter()
    block = encode_weights([bits])
    encode_s = time.perf_counter() - start
    decoder = BlockDecoder(block.luts, block.encoded_exponent, block.sign_mantissa, block.output_positions, block.gaps)
    out = np.empty(n, dtype=np.uint16)
    decode_s = best_of(lambda: decoder.decode_into(out), repeats)
    assert np.array_equal(out, bits), "decode is not bit-exact"
    return {"n": n, "encode_wps": n / encode_s, "decode_wps": n / decode_s, "ratio": block.nbytes / (2 * n)}


def build(cls, config: dict, seed: int) -> torch.nn.Module:  # type: ignore[no-untyped-def]
    torch.manual_seed(seed)
    model = cls(**config)
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0.0, 0.02)
    return model.to(torch.bfloat16).eval()


def model_memory(name: str, cls, config: dict) -> dict[str, object]:  # type: ignore[no-untyped-def]
    reference = build(cls, config, seed=0)
    bf16 = df11_memory_bytes(reference)
    n_params = sum(p.numel() for p in reference.parameters())
    with tempfile.TemporaryDirectory() as tmp:
        start = time.perf_counter()
        compress_transformer(reference, Path(tmp))
        compress_s = time.perf_counter() - start
        disk = sum(p.stat().st_size for p in Path(tmp).glob("*.safetensors"))
        del reference
        with torch.device("meta"):
            empty = cls(**config).to(torch.bfloat16)
        model = load_df11(empty, Path(tmp), "cpu")
    df11 = df11_memory_bytes(model)
    with_buffer = df11_memory_bytes(model, include_decode_buffer=True)
    return {
        "model": name, "params": n_params, "bf16_mb": bf16 / 1e6, "df11_mb": df11 / 1e6,
        "ratio": df11 / bf16, "ratio_with_buffer": with_buffer / bf16, "disk_mb": disk / 1e6,
        "compress_s": compress_s,
    }


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
        print(f"{r['n']:>12,} {r['encode_wps'] / 1e6:>12.1f} {r['decode_wps'] / 1e6:>12.1f} {r['ratio']:>10.4f}")

    print("\nModels: memory of the DF11-loaded model / its BF16 twin (goal <= 0.72)")
    print(f"{'model':<22} {'params':>12} {'BF16 MB':>9} {'DF11 MB':>9} {'ratio':>7} {'+buffer':>8} {'disk MB':>8} {'compress s':>11}")
    models = [("tiny FLUX", FluxTransformer2DModel, TINY_FLUX), ("tiny Qwen-Image", QwenImageTransformer2DModel, TINY_QWEN)]
    if not args.quick:
        models.append(("FLUX-shaped stack", FluxTransformer2DModel, STACK_FLUX))
    for name, cls, config in models:
        r = model_memory(name, cls, config)
        print(
            f"{r['model']:<22} {r['params']:>12,} {r['bf16_mb']:>9.2f} {r['df11_mb']:>9.2f} {r['ratio']:>7.3f}"
            f" {r['ratio_with_buffer']:>8.3f} {r['disk_mb']:>8.2f} {r['compress_s']:>11.2f}"
        )
    print("\nratio: parameters + DF11 tensors; +buffer: also the shared decode buffer (largest block, BF16).")


if __name__ == "__main__":
    main()
