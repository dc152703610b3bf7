"""LoRA parity: lcmkit's `load_lora_weights` / `set_adapters` / `fuse_lora` against diffusers' (with peft).

Reference: diffusers 0.42.1 `LatentConsistencyModelPipeline` (+ peft), loaded from the same diffusers-saved tiny
SD1.5 folder, given the same seeded random LoRA files. Images are compared as `np` output in [0, 1] with max abs
difference <= 1e-4; text embeddings <= 1e-5. Every test also checks that the LoRA changes the output by far more
than the tolerance, so a LoRA that is silently ignored fails.

The LoRAs cover every layer kind LCM-LoRA targets (attention projections, feed-forward, proj_in/out, resnet
conv1/conv2/conv_shortcut as conv LoRA, down/upsampler convs, time_emb_proj), in kohya format with alpha != rank and
in PEFT format, plus a text-encoder kohya LoRA.
"""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
from helpers.reference import assert_close_to_reference, max_abs_diff
from torch import nn

from lcmkit.loading.lora import LoraLayer, LoraLoaderMixin
from lcmkit.train.distill_lora import LCM_LORA_TARGETS

TOL = 1e-4
RANK = 4
PROMPT = "a red circle on a blue background"
UNET_TARGETS = LCM_LORA_TARGETS  # every layer kind the published LCM-LoRA files adapt
TE_TARGETS = ("q_proj", "k_proj", "v_proj", "out_proj", "fc1", "fc2")


def random_lora(
    model: nn.Module, suffixes: tuple[str, ...], seed: int, rank: int = RANK
) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """{module path: (down, up)} for every Linear/Conv2d whose path ends with a target suffix; seeded, small."""
    g = torch.Generator().manual_seed(seed)
    out = {}
    for name, m in model.named_modules():
        if not isinstance(m, (nn.Linear, nn.Conv2d)) or not name.endswith(suffixes):
            continue
        w = m.weight
        down_shape = (rank, w.shape[1], *w.shape[2:])
        up_shape = (w.shape[0], rank, 1, 1) if w.ndim == 4 else (w.shape[0], rank)
        fan_in = w[0].numel()
        out[name] = (
            torch.randn(down_shape, generator=g) / fan_in**0.5,
            torch.randn(up_shape, generator=g) * 0.3 / rank**0.5,
        )
    assert out, suffixes
    return out


def kohya(layers: dict, prefix: str, alpha: float | None) -> dict[str, torch.Tensor]:
    sd = {}
    for name, (down, up) in layers.items():
        key = prefix + name.replace(".", "_")
        sd[f"{key}.lora_down.weight"] = down
        sd[f"{key}.lora_up.weight"] = up
        if alpha is not None:
            sd[f"{key}.alpha"] = torch.tensor(alpha)
    return sd


def peft(layers: dict, prefix: str) -> dict[str, torch.Tensor]:
    sd = {}
    for name, (down, up) in layers.items():
        sd[f"{prefix}{name}.lora_A.weight"] = down
        sd[f"{prefix}{name}.lora_B.weight"] = up
    return sd


@pytest.fixture(scope="module")
def loaded_pipes(tiny_folders):
    import diffusers

    import lcmkit

    folder = tiny_folders["sd15"]
    ours = lcmkit.LatentConsistencyModelPipeline.from_pretrained(folder)
    ref = diffusers.LatentConsistencyModelPipeline.from_pretrained(folder)
    ours.set_progress_bar_config(disable=True)
    ref.set_progress_bar_config(disable=True)
    return ours, ref


@pytest.fixture
def pipes(loaded_pipes):
    """Fresh copies of the (lcmkit, diffusers) pipelines per test: LoRA loading mutates them."""
    return tuple(copy.deepcopy(p) for p in loaded_pipes)


@pytest.fixture
def ours(loaded_pipes):
    return copy.deepcopy(loaded_pipes[0])


