"""A word-level CLIP tokenizer for a closed vocabulary (the synthetic world's captions), in CLIP's own file format.

A tiny text encoder learns far faster from one token per word than from characters. We keep CLIP's format, so
`CLIPTokenizer` (and so any diffusers / lcmkit pipeline) loads the folder unchanged: the vocabulary starts from
the character-level vocab of `lcmkit.io.tokenizer` (every byte, alone and with `</w>`, so any text still tokenises), and
BPE merges are learnt on the word list until every listed word is a single token.
"""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Iterable
from pathlib import Path

import torch
from transformers import CLIPTokenizer

from lcmkit.io.tokenizer import write_char_clip_tokenizer

END_OF_WORD = "</w>"


def _merge_pair(symbols: list[str], pair: tuple[str, str]) -> list[str]:
    out, i = [], 0
    while i < len(symbols):
        if i + 1 < len(symbols) and (symbols[i], symbols[i + 1]) == pair:
            out.append(symbols[i] + symbols[i + 1])
            i += 2
        else:
            out.append(symbols[i])
            i += 1
    return out


def learn_word_merges(words: Iterable[str]) -> list[tuple[str, str]]:
    """BPE merges that turn each of `words` into one token.

    Classic BPE training (merge the most frequent adjacent pair, everywhere, until no pair is left). Because
    BPE encoding applies merges in the order they were learnt, it reproduces the training segmentation, so each
    listed word encodes to exactly one token. Ties break on the pair itself, so the result is deterministic.
    """
    segments: dict[str, list[str]] = {}
    for word in sorted(set(words)):
        if not word or not word.isascii() or not word.isalpha() or not word.islower():
            raise ValueError(f"vocabulary words must be lowercase ASCII letters only, got {word!r}")
        segments[word] = list(word[:-1]) + [word[-1] + END_OF_WORD]
    merges: list[tuple[str, str]] = []
    while True:
        counts: Counter[tuple[str, str]] = Counter()
        for symbols in segments.values():
            counts.update(zip(symbols, symbols[1:], strict=False))
        if not counts:
            return merges
        pair = max(counts, key=lambda p: (counts[p], p))
        merges.append(pair)
        segments = {word: _merge_pair(symbols, pair) for word, symbols in segments.items()}


def write_word_clip_tokenizer(folder: str | Path, words: Iterable[str], model_max_length: int = 32) -> Path:
    """Write a CLIP-format tokenizer (vocab.json, merges.txt, configs) whose listed `words` are single tokens.

    `model_max_length` is the padded length of every prompt (and so the text encoder's position count); the
    longest synthetic caption is 21 words plus start and end tokens.
    """
    folder = write_char_clip_tokenizer(folder, model_max_length=model_max_length)
    vocab: dict[str, int] = json.loads((folder / "vocab.json").read_text(encoding="utf-8"))
    merges = learn_word_merges(words)
    for a, b in merges:
        vocab.setdefault(a + b, len(vocab))
    (folder / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False), encoding="utf-8")
    lines = "".join(f"{a} {b}\n" for a, b in merges)
    (folder / "merges.txt").write_text("#version: 0.2\n" + lines, encoding="utf-8")
    return folder


def tokenize(tokenizer: CLIPTokenizer, captions: list[str], device: torch.device) -> torch.Tensor:
    """Token ids padded to `model_max_length`, exactly as the pipelines tokenise prompts."""
    ids = tokenizer(
        list(captions),
        padding="max_length",
        max_length=tokenizer.model_max_length,
        truncation=True,
        return_tensors="pt",
    ).input_ids
    return ids.to(device)
