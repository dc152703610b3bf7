"""The text side: CLIP tokenizer and text encoder from transformers, and prompt encoding.

``encode_prompt`` reproduces the positive branch of diffusers' ``StableDiffusionPipeline.encode_prompt`` (which
the LCM pipelines copy), and ``encode_negative_prompt`` its negative branch, so embeddings match diffusers on the
same weights. LoRA scaling of the text encoder is not done here; the LoRA loader owns it.
"""

from __future__ import annotations

import inspect
import logging
from collections.abc import Callable, Sequence
from pathlib import Path

import torch
import transformers
from torch import nn
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

from lcmkit.config import read_config_json, require_settings
from lcmkit.io.errors import MissingModelFileError, ModelFileError, describe
from lcmkit.io.weights import WeightsError, sniff_weights_file

logger = logging.getLogger(__name__)

# `model_type` of a text encoder config.json: a text config, or a whole CLIP config (its text_config is used)
_CLIP_MODEL_TYPES = ("clip_text_model", "clip")

PromptTransform = Callable[[str], str]


def _transformers_version() -> tuple[int, int]:
    major, minor = transformers.__version__.split(".")[:2]
    return int(major), int("".join(ch for ch in minor if ch.isdigit()) or 0)


def _dtype_kwarg() -> str:
    """transformers renamed ``torch_dtype`` to ``dtype`` in 4.56 (and 5.x defaults it to "auto")."""
    return "dtype" if _transformers_version() >= (4, 56) else "torch_dtype"


def _weight_names(variant: str | None) -> list[str]:
    infix = f".{variant}" if variant else ""
    return [
        f"model{infix}.safetensors",
        f"model.safetensors.index{infix}.json",
        f"pytorch_model{infix}.bin",
        f"pytorch_model.bin.index{infix}.json",
    ]


def _check_component_folder(folder: Path, variant: str | None, what: str) -> Path:
    """The weights file (or shard index) a component folder would load; missing files raise, naming them."""
    if not (folder / "config.json").is_file():
        raise MissingModelFileError(
            f"No {what} config.json in {folder}; pass the component folder (e.g. '<model>/{what}').",
            folder / "config.json",
        )
    names = _weight_names(variant)
    for name in names:
        if (folder / name).is_file():
            return folder / name
    present = sorted(p.name for p in folder.iterdir() if p.is_file())
    hint = ""
    if variant is None and any(".fp16." in name for name in present):
        hint = ' The folder has fp16 files: pass variant="fp16".'
    raise MissingModelFileError(
        f"No {what} weights named {names} in {folder}; found {present}.{hint}", folder
    )


def _text_config(folder: Path) -> CLIPTextConfig:
    """The folder's `CLIPTextConfig`; a config that is empty, of another model or not valid raises, naming it."""
    config_file = folder / "config.json"
    cfg = require_settings(read_config_json(config_file), config_file, "CLIP text encoder")
    model_type = cfg.get("model_type")
    if model_type is not None and model_type not in _CLIP_MODEL_TYPES:
        raise ModelFileError(
            f"`model_type` is {model_type!r}: not a CLIP text encoder config (expected one of "
            f"{list(_CLIP_MODEL_TYPES)}); is this the right component folder?",
            config_file,
        )
    try:
        return CLIPTextConfig.from_pretrained(folder, local_files_only=True)
    except Exception as e:  # transformers' validation errors have no common base class
        raise ModelFileError(f"is not a valid CLIP text encoder config: {describe(e)}", config_file) from e


