"""Build the CLIP ViT-L/14 tokenizer files (HF `CLIPTokenizer` format) from CLIP's BPE merge list.

Stable Diffusion 1.x single files carry no tokenizer, so lcmkit ships one in `src/lcmkit/assets/`. The source is
the MIT-licensed `bpe_simple_vocab_16e6.txt.gz` of OpenAI CLIP, which the `open_clip_torch` wheel on PyPI carries:

    pip download --no-deps open_clip_torch -d /tmp/oc
    python scripts/make_clip_tokenizer.py --source /tmp/oc/open_clip_torch-*.whl

(`--source` also takes the `.txt.gz` itself.) The vocabulary is built as CLIP's `SimpleTokenizer` builds it:
the 256 byte symbols, the same with the end-of-word marker `</w>`, one token per merge (the first
49152 - 256 - 2 merges of the file), then `<|startoftext|>` and `<|endoftext|>`: 49408 ids in all.
"""

from __future__ import annotations

import argparse
import gzip
import hashlib
import json
import logging
import zipfile
from pathlib import Path

from lcmkit.tiny import bytes_to_unicode

logger = logging.getLogger("make_clip_tokenizer")

BPE_MEMBER = "open_clip/bpe_simple_vocab_16e6.txt.gz"
NUM_MERGES = 49152 - 256 - 2
VOCAB_SIZE = 49408
BOS, EOS = "<|startoftext|>", "<|endoftext|>"
DEFAULT_OUT = Path(__file__).resolve().parents[1] / "src" / "lcmkit" / "assets" / "clip_vit_l14_tokenizer"

# The settings of the tokenizer published with openai/clip-vit-large-patch14, which SD 1.x uses as is.
TOKENIZER_CONFIG = {
    "add_prefix_space": False,
    "bos_token": BOS,
    "do_lower_case": True,
    "eos_token": EOS,
    "errors": "replace",
    "model_max_length": 77,
    "pad_token": EOS,
    "tokenizer_class": "CLIPTokenizer",
    "unk_token": EOS,
}
SPECIAL_TOKENS = {k: TOKENIZER_CONFIG[k] for k in ("bos_token", "eos_token", "pad_token", "unk_token")}

MIT_TERMS = """Permission is hereby granted, free of charge, to any person obtaining a copy
of this software and associated documentation files (the "Software"), to deal
in the Software without restriction, including without limitation the rights
to use, copy, modify, merge, publish, distribute, sublicense, and/or sell
copies of the Software, and to permit persons to whom the Software is
furnished to do so, subject to the following conditions:

The above copyright notice and this permission notice shall be included in all
copies or substantial portions of the Software.

THE SOFTWARE IS PROVIDED "AS IS", WITHOUT WARRANTY OF ANY KIND, EXPRESS OR
IMPLIED, INCLUDING BUT NOT LIMITED TO THE WARRANTIES OF MERCHANTABILITY,
FITNESS FOR A PARTICULAR PURPOSE AND NONINFRINGEMENT. IN NO EVENT SHALL THE
AUTHORS OR COPYRIGHT HOLDERS BE LIABLE FOR ANY CLAIM, DAMAGES OR OTHER
LIABILITY, WHETHER IN AN ACTION OF CONTRACT, TORT OR OTHERWISE, ARISING FROM,
OUT OF OR IN CONNECTION WITH THE SOFTWARE OR THE USE OR OTHER DEALINGS IN THE
SOFTWARE.
"""
NOTICE = f"""The files in this folder (vocab.json, merges.txt) are derived by scripts/make_clip_tokenizer.py from
bpe_simple_vocab_16e6.txt.gz, the byte-pair-encoding vocabulary of OpenAI CLIP, as distributed in the
open_clip_torch package. Both are released under the MIT License:

----------------------------------------------------------------------------------------------------
OpenAI CLIP (https://github.com/openai/CLIP)

MIT License

Copyright (c) 2021 OpenAI

{MIT_TERMS}
----------------------------------------------------------------------------------------------------
OpenCLIP (https://github.com/mlfoundations/open_clip)

Copyright (c) 2012-2021 Gabriel Ilharco, Mitchell Wortsman,
Nicholas Carlini, Rohan Taori, Achal Dave, Vaishaal Shankar,
John Miller, Hongseok Namkoong, Hannaneh Hajishirzi, Ali Farhadi,
Ludwig Schmidt

{MIT_TERMS}"""

# (prompt, ids) checked after writing; ids from OpenAI CLIP's tokenizer.
KNOWN_IDS = [("a photo of a cat", [49406, 320, 1125, 539, 320, 2368, 49407])]


def read_bpe_lines(source: Path) -> list[str]:
    """Lines of the BPE merge file, from the `.txt.gz` or from inside the open_clip wheel."""
    if source.suffix == ".whl":
        with zipfile.ZipFile(source) as wheel:
            data = wheel.read(BPE_MEMBER)
    else:
        data = source.read_bytes()
    logger.info("BPE file sha256 %s", hashlib.sha256(data).hexdigest())
    return gzip.decompress(data).decode("utf-8").split("\n")


def build_vocab_and_merges(lines: list[str]) -> tuple[dict[str, int], list[str]]:
    """CLIP's vocabulary (token -> id) and its merge list, from the BPE file's lines (line 0 is a header)."""
    merges = lines[1 : NUM_MERGES + 1]
    if len(merges) != NUM_MERGES or any(len(m.split(" ")) != 2 for m in merges):
        raise ValueError(
            f"expected {NUM_MERGES} 'left right' merge lines after the header; the file is not CLIP's"
        )
    symbols = list(bytes_to_unicode().values())
    tokens = symbols + [s + "</w>" for s in symbols] + ["".join(m.split(" ")) for m in merges] + [BOS, EOS]
    vocab = {t: i for i, t in enumerate(tokens)}
    if len(vocab) != VOCAB_SIZE:
        raise ValueError(f"built {len(vocab)} distinct tokens, CLIP has {VOCAB_SIZE}")
    return vocab, merges


def write_tokenizer(vocab: dict[str, int], merges: list[str], out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    (out / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False) + "\n", encoding="utf-8")
    (out / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n", encoding="utf-8")
    (out / "tokenizer_config.json").write_text(json.dumps(TOKENIZER_CONFIG, indent=2) + "\n")
    (out / "special_tokens_map.json").write_text(json.dumps(SPECIAL_TOKENS, indent=2) + "\n")
    (out / "LICENSE").write_text(NOTICE)


def check_known_ids(out: Path) -> None:
    from transformers import CLIPTokenizer

    tokenizer = CLIPTokenizer.from_pretrained(out, local_files_only=True)
    for prompt, expected in KNOWN_IDS:
        ids = tokenizer(prompt).input_ids
        if ids != expected:
            raise SystemExit(f"{prompt!r} tokenises to {ids}, CLIP gives {expected}")
    logger.info("known ids match for %d prompts", len(KNOWN_IDS))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--source", type=Path, required=True, help="open_clip_torch wheel or bpe_simple_vocab_16e6.txt.gz"
    )
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    vocab, merges = build_vocab_and_merges(read_bpe_lines(args.source))
    write_tokenizer(vocab, merges, args.out)
    logger.info("wrote %d tokens and %d merges to %s", len(vocab), len(merges), args.out)
    check_known_ids(args.out)


if __name__ == "__main__":
    main()
