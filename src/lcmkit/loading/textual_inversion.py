"""Textual-inversion embeddings (A1111 and diffusers files) added to the CLIP tokenizer and text encoder.

An embedding of n vectors becomes n new tokens, `tok`, `tok_1`, ..., `tok_{n-1}` (the names diffusers uses), each
with its own row in the text encoder's input embedding matrix; prompts are rewritten so that `tok` stands for all
n of them. What the text encoder had before is recorded on the text encoder itself (rows count and any rows that
were overwritten), so unloading restores the original matrix exactly, even for pipelines that share components.

File layouts read (the loaded dict decides, not the file name):

| layout | keys | token |
| --- | --- | --- |
| diffusers `learned_embeds.safetensors` / `.bin` | `{token: (dim,) or (n, dim)}` | the key |
| A1111 `.pt` | `string_to_param: {"*": (n, dim)}`, `name` | `name` |
| A1111 / Civitai `.safetensors` | `emb_params: (n, dim)` | the file name (diffusers would use "emb_params") |

Pickles are read with `torch.load(weights_only=True)` only.
"""

from __future__ import annotations

import json
import logging
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from lcmkit.io.errors import MissingModelFileError, ModelFileError
from lcmkit.io.weights import check_finite, load_state_dict
from lcmkit.loading.hub import hub_file, is_hub_id

logger = logging.getLogger(__name__)

DIFFUSERS_NAMES = ("learned_embeds.safetensors", "learned_embeds.bin")
HUB_KWARGS = ("cache_dir", "local_files_only", "revision", "hf_token", "subfolder", "force_download")
_RECORD_ATTR = "_lcmkit_textual_inversion"

Source = str | Path | Mapping[str, Any] | torch.Tensor


@dataclass
class _VocabRecord:
    """What the text encoder's input embedding was before the first textual inversion: its row count, and the
    original values of rows below that count that new tokens overwrote (when the tokenizer is shorter than
    the matrix, as in small test models, new token ids fall inside it)."""

    rows: int
    saved: dict[int, torch.Tensor] = field(default_factory=dict)


# ----------------------------------------------------------------------------------------------------------------------
# Reading files and dicts into (token, vectors)


def _load_source(
    source: str | Path, weight_name: str | None, hub_kwargs: dict[str, Any]
) -> tuple[Mapping[str, Any], Path]:
    """A file, a folder holding `learned_embeds.*` (or `weight_name`), or a hub repo id -> (dict, the file)."""
    path = Path(source).expanduser()
    if path.is_dir():
        names = (weight_name,) if weight_name else DIFFUSERS_NAMES
        found = [path / n for n in names if (path / n).is_file()]
        if not found:
            raise MissingModelFileError(
                f"{path} holds no textual inversion file named {list(names)}; pass the file itself, "
                "or weight_name=... for another name",
                path,
            )
        path = found[0]
    elif not path.exists():
        if not is_hub_id(str(source)):
            raise ValueError(
                f"{str(source)!r} is neither an existing file or folder nor a hub repo id ('owner/name')"
            )
        path = _hub_embedding(str(source), weight_name, hub_kwargs, hub_file)
    return load_state_dict(path), path


def _hub_embedding(
    repo_id: str, weight_name: str | None, hub_kwargs: dict[str, Any], hub_file: Callable
) -> Path:
    """`weight_name`, else `learned_embeds.safetensors`, else `learned_embeds.bin` from a hub repo."""
    names = (weight_name,) if weight_name else DIFFUSERS_NAMES
    for name in names[:-1]:
        try:
            return hub_file(repo_id, name, **hub_kwargs)
        except FileNotFoundError as e:
            logger.debug("%s: no %s (%s); trying %s", repo_id, name, e, names[-1])
    return hub_file(repo_id, names[-1], **hub_kwargs)