def load_text_encoder(
    folder: str | Path, dtype: torch.dtype | None = None, variant: str | None = None
) -> CLIPTextModel:
    """Load a diffusers-layout ``text_encoder/`` folder offline.

    transformers picks safetensors over ``pytorch_model.bin`` when both exist and reads ``.bin`` with
    ``weights_only=True`` (its default; we also pass it where the argument exists). transformers 5.x maps the
    ``text_model.`` key prefix of published checkpoints itself. ``dtype=None`` means float32 (transformers 5.x
    would otherwise keep the file's dtype). ``variant="fp16"`` reads ``model.fp16.safetensors``.

    A damaged folder raises a `ModelFileError` naming the file: a config that is empty, not JSON or not a CLIP
    text config, and weights that are truncated, not a torch file, or do not fit the config.
    """
    folder = Path(folder)
    if variant and not any((folder / name).is_file() for name in _weight_names(variant)):
        if any((folder / name).is_file() for name in _weight_names(None)):  # as diffusers: default weights
            logger.warning("%s has no %r weights; loading its default weights instead", folder, variant)
            variant = None
    weights = _check_component_folder(folder, variant, "text_encoder")
    config = _text_config(folder)
    _check_weights_file(weights)
    kwargs = {_dtype_kwarg(): dtype or torch.float32}
    if "weights_only" in inspect.signature(CLIPTextModel.from_pretrained).parameters:
        kwargs["weights_only"] = True  # the default already; said out loud so a changed default cannot bite
    try:
        model = CLIPTextModel.from_pretrained(
            folder, config=config, local_files_only=True, variant=variant, **kwargs
        )
    except Exception as e:  # torch, safetensors and transformers each raise their own kinds
        raise ModelFileError(
            f"cannot be loaded as the CLIP text encoder of {folder / 'config.json'}: {describe(e)}", weights
        ) from e
    return model.eval()


def _check_weights_file(path: Path) -> None:
    """What can be checked before transformers reads the weights, so that its errors (which do not name the file)
    are rarely met: what the file is (by its first bytes), and a safetensors header (no tensor is read)."""
    if path.name.endswith(".index.json"):
        return  # sharded weights: transformers reads the shards the index names
    if sniff_weights_file(path) != "safetensors":
        return
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt"):
            pass
    except Exception as e:  # SafetensorError, OSError
        raise WeightsError(
            f"not a readable safetensors file (corrupt or truncated?): {describe(e)}", path
        ) from e


def load_tokenizer(folder: str | Path) -> CLIPTokenizer:
    """Load a diffusers-layout ``tokenizer/`` folder (vocab.json, merges.txt, tokenizer_config.json) offline.

    Each file is checked first, so a damaged one raises a `ModelFileError` naming it (transformers' own errors
    for these are a KeyError, a TypeError or a bare Exception from the Rust tokenizer, none naming the file).
    """
    folder = Path(folder)
    if not (folder / "vocab.json").is_file() and not (folder / "tokenizer.json").is_file():
        raise MissingModelFileError(
            f"No vocab.json or tokenizer.json in {folder}; pass the '<model>/tokenizer' folder.", folder
        )
    check_tokenizer_files(folder)
    try:
        return CLIPTokenizer.from_pretrained(folder, local_files_only=True)
    except Exception as e:  # what the checks above did not foresee, still named by folder
        raise ModelFileError(
            f"transformers' CLIPTokenizer cannot read this tokenizer: {describe(e)}", folder
        ) from e


def check_tokenizer_files(folder: Path) -> None:
    """Check the files of a CLIP tokenizer folder that are present; raise a ModelFileError naming a bad one."""
    for name in ("tokenizer_config.json", "special_tokens_map.json"):
        if (folder / name).is_file():
            _check_token_settings(read_config_json(folder / name), folder / name)
    if (folder / "added_tokens.json").is_file():
        added = read_config_json(folder / "added_tokens.json")
        _check_ids(added, folder / "added_tokens.json", "added token")
    vocab = None
    if (folder / "vocab.json").is_file():
        vocab = read_config_json(folder / "vocab.json")
        if not vocab:
            raise ModelFileError(
                "holds no tokens ({}); a CLIP vocabulary maps each token to its id", folder / "vocab.json"
            )
        _check_ids(vocab, folder / "vocab.json", "token")
    if (folder / "merges.txt").is_file():
        _check_merges(folder / "merges.txt", vocab)
    elif vocab is not None and not (folder / "tokenizer.json").is_file():
        raise MissingModelFileError(
            "is missing: a CLIP tokenizer needs merges.txt next to vocab.json (or a tokenizer.json)",
            folder / "merges.txt",
        )
    if (folder / "tokenizer.json").is_file():
        data = read_config_json(folder / "tokenizer.json")
        if not isinstance(data.get("model"), dict):
            raise ModelFileError(
                "has no `model` object; a tokenizers-library tokenizer.json describes its model (BPE) there",
                folder / "tokenizer.json",
            )
        if not isinstance(data.get("added_tokens", []), list):
            raise ModelFileError("`added_tokens` must be a list", folder / "tokenizer.json")


