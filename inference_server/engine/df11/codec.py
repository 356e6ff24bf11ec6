"""The DFloat11 codec: Huffman coding of BF16 exponents, bit for bit compatible with dfloat11 0.5.0.

A BF16 weight is sign(1) | exponent(8) | mantissa(7). DFloat11 keeps sign and mantissa as one
byte per weight (``sign_mantissa``) and Huffman-codes the exponent byte into an MSB-first
bitstream (``encoded_exponent``). The decode tables (``luts``) and the side data that let a GPU
thread start in the middle of the stream (``gaps``, ``output_positions``) follow the layout the
package's CUDA kernel reads, so files written here decode there and the other way round.
Our codes are canonical Huffman codes (upstream builds its tree with dahuffman), so the bytes
differ from upstream's for the same weights while the format and the decoded weights do not.

The format cannot hold exponents >= 240 (table values >= 240 are pointers): inf, nan and
|w| >= 2**113 are refused with ``DF11FormatError``; ``compress.py`` keeps such a block in BF16.

This module and ``decoder.py`` are numpy only (no torch): they work on the raw 16-bit
patterns of the weights (``np.uint16``).
"""

from __future__ import annotations

import heapq
from dataclasses import dataclass

import numpy as np

from inference_server.engine.df11.format import (
    BYTES_PER_THREAD,
    THREADS_PER_BLOCK,
    DF11FormatError,
)

MAX_CODE_BITS = 32  # the kernel reads at most four bytes of one code
MAX_SYMBOL = 239  # LUT values >= 240 are pointers to the next table
MAX_DECODE_TABLES = 16  # pointers are 255 (table 1) down to 240 (table 16)


class TooManyTables(DF11FormatError):
    """The code would need more than 16 decode tables."""


@dataclass(frozen=True)
class EncodedBlock:
    """The DF11 tensors of one compressed block, as numpy arrays in their on-disk dtypes."""

    luts: np.ndarray  # uint8 [n_luts, 256]
    encoded_exponent: np.ndarray  # uint8 [n_bytes]
    sign_mantissa: np.ndarray  # uint8 [n_elements]
    output_positions: np.ndarray  # uint8 [4 * (n_cuda_blocks + 1)], little-endian uint32
    gaps: np.ndarray  # uint8, 5-bit entries packed MSB-first
    split_positions: np.ndarray  # int64 [n_weights - 1]

    @property
    def nbytes(self) -> int:
        return sum(
            a.nbytes
            for a in (
                self.luts,
                self.encoded_exponent,
                self.sign_mantissa,
                self.output_positions,
                self.gaps,
                self.split_positions,
            )
        )


# ---------------------------------------------------------------------------------------------
# Code construction


def code_lengths(counts: np.ndarray, max_bits: int = MAX_CODE_BITS) -> np.ndarray:
    """Huffman code lengths (uint8 [256]) for exponent ``counts``, no code longer than ``max_bits``.

    A lone symbol gets a 1-bit code: the kernel needs every code to advance the stream. When the
    tree is too deep, counts are halved (keeping every used symbol at least 1) until it fits;
    that converges because equal counts give a balanced tree of depth 8.
    """
    counts = np.asarray(counts, dtype=np.int64)
    while True:
        lengths = _huffman_lengths(counts)
        if lengths.max() <= max_bits:
            return lengths.astype(np.uint8)
        counts = np.where(counts > 0, np.maximum(counts >> 1, 1), 0)


def _huffman_lengths(counts: np.ndarray) -> np.ndarray:
    used = [int(s) for s in np.flatnonzero(counts)]
    lengths = np.zeros(256, dtype=np.int64)
    if not used:
        return lengths
    if len(used) == 1:
        lengths[used[0]] = 1
        return lengths
    # Heap items: (count, tie-break, symbols under this node). Depth = number of merges above.
    heap = [(int(counts[s]), s, [s]) for s in used]
    heapq.heapify(heap)
    tie = 256
    while len(heap) > 1:
        c1, _, s1 = heapq.heappop(heap)
        c2, _, s2 = heapq.heappop(heap)
        merged = s1 + s2
        lengths[merged] += 1
        heapq.heappush(heap, (c1 + c2, tie, merged))
        tie += 1
    return lengths


