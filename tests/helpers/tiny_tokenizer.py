"""A tiny CLIP BPE tokenizer built from scratch, for tests without network or tokenizer files.

Layout follows CLIP's own vocab: byte-level symbols (GPT-2's byte → unicode table), each alone and with the
end-of-word marker ``</w>``, then tokens made by merges. Every byte is in the vocab, so any text tokenises
without unknown tokens; a few common prompt words get whole-word tokens through their merges so that BPE is
really exercised. Ids: 0 ``<|startoftext|>``, 1 ``<|pad|>``, 2 ``<|endoftext|>`` (bos 0, pad 1, eos 2, as the
tiny ``CLIPTextConfig`` of the tests); all ids are < 1000. The padding token defaults to ``<|endoftext|>``, as
in the SD 1.x tokenizer.
"""

from __future__ import annotations

import json
import tempfile
from pathlib import Path

from transformers import CLIPTokenizer

from lcmkit.tiny import bytes_to_unicode

BOS, PAD, EOS = "<|startoftext|>", "<|pad|>", "<|endoftext|>"
END_OF_WORD = "</w>"
MODEL_MAX_LENGTH = 77
VOCAB_LIMIT = 1000

WORDS = (
    "an", "the", "of", "in", "on", "and", "with", "by", "at", "to", "is",
    "photo", "picture", "painting", "portrait", "art", "style", "digital",
    "cat", "dog", "horse", "man", "woman", "astronaut", "riding", "city", "night", "sky",
    "high", "quality", "detailed", "beautiful", "landscape", "mountain", "lake", "sunset", "forest",
    "red", "blue", "green", "white", "black",
)  # fmt: skip


def build_vocab_and_merges(words: tuple[str, ...] = WORDS) -> tuple[dict[str, int], list[tuple[str, str]]]:
    """Vocab (token → id) and ranked merges that build each word left to right: ``c a`` → ``ca`` → ``cat</w>``."""
    vocab: dict[str, int] = {BOS: 0, PAD: 1, EOS: 2}
    for symbol in bytes_to_unicode().values():
        vocab[symbol] = len(vocab)
    for symbol in bytes_to_unicode().values():
        vocab[symbol + END_OF_WORD] = len(vocab)
    merges: list[tuple[str, str]] = []
    for word in words:
        prefix = word[0]
        for index, char in enumerate(word[1:], start=1):
            last = index == len(word) - 1
            right = char + END_OF_WORD if last else char
            merged = prefix + right
            if (prefix, right) not in merges:
                merges.append((prefix, right))
            vocab.setdefault(merged, len(vocab))
            prefix = prefix + char
    if len(vocab) > VOCAB_LIMIT:
        raise ValueError(f"tiny vocab has {len(vocab)} tokens; the tiny text encoder allows {VOCAB_LIMIT}")
    return vocab, merges


def write_vocab_files(folder: Path, words: tuple[str, ...] = WORDS) -> tuple[Path, Path]:
    """Write CLIP-format ``vocab.json`` and ``merges.txt`` into ``folder``."""
    folder.mkdir(parents=True, exist_ok=True)
    vocab, merges = build_vocab_and_merges(words)
    vocab_file, merges_file = folder / "vocab.json", folder / "merges.txt"
    vocab_file.write_text(json.dumps(vocab, ensure_ascii=False), encoding="utf-8")
    lines = ["#version: 0.2"] + [f"{left} {right}" for left, right in merges]
    merges_file.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return vocab_file, merges_file


def make_tiny_clip_tokenizer(save_dir: str | Path | None = None, *, pad_token: str = EOS) -> CLIPTokenizer:
    """A tiny ``CLIPTokenizer`` (model_max_length 77); with ``save_dir``, also a diffusers ``tokenizer/`` folder.

    The folder holds vocab.json and merges.txt plus whatever ``save_pretrained`` writes, so both
    ``CLIPTokenizer.from_pretrained`` and lcmkit's ``load_tokenizer`` read it.
    """
    if save_dir is None:
        with tempfile.TemporaryDirectory() as scratch:
            vocab_file, merges_file = write_vocab_files(Path(scratch))
            return CLIPTokenizer(str(vocab_file), str(merges_file), pad_token=pad_token, model_max_length=77)
    save_dir = Path(save_dir)
    vocab_file, merges_file = write_vocab_files(save_dir)
    tokenizer = CLIPTokenizer(str(vocab_file), str(merges_file), pad_token=pad_token, model_max_length=77)
    tokenizer.save_pretrained(str(save_dir))
    return tokenizer
