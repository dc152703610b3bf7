"""lcmkit's LoRA loader on its own (no diffusers): the layer math, file formats, key translation and errors.

Parity with diffusers lives in tests/parity/test_lora_parity.py. This file proves what does not need the oracle:
the wrapped layer computes base(x) + w * (alpha/r) * B(A(x)) (checked against the formula written out, for Linear and
a strided Conv2d), fusing gives the same output and unfusing restores the weight bit for bit, the model's state dict
keys never change, the SGM block table for the SD1.x layout is the published one, alpha comes from `.alpha` keys,
then diffusers metadata, then defaults to the rank, and bad files fail with a ValueError that names the keys.
"""

from __future__ import annotations

import copy
import json

import pytest
import torch
from helpers.tiny_models import SMALL_UNET as CONFIG
from safetensors.torch import save_file
from torch import nn

from lcmkit.config import UNetConfig
from lcmkit.loading.lora import (
    LoraLayer,
    LoraLoaderMixin,
    LoraWeights,
    inject_adapter,
    lora_parameters,
    lora_state_dict_kohya,
    scale_lora,
    set_active_adapters,
    sgm_block_names,
)
from lcmkit.models.unet import UNet2DConditionModel
from lcmkit.nn.conv import set_conv_prepacking

TARGETS = ("to_q", "to_v", "to_out.0", "proj_in", "ff.net.2", "conv1", "conv_shortcut", "downsamplers.0.conv")


class Pipe(LoraLoaderMixin):
    """The smallest LoRA host: the mixin needs only `unet` and `text_encoder` attributes."""

    def __init__(self, unet: nn.Module, text_encoder: nn.Module | None = None) -> None:
        self.unet, self.text_encoder = unet, text_encoder


@pytest.fixture
def unet() -> UNet2DConditionModel:
    torch.manual_seed(0)
    return UNet2DConditionModel(CONFIG).eval()


def random_layers(model: nn.Module, seed: int, rank: int = 2) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(seed)
    out = {}
    for name, m in model.named_modules():
        if isinstance(m, (nn.Linear, nn.Conv2d)) and name.endswith(TARGETS):
            w = m.weight
            up_shape = (w.shape[0], rank, 1, 1) if w.ndim == 4 else (w.shape[0], rank)
            out[name] = (
                torch.randn(rank, *w.shape[1:], generator=g) * 0.3,
                torch.randn(up_shape, generator=g) * 0.3,
            )
    return out


def kohya(layers: dict, alpha: float | None = 1.0, prefix: str = "lora_unet_") -> dict[str, torch.Tensor]:
    sd = {}
    for name, (down, up) in layers.items():
        key = prefix + name.replace(".", "_")
        sd[f"{key}.lora_down.weight"], sd[f"{key}.lora_up.weight"] = down, up
        if alpha is not None:
            sd[f"{key}.alpha"] = torch.tensor(alpha)
    return sd


def run(unet: nn.Module, **kwargs) -> torch.Tensor:
    g = torch.Generator().manual_seed(1)
    x, ctx, w = (
        torch.randn(2, 4, 8, 8, generator=g),
        torch.randn(2, 3, 12, generator=g),
        torch.randn(2, 6, generator=g),
    )
    with torch.no_grad():
        return unet(x, 7, ctx, timestep_cond=w, **kwargs).sample


def hand_merged(unet: nn.Module, layers: dict, coeff: float) -> nn.Module:
    """A copy of `unet` with W + coeff * B @ A written into each targeted weight (conv: kernel[o,i] = sum_r B A)."""
    merged = copy.deepcopy(unet)
    with torch.no_grad():
        for name, (down, up) in layers.items():
            delta = torch.einsum("or,rikl->oikl", up.flatten(1), down) if down.ndim == 4 else up @ down
            merged.get_submodule(name).weight += coeff * delta
    return merged


