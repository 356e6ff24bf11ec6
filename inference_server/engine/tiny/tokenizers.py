"""Tokenizers built from Python objects, with no files from a hub.

Each covers every byte (or printable character) so any prompt tokenizes; vocabularies are small so
the tiny text encoders stay small. Real CLIP puts ``<|endoftext|>`` at the highest id (pipelines
pool on the argmax id), and so does this one.
"""

from __future__ import annotations

import string
from functools import lru_cache

# Chat and vision tokens the Qwen edit prompt template uses; their ids go into the text encoder config.
QWEN_SPECIALS = (
    "<|endoftext|>",
    "<|im_start|>",
    "<|im_end|>",
    "<|vision_start|>",
    "<|vision_end|>",
    "<|image_pad|>",
    "<|video_pad|>",
)


@lru_cache(maxsize=1)
def _byte_chars() -> list[str]:
    """GPT-2's reversible byte-to-unicode table, in byte order."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1))
    bs += list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    table = dict(zip(bs, cs, strict=True))
    return [chr(table[b]) for b in range(256)]


def clip_tokenizer():  # -> CLIPTokenizer
    """A byte-level BPE CLIP tokenizer: 256 bytes, their end-of-word forms, a few merges, 2 specials."""
    from transformers import CLIPTokenizer

    chars = _byte_chars()
    vocab: dict[str, int] = {}
    for c in chars:
        vocab[c] = len(vocab)
    for c in chars:
        vocab[c + "</w>"] = len(vocab)
    # A few merges so that tokenization is real BPE, not only characters.
    merges: list[tuple[str, str]] = [("a", "t</w>"), ("t", "h"), ("th", "e</w>"), ("c", "at</w>")]
    for a, b in merges:
        vocab.setdefault(a + b, len(vocab))
    vocab["<|startoftext|>"] = len(vocab)
    vocab["<|endoftext|>"] = len(vocab)  # the highest id, as in real CLIP
    return CLIPTokenizer(vocab=vocab, merges=merges, model_max_length=77)


def clip_special_ids() -> tuple[int, int, int]:
    """(vocab_size, bos_id, eos_id) of :func:`clip_tokenizer`."""
    n = 2 * 256 + 4
    return n + 2, n, n + 1


def t5_tokenizer():  # -> T5Tokenizer
    """A Unigram T5 tokenizer over printable ASCII, with and without the word-start marker."""
    from transformers import T5Tokenizer

    pieces: list[tuple[str, float]] = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("▁", -2.0)]
    for ch in string.ascii_letters + string.digits + string.punctuation:
        pieces.append(("▁" + ch, -3.0))
        pieces.append((ch, -4.0))
    for word in ("the", "cat", "a", "of", "photo", "dog"):
        pieces.append(("▁" + word, -1.0))
    return T5Tokenizer(vocab=pieces, extra_ids=0, model_max_length=512)


def t5_vocab_size() -> int:
    return 4 + 2 * len(string.ascii_letters + string.digits + string.punctuation) + 6


def qwen2_tokenizer():  # -> Qwen2Tokenizer
    """A byte-level Qwen2 tokenizer: 256 bytes, a few merges, and the chat/vision special tokens."""
    from transformers import Qwen2Tokenizer

    chars = _byte_chars()
    vocab = {c: i for i, c in enumerate(chars)}
    merges: list[tuple[str, str]] = [("Ġ", "t"), ("h", "e"), ("Ġt", "he")]
    for a, b in merges:
        vocab.setdefault(a + b, len(vocab))
    tok = Qwen2Tokenizer(vocab=vocab, merges=merges, model_max_length=32768)
    tok.add_special_tokens({"additional_special_tokens": [t for t in QWEN_SPECIALS if t != "<|endoftext|>"]})
    tok.add_tokens(["<|endoftext|>"], special_tokens=True)
    return tok


def qwen2_special_ids(tok) -> dict[str, int]:
    """Ids of the special tokens in ``tok``, keyed by token."""
    return {t: tok.convert_tokens_to_ids(t) for t in QWEN_SPECIALS}
