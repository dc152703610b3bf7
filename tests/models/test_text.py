"""Prompt encoding and text-side loading against diffusers' ``StableDiffusionPipeline.encode_prompt``.

The oracle is diffusers' own method, called unbound on a plain namespace holding the same tokenizer and text
encoder (so its LoRA and textual-inversion branches are off, as for a pipeline without those loaded).
Tolerance: bit-exact (``torch.equal``), since both sides run the same transformers modules on the same ids.
"""

from __future__ import annotations

import logging
from types import SimpleNamespace

import pytest
import torch
import transformers
from diffusers import StableDiffusionPipeline
from helpers.tiny_tokenizer import make_tiny_clip_tokenizer
from safetensors.torch import load_file, save_file
from transformers import CLIPTextConfig, CLIPTextModel

from lcmkit.models.text import (
    encode_negative_prompt,
    encode_prompt,
    final_layer_norm,
    load_text_encoder,
    load_tokenizer,
)

DEVICE = torch.device("cpu")
LONG_PROMPT = "a photo of a cat riding a horse, " * 12  # ~130 tokens: past CLIP's 77


def tiny_text_encoder(seed: int = 0) -> CLIPTextModel:
    torch.manual_seed(seed)
    config = CLIPTextConfig(
        hidden_size=32,
        intermediate_size=64,
        num_attention_heads=4,
        num_hidden_layers=3,
        vocab_size=1000,
        bos_token_id=0,
        eos_token_id=2,
        pad_token_id=1,
    )
    return CLIPTextModel(config).eval()


@pytest.fixture(scope="module")
def tokenizer():
    return make_tiny_clip_tokenizer()


@pytest.fixture(scope="module")
def text_encoder():
    return tiny_text_encoder()


def diffusers_encode(tokenizer, text_encoder, prompt, n=1, cfg=False, negative=None, **kwargs):
    """diffusers' encode_prompt on a stand-in `self`; returns (positive, negative)."""
    host = SimpleNamespace(tokenizer=tokenizer, text_encoder=text_encoder, unet=None)
    with torch.no_grad():
        return StableDiffusionPipeline.encode_prompt(
            host, prompt, DEVICE, n, cfg, negative_prompt=negative, **kwargs
        )


@pytest.mark.parametrize("prompt", ["a photo of a cat", ["a red dog", "an astronaut riding a horse on mars"]])
@pytest.mark.parametrize("n", [1, 3])
def test_encode_prompt_matches_diffusers(tokenizer, text_encoder, prompt, n):
    """Same embeddings (bit-exact) and shape (B·n, 77, 32) as diffusers, for a str and a list, n = 1 and 3."""
    ours = encode_prompt(prompt, tokenizer, text_encoder, DEVICE, num_images_per_prompt=n)
    reference, _ = diffusers_encode(tokenizer, text_encoder, prompt, n)
    batch = 1 if isinstance(prompt, str) else len(prompt)
    assert ours.shape == (batch * n, 77, 32)
    assert ours.dtype == torch.float32
    assert torch.equal(ours, reference)