def _parse(
    state: Mapping[str, Any] | torch.Tensor, token: str | None, stem: str | None
) -> tuple[str, torch.Tensor]:
    """(token, vectors as (n, dim)) from one loaded embedding, whatever its layout."""
    if isinstance(state, torch.Tensor):
        if token is None:
            raise ValueError("a bare embedding tensor has no token name; pass token=...")
        return token, _as_matrix(state, token)
    if "string_to_param" in state:  # A1111 .pt
        params = state["string_to_param"]
        if not isinstance(params, Mapping) or not params:
            raise ValueError(f"A1111 embedding: string_to_param should map '*' to a tensor, got {params!r}")
        vectors = params["*"] if "*" in params else next(iter(params.values()))
        loaded = state.get("name")
        own = loaded if isinstance(loaded, str) and loaded else stem
    elif "emb_params" in state:  # A1111 / Civitai .safetensors: A1111 names the token after the file
        vectors, own = state["emb_params"], stem
    elif len(state) == 1:  # diffusers
        own, vectors = next(iter(state.items()))
    else:
        hint = ""
        if {"clip_l", "clip_g"} <= set(state):
            hint = (
                " (an SDXL embedding: pass state_dict['clip_l'] with token=... for a CLIP ViT-L text encoder)"
            )
        raise ValueError(
            f"unknown textual inversion layout: keys {sorted(state)}{hint}. Expected one of: a single "
            "{token: tensor} (diffusers), 'string_to_param' + 'name' (A1111 .pt), 'emb_params' (A1111 .safetensors)"
        )
    name = token or own
    if name is None:
        raise ValueError("this embedding does not name its token; pass token=...")
    if token is not None and own is not None and token != own:
        logger.info("loading the embedding named %r as token %r", own, token)
    if not isinstance(vectors, torch.Tensor):
        raise ValueError(f"embedding for {name!r} is a {type(vectors).__name__}, not a tensor")
    return name, _as_matrix(vectors, name)


def _tensors(
    state: Mapping[str, Any] | torch.Tensor, name: str, vectors: torch.Tensor
) -> list[tuple[str, torch.Tensor]]:
    """(key, tensor) of every tensor a loaded embedding holds, keys as written in the file (`string_to_param.*`
    for A1111's nested dict), for the NaN/Inf check; a bare tensor is named after its token."""
    if isinstance(state, torch.Tensor):
        return [(name, vectors)]
    found = []
    for key, value in state.items():
        if isinstance(value, torch.Tensor):
            found.append((str(key), value))
        elif isinstance(value, Mapping):
            found += [(f"{key}.{k}", v) for k, v in value.items() if isinstance(v, torch.Tensor)]
    return found


def _as_matrix(vectors: torch.Tensor, token: str) -> torch.Tensor:
    if vectors.ndim == 1:
        return vectors[None]
    if vectors.ndim == 2 and vectors.shape[0] >= 1:
        return vectors
    raise ValueError(
        f"embedding for {token!r} has shape {tuple(vectors.shape)}; expected (dim,) or (n_vectors, dim)"
    )


def _expand(token: str, vectors: torch.Tensor) -> list[tuple[str, torch.Tensor]]:
    """`tok`, `tok_1`, ..., one per vector: the names diffusers gives multi-vector embeddings."""
    return [(token if i == 0 else f"{token}_{i}", v) for i, v in enumerate(vectors)]


# ----------------------------------------------------------------------------------------------------------------------
# The text encoder's input embedding matrix


def _embedding(text_encoder: nn.Module) -> nn.Embedding:
    emb = text_encoder.get_input_embeddings()
    if not isinstance(emb, nn.Embedding):
        raise TypeError(f"{type(text_encoder).__name__}'s input embeddings are not an nn.Embedding")
    return emb


def _set_matrix(text_encoder: nn.Module, weight: torch.Tensor) -> None:
    """Swap the weight in place (the module keeps its hooks), and keep config.vocab_size in step so that
    a saved text encoder loads back. Done by hand, not with resize_token_embeddings, which changed across
    transformers versions and in 5.x samples new rows from the global RNG."""
    emb = _embedding(text_encoder)
    emb.weight = nn.Parameter(weight, requires_grad=emb.weight.requires_grad)
    emb.num_embeddings = weight.shape[0]
    config = getattr(text_encoder, "config", None)
    if config is not None:
        text_config = config.get_text_config() if hasattr(config, "get_text_config") else config
        text_config.vocab_size = weight.shape[0]


