"""Parity of lcmkit's `UNet2DConditionModel` with diffusers' `UNet2DConditionModel` (the oracle) on the same weights.

Each model is built by diffusers under `torch.manual_seed(0)`; its GroupNorm and LayerNorm affine parameters
(initialised to 1/0) are then randomised, so that a norm in the wrong place changes the output far beyond the
tolerance. The same state dict is loaded into ours with `strict=True`. Every float32 comparison uses
atol=1e-5, rtol=0 on the CPU, for a batch of 2.

What this proves: identical checkpoint keys and shapes; the same output for the SD1.5-like, SD2-like
(linear projections, per-level heads, upcast attention, two transformer layers per block) and diffusers' LCM
fast-test layouts; for every timestep form; with the LCM w-embedding; at latent sizes the encoder rounds;
with FreeU on (and off again); with uneven per-level layouts and the remaining config knobs; after a save/load round trip in both directions; and in bfloat16.
"""

from __future__ import annotations

import pytest
import torch
from helpers.reference import assert_close_to_reference
from helpers.tiny_models import DIFFUSERS_SD15_UNET

diffusers = pytest.importorskip("diffusers")

from diffusers.utils.torch_utils import apply_freeu as ref_apply_freeu  # noqa: E402
from diffusers.utils.torch_utils import fourier_filter as ref_fourier_filter  # noqa: E402

from lcmkit.config import UNetConfig  # noqa: E402
from lcmkit.models.unet import UNet2DConditionModel  # noqa: E402
from lcmkit.nn.freeu import apply_freeu, fourier_filter  # noqa: E402

ATOL = 1e-5
FREEU = dict(s1=0.9, s2=0.2, b1=1.2, b2=1.4)

CONFIGS = {
    # (a) SD1.5-like: two resnets per level, conv projections, LCM w-embedding
    "sd15": DIFFUSERS_SD15_UNET,
    # (b) SD2-like: three levels, linear projections, per-level heads, upcast, two transformer layers per block
    "sd2": dict(
        block_out_channels=(32, 64, 64),
        layers_per_block=1,
        down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=24,
        norm_num_groups=8,
        attention_head_dim=[2, 4, 4],
        use_linear_projection=True,
        upcast_attention=True,
        transformer_layers_per_block=2,
        sample_size=16,
    ),
    # (c) the UNet of diffusers' LCM fast pipeline tests
    "lcm_fast": dict(
        block_out_channels=(4, 8),
        layers_per_block=1,
        sample_size=32,
        in_channels=4,
        out_channels=4,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        cross_attention_dim=32,
        norm_num_groups=2,
        time_cond_proj_dim=32,
    ),
    # (d) the remaining knobs: uneven layers and transformer depths per level, attention on every level,
    # other timestep-feature settings, a wider time embedding, a mid-block output scale, padding-0 downsampling
    "knobs": dict(
        block_out_channels=(8, 16),
        in_channels=3,
        out_channels=5,
        layers_per_block=[1, 2],
        transformer_layers_per_block=[2, 1],
        attention_head_dim=[2, 4],
        down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=16,
        norm_num_groups=4,
        norm_eps=1e-6,
        flip_sin_to_cos=False,
        freq_shift=1,
        time_embedding_dim=24,
        mid_block_scale_factor=2.0,
        downsample_padding=0,
    ),
}


def _randomise_norms(model: torch.nn.Module) -> None:
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, (torch.nn.GroupNorm, torch.nn.LayerNorm)):
                m.weight.copy_(1 + 0.5 * torch.randn(m.weight.shape, generator=gen))
                m.bias.copy_(0.5 * torch.randn(m.bias.shape, generator=gen))


def _build_ref(name: str) -> torch.nn.Module:
    torch.manual_seed(0)
    ref = diffusers.UNet2DConditionModel(**CONFIGS[name]).eval()
    _randomise_norms(ref)
    return ref


