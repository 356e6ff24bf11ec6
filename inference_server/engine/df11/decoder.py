"""The CPU decoder of DFloat11 blocks, in numpy, bit for bit what the CUDA kernel produces.

Like the kernel, it splits the bitstream into 8-byte chunks and decodes them side by side: the
``gaps`` say where the first code of each chunk starts, so every chunk is independent. Here the
chunks are numpy lanes advanced in lock step (one code per lane per step) rather than GPU
threads; one 64 K-entry table resolves codes of up to 16 bits in one lookup, and the rare longer
codes walk the upstream tables. ``output_positions`` are checked against the decoded counts, so
a corrupt stream fails loudly instead of yielding wrong weights.
"""

from __future__ import annotations

import numpy as np

from inference_server.engine.df11.format import BYTES_PER_THREAD, THREADS_PER_BLOCK, DF11FormatError

_FAST_BITS = 16
_LANES = 1 << 15  # chunks decoded per lock-step batch: bounds the scratch memory (~2 MB)


class BlockDecoder:
    """Decodes one DF11 block. Build once per block (it precomputes a 128 KB table), then call
    ``decode_into`` as often as needed."""

    def __init__(
        self,
        luts: np.ndarray,
        encoded_exponent: np.ndarray,
        sign_mantissa: np.ndarray,
        output_positions: np.ndarray,
        gaps: np.ndarray,
        *,
        bytes_per_thread: int = BYTES_PER_THREAD,
        threads_per_block: int = THREADS_PER_BLOCK,
    ) -> None:
        if bytes_per_thread != 8:
            raise DF11FormatError("the decoder handles 8 bytes per thread only (as the kernel does)")
        self.luts = np.ascontiguousarray(luts, dtype=np.uint8)
        self.encoded = encoded_exponent
        self.sign_mantissa = sign_mantissa
        self.positions = np.ascontiguousarray(output_positions).view("<u4")
        self.gaps = gaps
        self.threads_per_block = threads_per_block
        self.n_elements = int(sign_mantissa.size)
        self.fast = _fast_table(self.luts)

    def decode(self) -> np.ndarray:
        """The block's weights as BF16 bit patterns (new ``np.uint16`` array)."""
        out = np.empty(self.n_elements, dtype=np.uint16)
        self.decode_into(out)
        return out

    def decode_into(self, out: np.ndarray) -> None:
        """Write the block's BF16 bit patterns into ``out`` (uint16 or int16, >= n_elements)."""
        n = self.n_elements
        exponents = self.decode_exponents()
        sm = self.sign_mantissa.astype(np.uint16)
        target = out[:n].view(np.uint16)
        np.left_shift(exponents, 7, out=target, dtype=np.uint16)
        target |= (sm & 0x80) << 8
        target |= sm & 0x7F

    def decode_exponents(self) -> np.ndarray:
        """The decoded exponent bytes (uint8 [n_elements])."""
        n_chunks = -(-self.encoded.size // 8)
        gaps = _unpack_gaps(self.gaps, n_chunks)
        result = np.empty(self.n_elements, dtype=np.uint8)
        counts = np.zeros(n_chunks, dtype=np.int64)
        written = 0
        for c0 in range(0, n_chunks, _LANES):
            c1 = min(c0 + _LANES, n_chunks)
            syms, keep = self._decode_lanes(gaps[c0:c1], c0, c1)
            cnt = keep.sum(axis=0)
            counts[c0:c1] = cnt
            take = min(int(cnt.sum()), self.n_elements - written)
            if take > 0:
                # Transposed, the lanes are in stream order: keep the codes that started in
                # their own chunk.
                result[written : written + take] = syms.T[keep.T][:take]
                written += take
            if written >= self.n_elements:
                break
        if written < self.n_elements:
            raise DF11FormatError(f"bitstream ends after {written} of {self.n_elements} exponents")
        self._check_positions(counts)
        return result

    def _decode_lanes(self, gaps: np.ndarray, c0: int, c1: int) -> tuple[np.ndarray, np.ndarray]:
        """Decode chunks c0..c1 side by side. Returns symbols [step, lane] (uint8) and which of
        them started inside their lane's chunk (bool [step, lane])."""
        lanes = c1 - c0
        # Lanes are not stopped at their chunk's end (that would cost a select per step): they
        # run on into the next chunk until every lane is done, and the codes that started past
        # their end are dropped. A lane runs at most 64 codes of <= 32 bits too far, hence the
        # padding of 256 + 8 bytes.
        data = np.zeros(lanes * 8 + 264, dtype=np.uint8)
        piece = self.encoded[c0 * 8 : c1 * 8 + 264]
        data[: piece.size] = piece
        d32 = data.astype(np.uint32)
        # win32[i]: bytes i..i+3 big-endian; a 16-bit window at bit p is (win32[p >> 3] << (p & 7)) >> 16.
        win32 = (d32[:-3] << 24) | (d32[1:-2] << 16) | (d32[2:-1] << 8) | d32[3:]
        start = np.arange(lanes, dtype=np.int32) * 64
        pos = start + gaps.astype(np.int32)
        end = start + 64
        syms = np.empty((64, lanes), dtype=np.uint16)
        seen = np.empty((64, lanes), dtype=np.int32)
        fast = self.fast
        steps = 64
        for step in range(64):
            window = (win32[pos >> 3] << (pos & 7).astype(np.uint32)) >> 16
            entry = fast[window]
            length = entry >> 8
            if length.min() == 0:  # some lane holds a code longer than 16 bits
                idx = np.flatnonzero(length == 0)
                sym, length[idx] = _decode_long(self.luts, data, pos[idx])
                entry[idx] = sym
            syms[step] = entry
            seen[step] = pos
            pos += length
            if step % 4 == 3 and (pos >= end).all():
                steps = step + 1
                break
        keep = seen[:steps] < end
        return syms[:steps].astype(np.uint8), keep

    def _check_positions(self, counts: np.ndarray) -> None:
        """Codes per CUDA block must match output_positions (the last block may hold padding)."""
        tpb = self.threads_per_block
        n_blocks = self.positions.size - 1
        padded = np.zeros(n_blocks * tpb, dtype=np.int64)
        padded[: counts.size] = counts[: padded.size]
        starts = np.concatenate(([0], np.cumsum(padded.reshape(n_blocks, tpb).sum(axis=1))))
        expected = self.positions.astype(np.int64) - int(self.positions[0])
        if n_blocks > 1 and not np.array_equal(starts[1:-1], expected[1:-1]):
            raise DF11FormatError("decoded code counts disagree with output_positions: corrupt block")


def _unpack_gaps(packed: np.ndarray, n_chunks: int) -> np.ndarray:
    bits = np.unpackbits(packed)[: n_chunks * 5]
    if bits.size < n_chunks * 5:
        raise DF11FormatError("gaps array too short for the bitstream")
    return bits.reshape(n_chunks, 5).astype(np.int64) @ np.array([16, 8, 4, 2, 1], dtype=np.int64)


def _walk_luts(luts: np.ndarray, window32: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Decode the code at the top of each 32-bit window with the upstream tables (as the kernel)."""
    value = luts[0, (window32 >> 24) & 0xFF]
    for shift in (16, 8, 0):
        ptr = value >= 240
        if not ptr.any():
            break
        value = np.where(
            ptr, luts[(256 - value.astype(np.int64)) % luts.shape[0], (window32 >> shift) & 0xFF], value
        )
    return value.astype(np.uint8), luts[-1, value].astype(np.int64)


def _fast_table(luts: np.ndarray) -> np.ndarray:
    """For every 16-bit window: symbol | length << 8, or length 0 for codes longer than 16 bits
    (uint16: 128 KB per block, kept while the block is loaded)."""
    window = np.arange(1 << _FAST_BITS, dtype=np.uint64) << np.uint64(16)
    first = luts[0, (window >> np.uint64(24)).astype(np.int64)]
    sym, length = _walk_luts(luts, window.astype(np.int64))
    length = np.where(length > _FAST_BITS, 0, np.maximum(length, 1))
    # A third table level means the code is longer than 16 bits, whatever it decodes to.
    second = np.where(
        first >= 240,
        luts[
            (256 - first.astype(np.int64)) % luts.shape[0], (window >> np.uint64(16)).astype(np.int64) & 0xFF
        ],
        0,
    )
    length = np.where(second >= 240, 0, length)
    return (sym.astype(np.int64) | (length << 8)).astype(np.uint16)


def _decode_long(luts: np.ndarray, data: np.ndarray, pos: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    byte = pos >> 3
    w40 = np.zeros(pos.size, dtype=np.int64)
    for k in range(5):
        w40 = (w40 << 8) | data[byte + k]
    window32 = (w40 >> (8 - (pos & 7))) & 0xFFFFFFFF
    sym, length = _walk_luts(luts, window32)
    return sym, np.maximum(length, 1)