_TOKEN_FIELDS = ("bos_token", "eos_token", "unk_token", "pad_token")


def _check_token_settings(data: dict, path: Path) -> None:
    for key in _TOKEN_FIELDS:
        value = data.get(key)
        if value is not None and not isinstance(value, (str, dict)):
            raise ModelFileError(f"`{key}` must be a token string, got {value!r:.80}", path)
    length = data.get("model_max_length")
    if length is not None and (
        isinstance(length, bool) or not isinstance(length, (int, float)) or length < 1
    ):
        raise ModelFileError(f"`model_max_length` must be a positive number, got {length!r:.80}", path)
    added = data.get("added_tokens_decoder")
    if added is not None and not isinstance(added, dict):
        raise ModelFileError(f"`added_tokens_decoder` must be an object, got {added!r:.80}", path)


def _check_ids(mapping: dict, path: Path, what: str) -> None:
    for token, index in mapping.items():
        if isinstance(index, bool) or not isinstance(index, int) or index < 0:
            raise ModelFileError(
                f"maps the {what} {token!r:.40} to {index!r:.40}; every {what} must map to a non-negative integer id",
                path,
            )


def _check_merges(path: Path, vocab: dict | None) -> None:
    """merges.txt: an optional `#version` line, then one `left right` pair per line, each part (and the merged
    token) in the vocabulary, which is how the tokenizers library reads it."""
    data = path.read_bytes()
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise ModelFileError(
            f"is not UTF-8 text (byte 0x{data[e.start]:02x} at offset {e.start})", path
        ) from None
    for number, line in enumerate(text.split("\n"), start=1):
        line = line.rstrip("\r")
        if not line or (number == 1 and line.startswith("#version")):
            continue
        parts = line.split(" ")
        if len(parts) != 2 or not all(parts):
            raise ModelFileError(
                f"line {number} is {line!r:.60}; each line after '#version' must be two tokens separated by "
                "one space (a BPE merge)",
                path,
            )
        if vocab is not None:
            missing = [t for t in (*parts, "".join(parts)) if t not in vocab]
            if missing:
                raise ModelFileError(
                    f"line {number} ({line!r:.60}) merges tokens that vocab.json does not have: {missing}",
                    path,
                )


def final_layer_norm(text_encoder: nn.Module) -> nn.Module:
    """Return the LayerNorm that ends the CLIP text transformer.

    transformers 4.x nests it as ``text_model.final_layer_norm``; 5.x puts it on ``CLIPTextModel`` itself
    (``CLIPTextModelWithProjection`` still wraps a ``text_model``), so look in both places.
    """
    for owner in (getattr(text_encoder, "text_model", None), text_encoder):
        norm = getattr(owner, "final_layer_norm", None)
        if isinstance(norm, nn.Module):
            return norm
    raise TypeError(f"{type(text_encoder).__name__} has no final_layer_norm; expected a CLIP text model.")


def _module_dtype(module: nn.Module) -> torch.dtype:
    dtype = getattr(module, "dtype", None)
    if isinstance(dtype, torch.dtype):
        return dtype
    return next(module.parameters()).dtype


def _as_prompt_list(prompt: str | Sequence[str], name: str) -> list[str]:
    prompts = [prompt] if isinstance(prompt, str) else prompt
    if not isinstance(prompts, (list, tuple)):
        raise TypeError(f"`{name}` must be a str or a list of str, got {type(prompt).__name__}.")
    bad = sorted({type(p).__name__ for p in prompts if not isinstance(p, str)})
    if bad:
        raise TypeError(f"`{name}` must be a str or a list of str; the list holds {', '.join(bad)}.")
    if len(prompts) == 0:
        raise ValueError(f"`{name}` is an empty list; pass at least one prompt.")
    return list(prompts)


def _tokenize(
    prompts: list[str], tokenizer: CLIPTokenizer, max_length: int, device: torch.device | str
) -> tuple[torch.Tensor, torch.Tensor]:
    """Pad/truncate to ``max_length`` as diffusers does; return (input_ids, attention_mask)."""
    tokens = tokenizer(
        prompts, padding="max_length", max_length=max_length, truncation=True, return_tensors="pt"
    )
    return tokens.input_ids.to(device), tokens.attention_mask.to(device)