def test_repeat_order_is_prompt_major(tokenizer, text_encoder):
    """repeat(1, n, 1).view(B·n, …) gives p0,p0,p0,p1,p1,p1 (not interleaved) and the prompts differ."""
    prompts = ["a cat", "a dog"]
    ours = encode_prompt(prompts, tokenizer, text_encoder, DEVICE, num_images_per_prompt=3)
    singles = [encode_prompt(p, tokenizer, text_encoder, DEVICE) for p in prompts]
    for i in range(6):
        assert torch.equal(ours[i], singles[i // 3][0])
    assert not torch.equal(singles[0], singles[1])


def _norm_of(text_encoder):
    # Written out rather than via lcmkit's `final_layer_norm`, so the reference is independent of it.
    return (
        text_encoder.text_model.final_layer_norm
        if hasattr(text_encoder, "text_model")
        else text_encoder.final_layer_norm
    )


@pytest.mark.parametrize("clip_skip", [1, 2])
def test_clip_skip_matches_direct_reference(tokenizer, text_encoder, clip_skip):
    """clip_skip=k equals final_layer_norm(hidden_states[-(k+1)]) from the encoder itself, and differs from k=None.

    diffusers 0.42.1 cannot be the oracle here under transformers 5.x: it calls
    ``text_encoder.text_model.final_layer_norm``, and transformers 5 moved ``final_layer_norm`` onto
    ``CLIPTextModel`` itself (no ``text_model``), so it raises AttributeError. We still call it: where it
    works (transformers 4.x, or a fixed diffusers) it must agree with us.
    """
    prompts = ["a photo of a cat", "a beautiful landscape at sunset"]
    ours = encode_prompt(prompts, tokenizer, text_encoder, DEVICE, clip_skip=clip_skip)

    ids = tokenizer(
        prompts, padding="max_length", max_length=77, truncation=True, return_tensors="pt"
    ).input_ids
    with torch.no_grad():
        hidden = text_encoder(ids, output_hidden_states=True).hidden_states
        reference = _norm_of(text_encoder)(hidden[-(clip_skip + 1)])
    assert torch.equal(ours, reference)
    assert not torch.allclose(ours, encode_prompt(prompts, tokenizer, text_encoder, DEVICE), atol=1e-3)

    try:
        theirs, _ = diffusers_encode(tokenizer, text_encoder, prompts, clip_skip=clip_skip)
    except AttributeError as error:  # the diffusers 0.42.1 + transformers 5.x breakage described above
        assert "text_model" in str(error)
        assert int(transformers.__version__.split(".")[0]) >= 5
    else:
        assert torch.equal(ours, theirs)


def test_clip_skip_zero_is_last_layer(tokenizer, text_encoder):
    """clip_skip=0 re-applies the final LayerNorm to the last layer: the same as no clip_skip (≤1e-6)."""
    plain = encode_prompt("a cat", tokenizer, text_encoder, DEVICE)
    zero = encode_prompt("a cat", tokenizer, text_encoder, DEVICE, clip_skip=0)
    torch.testing.assert_close(zero, plain, atol=1e-6, rtol=0)


def test_final_layer_norm_is_found(text_encoder):
    """The LayerNorm is found on this transformers version (5.x: on the model; 4.x: under text_model)."""
    assert final_layer_norm(text_encoder) is _norm_of(text_encoder)
    with pytest.raises(TypeError, match="final_layer_norm"):
        final_layer_norm(torch.nn.Linear(2, 2))


def test_truncation_warning_names_removed_text(tokenizer, text_encoder, caplog):
    """A prompt past 77 tokens is cut; the warning names the cut text; embeddings still match diffusers."""
    with caplog.at_level(logging.WARNING, logger="lcmkit.models.text"):
        ours = encode_prompt(LONG_PROMPT, tokenizer, text_encoder, DEVICE)
    full = tokenizer(LONG_PROMPT).input_ids
    assert len(full) > 77
    removed = tokenizer.decode(full[76:-1])
    messages = [r.getMessage() for r in caplog.records if r.name == "lcmkit.models.text"]
    assert len(messages) == 1
    assert "truncated" in messages[0] and "77 tokens" in messages[0]
    assert removed in messages[0]
    reference, _ = diffusers_encode(tokenizer, text_encoder, LONG_PROMPT)
    assert torch.equal(ours, reference)

    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="lcmkit.models.text"):
        encode_prompt("a cat", tokenizer, text_encoder, DEVICE)
    assert not [r for r in caplog.records if r.name == "lcmkit.models.text"]


def test_attention_mask_used_only_when_configured(tokenizer, text_encoder):
    """With config.use_attention_mask the mask is passed (padding outputs change), matching diffusers."""
    plain = encode_prompt("a cat", tokenizer, text_encoder, DEVICE)
    text_encoder.config.use_attention_mask = True
    try:
        masked = encode_prompt("a cat", tokenizer, text_encoder, DEVICE)
        reference, _ = diffusers_encode(tokenizer, text_encoder, "a cat")
    finally:
        del text_encoder.config.use_attention_mask
    assert torch.equal(masked, reference)
    assert not torch.allclose(masked, plain)


def test_prompt_embeds_pass_through(tokenizer, text_encoder):
    """Given prompt_embeds, no encoding happens: cast to the encoder dtype (or `dtype`) and repeated, as diffusers."""
    embeds = torch.randn(2, 77, 32, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    ours = encode_prompt(None, tokenizer, text_encoder, DEVICE, num_images_per_prompt=2, prompt_embeds=embeds)
    reference, _ = diffusers_encode(tokenizer, text_encoder, None, 2, prompt_embeds=embeds)
    assert ours.dtype == torch.float32
    assert torch.equal(ours, reference)
    kept = encode_prompt(None, None, None, DEVICE, prompt_embeds=embeds)
    assert kept.dtype == torch.float64 and torch.equal(kept, embeds)
    half = encode_prompt(None, None, None, DEVICE, prompt_embeds=embeds, dtype=torch.float16)
    assert half.dtype == torch.float16


def test_dtype_argument_casts(tokenizer, text_encoder):
    out = encode_prompt("a cat", tokenizer, text_encoder, DEVICE, dtype=torch.float64)
    assert out.dtype == torch.float64
    assert torch.equal(out, encode_prompt("a cat", tokenizer, text_encoder, DEVICE).double())


def test_prompt_transform_is_applied_before_tokenising(tokenizer, text_encoder):
    """The textual-inversion hook rewrites each prompt before tokenisation."""
    seen = []

    def transform(prompt: str) -> str:
        seen.append(prompt)
        return prompt.replace("<kitty>", "cat")

    out = encode_prompt(["a <kitty>", "a dog"], tokenizer, text_encoder, DEVICE, prompt_transform=transform)
    assert seen == ["a <kitty>", "a dog"]
    assert torch.equal(out, encode_prompt(["a cat", "a dog"], tokenizer, text_encoder, DEVICE))


def test_encode_prompt_errors(tokenizer, text_encoder):
    embeds = torch.zeros(1, 77, 32)
    with pytest.raises(ValueError, match="not both"):
        encode_prompt("a cat", tokenizer, text_encoder, DEVICE, prompt_embeds=embeds)
    with pytest.raises(ValueError, match="both are None"):
        encode_prompt(None, tokenizer, text_encoder, DEVICE)
    with pytest.raises(TypeError, match="str or a list of str"):
        encode_prompt(3, tokenizer, text_encoder, DEVICE)
    with pytest.raises(TypeError, match="list holds int"):
        encode_prompt(["a cat", 3], tokenizer, text_encoder, DEVICE)
    with pytest.raises(ValueError, match="empty"):
        encode_prompt([], tokenizer, text_encoder, DEVICE)
    with pytest.raises(ValueError, match=r"clip_skip.*\[0, 3\]"):
        encode_prompt("a cat", tokenizer, text_encoder, DEVICE, clip_skip=4)
    with pytest.raises(ValueError, match="num_images_per_prompt"):
        encode_prompt("a cat", tokenizer, text_encoder, DEVICE, num_images_per_prompt=0)
    with pytest.raises(ValueError, match="batch, seq_len, dim"):
        encode_prompt(None, tokenizer, text_encoder, DEVICE, prompt_embeds=torch.zeros(77, 32))


@pytest.mark.parametrize(
    ("prompt", "negative"),
    [
        ("a cat", None),
        (["a cat", "a dog"], None),
        ("a cat", "blurry"),
        (["a cat", "a dog"], ["ugly", "blurry red"]),
    ],
)
def test_negative_prompt_matches_diffusers(tokenizer, text_encoder, prompt, negative):
    """The negative branch (None → "" per prompt; str; list) matches diffusers' CFG branch bit-exactly, n = 2."""
    batch = 1 if isinstance(prompt, str) else len(prompt)
    ours = encode_negative_prompt(negative, batch, tokenizer, text_encoder, DEVICE, 2, prompt=prompt)
    _, reference = diffusers_encode(tokenizer, text_encoder, prompt, 2, cfg=True, negative=negative)
    assert ours.shape == (batch * 2, 77, 32)
    assert torch.equal(ours, reference)


def test_negative_prompt_errors_match_diffusers(tokenizer, text_encoder):
    """Type mismatch → TypeError and batch mismatch → ValueError, on both sides."""
    with pytest.raises(TypeError, match="same type"):
        encode_negative_prompt(["ugly"], 1, tokenizer, text_encoder, DEVICE, prompt="a cat")
    with pytest.raises(TypeError):
        diffusers_encode(tokenizer, text_encoder, "a cat", cfg=True, negative=["ugly"])
    with pytest.raises(ValueError, match="batch size 1 but `prompt` has batch size 2"):
        encode_negative_prompt(["ugly"], 2, tokenizer, text_encoder, DEVICE, prompt=["a cat", "a dog"])
    with pytest.raises(ValueError):
        diffusers_encode(tokenizer, text_encoder, ["a cat", "a dog"], cfg=True, negative=["ugly"])
    with pytest.raises(ValueError, match="batch size 3, expected 2"):
        encode_negative_prompt(None, 2, None, None, DEVICE, negative_prompt_embeds=torch.zeros(3, 77, 32))


def test_negative_prompt_string_broadcasts_over_embeds_batch(tokenizer, text_encoder):
    """With prompt_embeds of batch 2 and one negative string, each prompt gets that string.

    (diffusers keeps a single copy here and then fails in .view(); we broadcast instead.)
    """
    ours = encode_negative_prompt("ugly", 2, tokenizer, text_encoder, DEVICE, 1)
    single = encode_negative_prompt("ugly", 1, tokenizer, text_encoder, DEVICE, 1)
    assert torch.equal(ours, single.expand(2, -1, -1))


def test_negative_clip_skip_and_max_length(tokenizer, text_encoder):
    """diffusers ignores clip_skip on the negative side (our default); max_length follows the positive embeds."""
    default = encode_negative_prompt(None, 1, tokenizer, text_encoder, DEVICE)
    assert torch.equal(default, encode_prompt("", tokenizer, text_encoder, DEVICE))
    skipped = encode_negative_prompt(None, 1, tokenizer, text_encoder, DEVICE, clip_skip=1)
    assert torch.equal(skipped, encode_prompt("", tokenizer, text_encoder, DEVICE, clip_skip=1))
    short = encode_negative_prompt(None, 1, tokenizer, text_encoder, DEVICE, max_length=20)
    assert short.shape == (1, 20, 32)


# ----- loading -------------------------------------------------------------------------------------------


def _same_weights(a: torch.nn.Module, b: torch.nn.Module) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k].float(), sb[k].float()) for k in sa)


