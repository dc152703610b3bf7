"""lcmkit's single-file loader: configs read off the tensors, pickles, the packaged tokenizer, and clear errors.

Original-layout files are written in the test from tiny diffusers modules (`helpers/original_layout.py`, a
hand-written inverse mapping independent of lcmkit). Image parity with diffusers is in
`parity/test_single_file_parity.py`; here the weights themselves are compared, exactly.
"""

from __future__ import annotations

import copy
import dataclasses
import logging
import pickle
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers.original_layout import original_state_dict, save_original
from helpers.tiny_models import DIFFUSERS_SD1_MINIATURE_UNET, DIFFUSERS_SD1_MINIATURE_VAE
from safetensors.torch import save_file

from lcmkit import LatentConsistencyModelPipeline, UNetConfig, VAEConfig
from lcmkit.loading import single_file as sf
from lcmkit.loading.weights import WeightsError, check_keys

ASSETS = Path(sf.__file__).resolve().parents[1] / "assets" / sf.TOKENIZER_ASSET
# ids from OpenAI CLIP's own tokenizer (checked against open_clip's SimpleTokenizer when the files were made)
KNOWN_IDS = {
    "a photo of a cat": [49406, 320, 1125, 539, 320, 2368, 49407],
    "An astronaut riding a horse on Mars, 4k, highly detailed!!": [
        49406, 550, 18376, 6765, 320, 4558, 525, 7496, 267, 275, 330, 267, 5302, 12609, 748, 49407,
    ],
    "café déjà vu — naïve façade": [49406, 15304, 25466, 73, 21259, 13230, 2005, 1097, 35689, 563, 778, 10067, 1928, 49407],
}  # fmt: skip


def tiny_modules() -> dict:
    """SD 1.x in miniature (4-level UNet with LCM's w-embedding, 3-level VAE, 2-layer CLIP text tower)."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    torch.manual_seed(0)
    unet = UNet2DConditionModel(**DIFFUSERS_SD1_MINIATURE_UNET)
    vae = AutoencoderKL(**DIFFUSERS_SD1_MINIATURE_VAE)
    text_encoder = CLIPTextModel(
        CLIPTextConfig(
            vocab_size=1000,
            hidden_size=64,
            intermediate_size=128,
            num_hidden_layers=3,
            num_attention_heads=1,
            max_position_embeddings=77,
            hidden_act="quick_gelu",
        )
    )
    return {"unet": unet.eval(), "vae": vae.eval(), "text_encoder": text_encoder.eval()}


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    modules = tiny_modules()
    sd = original_state_dict(**modules)
    path = save_original(sd, tmp_path_factory.mktemp("single") / "tiny.safetensors")
    return modules, sd, path


def assert_same_weights(ours: torch.nn.Module, ref: torch.nn.Module) -> None:
    a, b = ours.state_dict(), ref.state_dict()
    assert set(a) == set(b)
    bad = [k for k in b if not torch.equal(a[k].to(b[k].dtype), b[k])]
    assert not bad, f"{len(bad)} tensors differ: {bad[:4]}"


def part(sd: dict, prefix: str) -> dict:
    return {k[len(prefix) :]: v for k, v in sd.items() if k.startswith(prefix)}


# ----------------------------------------------------------------------------------------------------------------------
# Configs from the tensors


def test_inferred_configs_equal_the_diffusers_configs(tiny):
    """Levels, widths, layers, attention levels, context width and w-embedding size all come from the tensors."""
    modules, sd, _ = tiny
    unet_cfg = sf.infer_unet_config(part(sd, sf.UNET_PREFIX), sample_size=16)
    assert unet_cfg == UNetConfig.from_diffusers(dict(modules["unet"].config))
    assert unet_cfg.time_cond_proj_dim == 32 and unet_cfg.up_attention == (False, True, True, True)
    vae_cfg = sf.infer_vae_config(part(sd, sf.VAE_PREFIX))
    expected = VAEConfig.from_diffusers(dict(modules["vae"].config))
    assert vae_cfg == dataclasses.replace(expected, sample_size=sf.SD1_IMAGE_SIZE)
    text_cfg = sf.infer_text_config(part(sd, sf.TEXT_PREFIX + "text_model."))
    ref = modules["text_encoder"].config
    for key in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads"):
        assert getattr(text_cfg, key) == getattr(ref, key), key
    assert text_cfg.hidden_act == "quick_gelu"


def test_clip_vit_l14_text_config_is_sd15s():
    """The public CLIP ViT-L/14 text-tower facts that SD 1.x's text_encoder/config.json also states."""
    cfg = sf.clip_vit_l14_text_config()
    assert (cfg.vocab_size, cfg.hidden_size, cfg.intermediate_size) == (49408, 768, 3072)
    assert (cfg.num_hidden_layers, cfg.num_attention_heads, cfg.max_position_embeddings) == (12, 12, 77)
    assert cfg.hidden_act == "quick_gelu" and cfg.layer_norm_eps == 1e-5