def _warn_if_truncated(prompts: list[str], tokenizer: CLIPTokenizer, input_ids: torch.Tensor) -> None:
    """Log the text CLIP cut off, found by tokenising again without truncation (as diffusers does)."""
    full_ids = tokenizer(prompts, padding="longest", return_tensors="pt").input_ids
    input_ids = input_ids.cpu()
    if full_ids.shape[-1] >= input_ids.shape[-1] and not torch.equal(full_ids, input_ids):
        # Position max_len-1 onwards, minus the final end token, is what truncation removed.
        removed = tokenizer.batch_decode(full_ids[:, tokenizer.model_max_length - 1 : -1])
        logger.warning(
            "The following part of your input was truncated because CLIP can only handle sequences up to %d tokens: %s",
            tokenizer.model_max_length,
            removed,
        )


def _attention_mask_if_used(text_encoder: nn.Module, mask: torch.Tensor) -> torch.Tensor | None:
    # SD 1.x/2.x encoders were trained without a mask (padding attends causally); only some configs ask for it.
    return mask if getattr(text_encoder.config, "use_attention_mask", False) else None


def _run_encoder(
    text_encoder: nn.Module,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor | None,
    clip_skip: int | None,
) -> torch.Tensor:
    if clip_skip is None:
        return text_encoder(input_ids, attention_mask=attention_mask)[0]
    num_layers = text_encoder.config.num_hidden_layers
    if not isinstance(clip_skip, int) or not 0 <= clip_skip <= num_layers:
        raise ValueError(
            f"`clip_skip` must be an int in [0, {num_layers}] (1 = penultimate layer), got {clip_skip}."
        )
    output = text_encoder(input_ids, attention_mask=attention_mask, output_hidden_states=True)
    # hidden_states = (embeddings, layer 1, ..., layer L); the last hidden state proper also passes the final
    # LayerNorm, so apply it to the earlier layer too to keep the embedding's scale.
    return final_layer_norm(text_encoder)(output.hidden_states[-(clip_skip + 1)])


def _cast_and_repeat(
    embeds: torch.Tensor, num_images_per_prompt: int, dtype: torch.dtype, device: torch.device | str
) -> torch.Tensor:
    if num_images_per_prompt < 1:
        raise ValueError(f"`num_images_per_prompt` must be >= 1, got {num_images_per_prompt}.")
    embeds = embeds.to(dtype=dtype, device=device)
    batch, seq_len, _ = embeds.shape
    # repeat+view (not repeat_interleave) keeps diffusers' ordering: prompt 0 × n, then prompt 1 × n, ...
    embeds = embeds.repeat(1, num_images_per_prompt, 1)
    return embeds.view(batch * num_images_per_prompt, seq_len, -1)


def _target_dtype(
    dtype: torch.dtype | None, text_encoder: nn.Module | None, embeds: torch.Tensor
) -> torch.dtype:
    if dtype is not None:
        return dtype
    return _module_dtype(text_encoder) if text_encoder is not None else embeds.dtype


def encode_prompt(
    prompt: str | Sequence[str] | None,
    tokenizer: CLIPTokenizer | None,
    text_encoder: nn.Module | None,
    device: torch.device | str,
    num_images_per_prompt: int = 1,
    prompt_embeds: torch.Tensor | None = None,
    clip_skip: int | None = None,
    dtype: torch.dtype | None = None,
    prompt_transform: PromptTransform | None = None,
) -> torch.Tensor:
    """Encode prompts to (B·n, 77, D) CLIP hidden states, the UNet's cross-attention context.

    Either ``prompt`` or ``prompt_embeds`` (B, seq, D) is given. ``clip_skip=k`` takes the output of the
    k-th layer from the end (1 = penultimate) through the final LayerNorm. ``prompt_transform`` rewrites each
    prompt before tokenising (textual inversion expands its tokens there). The result is cast to ``dtype``
    (default: the text encoder's dtype) and each prompt is repeated ``num_images_per_prompt`` times.
    Gradients flow if the caller enables them (the pipelines run under ``torch.no_grad``), as in diffusers.
    """
    if prompt is not None and prompt_embeds is not None:
        raise ValueError("Pass either `prompt` or `prompt_embeds`, not both.")
    if prompt_embeds is None:
        if prompt is None:
            raise ValueError("Pass either `prompt` or `prompt_embeds`; both are None.")
        if tokenizer is None or text_encoder is None:
            raise ValueError(
                "Encoding a `prompt` needs a tokenizer and a text encoder; pass `prompt_embeds` instead."
            )
        prompts = _as_prompt_list(prompt, "prompt")
        if prompt_transform is not None:
            prompts = [prompt_transform(p) for p in prompts]
        input_ids, mask = _tokenize(prompts, tokenizer, tokenizer.model_max_length, device)
        _warn_if_truncated(prompts, tokenizer, input_ids)
        prompt_embeds = _run_encoder(
            text_encoder, input_ids, _attention_mask_if_used(text_encoder, mask), clip_skip
        )
    elif prompt_embeds.ndim != 3:
        raise ValueError(
            f"`prompt_embeds` must be (batch, seq_len, dim), got shape {tuple(prompt_embeds.shape)}."
        )

    target = _target_dtype(dtype, text_encoder, prompt_embeds)
    return _cast_and_repeat(prompt_embeds, num_images_per_prompt, target, device)


