"""Loading IP-Adapter files: the layer order the files use, and refusals.

A file that does not fit the UNet (another cross-attention width as in an SDXL adapter, another number of attention
layers, a wrong shape, an unknown projection, NaN) raises a ModelFileError naming the file, and the pipeline is left
as it was: its images are bitwise the same before and after the refused load, with or without an adapter loaded.
"""

from __future__ import annotations

import numpy as np
import PIL.Image
import pytest
import torch
from helpers.tiny_ip_adapter import (
    attention_weights,
    ip_state_dict,
    plain_image_proj,
    save_image_encoder,
    save_ip_adapter,
)

from lcmkit import LatentConsistencyModelPipeline
from lcmkit.io.errors import ModelFileError
from lcmkit.loading.ip_adapter import cross_attentions


def picture() -> PIL.Image.Image:
    return PIL.Image.fromarray(np.random.RandomState(0).randint(0, 256, (32, 32, 3), dtype=np.uint8))


@pytest.fixture(scope="module")
def pipe(tiny_folders):
    p = LatentConsistencyModelPipeline.from_pretrained(tiny_folders["sd15"])
    p.set_progress_bar_config(disable=True)
    return p


@pytest.fixture(scope="module")
def encoder_folder(tmp_path_factory):
    folder = tmp_path_factory.mktemp("ipenc")
    save_image_encoder(folder / "image_encoder")
    return folder


def test_cross_attention_order_is_the_reference_processor_order(pipe, tiny_folders):
    """N = 1, 3, 5, ... of the files are diffusers' attn_processors (down, up, mid) with attn2 at odd places."""
    from diffusers import UNet2DConditionModel

    ref = UNet2DConditionModel.from_pretrained(tiny_folders["sd15"] / "unet")
    names = [n.removesuffix(".processor") for n in ref.attn_processors]
    ours = [name for name, _ in cross_attentions(pipe.unet)]
    assert ours == names[1::2]
    assert all(n.endswith("attn1") for n in names[0::2])


def _bad_files():
    gen = torch.Generator().manual_seed(3)
    good = ip_state_dict("plain")
    sdxl_like = {
        "image_proj": plain_image_proj(gen, cross_dim=64),
        "ip_adapter": attention_weights(gen, cross_dim=64),
    }
    fewer = {"image_proj": good["image_proj"], "ip_adapter": attention_weights(gen, channels=(32,) * 5)}
    wrong_shape = {"image_proj": good["image_proj"], "ip_adapter": dict(good["ip_adapter"])}
    wrong_shape["ip_adapter"]["11.to_v_ip.weight"] = torch.zeros(32, 32)  # the mid block is 64 wide
    nan = {"image_proj": dict(good["image_proj"]), "ip_adapter": good["ip_adapter"]}
    nan["image_proj"]["norm.bias"] = torch.full((32,), float("nan"))
    unknown = {"image_proj": {"proj.0.weight": torch.zeros(8, 16)}, "ip_adapter": good["ip_adapter"]}
    faceid = {"image_proj": good["image_proj"], "ip_adapter": {**good["ip_adapter"], "1.to_k_lora.down.weight": torch.zeros(1, 32)}}  # fmt: skip
    return {
        "sdxl_like": (sdxl_like, "width 64"),
        "fewer_layers": (fewer, "5 attention layers"),
        "wrong_shape": (wrong_shape, "ip_adapter.11.to_v_ip.weight"),
        "nan": (nan, "non-finite"),
        "unknown_projection": (unknown, "unknown IP-Adapter image projection"),
        "faceid_lora": (faceid, "to_k_lora"),
    }