def test_unet_key_map_covers_every_original_key(tiny):
    """The generated map claims every UNet key of the file and lands on exactly our UNet's parameter names."""
    modules, sd, _ = tiny
    unet_sd = part(sd, sf.UNET_PREFIX)
    config = sf.infer_unet_config(unet_sd)
    translated = sf.translate(unet_sd, sf.unet_key_map(config), "UNet")
    assert set(translated) == set(modules["unet"].state_dict())


def test_full_size_sd15_lcm_layout_on_meta_device():
    """At real SD 1.5 size (built on the meta device, no memory): the inferred configs are SD 1.5's, and every
    original key lands on our UNet's and VAE's parameters with the right shapes; the text keys fit ViT-L/14."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextModel

    from lcmkit.models.unet import UNet2DConditionModel as OurUNet
    from lcmkit.models.vae import AutoencoderKL as OurVAE

    with torch.device("meta"):
        unet = UNet2DConditionModel(cross_attention_dim=768, time_cond_proj_dim=256)
        vae = AutoencoderKL(
            block_out_channels=[128, 256, 512, 512],
            down_block_types=["DownEncoderBlock2D"] * 4,
            up_block_types=["UpDecoderBlock2D"] * 4,
            layers_per_block=2,
            sample_size=512,
        )
        text = CLIPTextModel(sf.clip_vit_l14_text_config())
    sd = original_state_dict(unet, vae, text)
    unet_cfg = sf.infer_unet_config(part(sd, sf.UNET_PREFIX))
    assert unet_cfg == UNetConfig.from_diffusers({**unet.config, "sample_size": 64})
    assert unet_cfg.block_out_channels == (320, 640, 1280, 1280) and unet_cfg.heads == (8, 8, 8, 8)
    vae_cfg = sf.infer_vae_config(part(sd, sf.VAE_PREFIX))
    assert vae_cfg == VAEConfig.from_diffusers(dict(vae.config))
    with torch.device("meta"):
        ours = {"unet": OurUNet(unet_cfg), "vae": OurVAE(vae_cfg)}
    check_keys(
        ours["unet"], sf.translate(part(sd, sf.UNET_PREFIX), sf.unet_key_map(unet_cfg), "UNet"), "unet"
    )
    vae_sd = sf.translate(part(sd, sf.VAE_PREFIX), sf.vae_key_map(vae_cfg), "VAE")
    check_keys(ours["vae"], sf.linear_from_conv(vae_sd), "vae")
    text_sd = part(sd, sf.TEXT_PREFIX + "text_model.")
    assert sf.infer_text_config(text_sd).to_dict() == sf.clip_vit_l14_text_config().to_dict()


# ----------------------------------------------------------------------------------------------------------------------
# Loading


def test_from_single_file_loads_exact_weights_and_packaged_tokenizer(tiny, tmp_path, caplog):
    """Every tensor lands where diffusers has it (an fp16 file becomes float32 by default); DDPM buffers are skipped
    without a warning; the tokenizer is the packaged CLIP one; the scheduler has SD's betas."""
    modules, sd, _ = tiny
    half = {k: v.half() if v.is_floating_point() else v for k, v in sd.items()}
    with caplog.at_level(logging.WARNING, logger="lcmkit.loading.single_file"):
        pipe = LatentConsistencyModelPipeline.from_single_file(
            save_original(half, tmp_path / "half.safetensors")
        )
    assert not caplog.records
    assert pipe.unet.dtype == torch.float32 and pipe.text_encoder.dtype == torch.float32
    for name, module in modules.items():
        assert_same_weights(getattr(pipe, name), copy.deepcopy(module).half().float())
    assert pipe.tokenizer("a photo of a cat").input_ids == KNOWN_IDS["a photo of a cat"]
    assert pipe.scheduler.config.beta_schedule == "scaled_linear"
    assert pipe.scheduler.config.prediction_type == "epsilon"
    assert pipe.safety_checker is None and pipe.requires_safety_checker is False
    assert pipe.unet.config.sample_size == sf.SD1_IMAGE_SIZE // 4  # 512 px through this 3-level VAE


