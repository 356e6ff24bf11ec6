"""The DF11 codec: bit-exact round trips through our numpy decoder and through a line-by-line
emulation of dfloat11 0.5.0's CUDA kernel (decode.cu), so what we write decodes on GPUs too."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from inference_server.engine.df11.codec import (
    MAX_CODE_BITS,
    EncodedBlock,
    build_luts,
    canonical_codes,
    code_lengths,
    encode_exponents,
    encode_weights,
)
from inference_server.engine.df11.decoder import BlockDecoder
from inference_server.engine.df11.format import DF11FormatError

torch.set_num_threads(1)


def bf16_bits(values: torch.Tensor) -> np.ndarray:
    return values.to(torch.bfloat16).view(torch.int16).numpy().view(np.uint16).copy()


def normal_bits(n: int, std: float = 0.02, seed: int = 0) -> np.ndarray:
    return bf16_bits(torch.randn(n, generator=torch.Generator().manual_seed(seed)) * std)


def ours(block) -> np.ndarray:  # type: ignore[no-untyped-def]
    return BlockDecoder(
        block.luts, block.encoded_exponent, block.sign_mantissa, block.output_positions, block.gaps
    ).decode()


def kernel(block, threads: int = 512) -> np.ndarray:  # type: ignore[no-untyped-def]
    """What decode.cu computes: each thread decodes the codes that start in its 8 bytes (from its
    5-bit gap), a block prefix-sums the counts from output_positions[block] and writes only
    indices below output_positions[block + 1] and n_elements."""
    luts, sm = block.luts, block.sign_mantissa
    codes = bytes(block.encoded_exponent) + bytes(16)  # the kernel reads past the end
    gaps = bytes(block.gaps) + bytes(1)  # ... and one byte past the gaps
    positions = block.output_positions.view("<u4")
    n, n_luts = sm.size, luts.shape[0]
    out = np.zeros(n, dtype=np.uint16)
    written = np.zeros(n, dtype=bool)
    n_blocks = -(-len(block.encoded_exponent) // (threads * 8))
    for b in range(n_blocks):
        index = int(positions[b])
        for t in range(threads):
            gid = b * threads + t
            short = (gaps[gid * 5 // 8] << 8) | gaps[gid * 5 // 8 + 1]
            bit = gid * 64 + ((short >> (11 - gid * 5 % 8)) & 0x1F)
            while bit < gid * 64 + 64:
                window = (int.from_bytes(codes[bit // 8 : bit // 8 + 5], "big") >> (8 - bit % 8)) & 0xFFFFFFFF
                decoded = int(luts[0, window >> 24])
                for shift in (16, 8, 0):
                    if decoded < 240:
                        break
                    decoded = int(luts[256 - decoded, (window >> shift) & 0xFF])
                if index < min(int(positions[b + 1]), n):
                    s = int(sm[index])
                    out[index] = ((s & 0x80) << 8) | (decoded << 7) | (s & 0x7F)
                    written[index] = True
                index += 1
                bit += int(luts[n_luts - 1, decoded])
    assert written.all(), f"kernel left {int((~written).sum())} weights unwritten"
    return out


def roundtrip(weights: list[np.ndarray], *, emulate_kernel: bool = True) -> None:
    block = encode_weights(weights)
    expected = np.concatenate([w.reshape(-1) for w in weights])
    assert np.array_equal(ours(block), expected)
    if emulate_kernel:
        assert np.array_equal(kernel(block), expected)
    assert block.split_positions.tolist() == np.cumsum([w.size for w in weights])[:-1].tolist()


@pytest.mark.parametrize("n", [1, 2, 9, 1000, 13_001, 40_000])
def test_normal_weights_roundtrip(n: int) -> None:
    bits = normal_bits(n, seed=n)
    roundtrip([bits[: n // 2], bits[n // 2 :]] if n > 1 else [bits], emulate_kernel=n <= 13_001)


def test_large_block_ours_only() -> None:
    roundtrip([normal_bits(700_000, std=0.05, seed=3)], emulate_kernel=False)


@pytest.mark.parametrize(
    "name",
    [
        "zeros",
        "signed_zeros",
        "subnormals",
        "one_exponent",
        "two_exponents",
        "extremes",
        "all_codable",
        "wide",
    ],
)
def test_edge_values_roundtrip(name: str) -> None:
    rng = np.random.default_rng(0)
    every = np.arange(1 << 16, dtype=np.uint16)
    cases = {
        "zeros": np.zeros(5000, dtype=np.uint16),
        "signed_zeros": np.tile(np.array([0x0000, 0x8000], dtype=np.uint16), 3000),
        "subnormals": rng.integers(0, 0x80, 6000).astype(np.uint16)
        | (rng.integers(0, 2, 6000).astype(np.uint16) << 15),
        "one_exponent": (np.uint16(120 << 7) | rng.integers(0, 0x80, 9000).astype(np.uint16)),
        "two_exponents": (rng.integers(119, 121, 9000).astype(np.uint16) << 7) | np.uint16(0x8055),
        "extremes": np.array([0x0001, 0x7780, 0xF7FF, 0x0080, 0x8000, 0x0000] * 500, dtype=np.uint16),
        "all_codable": every[((every >> 7) & 0xFF) < 240],
        "wide": bf16_bits(torch.randn(20000, generator=torch.Generator().manual_seed(1)) * 1e4),
    }
    roundtrip([cases[name]], emulate_kernel=cases[name].size <= 20_000)


@pytest.mark.parametrize("value", [float("inf"), float("-inf"), float("nan"), 2.0**120])
def test_uncodable_exponents_are_refused(value: float) -> None:
    """Exponents >= 240 collide with the format's table pointers: refused, never mis-coded."""
    bits = normal_bits(1000)
    bits[10] = bf16_bits(torch.tensor([value]))[0]
    with pytest.raises(DF11FormatError):
        encode_weights([bits])


