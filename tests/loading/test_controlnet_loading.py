"""Loading ControlNets: diffusers folders, original single files (lllyasviel's layout), bad files, and the refusal
of a ControlNet built for another base model (named by file, the pipeline left as it was).

The single files are written from a tiny diffusers ControlNet by `helpers.original_layout.controlnet_to_original`
(a mapping written independently of lcmkit's loader) and must load to exactly the folder's weights.
"""

from __future__ import annotations

import pytest
import torch
from helpers.original_layout import controlnet_to_original, save_original
from helpers.reference import assert_close_to_reference
from helpers.tiny_controlnet import save_diffusers_controlnet

from lcmkit import LatentConsistencyModelPipeline
from lcmkit.io.errors import ModelFileError
from lcmkit.loading.controlnet import ControlNetModel, load_controlnet

pytest.importorskip("diffusers")

# SD 1.x's fixed facts (8 heads, 32 GroupNorm groups) that a single file cannot record
SD1_LIKE = dict(norm_num_groups=32, attention_head_dim=8)


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return save_diffusers_controlnet(tmp_path_factory.mktemp("cn_sd1"), seed=3, **SD1_LIKE)


def _outputs(net):
    gen = torch.Generator().manual_seed(0)
    x, context = torch.randn(1, 4, 8, 8, generator=gen), torch.randn(1, 5, 32, generator=gen)
    cond = torch.rand(1, 3, 16, 16, generator=gen)
    with torch.no_grad():
        down, mid = net(x, 500, context, cond, return_dict=False)
    return [*down, mid]


@pytest.mark.parametrize(
    "name, prefix", [("control_sd15_tiny.safetensors", "control_model."), ("control_sd15_tiny.pth", "")]
)
def test_single_file_loads_equal_to_the_folder(folder, tmp_path, name, prefix):
    from_folder = ControlNetModel.from_pretrained(folder)
    sd = controlnet_to_original(dict(from_folder.state_dict()), layers=2, prefix=prefix)
    assert any(k.startswith(f"{prefix}input_hint_block.") for k in sd)
    path = save_original(sd, tmp_path / name)
    from_file = ControlNetModel.from_single_file(path)
    assert from_file.config.block_out_channels == from_folder.config.block_out_channels
    assert from_file.config.conditioning_embedding_out_channels == (8, 16)
    ours, theirs = from_file.state_dict(), from_folder.state_dict()
    assert ours.keys() == theirs.keys()
    for key in theirs:
        assert torch.equal(ours[key], theirs[key]), key
    for a, b in zip(_outputs(from_file), _outputs(from_folder), strict=True):
        # equal weights; a memory-mapped file and a read one may take different conv paths (~1e-6 on values near 1)
        assert_close_to_reference(a, b, atol=1e-5, what="residual")
    assert from_file.name_or_path == str(path)
    assert isinstance(load_controlnet(path), ControlNetModel)  # load_controlnet tells a file from a folder


def test_not_a_controlnet_file_is_refused_by_name(tmp_path):
    path = save_original(
        {"model.diffusion_model.input_blocks.0.0.weight": torch.zeros(4, 4, 3, 3)}, tmp_path / "x.safetensors"
    )
    with pytest.raises(ModelFileError, match="x.safetensors.*original ControlNet"):
        load_controlnet(path)
    with pytest.raises(ModelFileError, match="neither a ControlNet folder"):
        load_controlnet(tmp_path / "missing")


def test_controlnet_for_another_base_is_refused_and_the_pipeline_is_unchanged(tiny_folders, tmp_path):
    pipe = LatentConsistencyModelPipeline.from_pretrained(tiny_folders["sd15"])
    fits = load_controlnet(save_diffusers_controlnet(tmp_path / "fits"))
    pipe.controlnet = fits
    # an SD 2.x-like ControlNet: 1024-wide text, other widths
    other = save_diffusers_controlnet(
        tmp_path / "sd2_controlnet", cross_attention_dim=48, block_out_channels=(32, 32)
    )
    wrong = load_controlnet(other)
    with pytest.raises(ModelFileError, match=r"sd2_controlnet.*another base model.*cross_attention_dim 48"):
        pipe.controlnet = wrong
    assert pipe.controlnet is fits
    with pytest.raises(ModelFileError, match="sd2_controlnet"):
        pipe.controlnet = [fits, wrong]
    assert pipe.controlnet is fits
    with pytest.raises(ModelFileError, match="sd2_controlnet"):
        LatentConsistencyModelPipeline.from_pretrained(tiny_folders["sd15"], controlnet=wrong)


def test_sdxl_controlnet_config_is_refused_naming_the_file(tmp_path):
    folder = save_diffusers_controlnet(tmp_path / "xl")
    config = (folder / "config.json").read_text()
    (folder / "config.json").write_text(
        config.replace('"addition_embed_type": null', '"addition_embed_type": "text_time"')
    )
    with pytest.raises(ModelFileError, match=r"xl.config\.json.*addition_embed_type"):
        load_controlnet(folder)


def test_hub_id_offline_gives_the_hub_loader_error(monkeypatch, tmp_path):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path))
    with pytest.raises(FileNotFoundError, match="lllyasviel/control_v11p_sd15_canny"):
        load_controlnet("lllyasviel/control_v11p_sd15_canny", cache_dir=tmp_path)


def test_save_pretrained_round_trips_through_diffusers(folder, tmp_path):
    import diffusers

    ours = ControlNetModel.from_pretrained(folder)
    ours.save_pretrained(tmp_path / "saved")
    theirs = diffusers.ControlNetModel.from_pretrained(tmp_path / "saved")
    for key, value in theirs.state_dict().items():
        assert torch.equal(value, ours.state_dict()[key]), key
    assert theirs.config.layers_per_block == 2
    assert tuple(theirs.config.conditioning_embedding_out_channels) == (8, 16)