def test_ckpt_pickle_old_text_layout_and_dtype(tmp_path):
    """A `.ckpt` (torch pickle, `state_dict` inside) with the pre-`text_model.` text keys; `dtype` (the newer
    spelling of torch_dtype) casts; `local_files_only` is accepted as in diffusers."""
    modules = tiny_modules()
    path = save_original(original_state_dict(**modules, with_text_model=False), tmp_path / "old.ckpt")
    pipe = LatentConsistencyModelPipeline.from_single_file(
        path, dtype=torch.bfloat16, prediction_type="v_prediction", local_files_only=True
    )
    assert pipe.unet.dtype == torch.bfloat16 and pipe.vae.dtype == torch.bfloat16
    assert pipe.text_encoder.dtype == torch.bfloat16
    assert pipe.scheduler.config.prediction_type == "v_prediction"
    for name, module in modules.items():
        assert_same_weights(getattr(pipe, name), module.to(torch.bfloat16))


def test_config_folder_and_component_overrides(tiny_folders, tmp_path):
    """`config=` a diffusers folder (here 4 heads and 8 GroupNorm groups, which no tensor reveals) gives the same
    pipeline as from_pretrained on that folder; a component passed in replaces the file's."""
    import diffusers

    folder = tiny_folders["sd15"]
    ref = diffusers.LatentConsistencyModelPipeline.from_pretrained(folder)
    path = save_original(original_state_dict(ref.unet, ref.vae, ref.text_encoder), tmp_path / "x.safetensors")
    ours = LatentConsistencyModelPipeline.from_single_file(path, config=folder)
    again = LatentConsistencyModelPipeline.from_pretrained(folder)
    for name in ("unet", "vae", "text_encoder"):
        assert_same_weights(getattr(ours, name), getattr(again, name))
    assert ours.unet.config == again.unet.config
    assert ours.tokenizer.get_vocab() == again.tokenizer.get_vocab()
    kwargs = dict(num_inference_steps=2, output_type="np", height=32, width=32)
    ours.set_progress_bar_config(disable=True)
    again.set_progress_bar_config(disable=True)
    a = ours("a cat", generator=torch.Generator().manual_seed(0), **kwargs).images
    b = again("a cat", generator=torch.Generator().manual_seed(0), **kwargs).images
    # The weights are bitwise the same (above), but memory-mapped from two files at different offsets: on some CPUs
    # (seen on an AMD EPYC with AVX2) the GEMM kernels round misaligned operands differently, about 3e-7 here
    np.testing.assert_allclose(a, b, rtol=0, atol=1e-6)
    swapped = LatentConsistencyModelPipeline.from_single_file(path, config=folder, vae=again.vae)
    assert swapped.vae is again.vae


# ----------------------------------------------------------------------------------------------------------------------
# Safety and errors


class _Marker:
    """Unpickling this calls `open(path, "w")`, which creates a file: code run by loading."""

    def __init__(self, path: Path) -> None:
        self.path = str(path)

    def __reduce__(self):
        return (open, (self.path, "w"))


def test_pickle_that_runs_code_is_refused(tmp_path):
    """weights_only=True refuses the pickle with a clear error, and the code never runs (no marker file)."""
    marker = tmp_path / "pwned"
    evil = tmp_path / "evil.ckpt"
    torch.save({"state_dict": {"model.diffusion_model.x": _Marker(marker)}}, str(evil))
    with pytest.raises(WeightsError, match="could not be loaded safely"):
        LatentConsistencyModelPipeline.from_single_file(evil)
    assert not marker.exists()
    # the pickle is live: an unsafe load would have run it
    proof = tmp_path / "proof"
    with open(evil, "wb") as f:
        pickle.dump({"x": _Marker(proof)}, f)
    with open(evil, "rb") as f:
        pickle.load(f)["x"].close()  # deliberate, in a temp folder
    assert proof.exists()


def test_lora_file_names_what_was_expected(tmp_path):
    path = tmp_path / "lcm-lora.safetensors"
    save_file(
        {
            "lora_unet_down_blocks_0_attentions_0_proj_in.lora_down.weight": torch.zeros(4, 32),
            "lora_unet_down_blocks_0_attentions_0_proj_in.lora_up.weight": torch.zeros(32, 4),
        },
        str(path),
    )
    with pytest.raises(sf.SingleFileError, match=r"model\.diffusion_model\..*LoRA.*load_lora_weights"):
        LatentConsistencyModelPipeline.from_single_file(path)