def encode_negative_prompt(
    negative_prompt: str | Sequence[str] | None,
    batch_size: int,
    tokenizer: CLIPTokenizer | None,
    text_encoder: nn.Module | None,
    device: torch.device | str,
    num_images_per_prompt: int = 1,
    negative_prompt_embeds: torch.Tensor | None = None,
    prompt: str | Sequence[str] | None = None,
    max_length: int | None = None,
    clip_skip: int | None = None,
    dtype: torch.dtype | None = None,
    prompt_transform: PromptTransform | None = None,
) -> torch.Tensor:
    """Encode the unconditional side of classifier-free guidance, as diffusers' negative branch does.

    ``None`` means "" for each of the ``batch_size`` prompts. ``prompt`` (when given) must have the same type
    (str vs list) as ``negative_prompt`` (else TypeError), and a list must have ``batch_size`` entries (else
    ValueError). ``max_length`` is the positive embeddings' sequence length (default: the tokenizer's).
    diffusers encodes the negative side without ``clip_skip``; leave it None to match, or pass the positive
    side's value to skip the same layers on both sides. LCM pipelines themselves never use this.
    """
    if negative_prompt_embeds is None:
        if negative_prompt is None:
            negatives = [""] * batch_size
        elif prompt is not None and type(prompt) is not type(negative_prompt):
            raise TypeError(
                f"`negative_prompt` must have the same type as `prompt`, got {type(negative_prompt).__name__} "
                f"and {type(prompt).__name__}."
            )
        elif isinstance(negative_prompt, str):
            # diffusers keeps one copy here and fails later when batch_size > 1; broadcasting is what was meant.
            negatives = [negative_prompt] * batch_size
        else:
            negatives = _as_prompt_list(negative_prompt, "negative_prompt")
            if len(negatives) != batch_size:
                raise ValueError(
                    f"`negative_prompt` has batch size {len(negatives)} but `prompt` has batch size {batch_size}; "
                    "pass one negative prompt per prompt, or a single string."
                )
        if tokenizer is None or text_encoder is None:
            raise ValueError(
                "Encoding a `negative_prompt` needs a tokenizer and a text encoder; pass `negative_prompt_embeds`."
            )
        if prompt_transform is not None:
            negatives = [prompt_transform(p) for p in negatives]
        length = tokenizer.model_max_length if max_length is None else max_length
        input_ids, mask = _tokenize(negatives, tokenizer, length, device)
        negative_prompt_embeds = _run_encoder(
            text_encoder, input_ids, _attention_mask_if_used(text_encoder, mask), clip_skip
        )
    elif negative_prompt_embeds.ndim != 3:
        raise ValueError(
            f"`negative_prompt_embeds` must be (batch, seq_len, dim), got shape {tuple(negative_prompt_embeds.shape)}."
        )
    if negative_prompt_embeds.shape[0] != batch_size:
        raise ValueError(
            f"`negative_prompt_embeds` has batch size {negative_prompt_embeds.shape[0]}, expected {batch_size}."
        )

    target = _target_dtype(dtype, text_encoder, negative_prompt_embeds)
    return _cast_and_repeat(negative_prompt_embeds, num_images_per_prompt, target, device)