def test_layer_math_linear_and_strided_conv():
    """LoraLayer = base + w * (alpha/r) * up(down(x)); the conv down has the base kernel, stride and padding."""
    torch.manual_seed(0)
    lin, conv = nn.Linear(6, 5), nn.Conv2d(3, 4, 3, stride=2, padding=1)
    x_lin, x_conv = torch.randn(2, 6), torch.randn(1, 3, 9, 9)
    for base, x, down, up in (
        (lin, x_lin, torch.randn(2, 6), torch.randn(5, 2)),
        (conv, x_conv, torch.randn(2, 3, 3, 3), torch.randn(4, 2, 1, 1)),
    ):
        layer = LoraLayer(copy.deepcopy(base))
        layer.add_adapter("a", LoraWeights(down, up, alpha=1.0))
        layer.active = ["a"]
        layer.adapter_weights["a"] = 0.7
        with torch.no_grad():
            if isinstance(base, nn.Conv2d):
                lora = nn.functional.conv2d(nn.functional.conv2d(x, down, stride=2, padding=1), up)
            else:
                lora = x @ down.T @ up.T
            expected = base(x) + 0.7 * 0.5 * lora
            torch.testing.assert_close(layer(x), expected, rtol=0, atol=1e-6)
            original = layer.weight.detach().clone()
            layer.fuse(["a"], lora_scale=1.0)
            torch.testing.assert_close(layer(x), expected, rtol=0, atol=1e-5)
            layer.unfuse()
            assert torch.equal(layer.weight, original)


def test_kohya_load_equals_hand_merge_and_keeps_state_dict(unet, tmp_path):
    """A kohya LoRA (alpha 1, rank 2) equals W + 0.5 B A written by hand; state dict keys and save_pretrained are
    unchanged; adapter tensors follow `.to()`; `lora_state_dict_kohya` round-trips."""
    layers = random_layers(unet, seed=1)
    keys = list(unet.state_dict())
    pipe = Pipe(unet)
    plain = run(unet)
    expected = run(hand_merged(unet, layers, 0.5))
    pipe.load_lora_weights(kohya(layers), adapter_name="k")
    assert (expected - plain).abs().max() > 1e-2
    torch.testing.assert_close(run(unet), expected, rtol=0, atol=1e-5)
    assert list(unet.state_dict()) == keys
    unet.save_pretrained(tmp_path / "saved")
    reloaded = UNet2DConditionModel.from_pretrained(tmp_path / "saved")
    set_conv_prepacking(
        reloaded, "off"
    )  # memory-mapped weights would take the packed path: same values to 1e-6
    torch.testing.assert_close(run(reloaded), plain, rtol=0, atol=0)
    unet.load_state_dict(reloaded.state_dict(), strict=True)

    exported = lora_state_dict_kohya(unet, "k")
    assert exported.keys() == kohya(layers).keys()
    fresh = Pipe(copy.deepcopy(reloaded))
    fresh.load_lora_weights(exported)
    torch.testing.assert_close(run(fresh.unet), run(unet), rtol=0, atol=0)

    unet.to(torch.float64)
    assert all(p.dtype == torch.float64 for p in lora_parameters(unet, "k"))
    assert len(lora_parameters(unet, "k")) == 2 * len(layers)