@pytest.fixture(scope="module")
def loras(tiny_folders):
    """Seeded LoRA state dicts for the tiny SD1.5 UNet and text encoder (module names from a clean diffusers UNet)."""
    import diffusers
    from transformers import CLIPTextModel

    unet = diffusers.UNet2DConditionModel.from_pretrained(tiny_folders["sd15"], subfolder="unet")
    te = CLIPTextModel.from_pretrained(tiny_folders["sd15"] / "text_encoder")
    te_layers = random_lora(te, TE_TARGETS, seed=3)
    return {
        "kohya_unet": kohya(random_lora(unet, UNET_TARGETS, seed=1), "lora_unet_", alpha=2.0),
        "peft_unet": peft(random_lora(unet, UNET_TARGETS, seed=2), "unet."),
        # kohya text-encoder names keep the `text_model.` level that transformers 5 dropped
        "kohya_te": kohya({f"text_model.{k}": v for k, v in te_layers.items()}, "lora_te_", alpha=8.0),
        "te_layers": te_layers,
    }


def images(pipe, **kwargs) -> np.ndarray:
    kwargs = {"num_inference_steps": 1, "guidance_scale": 6.0, **kwargs}
    return pipe(PROMPT, generator=torch.Generator().manual_seed(0), output_type="np", **kwargs).images


def assert_parity(pipes, baseline=None, **kwargs) -> np.ndarray:
    ours, ref = pipes
    a, b = images(ours, **kwargs), images(ref, **kwargs)
    assert_close_to_reference(a, b, atol=TOL, what="image")
    if baseline is not None:
        assert max_abs_diff(a, baseline) > 100 * TOL, "the LoRA did not change the image"
    return a


def test_kohya_unet_and_text_encoder_unfused_and_fused(pipes, loras):
    """kohya (alpha/rank = 0.5 on the UNet, 2 on the text encoder) matches diffusers unfused and fused;
    unfuse puts back the exact weights."""
    ours, ref = pipes
    plain = images(ours)
    sd = {**loras["kohya_unet"], **loras["kohya_te"]}
    before = copy.deepcopy(sd)
    ours.load_lora_weights(sd, adapter_name="k")
    assert all(torch.equal(sd[k], before[k]) for k in before) and sd.keys() == before.keys()
    ref.load_lora_weights(sd, adapter_name="k")
    unfused = assert_parity(pipes, baseline=plain)
    assert ours.get_list_adapters() == {"unet": ["k"], "text_encoder": ["k"]}

    weights = {c: copy.deepcopy(getattr(ours, c).state_dict()) for c in ("unet", "text_encoder")}
    ours.fuse_lora()
    ref.fuse_lora()
    assert ours.num_fused_loras == 1 and ours.fused_loras == {"k"}
    fused = assert_parity(pipes, baseline=plain)
    assert_close_to_reference(fused, unfused, atol=TOL, what="image")
    ours.unfuse_lora()
    assert ours.num_fused_loras == 0
    for c, sd_before in weights.items():
        after = getattr(ours, c).state_dict()
        assert all(torch.equal(after[k], v) for k, v in sd_before.items()), c
    assert max_abs_diff(images(ours), unfused) == 0.0


def test_two_adapters_with_weights(pipes, loras):
    """A kohya adapter and a PEFT adapter (no alpha: alpha = rank) at weights 1.0 and 0.8, unfused and fused."""
    ours, ref = pipes
    plain = images(ours)
    for pipe in pipes:
        pipe.load_lora_weights(loras["kohya_unet"], adapter_name="lcm")
        pipe.load_lora_weights(loras["peft_unet"], adapter_name="style")
    assert ours.get_active_adapters() == ref.get_active_adapters() == ["style"]
    only_style = assert_parity(pipes, baseline=plain)
    for pipe in pipes:
        pipe.set_adapters(["lcm", "style"], adapter_weights=[1.0, 0.8])
    assert ours.get_active_adapters() == ["lcm", "style"]
    both = assert_parity(pipes, baseline=only_style)
    for pipe in pipes:
        pipe.fuse_lora(lora_scale=0.7)
    assert ours.fused_loras == {"lcm", "style"}
    assert_parity(pipes, baseline=both)