def test_load_text_encoder_safetensors(tmp_path, text_encoder, tokenizer):
    """A saved encoder loads offline in float32 with identical weights and identical embeddings."""
    text_encoder.save_pretrained(tmp_path)
    loaded = load_text_encoder(tmp_path)
    assert loaded.dtype == torch.float32 and not loaded.training
    assert _same_weights(loaded, text_encoder)
    assert torch.equal(
        encode_prompt("a cat", tokenizer, loaded, DEVICE),
        encode_prompt("a cat", tokenizer, text_encoder, DEVICE),
    )
    assert load_text_encoder(tmp_path, dtype=torch.float16).dtype == torch.float16


def test_load_text_encoder_old_key_prefix(tmp_path, text_encoder):
    """Published checkpoints (transformers 4.x) prefix keys with `text_model.`; they load the same."""
    text_encoder.save_pretrained(tmp_path)
    state = load_file(tmp_path / "model.safetensors")
    prefixed = {k if k.startswith("text_model.") else f"text_model.{k}": v for k, v in state.items()}
    save_file(prefixed, tmp_path / "model.safetensors", metadata={"format": "pt"})
    assert _same_weights(load_text_encoder(tmp_path), text_encoder)


def test_load_text_encoder_fp16_variant(tmp_path, text_encoder):
    """`variant="fp16"` reads model.fp16.safetensors; without it the error points at the variant."""
    text_encoder.to(torch.float16).save_pretrained(tmp_path)
    text_encoder.float()
    (tmp_path / "model.safetensors").rename(tmp_path / "model.fp16.safetensors")
    loaded = load_text_encoder(tmp_path, variant="fp16")
    assert loaded.dtype == torch.float32
    assert all(
        torch.equal(v, text_encoder.state_dict()[k].half().float()) for k, v in loaded.state_dict().items()
    )
    with pytest.raises(FileNotFoundError, match='variant="fp16"'):
        load_text_encoder(tmp_path)


