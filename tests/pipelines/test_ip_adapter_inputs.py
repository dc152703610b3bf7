"""IP-Adapter call inputs: each misuse raises a ValueError saying what to do; the fast (OpenVINO) mode refuses
IP-Adapter in both orders (adapter first, or fast mode first) saying it needs exact mode."""

from __future__ import annotations

import numpy as np
import PIL.Image
import pytest
import torch
from helpers.tiny_ip_adapter import ip_state_dict, save_image_encoder, save_ip_adapter

from lcmkit import LatentConsistencyModelPipeline
from lcmkit.runtime import FastPaths


def picture() -> PIL.Image.Image:
    return PIL.Image.fromarray(np.random.RandomState(0).randint(0, 256, (32, 32, 3), dtype=np.uint8))


@pytest.fixture(scope="module")
def ip_folder(tmp_path_factory):
    folder = tmp_path_factory.mktemp("ip")
    save_image_encoder(folder / "image_encoder")
    save_ip_adapter(folder / "ip-adapter_sd15.safetensors", ip_state_dict("plain"))
    return folder


@pytest.fixture()
def pipe(tiny_folders):
    p = LatentConsistencyModelPipeline.from_pretrained(tiny_folders["sd15"])
    p.set_progress_bar_config(disable=True)
    return p


CALL = dict(num_inference_steps=1, output_type="np")


def test_image_prompt_without_adapter(pipe):
    with pytest.raises(ValueError, match="need an IP-Adapter: call load_ip_adapter"):
        pipe("a cat", ip_adapter_image=picture(), **CALL)
    with pytest.raises(ValueError, match="no IP-Adapter is loaded"):
        pipe.set_ip_adapter_scale(0.5)


def test_adapter_without_image_prompt_and_bad_prompts(pipe, ip_folder):
    pipe.load_ip_adapter(ip_folder)
    with pytest.raises(ValueError, match="an IP-Adapter is loaded: pass ip_adapter_image="):
        pipe("a cat", **CALL)
    with pytest.raises(ValueError, match="either ip_adapter_image or ip_adapter_image_embeds"):
        pipe("a cat", ip_adapter_image=picture(), ip_adapter_image_embeds=[torch.zeros(1, 1, 16)], **CALL)
    with pytest.raises(ValueError, match="2 entries for 1 IP-Adapter"):
        pipe("a cat", ip_adapter_image=[picture(), picture()], **CALL)
    with pytest.raises(ValueError, match="runs no classifier-free guidance"):
        pipe("a cat", ip_adapter_image_embeds=[torch.zeros(2, 1, 16)], **CALL)
    with pytest.raises(ValueError, match="must be a 3-d tensor"):
        pipe("a cat", ip_adapter_image_embeds=[torch.zeros(1, 16)], **CALL)
    with pytest.raises(ValueError, match="one number"):
        pipe.set_ip_adapter_scale([0.5, 1.0])
    with pytest.raises(ValueError, match="one IP-Adapter at a time"):
        pipe.load_ip_adapter([ip_folder, ip_folder])
    out = pipe("a cat", ip_adapter_image_embeds=[torch.zeros(1, 1, 16)], **CALL).images
    assert out.shape == (1, 32, 32, 3)


def test_unet_called_without_image_embeds(pipe, ip_folder):
    pipe.load_ip_adapter(ip_folder)
    x, ctx = torch.zeros(1, 4, 8, 8), torch.zeros(1, 7, 32)
    with pytest.raises(ValueError, match="added_cond_kwargs"):
        pipe.unet(x, 1, ctx, timestep_cond=torch.zeros(1, 32))
    with pytest.raises(ValueError, match="one row of image embeddings per sample"):
        pipe.unet(
            x,
            1,
            ctx,
            timestep_cond=torch.zeros(1, 32),
            added_cond_kwargs={"image_embeds": [torch.zeros(2, 1, 16)]},
        )


def test_fast_mode_refuses_an_adapter_loaded_first(pipe, ip_folder):
    pipe.load_ip_adapter(ip_folder)
    with pytest.raises(ValueError, match="IP-Adapter needs exact mode"):
        pipe.set_fast_paths(FastPaths.fast())
    assert pipe.fast_paths.backend == "torch"
    pipe.unload_ip_adapter()


def test_fast_mode_pipeline_refuses_ip_adapter(pipe, ip_folder, tmp_path, monkeypatch):
    monkeypatch.setenv("LCMKIT_OPENVINO_CACHE", str(tmp_path))
    pipe.set_fast_paths(FastPaths.fast())
    with pytest.raises(ValueError, match="IP-Adapter needs exact mode"):
        pipe.load_ip_adapter(ip_folder)
    with pytest.raises(ValueError, match="IP-Adapter needs exact mode"):
        pipe("a cat", ip_adapter_image=picture(), **CALL)


def test_save_pretrained_refuses_while_an_adapter_is_loaded(pipe, ip_folder, tmp_path):
    pipe.load_ip_adapter(ip_folder)
    with pytest.raises(ValueError, match="unload_ip_adapter"):
        pipe.save_pretrained(tmp_path / "saved")
    assert not (tmp_path / "saved").exists()
    pipe.unload_ip_adapter()
    pipe.save_pretrained(tmp_path / "saved")
    assert (tmp_path / "saved" / "model_index.json").is_file()