def test_runtime_scale_and_disable(pipes, loras):
    """`cross_attention_kwargs={"scale": s}` scales the UNet adapters for that call (as diffusers does);
    disable_lora gives exactly the LoRA-free image and enable_lora exactly the LoRA image again."""
    ours, ref = pipes
    plain = images(ours)
    for pipe in pipes:
        pipe.load_lora_weights(loras["kohya_unet"], adapter_name="k")
    full = images(ours)
    assert_parity(pipes, baseline=full, cross_attention_kwargs={"scale": 0.5})
    assert max_abs_diff(images(ours), full) == 0.0  # the scale applied to that call only
    ours.disable_lora()
    assert max_abs_diff(images(ours), plain) == 0.0
    ours.enable_lora()
    assert max_abs_diff(images(ours), full) == 0.0


def test_runtime_scale_with_text_encoder_lora(pipes, loras):
    """With a UNet + text-encoder LoRA, `cross_attention_kwargs={"scale": 0.5}` scales both: lcmkit given the prompt
    equals diffusers, and equals lcmkit given embeddings encoded by hand inside `scale_lora(text_encoder, 0.5)`."""
    from lcmkit.loading.lora import scale_lora

    ours, ref = pipes
    for pipe in pipes:
        pipe.load_lora_weights({**loras["kohya_unet"], **loras["kohya_te"]})
    kwargs = {"num_inference_steps": 1, "guidance_scale": 6.0, "output_type": "np"}
    kwargs["cross_attention_kwargs"] = {"scale": 0.5}
    with torch.no_grad(), scale_lora(ours.text_encoder, 0.5):
        embeds = ours.encode_prompt(PROMPT, torch.device("cpu"))
    a = ours(prompt_embeds=embeds, generator=torch.Generator().manual_seed(0), **kwargs).images
    b = ref(PROMPT, generator=torch.Generator().manual_seed(0), **kwargs).images
    c = ours(PROMPT, generator=torch.Generator().manual_seed(0), **kwargs).images
    assert_close_to_reference(a, b, atol=TOL, what="image")
    assert_close_to_reference(c, b, atol=TOL, what="image")
    assert max_abs_diff(a, images(ours)) > 100 * TOL


def test_unload_restores_plain_modules_and_fused_unload_keeps_fusion(ours, loras):
    """unload_lora_weights gives back the original modules and outputs exactly; after fuse_lora it keeps the
    fused weights (diffusers' fuse-then-unload recipe), so the image stays the fused one."""
    plain = images(ours)
    keys = list(ours.unet.state_dict())
    to_q = ours.unet.get_submodule("down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q")
    ours.load_lora_weights({**loras["kohya_unet"], **loras["kohya_te"]})
    assert list(ours.unet.state_dict()) == keys  # no LoRA tensors in the state dict, same key order
    ours.unload_lora_weights()
    assert ours.get_list_adapters() == {}
    assert ours.unet.get_submodule("down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q") is to_q
    assert not any(isinstance(m, LoraLayer) for c in (ours.unet, ours.text_encoder) for m in c.modules())
    assert max_abs_diff(images(ours), plain) == 0.0

    ours.load_lora_weights(loras["kohya_unet"], adapter_name="k")
    ours.fuse_lora()
    fused = images(ours)
    ours.unload_lora_weights()
    assert not any(isinstance(m, LoraLayer) for m in ours.unet.modules())
    assert max_abs_diff(fused, plain) > 100 * TOL
    assert max_abs_diff(images(ours), fused) == 0.0