def test_peft_format_alpha_sources(unet, tmp_path):
    """PEFT keys, with and without the `unet.` prefix: alpha = rank when nothing says otherwise; `.alpha` keys and
    diffusers metadata (`lora_alpha`, `alpha_pattern`) override it."""
    layers = random_layers(unet, seed=2)
    plain_sd = {}
    for name, (down, up) in layers.items():
        plain_sd[f"{name}.lora_A.weight"], plain_sd[f"{name}.lora_B.weight"] = down, up
    special = "down_blocks.0.resnets.0.conv1"
    cases = {
        "no_alpha": ({f"unet.{k}": v for k, v in plain_sd.items()}, None, lambda n: 1.0),
        "unprefixed": (plain_sd, None, lambda n: 1.0),
        "alpha_keys": (
            {**plain_sd, **{f"unet.{n}.alpha": torch.tensor(4.0) for n in layers}},
            None,
            lambda n: 2.0,
        ),
        "metadata": (
            plain_sd,
            {"unet.r": 2, "unet.lora_alpha": 1, "unet.alpha_pattern": {special: 6}},
            lambda n: 3.0 if n == special else 0.5,
        ),
    }
    for label, (sd, meta, scale_of) in cases.items():
        model = copy.deepcopy(unet)
        if meta is None:
            Pipe(model).load_lora_weights(sd)
        else:
            save_file(
                sd, tmp_path / "pytorch_lora_weights.safetensors", {"lora_adapter_metadata": json.dumps(meta)}
            )
            Pipe(model).load_lora_weights(tmp_path)  # the folder: finds the diffusers default file name
        for name in layers:
            assert model.get_submodule(name).scales == {"default_0": scale_of(name)}, (label, name)


def test_older_diffusers_spellings(unet):
    """The attention-processor format (`attn1.processor.to_q_lora.down.weight`) and `lora.down/up` keys load as the
    same layers as PEFT keys (no alpha: alpha = rank)."""
    layers = {
        n: v for n, v in random_layers(unet, seed=6).items() if n.endswith(("to_q", "to_out.0", "conv1"))
    }
    peft, legacy = {}, {}
    for name, (down, up) in layers.items():
        peft[f"unet.{name}.lora_A.weight"], peft[f"unet.{name}.lora_B.weight"] = down, up
        if name.endswith(("to_q", "to_out.0")):
            attn, proj = name.removesuffix(".0").rsplit(".", 1)
            legacy[f"{attn}.processor.{proj}_lora.down.weight"] = down
            legacy[f"{attn}.processor.{proj}_lora.up.weight"] = up
        else:
            legacy[f"unet.{name}.lora.down.weight"], legacy[f"unet.{name}.lora.up.weight"] = down, up
    outs = []
    for sd in (peft, legacy):
        model = copy.deepcopy(unet)
        Pipe(model).load_lora_weights(sd)
        outs.append(run(model))
    assert (outs[0] - run(unet)).abs().max() > 1e-2
    assert torch.equal(outs[0], outs[1])


def test_errors_name_the_keys(unet):
    """Unknown keys, keys for modules that do not exist, a missing up weight and a wrong shape are all refused
    with the key in the message, and leave the model unchanged; the caller's dict is not modified."""
    layers = random_layers(unet, seed=3)
    good = kohya(layers)
    pipe = Pipe(unet)
    bad_cases = {
        "lora_unet_down_blocks_0_resnets_0_conv1.hada_w1_a": "hada_w1_a",
        "lora_unet_down_blocks_9_resnets_0_conv1.lora_down.weight": "down_blocks_9",
        "unet.not_a_module.lora_A.weight": "not_a_module",
        "something_else.weight": "something_else",
    }
    for key, needle in bad_cases.items():
        sd = {**good, key: torch.zeros(2, 8)}
        snapshot = dict(sd)
        with pytest.raises(ValueError, match=needle):
            pipe.load_lora_weights(sd)
        assert sd.keys() == snapshot.keys() and all(sd[k] is snapshot[k] for k in sd)
    missing_up = {k: v for k, v in good.items() if not k.startswith("lora_unet_conv_in")}
    missing_up.pop(next(k for k in missing_up if k.endswith("lora_up.weight")))
    with pytest.raises(ValueError, match="needs both down and up"):
        pipe.load_lora_weights(missing_up)
    wrong = dict(good)
    key = next(k for k in wrong if "conv1" in k and k.endswith("lora_down.weight"))
    wrong[key] = torch.zeros(2, 3, 3, 3)
    with pytest.raises(ValueError, match="needs down"):
        pipe.load_lora_weights(wrong)
    assert not any(isinstance(m, LoraLayer) for m in unet.modules())
    pipe.load_lora_weights(good, adapter_name="ok")
    with pytest.raises(ValueError, match="already in use"):
        pipe.load_lora_weights(good, adapter_name="ok")
    with pytest.raises(ValueError, match="without '.'"):
        pipe.load_lora_weights(good, adapter_name="a.b")
    with pytest.raises(ValueError, match="not loaded"):
        pipe.set_adapters(["ok", "nope"])


