"""The CPU decoder of DFloat11 blocks, in numpy, bit for bit what the CUDA kernel produces.

Like the kernel, it splits the bitstream into 8-byte chunks and decodes them side by side: the
``gaps`` say where the first code of each chunk starts, so every chunk is independent. Here the
chunks are numpy lanes advanced in lock step rather than GPU threads; one 64 K-entry table
resolves the next one or two codes (when they fit in 16 bits) in one lookup, and the rare codes
longer than 16 bits walk the upstream tables. ``output_positions`` are checked against the
decoded counts, so a corrupt stream fails loudly instead of yielding wrong weights.

It decodes streams written by upstream's encoder too (checked against dfloat11 0.5.0's own
``encode_weights``, whose codes come from dahuffman rather than our canonical codes).
"""

from __future__ import annotations

import numpy as np

from inference_server.engine.df11.format import BYTES_PER_THREAD, THREADS_PER_BLOCK, DF11FormatError

_FAST_BITS = 16
_TOTAL_SHIFT = 23  # table entry layout, see _fast_table
_NO_SECOND = 64
_LANES = 1 << 15  # chunks decoded per lock-step batch: bounds the scratch memory (about 20 MB)


class BlockDecoder:
    """Decodes one DF11 block. Build once per block (it precomputes a 256 KB table), then call
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
            syms, keep, cnt = self._decode_lanes(gaps[c0:c1], c0, c1)
            counts[c0:c1] = cnt
            take = min(int(cnt.sum()), self.n_elements - written)
            if take > 0:
                result[written : written + take] = np.compress(keep, syms)[:take]
                written += take
            if written >= self.n_elements:
                break
        if written < self.n_elements:
            raise DF11FormatError(f"bitstream ends after {written} of {self.n_elements} exponents")
        self._check_positions(counts)
        return result

    def _decode_lanes(self, gaps: np.ndarray, c0: int, c1: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Decode chunks c0..c1 side by side, up to two codes per lane and step. Returns the
        symbols in stream order with padding slots (uint8), which of them to keep (real codes
        that started inside their lane's chunk) and the kept codes per lane."""
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
        # Unsigned bit positions: shifts, masks and adds then need no casts in the loop.
        start = np.arange(lanes, dtype=np.uint32) * np.uint32(64)
        pos = start + gaps.astype(np.uint32)
        end = start + 64
        entries = np.empty((64, lanes), dtype=np.uint32)
        seen = np.empty((64, lanes), dtype=np.uint32)
        fast = self.fast
        steps = 64
        for step in range(64):
            window = (win32[pos >> 3] << (pos & 7)) >> 16
            entry = fast[window]
            advance = entry >> _TOTAL_SHIFT
            if advance.min() == 0:  # some lane holds a code longer than 16 bits
                idx = np.flatnonzero(advance == 0)
                sym, length = _decode_long(self.luts, data, pos[idx])
                advance[idx] = length
                entry[idx] = (
                    sym.astype(np.uint32) | (_NO_SECOND << 16) | (length.astype(np.uint32) << _TOTAL_SHIFT)
                )
            entries[step] = entry
            seen[step] = pos
            pos += advance
            if step % 4 == 3 and (pos >= end).all():
                steps = step + 1
                break
        entries, seen = entries[:steps], seen[:steps]
        first = seen < end
        second = (seen + ((entries >> 16) & 0x7F)) < end
        counts = first.sum(axis=0) + second.sum(axis=0)
        # Lane-major order is stream order: transpose symbol pairs and their keep flags to
        # [lane, step, (first, second)], flat, for one np.compress.
        pairs = (entries & 0xFFFF).astype(np.uint16)  # first symbol | second symbol << 8
        flags = first.view(np.uint8).astype(np.uint16) | (second.view(np.uint8).astype(np.uint16) << 8)
        syms = np.ascontiguousarray(pairs.T).view(np.uint8).reshape(-1)
        keep = np.ascontiguousarray(flags.T).view(np.bool_).reshape(-1)
        return syms, keep, counts

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
    """For every 16-bit window, the codes at its start, as one uint32 (256 KB per block):
    first symbol (bits 0-7), second symbol (8-15), bit offset of the second code (16-22; 64 when
    the second code does not fit in the window), bits consumed (23-28; 0 when the first code is
    longer than 16 bits and needs the upstream tables)."""
    window = np.arange(1 << _FAST_BITS, dtype=np.int64)
    sym1, len1 = _first_code(luts, window)
    rest = (window << np.where(len1 > 0, len1, 0)) & 0xFFFF
    sym2, len2 = _first_code(luts, rest)
    two = (len1 > 0) & (len2 > 0) & (len1 + len2 <= _FAST_BITS)
    offset2 = np.where(two, len1, _NO_SECOND)
    total = np.where(two, len1 + len2, len1)
    table = sym1 | (np.where(two, sym2, 0) << 8) | (offset2 << 16) | (total << _TOTAL_SHIFT)
    return table.astype(np.uint32)


def _first_code(luts: np.ndarray, window16: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Symbol and length of the code at the top of each 16-bit window (zero bits after it);
    length 0 when the code is longer than 16 bits. Lengths are at least 1, so that padding
    always advances."""
    window32 = window16 << 16
    sym, length = _walk_luts(luts, window32)
    first = luts[0, window16 >> 8]
    second = np.where(first >= 240, luts[(256 - first.astype(np.int64)) % luts.shape[0], window16 & 0xFF], 0)
    # A third table level means the code is longer than 16 bits, whatever it decoded to.
    long_ = (second >= 240) | (length > _FAST_BITS)
    return sym.astype(np.int64), np.where(long_, 0, np.maximum(length, 1))


def _decode_long(luts: np.ndarray, data: np.ndarray, pos: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    byte = pos >> 3
    w40 = np.zeros(pos.size, dtype=np.int64)
    for k in range(5):
        w40 = (w40 << 8) | data[byte + k]
    window32 = (w40 >> (8 - (pos & 7))) & 0xFFFFFFFF
    sym, length = _walk_luts(luts, window32)
    return sym, np.maximum(length, 1)
