"""A character-level CLIP tokenizer written in CLIP's own file format (vocab.json, merges.txt, configs).

`CLIPTokenizer` reads the folder like any other. The tiny demo model (`lcmkit.tiny`) and the word-level tokenizer
of the training recipe (`lcmkit.train.tokenizer`) both start from it.
"""

from __future__ import annotations

import json
from pathlib import Path


def bytes_to_unicode() -> dict[int, str]:
    """Byte -> printable character: the reversible table of GPT-2/CLIP byte-level BPE (256 entries).

    Printable bytes map to themselves and come first (the vocabulary's order); the rest map past Latin-1.
    """
    printable = [
        *range(ord("!"), ord("~") + 1),
        *range(ord("¡"), ord("¬") + 1),
        *range(ord("®"), ord("ÿ") + 1),
    ]
    table = {b: chr(b) for b in printable}
    for n, b in enumerate(b for b in range(256) if b not in table):
        table[b] = chr(256 + n)
    return table


def write_char_clip_tokenizer(folder: str | Path, model_max_length: int = 77) -> Path:
    """Write vocab.json / merges.txt / configs of a character-level CLIP tokenizer (514 tokens) to `folder`."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    chars = list(bytes_to_unicode().values())
    tokens = chars + [c + "</w>" for c in chars] + ["<|startoftext|>", "<|endoftext|>"]
    (folder / "vocab.json").write_text(json.dumps({t: i for i, t in enumerate(tokens)}, ensure_ascii=False))
    (folder / "merges.txt").write_text("#version: 0.2\n")
    config = {
        "tokenizer_class": "CLIPTokenizer",
        "model_max_length": model_max_length,
        "bos_token": "<|startoftext|>",
        "eos_token": "<|endoftext|>",
        "unk_token": "<|endoftext|>",
        "pad_token": "<|endoftext|>",
    }
    (folder / "tokenizer_config.json").write_text(json.dumps(config, indent=2))
    (folder / "special_tokens_map.json").write_text(
        json.dumps({k: config[k] for k in ("bos_token", "eos_token", "unk_token", "pad_token")}, indent=2)
    )
    return folder