def test_adapter_bookkeeping(unet):
    """set_adapters / get_active_adapters / delete_adapters / fuse bookkeeping, and scale = weight equivalence:
    cross_attention_kwargs={"scale": s} gives the same output as set_adapters(..., s)."""
    pipe = Pipe(unet)
    plain = run(unet)
    a, b = random_layers(unet, seed=4), random_layers(unet, seed=5)
    expected = run(hand_merged(hand_merged(unet, a, 0.5), b, 0.8))  # kohya alpha 1 / rank 2; b: alpha = rank
    pipe.load_lora_weights(kohya(a), adapter_name="a")
    pipe.load_lora_weights(kohya(b, alpha=None), adapter_name="b")
    assert pipe.get_list_adapters() == {"unet": ["a", "b"]}
    assert pipe.get_active_adapters() == ["b"]
    pipe.set_adapters(["a", "b"], [1.0, 0.8])
    both = run(unet)
    torch.testing.assert_close(both, expected, rtol=0, atol=1e-5)
    scaled = run(unet, cross_attention_kwargs={"scale": 0.3})
    pipe.set_adapters(["a", "b"], [0.3, 0.24])
    torch.testing.assert_close(scaled, run(unet), rtol=0, atol=1e-6)
    pipe.set_adapters(["a", "b"], [1.0, 0.8])

    pipe.fuse_lora(adapter_names=["a"])
    assert pipe.fused_loras == {"a"} and pipe.num_fused_loras == 1
    torch.testing.assert_close(run(unet), both, rtol=0, atol=1e-5)  # a fused, b still applied at run time
    with pytest.raises(ValueError, match="unfuse_lora"):
        pipe.delete_adapters("a")
    pipe.unfuse_lora()
    pipe.delete_adapters("a")
    assert pipe.get_list_adapters() == {"unet": ["b"]} and pipe.get_active_adapters() == ["b"]
    pipe.delete_adapters(["b"])
    assert pipe.get_list_adapters() == {} and not any(isinstance(m, LoraLayer) for m in unet.modules())
    assert torch.equal(run(unet), plain)


def test_text_encoder_kohya_and_scale():
    """`lora_te_text_model_...` keys reach a transformers-5 CLIPTextModel (which has no `text_model.` level);
    the result equals W + (alpha/r) B A written by hand, and `scale_lora` multiplies the update."""
    from transformers import CLIPTextConfig, CLIPTextModel

    torch.manual_seed(0)
    config = CLIPTextConfig(
        hidden_size=16,
        intermediate_size=32,
        num_attention_heads=2,
        num_hidden_layers=2,
        vocab_size=50,
        bos_token_id=0,
        eos_token_id=2,
        pad_token_id=1,
    )
    te = CLIPTextModel(config).eval()
    g = torch.Generator().manual_seed(0)
    layers = {
        n: (
            torch.randn(2, m.in_features, generator=g) * 0.3,
            torch.randn(m.out_features, 2, generator=g) * 0.3,
        )
        for n, m in te.named_modules()
        if n.endswith(("q_proj", "out_proj", "fc1", "fc2"))
    }
    prefix = "lora_te_text_model_" if not hasattr(te, "text_model") else "lora_te_"
    sd = kohya({n.removeprefix("text_model."): v for n, v in layers.items()}, alpha=4.0, prefix=prefix)
    ids = torch.tensor([[0, 5, 9, 2, 1]])
    with torch.no_grad():
        plain = te(ids)[0]
        expected = hand_merged(te, layers, 2.0)(ids)[0]
        half = hand_merged(te, layers, 1.0)(ids)[0]
    pipe = Pipe(unet=None, text_encoder=te)
    pipe.load_lora_weights(sd, adapter_name="t")
    with torch.no_grad():
        torch.testing.assert_close(te(ids)[0], expected, rtol=0, atol=1e-5)
        with scale_lora(te, 0.5):
            torch.testing.assert_close(te(ids)[0], half, rtol=0, atol=1e-5)
        pipe.unload_lora_weights()
        assert torch.equal(te(ids)[0], plain)