def test_code_lengths_are_capped_at_32_bits() -> None:
    fib = [1, 1]
    while len(fib) < 60:
        fib.append(fib[-1] + fib[-2])
    counts = np.zeros(256, dtype=np.int64)
    counts[:60] = fib
    lengths = code_lengths(counts)
    assert 24 < lengths.max() <= MAX_CODE_BITS  # four table levels in use
    assert (lengths[:60] > 0).all() and (lengths[60:] == 0).all()
    assert np.sum(2.0 ** -lengths[:60].astype(float)) <= 1.0
    # A stream holding every one of these symbols (long codes included) decodes on both sides.
    codes = canonical_codes(lengths)
    exponents = np.repeat(np.arange(60, dtype=np.uint8), 50)
    np.random.default_rng(1).shuffle(exponents)
    encoded, gaps, positions = encode_exponents(exponents, lengths, codes)
    sm = np.arange(exponents.size, dtype=np.uint8)
    block = EncodedBlock(
        luts=build_luts(lengths, codes),
        encoded_exponent=encoded,
        sign_mantissa=sm,
        output_positions=positions.astype("<u4").view(np.uint8),
        gaps=gaps,
        split_positions=np.zeros(0, dtype=np.int64),
    )
    expected = (exponents.astype(np.uint16) << 7) | ((sm.astype(np.uint16) & 0x80) << 8) | (sm & 0x7F)
    assert np.array_equal(ours(block), expected)
    assert np.array_equal(kernel(block), expected)


def test_many_rare_exponents_fit_in_sixteen_tables() -> None:
    """One dominant exponent and every other codable one once: plain Huffman would need about a
    hundred decode tables; the encoder packs long codes so the format's 16 suffice."""
    exponents = np.concatenate([np.full(30_000, 120), np.arange(240)]).astype(np.uint16)
    np.random.default_rng(2).shuffle(exponents)
    bits = (exponents << 7) | np.uint16(0x0011)
    block = encode_weights([bits])
    assert block.luts.shape[0] <= 17
    roundtrip([bits])


def test_corrupt_stream_is_detected() -> None:
    block = encode_weights([normal_bits(60_000, seed=5)])
    broken = block.encoded_exponent.copy()
    broken[100:4000] ^= 0x5A
    decoder = BlockDecoder(block.luts, broken, block.sign_mantissa, block.output_positions, block.gaps)
    with pytest.raises(DF11FormatError):
        decoder.decode()


def test_sliced_encoding_equals_whole() -> None:
    """The encoder works through slices of the block; slice seams must not show in the output."""
    bits = normal_bits(30_000, seed=9)
    exponents = ((bits >> 7) & 0xFF).astype(np.uint8)
    lengths = code_lengths(np.bincount(exponents, minlength=256))
    codes = canonical_codes(lengths)
    whole = encode_exponents(exponents, lengths, codes, slice_size=1 << 30)
    for slice_size in (1, 97, 4096):
        sliced = encode_exponents(exponents, lengths, codes, slice_size=slice_size)
        assert all(np.array_equal(a, b) for a, b in zip(whole, sliced, strict=True)), slice_size