def _write_rows(text_encoder: nn.Module, record: _VocabRecord, rows: Mapping[int, torch.Tensor]) -> None:
    """Put vectors at token ids, growing the matrix as needed and saving original rows before overwriting."""
    old = _embedding(text_encoder).weight.detach()
    size = max(old.shape[0], max(rows) + 1)
    weight = torch.empty(size, old.shape[1], dtype=old.dtype, device=old.device)
    weight[: old.shape[0]] = old
    for index, vector in rows.items():
        if index < record.rows and index not in record.saved:
            record.saved[index] = old[index].clone()
        weight[index] = vector.to(dtype=old.dtype, device=old.device)
    _set_matrix(text_encoder, weight)


def _restore(text_encoder: nn.Module, record: _VocabRecord) -> None:
    old = _embedding(text_encoder).weight.detach()
    weight = old[: record.rows].clone()
    for index, vector in record.saved.items():
        weight[index] = vector
    record.saved.clear()
    _set_matrix(text_encoder, weight)


# ----------------------------------------------------------------------------------------------------------------------
# The tokenizer's added tokens


def _added(tokenizer: Any) -> dict[str, int]:
    """Non-special added tokens -> id (textual inversion tokens, and any the user added)."""
    return {t.content: i for i, t in tokenizer.added_tokens_decoder.items() if not t.special}


def _remove_tokens(tokenizer: Any, tokens: set[str]) -> None:
    """Drop added tokens; the remaining added tokens above the base vocab move down to stay contiguous."""
    backend = getattr(tokenizer, "_tokenizer", None)
    if backend is not None and hasattr(
        backend, "to_str"
    ):  # a `tokenizers` backend (transformers 5, or *Fast)
        from tokenizers import Tokenizer

        data = json.loads(backend.to_str())
        base = backend.get_vocab_size(with_added_tokens=False)
        kept = [t for t in data.get("added_tokens", []) if t.get("content") not in tokens]
        above = sorted((t for t in kept if t["id"] >= base), key=lambda t: t["id"])
        for new_id, entry in enumerate(above, start=base):
            entry["id"] = new_id
        data["added_tokens"] = kept
        tokenizer._tokenizer = Tokenizer.from_str(json.dumps(data))
        return
    # transformers 4.x slow tokenizer: the added tokens live in two dicts plus a matching trie
    decoder, encoder = tokenizer._added_tokens_decoder, tokenizer._added_tokens_encoder
    base = tokenizer.vocab_size
    kept = sorted((i, t) for i, t in decoder.items() if t.content not in tokens)
    decoder.clear()
    encoder.clear()
    next_id = base
    for i, t in kept:
        if i >= base:
            i, next_id = next_id, next_id + 1
        decoder[i] = t
        encoder[t.content] = i
    for update in ("_update_trie", "_update_total_vocab_size"):
        if hasattr(tokenizer, update):
            getattr(tokenizer, update)()


def multi_vector_tokens(tokenizer: Any) -> dict[str, list[str]]:
    """Added token -> [token, token_1, ...] for every token that has companions (a multi-vector embedding)."""
    added = set(tokenizer.added_tokens_encoder)
    groups = {}
    for token in added:
        if f"{token}_1" in added:
            names, i = [token], 1
            while f"{token}_{i}" in added:
                names.append(f"{token}_{i}")
                i += 1
            groups[token] = names
    return groups


def convert_prompt(prompt: str, tokenizer: Any) -> str:
    """Spell each multi-vector token out as `tok tok_1 ... tok_{n-1}`.

    Added tokens are matched longest first, as the tokenizer matches them, so a prompt that already says
    `tok_1` is left alone (diffusers' plain string replace would turn it into `tok tok_1 ... _1`).
    """
    groups = multi_vector_tokens(tokenizer)
    if not groups:
        return prompt
    added = sorted(tokenizer.added_tokens_encoder, key=len, reverse=True)
    pattern = re.compile("|".join(re.escape(t) for t in added))
    return pattern.sub(lambda m: " ".join(groups.get(m.group(0), [m.group(0)])), prompt)