def test_sgm_block_table_for_sd15_layout():
    """The derived SGM table for the SD1.x config (4 levels, 2 layers, attention on levels 0-2) is the published
    LDM numbering."""
    blocks = sgm_block_names(UNetConfig())
    expected = {
        "down_blocks.0.resnets.0": "input_blocks.1.0",
        "down_blocks.0.attentions.1": "input_blocks.2.1",
        "down_blocks.0.downsamplers.0.conv": "input_blocks.3.0.op",
        "down_blocks.1.attentions.0": "input_blocks.4.1",
        "down_blocks.2.downsamplers.0.conv": "input_blocks.9.0.op",
        "down_blocks.3.resnets.1": "input_blocks.11.0",
        "mid_block.attentions.0": "middle_block.1",
        "mid_block.resnets.1": "middle_block.2",
        "up_blocks.0.resnets.2": "output_blocks.2.0",
        "up_blocks.0.upsamplers.0.conv": "output_blocks.2.1.conv",
        "up_blocks.1.attentions.0": "output_blocks.3.1",
        "up_blocks.1.upsamplers.0.conv": "output_blocks.5.2.conv",
        "up_blocks.3.attentions.2": "output_blocks.11.1",
    }
    assert {k: blocks[k] for k in expected} == expected
    assert "down_blocks.3.attentions.0" not in blocks and "up_blocks.0.attentions.0" not in blocks
    assert "down_blocks.3.downsamplers.0.conv" not in blocks and "up_blocks.3.upsamplers.0.conv" not in blocks
    assert len(blocks) == 8 + 6 + 3 + 3 + 12 + 9 + 3


def test_inject_trainable_adapter(unet):
    """The trainer's path: inject a zero-initialised trainable adapter; gradients reach only its tensors."""
    layers = {}
    for name, m in unet.named_modules():
        if isinstance(m, (nn.Linear, nn.Conv2d)) and name.endswith(TARGETS):
            w = m.weight
            up_shape = (w.shape[0], 2, 1, 1) if w.ndim == 4 else (w.shape[0], 2)
            layers[name] = LoraWeights(torch.randn(2, *w.shape[1:]), torch.zeros(up_shape), alpha=2.0)
    unet.requires_grad_(False)  # before the plain run: frozen weights may take other (fast) conv paths
    plain = run(unet)
    inject_adapter(unet, "train", layers, trainable=True)
    set_active_adapters(unet, ["train"], [1.0])
    assert torch.equal(run(unet), plain)  # B = 0: the adapter starts as the identity
    g = torch.Generator().manual_seed(1)
    x, ctx, w = (
        torch.randn(1, 4, 8, 8, generator=g),
        torch.randn(1, 3, 12, generator=g),
        torch.randn(1, 6, generator=g),
    )
    unet(x, 7, ctx, timestep_cond=w).sample.square().mean().backward()
    params = lora_parameters(unet, "train")
    assert len(params) == 2 * len(layers)
    assert all(p.grad is not None for p in params[1::2])  # up tensors get gradients
    assert all(
        p.grad is None for n, p in unet.named_parameters() if ".lora_" not in n
    )  # the base stays frozen