def _inputs(ref: torch.nn.Module, height: int = 16, width: int = 16, batch: int = 2) -> dict:
    """Latents, text embeddings (7 tokens) and, where the UNet has one, a w-embedding."""
    gen = torch.Generator().manual_seed(2)
    cfg = ref.config
    out = {
        "sample": torch.randn(batch, cfg.in_channels, height, width, generator=gen),
        "encoder_hidden_states": torch.randn(batch, 7, cfg.cross_attention_dim, generator=gen),
    }
    if cfg.time_cond_proj_dim:
        out["timestep_cond"] = torch.randn(batch, cfg.time_cond_proj_dim, generator=gen)
    return out


def _run(model: torch.nn.Module, inputs: dict, timestep=499) -> torch.Tensor:
    with torch.no_grad():
        return model(timestep=timestep, **inputs).sample


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Tiny models run faster, and with far less jitter, on one thread than on two."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module", params=list(CONFIGS))
def pair(request):
    ref = _build_ref(request.param)
    ours = UNet2DConditionModel(UNetConfig.from_diffusers(dict(ref.config))).eval()
    ours.load_state_dict(ref.state_dict(), strict=True)
    return ref, ours


def test_same_keys_and_shapes(pair):
    ref, ours = pair
    ref_sd, our_sd = ref.state_dict(), ours.state_dict()
    assert sorted(our_sd) == sorted(ref_sd)
    assert {k: tuple(v.shape) for k, v in our_sd.items()} == {k: tuple(v.shape) for k, v in ref_sd.items()}


def test_forward_matches(pair):
    """Per-sample timesteps (1-d tensor of length B), dict and tuple outputs."""
    ref, ours = pair
    inputs = _inputs(ref)
    t = torch.tensor([999, 19])
    out = _run(ours, inputs, t)
    assert_close_to_reference(out, _run(ref, inputs, t), atol=ATOL, what="UNet sample")
    with torch.no_grad():
        as_tuple = ours(timestep=t, return_dict=False, **inputs)
    assert isinstance(as_tuple, tuple) and len(as_tuple) == 1
    torch.testing.assert_close(as_tuple[0], out, atol=0, rtol=0)


@pytest.mark.parametrize(
    "timestep",
    [999, 499.5, torch.tensor(259), torch.tensor([759])],
    ids=["int", "float", "0d", "1d_len1"],
)
def test_timestep_forms_match(timestep):
    """A python int or float, a 0-d tensor, or a 1-element tensor is broadcast to the batch as diffusers does."""
    ref = _build_ref("lcm_fast")
    ours = UNet2DConditionModel(UNetConfig.from_diffusers(dict(ref.config))).eval()
    ours.load_state_dict(ref.state_dict(), strict=True)
    inputs = _inputs(ref, 8, 8)
    assert_close_to_reference(
        _run(ours, inputs, timestep), _run(ref, inputs, timestep), atol=ATOL, what="UNet sample"
    )


def test_odd_latent_size(pair):
    """Sizes that are not multiples of 2**(levels-1) make the encoder round up and the decoder follow the skips."""
    ref, ours = pair
    size = (18, 14) if len(ref.config.block_out_channels) == 3 else (9, 13)
    inputs = _inputs(ref, *size)
    out = _run(ours, inputs)
    b, _, h, w = inputs["sample"].shape
    assert out.shape == (b, ref.config.out_channels, h, w)
    assert_close_to_reference(out, _run(ref, inputs), atol=ATOL, what="UNet sample")


def test_freeu_matches_and_disables(pair):
    ref, ours = pair
    inputs = _inputs(ref, 12, 10)  # not powers of two: the float32 FFT path
    plain = _run(ours, inputs)
    ref.enable_freeu(**FREEU)
    ours.enable_freeu(**FREEU)
    try:
        with_freeu = _run(ours, inputs)
        assert_close_to_reference(with_freeu, _run(ref, inputs), atol=ATOL, what="UNet sample")
    finally:
        ref.disable_freeu()
        ours.disable_freeu()
    assert (with_freeu - plain).abs().max() > 1e-3, "FreeU changed nothing"
    for block in ours.up_blocks:
        assert all(getattr(block, k) is None for k in ("s1", "s2", "b1", "b2"))
    assert_close_to_reference(_run(ours, inputs), plain, atol=ATOL, what="UNet sample")