def test_text_encoder_kohya_matches_reference(pipes, loras):
    """Text-encoder LoRA: prompt embeddings equal diffusers' and a copy of the encoder with W + (alpha/r) B A
    written in by hand; `scale_lora` scales the update."""
    from lcmkit.loading.lora import scale_lora

    ours, ref = pipes
    hand = copy.deepcopy(ours.text_encoder)
    with torch.no_grad():
        for name, (down, up) in loras["te_layers"].items():
            hand.get_submodule(name).weight += 8.0 / RANK * up @ down
    ids = ours.tokenizer(PROMPT, padding="max_length", max_length=77, truncation=True, return_tensors="pt")
    with torch.no_grad():
        expected = hand(ids.input_ids)[0]
        plain = ours.encode_prompt(PROMPT, torch.device("cpu"))
    for pipe in pipes:
        pipe.load_lora_weights(loras["kohya_te"], adapter_name="te")
    assert ours.get_list_adapters() == {"text_encoder": ["te"]}
    with torch.no_grad():
        got = ours.encode_prompt(PROMPT, torch.device("cpu"))
        theirs = ref.encode_prompt(PROMPT, "cpu", 1, False)[0]
    assert (plain - expected).abs().max() > 1e-2
    assert (got - expected).abs().max() <= 1e-5
    assert (got - theirs).abs().max() <= 1e-5
    with torch.no_grad(), scale_lora(ours.text_encoder, 0.0):
        assert (ours.encode_prompt(PROMPT, torch.device("cpu")) - plain).abs().max() == 0.0


def test_diffusers_saved_peft_file_with_metadata(pipes, loras, tmp_path):
    """A LoRA file written by diffusers' `save_lora_weights` with its LoraConfig metadata (alpha 2 != rank 4 and no
    `.alpha` keys): lcmkit reads alpha from the metadata."""
    from peft import LoraConfig
    from peft.utils import get_peft_model_state_dict

    ours, ref = pipes
    plain = images(ours)
    targets = sorted({k.removeprefix("unet.").rsplit(".lora_", 1)[0] for k in loras["peft_unet"]})
    ref.unet.add_adapter(LoraConfig(r=RANK, lora_alpha=2, target_modules=targets, init_lora_weights=False))
    config = ref.unet.peft_config["default"].to_dict()
    type(ref).save_lora_weights(
        tmp_path,
        unet_lora_layers=get_peft_model_state_dict(ref.unet),
        unet_lora_adapter_metadata=config,
    )
    ours.load_lora_weights(tmp_path)
    assert_parity(pipes, baseline=plain)


def test_sgm_named_kohya_equals_diffusers_named(tmp_path):
    """On a 4-level, 2-layers-per-block UNet (the SD1.x layout), an SGM/LDM-named kohya file gives exactly the
    output of the diffusers-named file, and that matches diffusers' UNet with the same LoRA (<= 1e-4).

    The SGM names are written from a hand table of the SD1.x LDM layout, not from lcmkit's mapping.
    """
    import diffusers
    from diffusers.loaders import StableDiffusionLoraLoaderMixin

    from lcmkit.models.unet import UNet2DConditionModel

    torch.manual_seed(0)
    ref_unet = diffusers.UNet2DConditionModel(
        block_out_channels=(8, 16, 16, 16),
        layers_per_block=2,
        sample_size=16,
        down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
        up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
        cross_attention_dim=16,
        norm_num_groups=8,
        attention_head_dim=2,
    ).eval()
    ref_unet.save_pretrained(tmp_path)
    layers = random_lora(ref_unet, UNET_TARGETS, seed=5)
    named = kohya(layers, "lora_unet_", alpha=3.0)
    sgm = {_sd15_sgm_key(k): v for k, v in named.items()}
    assert len(sgm) == len(named) and any("output_blocks_2_1_conv" in k for k in sgm)

    class Holder(LoraLoaderMixin):
        def __init__(self, unet):
            self.unet, self.text_encoder = unet, None

    g = torch.Generator().manual_seed(0)
    x, ctx = torch.randn(1, 4, 16, 16, generator=g), torch.randn(1, 5, 16, generator=g)
    outs = {}
    holder = Holder(UNet2DConditionModel.from_pretrained(tmp_path))
    for name, sd in (("plain", {}), ("named", named), ("sgm", sgm)):
        if sd:
            holder.load_lora_weights(sd, adapter_name=name)
        with torch.no_grad():
            outs[name] = holder.unet(x, 10, ctx).sample
        holder.unload_lora_weights()
    state_dict, alphas = StableDiffusionLoraLoaderMixin.lora_state_dict(named)
    StableDiffusionLoraLoaderMixin.load_lora_into_unet(state_dict, alphas, ref_unet, adapter_name="x")
    with torch.no_grad():
        expected = ref_unet(x, 10, ctx).sample
    assert torch.equal(outs["sgm"], outs["named"])
    assert (outs["named"] - outs["plain"]).abs().max() > 1e-2
    assert (outs["named"] - expected).abs().max() <= TOL