@pytest.mark.parametrize("case", list(_bad_files()))
@pytest.mark.parametrize("suffix", [".safetensors", ".bin"])
@pytest.mark.parametrize("loaded_first", [False, True])
def test_bad_file_is_refused_and_pipeline_unchanged(
    pipe, encoder_folder, tmp_path, case, suffix, loaded_first
):
    groups, words = _bad_files()[case]
    path = save_ip_adapter(tmp_path / f"{case}{suffix}", groups)
    good = save_ip_adapter(encoder_folder / "good.safetensors", ip_state_dict("plain"))
    pipe.unload_ip_adapter()
    kwargs = {}
    if loaded_first:
        pipe.load_ip_adapter(encoder_folder, weight_name=good.name)
        pipe.set_ip_adapter_scale(0.6)
        kwargs = {"ip_adapter_image": picture()}
    call = dict(num_inference_steps=1, output_type="np", **kwargs)
    before = pipe("a dog", generator=torch.Generator().manual_seed(0), **call).images
    with pytest.raises(ModelFileError, match=words) as info:
        pipe.load_ip_adapter(tmp_path, weight_name=path.name, image_encoder_folder=None)
    assert str(path.absolute()) in str(info.value)
    after = pipe("a dog", generator=torch.Generator().manual_seed(0), **call).images
    assert np.array_equal(before, after)
    assert (pipe.unet.image_proj is not None) == loaded_first
    pipe.unload_ip_adapter()


def test_missing_file_and_missing_encoder(pipe, tmp_path):
    with pytest.raises(FileNotFoundError, match="ip-adapter_sd15"):
        pipe.load_ip_adapter(tmp_path)
    save_ip_adapter(tmp_path / "ip-adapter_sd15.safetensors", ip_state_dict("plain"))
    with pytest.raises(ModelFileError, match="no image encoder"):
        pipe.load_ip_adapter(tmp_path)
    assert pipe.unet.image_proj is None
    pipe.load_ip_adapter(tmp_path, image_encoder_folder=None)  # embeds only
    with pytest.raises(ValueError, match="image encoder"):
        pipe("a dog", num_inference_steps=1, output_type="np", ip_adapter_image=picture())
    pipe.unload_ip_adapter()


def test_state_dict_source(pipe):
    groups = ip_state_dict("plain")
    with pytest.raises(ValueError, match="image encoder cannot be loaded from a state dict"):
        pipe.load_ip_adapter(groups)
    pipe.load_ip_adapter(groups, image_encoder_folder=None)
    flat = {f"{g}.{k}": v for g, sd in groups.items() for k, v in sd.items()}
    pipe.load_ip_adapter(flat, image_encoder_folder=None)  # the flattened (safetensors) layout too
    assert pipe.ip_adapter_loaded
    pipe.unload_ip_adapter()


def test_hub_id_fetches_the_file_and_the_encoder(pipe, tmp_path, monkeypatch):
    """A hub id goes through lcmkit's hub loader (stubbed here: no network in tests) for the adapter file in
    `subfolder`, and for the encoder's config and weights in `subfolder/image_encoder`, as h94/IP-Adapter lays out."""
    import lcmkit.loading.ip_adapter as ip_module

    repo = tmp_path / "snapshot"
    save_image_encoder(repo / "models" / "image_encoder")
    save_ip_adapter(repo / "models" / "ip-adapter_sd15.safetensors", ip_state_dict("plain"))
    asked = []

    def fake_hub_file(repo_id, filename, subfolder=None, **kwargs):
        asked.append((repo_id, subfolder, filename))
        path = repo / (subfolder or "") / filename
        if not path.is_file():
            raise FileNotFoundError(path)
        return path

    monkeypatch.setattr(ip_module, "hub_file", fake_hub_file)
    pipe.load_ip_adapter("h94/IP-Adapter", subfolder="models", weight_name="ip-adapter_sd15.safetensors")
    assert asked[0] == ("h94/IP-Adapter", "models", "ip-adapter_sd15.safetensors")
    assert ("h94/IP-Adapter", "models/image_encoder", "config.json") in asked
    assert ("h94/IP-Adapter", "models/image_encoder", "model.safetensors") in asked
    assert pipe.ip_adapter_loaded and pipe.image_encoder is not None
    pipe.unload_ip_adapter()
