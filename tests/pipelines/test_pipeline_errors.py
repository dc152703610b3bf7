"""Bad input gets a clear error that names what was wrong (and what is allowed)."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch

from lcmkit import LatentConsistencyModelImg2ImgPipeline, LatentConsistencyModelPipeline
from lcmkit.loading.folders import PipelineFolderError
from lcmkit.loading.weights import WeightsError


@pytest.fixture(scope="module")
def t2i(tiny_folders):
    pipe = LatentConsistencyModelPipeline.from_pretrained(tiny_folders["sd15"])
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.fixture(scope="module")
def i2i(t2i):
    return LatentConsistencyModelImg2ImgPipeline.from_pipe(t2i)


def test_height_width_not_divisible_by_8(t2i):
    with pytest.raises(ValueError, match=r"divisible by 8 but are 36 and 32"):
        t2i("x", height=36, width=32)


def test_prompt_and_embeds_both_or_neither(t2i):
    embeds = torch.zeros(1, 77, 32)
    with pytest.raises(ValueError, match="Cannot forward both `prompt` and `prompt_embeds`"):
        t2i("x", prompt_embeds=embeds)
    with pytest.raises(ValueError, match="Provide either `prompt` or `prompt_embeds`"):
        t2i()
    with pytest.raises(ValueError, match="has to be of type `str` or `list`"):
        t2i(prompt=3)


def test_generator_list_length(t2i):
    gens = [torch.Generator().manual_seed(i) for i in range(3)]
    with pytest.raises(ValueError, match=r"list of generators of length 3.*batch size of 2"):
        t2i(["a", "b"], generator=gens)


def test_unknown_output_type(t2i):
    with pytest.raises(
        ValueError, match=r"unknown output_type 'jpg'; allowed: \['pil', 'np', 'pt', 'latent'\]"
    ):
        t2i("x", output_type="jpg")


def test_bad_callback_inputs(t2i):
    with pytest.raises(ValueError, match=r"\['noise'\].*allowed"):
        t2i("x", callback_on_step_end=lambda *a: {}, callback_on_step_end_tensor_inputs=["noise"])


def test_steps_beyond_original_steps(t2i):
    with pytest.raises(ValueError, match="original_inference_steps"):
        t2i("x", num_inference_steps=60)


@pytest.mark.parametrize("strength", [-0.1, 1.5])
def test_strength_out_of_range(i2i, strength):
    with pytest.raises(ValueError, match=rf"strength should in \[0.0, 1.0\] but is {strength}"):
        i2i("x", image=np.zeros((1, 32, 32, 3), np.float32), strength=strength)


def test_strength_times_steps_leaves_no_step(i2i):
    """strength 0.05 x 50 original steps = 2 grid points, fewer than the 4 steps asked for."""
    with pytest.raises(ValueError, match=r"smaller than `num_inference_steps`"):
        i2i("x", image=np.zeros((1, 32, 32, 3), np.float32), strength=0.05, num_inference_steps=4)


def test_img2img_without_image(i2i):
    with pytest.raises(ValueError, match="img2img needs an `image`"):
        i2i("x")


def test_unexpected_keyword(t2i):
    with pytest.raises(TypeError, match="denoising_end"):
        t2i("x", denoising_end=0.8)
    with pytest.raises(ValueError, match="need an IP-Adapter"):  # a known argument, without its adapter
        t2i("x", ip_adapter_image="face.png")


def test_long_prompt_truncated_with_warning(t2i, caplog):
    long_prompt = " ".join(["red circle"] * 60)
    with caplog.at_level("WARNING"):
        t2i(long_prompt, num_inference_steps=1, output_type="latent")
    assert any("truncated" in r.getMessage() or "removed" in r.getMessage() for r in caplog.records)


def _copy(folder, tmp_path):
    dst = tmp_path / "pipe"
    shutil.copytree(folder, dst)
    return dst


def test_not_a_folder(tmp_path):
    with pytest.raises(ValueError, match="neither an existing local folder nor a hub repo id"):
        LatentConsistencyModelPipeline.from_pretrained(tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    with pytest.raises(PipelineFolderError, match="has no model_index.json"):
        LatentConsistencyModelPipeline.from_pretrained(tmp_path / "empty")


def test_missing_component_folder(tiny_folders, tmp_path):
    dst = _copy(tiny_folders["sd15"], tmp_path)
    shutil.rmtree(dst / "unet")
    with pytest.raises(PipelineFolderError, match=r"lists `unet`.*does not exist"):
        LatentConsistencyModelPipeline.from_pretrained(dst)


def test_missing_weights_file(tiny_folders, tmp_path):
    dst = _copy(tiny_folders["sd15"], tmp_path)
    for f in (dst / "vae").glob("*.safetensors"):
        f.unlink()
    with pytest.raises(WeightsError, match=r"no weights file in .*vae"):
        LatentConsistencyModelPipeline.from_pretrained(dst)


def test_mismatched_weights(tiny_folders, tmp_path):
    """A UNet config that disagrees with its weights: the error names the missing keys and shape mismatches."""
    dst = _copy(tiny_folders["sd15"], tmp_path)
    cfg_file = dst / "unet" / "config.json"
    cfg = json.loads(cfg_file.read_text())
    cfg["time_cond_proj_dim"] = 64
    cfg["layers_per_block"] = 3
    cfg_file.write_text(json.dumps(cfg))
    with pytest.raises(
        WeightsError, match=r"missing keys: .*shape mismatches: time_embedding.cond_proj.weight"
    ):
        LatentConsistencyModelPipeline.from_pretrained(dst)


def test_corrupt_safetensors(tiny_folders, tmp_path):
    dst = _copy(tiny_folders["sd15"], tmp_path)
    path = dst / "unet" / "diffusion_pytorch_model.safetensors"
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(WeightsError, match=r"not a readable safetensors file"):
        LatentConsistencyModelPipeline.from_pretrained(dst)