# SD1.x (4 levels, 2 layers per block): diffusers block -> LDM block, as published SD checkpoints name them.
_SD15_BLOCKS = {
    **{
        f"down_blocks_{lv}_resnets_{j}": f"input_blocks_{1 + 3 * lv + j}_0"
        for lv in range(4)
        for j in range(2)
    },
    **{
        f"down_blocks_{lv}_attentions_{j}": f"input_blocks_{1 + 3 * lv + j}_1"
        for lv in range(3)
        for j in range(2)
    },
    "down_blocks_0_downsamplers_0_conv": "input_blocks_3_0_op",
    "down_blocks_1_downsamplers_0_conv": "input_blocks_6_0_op",
    "down_blocks_2_downsamplers_0_conv": "input_blocks_9_0_op",
    "mid_block_resnets_0": "middle_block_0",
    "mid_block_attentions_0": "middle_block_1",
    "mid_block_resnets_1": "middle_block_2",
    **{f"up_blocks_{s}_resnets_{j}": f"output_blocks_{3 * s + j}_0" for s in range(4) for j in range(3)},
    **{
        f"up_blocks_{s}_attentions_{j}": f"output_blocks_{3 * s + j}_1" for s in range(1, 4) for j in range(3)
    },
    "up_blocks_0_upsamplers_0_conv": "output_blocks_2_1_conv",
    "up_blocks_1_upsamplers_0_conv": "output_blocks_5_2_conv",
    "up_blocks_2_upsamplers_0_conv": "output_blocks_8_2_conv",
}
_SD15_RESNET_LEAVES = {
    "conv1": "in_layers_2",
    "conv2": "out_layers_3",
    "conv_shortcut": "skip_connection",
    "time_emb_proj": "emb_layers_1",
}


def _sd15_sgm_key(key: str) -> str:
    name, _, suffix = key.removeprefix("lora_unet_").partition(".")
    for block, ldm in sorted(_SD15_BLOCKS.items(), key=lambda kv: -len(kv[0])):
        if name == block or name.startswith(block + "_"):
            rest = name[len(block) + 1 :]
            if "_resnets_" in block:
                rest = _SD15_RESNET_LEAVES[rest]
            return f"lora_unet_{ldm}{'_' + rest if rest else ''}.{suffix}"
    raise AssertionError(f"no LDM block for {key}")


@pytest.mark.parametrize("fuse", [False, True])
def test_lcm_lora_on_plain_sd_unet_with_cfg_and_negative_prompt(tiny_folders, fuse):
    """The LCM-LoRA recipe: an SD UNet without w-embedding + a kohya LoRA, guidance 1.5 and a negative prompt.
    lcmkit's LCM pipeline equals diffusers' StableDiffusionPipeline with an LCMScheduler on the same weights."""
    import diffusers

    import lcmkit

    folder = tiny_folders["sd15_plain"]
    unet = diffusers.UNet2DConditionModel.from_pretrained(folder, subfolder="unet")
    lora = kohya(random_lora(unet, UNET_TARGETS, seed=5), "lora_unet_", alpha=2.0)
    ours = lcmkit.LatentConsistencyModelPipeline.from_pretrained(folder)
    ref = diffusers.StableDiffusionPipeline.from_pretrained(
        folder, safety_checker=None, requires_safety_checker=False
    )
    for pipe in (ours, ref):
        pipe.set_progress_bar_config(disable=True)
        pipe.load_lora_weights(dict(lora), adapter_name="lcm")
        if fuse:
            pipe.fuse_lora()
    kwargs = dict(num_inference_steps=4, guidance_scale=1.5, negative_prompt="blurry", output_type="np")
    a = ours(PROMPT, generator=torch.Generator().manual_seed(7), **kwargs).images
    b = ref(PROMPT, generator=torch.Generator().manual_seed(7), **kwargs).images
    assert_close_to_reference(a, b, atol=TOL, what="image")