def test_diffusers_folder_loads_and_ours_saves_for_diffusers(tmp_path):
    """diffusers `save_pretrained` -> our `from_pretrained`, and ours `save_pretrained` -> diffusers `from_pretrained`."""
    ref = _build_ref("sd2")
    ref.save_pretrained(tmp_path / "ref")
    ours = UNet2DConditionModel.from_pretrained(tmp_path / "ref")
    inputs = _inputs(ref, 8, 8)
    assert_close_to_reference(_run(ours, inputs), _run(ref, inputs), atol=ATOL, what="UNet sample")

    ours.save_pretrained(tmp_path / "ours")
    back = diffusers.UNet2DConditionModel.from_pretrained(tmp_path / "ours").eval()
    assert_close_to_reference(_run(back, inputs), _run(ref, inputs), atol=ATOL, what="UNet sample")


@pytest.mark.parametrize("name", ["sd15", "lcm_fast"])
def test_bfloat16_matches(name):
    """Same ops in the same order: bf16 outputs agree to one bf16 rounding step of the output's magnitude."""
    ref = _build_ref(name)
    ours = UNet2DConditionModel(UNetConfig.from_diffusers(dict(ref.config))).eval()
    ours.load_state_dict(ref.state_dict(), strict=True)
    ref, ours = ref.to(torch.bfloat16), ours.to(torch.bfloat16)
    inputs = {k: v.to(torch.bfloat16) for k, v in _inputs(ref, 12, 10).items()}
    ours.enable_freeu(**FREEU)
    ref.enable_freeu(**FREEU)
    expected = _run(ref, inputs).float()
    assert_close_to_reference(_run(ours, inputs).float(), expected, atol=2e-2)


def test_bfloat16_upcast_attention_near_float32():
    """With `upcast_attention`, we run attention in float32 under bf16; diffusers' default SDPA processor
    ignores the flag, so here both bf16 runs are held against the float32 output instead of each other."""
    ref = _build_ref("sd2")
    ours = UNet2DConditionModel(UNetConfig.from_diffusers(dict(ref.config))).eval()
    ours.load_state_dict(ref.state_dict(), strict=True)
    inputs = _inputs(ref)
    expected = _run(ref, inputs)
    ours = ours.to(torch.bfloat16)
    out = _run(ours, {k: v.to(torch.bfloat16) for k, v in inputs.items()}).float()
    assert_close_to_reference(out, expected, atol=0.1)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("size", [(8, 8), (6, 10), (1, 3)], ids=["pow2", "non_pow2", "tiny"])
def test_freeu_functions_match(dtype, size):
    """`fourier_filter` and `apply_freeu` against diffusers' `utils.torch_utils` versions, all stages."""
    gen = torch.Generator().manual_seed(3)
    x = torch.randn(2, 6, *size, generator=gen).to(dtype)
    assert_close_to_reference(
        fourier_filter(x, threshold=1, scale=0.3), ref_fourier_filter(x, threshold=1, scale=0.3), atol=ATOL
    )
    for idx in range(3):
        h = torch.randn(2, 5, *size, generator=gen).to(dtype)
        skip = torch.randn(2, 3, *size, generator=gen).to(dtype)
        ours = apply_freeu(idx, h, skip, **FREEU)
        expected = ref_apply_freeu(idx, h.clone(), skip, **FREEU)
        for a, b in zip(ours, expected, strict=True):
            assert a.dtype == b.dtype
            assert_close_to_reference(a, b, atol=ATOL, what="UNet sample")