def save_as_bin(model: CLIPTextModel, folder) -> None:
    """config.json + pytorch_model.bin (transformers 5 no longer writes .bin itself)."""
    model.save_pretrained(folder)
    (folder / "model.safetensors").unlink()
    torch.save(model.state_dict(), folder / "pytorch_model.bin")


def test_load_text_encoder_prefers_safetensors(tmp_path, text_encoder):
    """`.bin` alone loads; with both files present the safetensors weights win."""
    other = tiny_text_encoder(seed=1)
    save_as_bin(other, tmp_path)
    assert _same_weights(load_text_encoder(tmp_path), other)
    text_encoder.save_pretrained(tmp_path)
    assert _same_weights(load_text_encoder(tmp_path), text_encoder)


class Payload:
    """Not a tensor: `torch.load(weights_only=True)` must refuse to unpickle it."""

    def __reduce__(self):
        return (print, ("unpickled arbitrary code",))


def test_bin_is_read_with_weights_only(tmp_path, text_encoder, capsys):
    """A `.bin` holding a non-tensor pickle fails to load instead of running code (transformers uses weights_only)."""
    save_as_bin(text_encoder, tmp_path)
    state = torch.load(tmp_path / "pytorch_model.bin", weights_only=True)
    state["evil"] = Payload()
    torch.save(state, tmp_path / "pytorch_model.bin")
    # UnpicklingError from torch; transformers versions may wrap it, but the message names weights_only.
    with pytest.raises(Exception, match=r"(?i)weights.only"):
        load_text_encoder(tmp_path)
    assert "unpickled arbitrary code" not in capsys.readouterr().out


def test_load_text_encoder_missing_files(tmp_path):
    with pytest.raises(FileNotFoundError, match="config.json"):
        load_text_encoder(tmp_path)
    (tmp_path / "config.json").write_text("{}")
    with pytest.raises(FileNotFoundError, match="weights"):
        load_text_encoder(tmp_path)


def test_load_tokenizer_from_vocab_files(tmp_path, tokenizer):
    """A diffusers tokenizer/ folder (vocab.json + merges.txt + config) loads offline, same ids, max length 77."""
    folder = tmp_path / "tokenizer"
    make_tiny_clip_tokenizer(save_dir=folder)
    (folder / "tokenizer.json").unlink(missing_ok=True)  # diffusers folders often have only the slow files
    loaded = load_tokenizer(folder)
    assert loaded.model_max_length == 77
    text = "A photo of a cat, high quality! 123"
    assert loaded(text).input_ids == tokenizer(text).input_ids
    with pytest.raises(FileNotFoundError, match="vocab.json"):
        load_tokenizer(tmp_path / "nowhere")