# ----------------------------------------------------------------------------------------------------------------------
# The pipeline mixin


class TextualInversionLoaderMixin:
    """Pipeline methods for textual inversion, named and called as diffusers' are."""

    def _prompt_transform(self) -> Callable[[str], str] | None:
        """A str -> str rewrite applied to every prompt before tokenising (None: nothing to rewrite)."""
        tokenizer = getattr(self, "tokenizer", None)
        if tokenizer is None or not multi_vector_tokens(tokenizer):
            return None
        return lambda prompt: convert_prompt(prompt, tokenizer)

    def maybe_convert_prompt(self, prompt: str | list[str], tokenizer: Any) -> str | list[str]:
        """Expand multi-vector textual-inversion tokens in a prompt or a list of prompts (diffusers' API)."""
        if isinstance(prompt, list):
            return [convert_prompt(p, tokenizer) for p in prompt]
        return convert_prompt(prompt, tokenizer)

    def load_textual_inversion(
        self,
        pretrained_model_name_or_path: Source | Sequence[Source],
        token: str | list[str] | None = None,
        weight_name: str | None = None,
        tokenizer: Any = None,
        text_encoder: nn.Module | None = None,
        **hub_kwargs: Any,
    ) -> None:
        """Add one or more embeddings as new tokens.

        `pretrained_model_name_or_path` is a file, a folder with `learned_embeds.*`, a hub id, a loaded dict or a
        tensor, or a list of these (then `token`, if given, is a list of the same length). A single (n, dim)
        tensor with a list of n tokens gives each token one row. `hub_kwargs` (cache_dir, local_files_only,
        revision, token as `hf_token`, subfolder) apply to hub ids. Nothing changes unless every embedding is valid.
        """
        tokenizer = tokenizer if tokenizer is not None else getattr(self, "tokenizer", None)
        text_encoder = text_encoder if text_encoder is not None else getattr(self, "text_encoder", None)
        if tokenizer is None or text_encoder is None:
            raise ValueError(
                "load_textual_inversion needs a tokenizer and a text encoder (the pipeline has none)"
            )
        unknown = sorted(set(hub_kwargs) - set(HUB_KWARGS))
        if unknown:
            raise TypeError(f"unexpected keyword arguments {unknown}; hub options are {list(HUB_KWARGS)}")
        if "hf_token" in hub_kwargs:
            hub_kwargs["token"] = hub_kwargs.pop("hf_token")
        entries = self._read_embeddings(pretrained_model_name_or_path, token, weight_name, hub_kwargs)
        new = [pair for name, vectors in entries for pair in _expand(name, vectors)]
        self._check_new_tokens(entries, new, tokenizer, text_encoder)

        record = getattr(text_encoder, _RECORD_ATTR, None)
        if record is None:
            record = _VocabRecord(rows=_embedding(text_encoder).num_embeddings)
            setattr(text_encoder, _RECORD_ATTR, record)
        tokenizer.add_tokens([name for name, _ in new])
        _write_rows(text_encoder, record, {tokenizer.convert_tokens_to_ids(n): v for n, v in new})
        for name, vectors in entries:
            logger.info("loaded textual inversion %r (%d vectors)", name, len(vectors))

    @staticmethod
    def _read_embeddings(
        sources: Source | Sequence[Source],
        token: str | list[str] | None,
        weight_name: str | None,
        hub_kwargs: dict[str, Any],
    ) -> list[tuple[str, torch.Tensor]]:
        """(token, (n, dim) vectors) for each embedding given."""
        tokens = token if isinstance(token, list) else None
        if isinstance(sources, torch.Tensor) and tokens is not None:
            if sources.ndim != 2 or sources.shape[0] != len(tokens):
                raise ValueError(
                    f"a tensor of shape {tuple(sources.shape)} with {len(tokens)} tokens: pass one row per token"
                )
            return [(t, row[None]) for t, row in zip(tokens, sources, strict=True)]
        items = list(sources) if isinstance(sources, (list, tuple)) else [sources]
        if tokens is None:
            tokens = [token] * len(items)
        if len(tokens) != len(items):
            raise ValueError(
                f"{len(items)} embeddings but {len(tokens)} tokens; pass one token per embedding"
            )
        entries = []
        for item, tok in zip(items, tokens, strict=True):
            path = None
            if isinstance(item, (str, Path)):
                state, path = _load_source(item, weight_name, hub_kwargs)
            else:
                state = item
            try:
                name, vectors = _parse(state, tok, path.stem if path else None)
            except ModelFileError:
                raise
            except ValueError as e:  # a layout or shape this loader cannot read: say which file it is
                if path is None:
                    raise
                raise ModelFileError(str(e), path) from None
            check_finite(_tensors(state, name, vectors), path, f"textual inversion embedding {name!r}")
            entries.append((name, vectors))
        return entries

    @staticmethod
    def _check_new_tokens(
        entries: list[tuple[str, torch.Tensor]],
        new: list[tuple[str, torch.Tensor]],
        tokenizer: Any,
        text_encoder: nn.Module,
    ) -> None:
        dim = _embedding(text_encoder).embedding_dim
        for name, vectors in entries:
            if vectors.shape[-1] != dim:
                raise ValueError(
                    f"embedding {name!r} has dim {vectors.shape[-1]} but the text encoder's hidden size is {dim}: "
                    "it was trained for another text encoder (SD 1.x uses 768, SD 2.x 1024)"
                )
        names = [name for name, _ in new]
        duplicates = sorted({n for n in names if names.count(n) > 1})
        if duplicates:
            raise ValueError(
                f"tokens {duplicates} are given more than once; each embedding needs its own token"
            )
        vocab = tokenizer.get_vocab()
        taken = [n for n in names if n in vocab]
        if taken:
            raise ValueError(
                f"token(s) {taken} already in the tokenizer's vocabulary; choose another token=..., or "
                "unload_textual_inversion() the embedding that uses it first"
            )

    def unload_textual_inversion(
        self,
        tokens: str | list[str] | None = None,
        tokenizer: Any = None,
        text_encoder: nn.Module | None = None,
    ) -> None:
        """Remove textual-inversion tokens (all added tokens by default) and their embedding rows.

        A multi-vector token takes its `_1`, `_2`, ... companions with it. Once none is left, the text encoder's
        matrix is exactly what it was before the first load.
        """
        tokenizer = tokenizer if tokenizer is not None else getattr(self, "tokenizer", None)
        text_encoder = text_encoder if text_encoder is not None else getattr(self, "text_encoder", None)
        if tokenizer is None or text_encoder is None:
            raise ValueError(
                "unload_textual_inversion needs a tokenizer and a text encoder (the pipeline has none)"
            )
        added = _added(tokenizer)
        if tokens is None:
            remove = set(added)
        else:
            wanted = [tokens] if isinstance(tokens, str) else list(tokens)
            unknown = [t for t in wanted if t not in added]
            if unknown:
                raise ValueError(
                    f"no textual inversion token(s) {unknown} to remove; loaded: {sorted(added)}"
                )
            groups = multi_vector_tokens(tokenizer)
            remove = {name for t in wanted for name in groups.get(t, [t])}
        if not remove:
            return
        weight = _embedding(text_encoder).weight.detach()
        keep = {t: weight[i].clone() for t, i in added.items() if t not in remove and i < weight.shape[0]}
        record = getattr(text_encoder, _RECORD_ATTR, None)
        if (
            record is None
        ):  # tokens added before lcmkit saw this text encoder: the rows from the first one on go
            record = _VocabRecord(rows=min(weight.shape[0], min(added.values())))
        _restore(text_encoder, record)
        _remove_tokens(tokenizer, remove)
        if keep:
            _write_rows(
                text_encoder, record, {tokenizer.convert_tokens_to_ids(t): v for t, v in keep.items()}
            )
            setattr(text_encoder, _RECORD_ATTR, record)
        elif hasattr(text_encoder, _RECORD_ATTR):
            delattr(text_encoder, _RECORD_ATTR)
        logger.info("unloaded textual inversion tokens %s", sorted(remove))