def canonical_codes(lengths: np.ndarray) -> np.ndarray:
    """Canonical MSB-first code values (uint64 [256]) for the given lengths (0 = unused)."""
    codes = np.zeros(256, dtype=np.uint64)
    order = sorted((int(n), s) for s, n in enumerate(lengths) if n > 0)
    code, prev_len = 0, 0
    for n, s in order:
        code <<= n - prev_len
        codes[s] = code
        code += 1
        prev_len = n
    return codes


def build_luts(lengths: np.ndarray, codes: np.ndarray) -> np.ndarray:
    """Decode tables in the dfloat11 layout: uint8 [n_tables + 1, 256].

    Table 0 is indexed by the first byte of a code. An entry is the exponent when the code ends
    within that byte, else ``256 - t`` where table ``t`` is indexed by the next byte. The last
    row maps an exponent to its code length. Entries no code reaches repeat their left
    neighbour, as upstream does (only padding bits ever land there).
    """
    symbols = [s for s in range(256) if lengths[s] > 0]
    if any(s > MAX_SYMBOL for s in symbols):
        raise DF11FormatError(
            f"exponent {max(symbols)} cannot be coded: DF11 tables reserve values >= 240 "
            "(weights of magnitude >= 2**113, inf or nan)"
        )
    # Every byte-aligned proper prefix of a code gets a table: (prefix bytes, prefix value).
    prefixes = {(0, 0)}
    for s in symbols:
        n, c = int(lengths[s]), int(codes[s])
        for j in range(1, (n - 1) // 8 + 1):
            prefixes.add((j, c >> (n - 8 * j)))
    order = sorted(prefixes)
    if len(order) > MAX_DECODE_TABLES:
        raise TooManyTables(f"{len(order)} decode tables needed, the format allows {MAX_DECODE_TABLES}")
    index = {p: i for i, p in enumerate(order)}

    luts = np.zeros((len(order) + 1, 256), dtype=np.uint8)
    for (j, prefix), t in index.items():
        row = np.full(256, -1, dtype=np.int64)
        for s in symbols:
            n, c = int(lengths[s]), int(codes[s])
            if n <= 8 * j or (c >> (n - 8 * j)) != prefix:
                continue
            if n <= 8 * j + 8:
                rest = n - 8 * j
                lo = (c & ((1 << rest) - 1)) << (8 - rest)
                row[lo : lo + (1 << (8 - rest))] = s
            else:
                next_byte = (c >> (n - 8 * j - 8)) & 0xFF
                row[next_byte] = 256 - index[(j + 1, c >> (n - 8 * j - 8))]
        luts[t] = _fill_forward(row)
    luts[-1, symbols] = lengths[symbols]
    return luts


def _fill_forward(row: np.ndarray) -> np.ndarray:
    filled = np.flatnonzero(row >= 0)
    if filled.size == 0:
        return np.zeros(256, dtype=np.uint8)
    idx = np.maximum.accumulate(np.where(row >= 0, np.arange(256), -1))
    idx[idx < 0] = filled[0]
    return row[idx].astype(np.uint8)


# ---------------------------------------------------------------------------------------------
# Encoding


def encode_weights(
    weights: list[np.ndarray],
    *,
    bytes_per_thread: int = BYTES_PER_THREAD,
    threads_per_block: int = THREADS_PER_BLOCK,
) -> EncodedBlock:
    """Compress the BF16 bit patterns (``np.uint16`` arrays) of one block's weights, in order.

    Raises ``DF11FormatError`` if an exponent is >= 240 (the format cannot hold it).
    """
    flat = np.concatenate([np.ascontiguousarray(w).reshape(-1).view(np.uint16) for w in weights])
    if flat.size == 0:
        raise DF11FormatError("nothing to compress")
    exponents = ((flat >> 7) & 0xFF).astype(np.uint8)
    sign_mantissa = (((flat >> 8) & 0x80) | (flat & 0x7F)).astype(np.uint8)

    lengths, codes, luts = _code_for(np.bincount(exponents, minlength=256))
    encoded, gaps, positions = encode_exponents(
        exponents, lengths, codes, bytes_per_thread=bytes_per_thread, threads_per_block=threads_per_block
    )
    sizes = np.array([w.size for w in weights], dtype=np.int64)
    return EncodedBlock(
        luts=luts,
        encoded_exponent=encoded,
        sign_mantissa=sign_mantissa,
        output_positions=positions.astype("<u4").view(np.uint8),
        gaps=gaps,
        split_positions=np.cumsum(sizes)[:-1],
    )


def _code_for(counts: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Lengths, codes and tables for ``counts``. When many rare exponents would spread long
    codes over more than 16 tables, their lengths are rounded up to a whole number of bytes:
    codes of one byte-length then pack densely into few tables, for a small loss of ratio
    (only strange distributions need it; Kraft's sum only shrinks, so the code stays valid)."""
    lengths = code_lengths(counts)
    try:
        codes = canonical_codes(lengths)
        return lengths, codes, build_luts(lengths, codes)
    except TooManyTables:
        lengths = np.where(lengths > 8, (lengths.astype(np.int64) + 7) // 8 * 8, lengths).astype(np.uint8)
        codes = canonical_codes(lengths)
        return lengths, codes, build_luts(lengths, codes)


def encode_exponents(
    exponents: np.ndarray,
    lengths: np.ndarray,
    codes: np.ndarray,
    *,
    bytes_per_thread: int = BYTES_PER_THREAD,
    threads_per_block: int = THREADS_PER_BLOCK,
    slice_size: int = 1 << 22,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Bitstream (uint8), packed gaps (uint8) and output positions (uint32) for ``exponents``.

    Works through ``slice_size`` exponents at a time, so the temporaries stay small (a FLUX
    double block has 340 M weights): per-element int64 arrays of the whole block would take
    gigabytes.
    """
    n = exponents.size
    len64 = lengths.astype(np.int64)
    total_bits = int(np.bincount(exponents, minlength=256) @ len64)
    n_bytes = (total_bits + 7) // 8
    bits_per_thread = 8 * bytes_per_thread
    bits_per_block = bits_per_thread * threads_per_block
    n_blocks = -(-n_bytes // (bytes_per_thread * threads_per_block))
    words = np.zeros(total_bits // 64 + 2, dtype=np.uint64)
    # gaps: bit offset of the first code starting in each thread's 8-byte chunk (0 if none).
    gaps = np.zeros(n_blocks * threads_per_block, dtype=np.int64)
    # output_positions: index of the first element each CUDA block writes, then the total.
    positions = np.full(n_blocks + 1, n, dtype=np.int64)

    codes_u = codes.astype(np.uint64)
    offset_bits, last_start = 0, -1
    for a in range(0, n, slice_size):
        e = exponents[a : a + slice_size]
        code_len = len64[e]
        s = np.cumsum(code_len)
        s += offset_bits - code_len  # start bit of each code
        offset_bits = int(s[-1] + code_len[-1])

        # Pack codes into big-endian 64-bit words. Codes never share bits, so a word is the OR
        # of the codes starting in it plus the spill of one code started in the word before.
        value = codes_u[e]
        word = s >> 6
        free = 64 - (s & 63) - code_len  # bits left in the word after the code
        part = value << np.maximum(free, 0).astype(np.uint64)
        spill = np.flatnonzero(free < 0)  # a few percent of codes cross into the next word
        part[spill] = value[spill] >> (-free[spill]).astype(np.uint64)
        first = np.flatnonzero(np.diff(word, prepend=-1))
        words[word[first]] |= np.bitwise_or.reduceat(part, first)
        words[word[spill] + 1] |= value[spill] << (64 + free[spill]).astype(np.uint64)

        # Chunks and CUDA blocks whose first bit lies after the previous slice's last code start
        # and not after this slice's: their first code starting at or after it is in this slice.
        top = int(s[-1])
        k = np.arange(last_start // bits_per_thread + 1, min(top // bits_per_thread + 1, gaps.size))
        at = s[np.searchsorted(s, k * bits_per_thread)]
        gaps[k] = np.where(at < (k + 1) * bits_per_thread, at - k * bits_per_thread, 0)
        b = np.arange(last_start // bits_per_block + 1, min(top // bits_per_block + 1, n_blocks))
        positions[b] = a + np.searchsorted(s, b * bits_per_block)
        last_start = top

    encoded = words.astype(">u8").view(np.uint8)[:n_bytes].copy()
    if gaps.max(initial=0) >= 32:
        raise DF11FormatError("gap does not fit in 5 bits")  # impossible with codes <= 32 bits
    gap_bits = ((gaps[:, None] >> np.arange(4, -1, -1)) & 1).astype(np.uint8)
    return encoded, np.packbits(gap_bits.reshape(-1)), positions.astype(np.uint32)