def test_non_checkpoints_and_bad_paths(tmp_path):
    other = tmp_path / "other.safetensors"
    save_file({"foo.weight": torch.zeros(2)}, str(other))
    with pytest.raises(
        sf.SingleFileError,
        match=r"does not look like an original Stable Diffusion checkpoint.*first_stage_model\.",
    ):
        LatentConsistencyModelPipeline.from_single_file(other)
    with pytest.raises(sf.SingleFileError, match="not found"):
        LatentConsistencyModelPipeline.from_single_file(tmp_path / "missing.safetensors")
    with pytest.raises(sf.SingleFileError, match="URL"):
        LatentConsistencyModelPipeline.from_single_file("https://example.com/model.safetensors")
    (tmp_path / "model.txt").write_text("x")
    with pytest.raises(sf.SingleFileError, match=r"\.safetensors"):
        LatentConsistencyModelPipeline.from_single_file(tmp_path / "model.txt")
    with pytest.raises(TypeError, match="original_config"):
        LatentConsistencyModelPipeline.from_single_file(other, original_config="v1-inference.yaml")


def test_sd2_files_are_refused_clearly(tiny):
    """OpenCLIP text towers (cond_stage_model.model.*) and 1024-wide contexts mean SD 2.x: a clear error."""
    _, sd, _ = tiny
    with pytest.raises(
        sf.SingleFileError, match="SD 2.x single files with OpenCLIP text towers are not supported"
    ):
        sf.split_checkpoint({**sd, "cond_stage_model.model.token_embedding.weight": torch.zeros(2, 2)}, "f")
    unet_sd = part(sd, sf.UNET_PREFIX)
    wide = {k: torch.zeros(v.shape[0], 1024) if k.endswith(("attn2.to_k.weight", "attn2.to_v.weight")) else v
            for k, v in unet_sd.items()}  # fmt: skip
    with pytest.raises(sf.SingleFileError, match="SD 2.x"):
        sf.infer_unet_config(wide)


def test_missing_and_unknown_keys_are_named(tiny):
    _, sd, _ = tiny
    unet_sd = part(sd, sf.UNET_PREFIX)
    config = sf.infer_unet_config(unet_sd)
    missing = {k: v for k, v in unet_sd.items() if k != "out.2.bias"}
    with pytest.raises(WeightsError, match=r"1 missing keys: conv_out\.bias"):
        sf.build_unet(missing, config, "f", torch.float32)
    extra = {**unet_sd, "input_blocks.1.2.weight": torch.zeros(1)}
    with pytest.raises(sf.SingleFileError, match=r"input_blocks\.1\.2\.weight"):
        sf.build_unet(extra, config, "f", torch.float32)
    no_vae = {k: v for k, v in sd.items() if not k.startswith(sf.VAE_PREFIX)}
    parts = sf.split_checkpoint(no_vae, "f")
    assert parts["vae"] == {} and parts["unet"]


def test_text_encoder_keys_for_both_transformers_layouts():
    """transformers 4.x models name CLIP weights `text_model.*`, 5.x without; position_ids is never a weight."""
    sd = {
        "text_model.embeddings.position_ids": torch.arange(3),
        "text_model.final_layer_norm.weight": torch.ones(2),
    }
    assert list(sf.text_encoder_state_dict(sd, with_text_model=True)) == [
        "text_model.final_layer_norm.weight"
    ]
    assert list(sf.text_encoder_state_dict(sd, with_text_model=False)) == ["final_layer_norm.weight"]


# ----------------------------------------------------------------------------------------------------------------------
# The packaged tokenizer


def test_packaged_tokenizer_files_load_offline_with_known_ids(monkeypatch):
    """The shipped vocab.json / merges.txt load with transformers' CLIPTokenizer (network off) and give CLIP's ids."""
    from transformers import CLIPTokenizer

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    names = {p.name for p in ASSETS.iterdir()}
    assert {"vocab.json", "merges.txt", "tokenizer_config.json", "special_tokens_map.json"} <= names
    for tokenizer in (
        CLIPTokenizer.from_pretrained(ASSETS, local_files_only=True),
        sf.load_packaged_tokenizer(),
    ):
        assert len(tokenizer) == 49408 and tokenizer.model_max_length == 77
        assert tokenizer.pad_token_id == tokenizer.eos_token_id == 49407
        for prompt, ids in KNOWN_IDS.items():
            assert tokenizer(prompt).input_ids == ids, prompt
