"""`ModelSpec` and `load_pipeline`: the one description of a model that the CLI and the server share.

What these tests prove: every bad spec is refused when it is made, naming the option, without importing torch; the
model name is the folder's name, the file's stem or the hub id; `load_pipeline` applies every switch to a real tiny
pipeline and gives the same image as applying them by hand; hub ids go through their cached snapshot (faked here,
no network) and a tiny VAE spares downloading the full one; the device and dtype policy.
"""

from __future__ import annotations

import subprocess
import sys
from dataclasses import FrozenInstanceError
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers.tiny_models import TAESD_8
from safetensors.torch import save_file
from torch import nn

import lcmkit.spec
from lcmkit import LatentConsistencyModelPipeline
from lcmkit.models.tiny_vae import AutoencoderTiny
from lcmkit.spec import DEFAULT_MODEL, ModelSpec, SpecError, device_and_dtype, fetch, load_pipeline


@pytest.fixture(scope="module")
def model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from lcmkit.tiny import build_tiny_lcm

    return build_tiny_lcm(tmp_path_factory.mktemp("tiny") / "tiny-model")


def kohya_lora(unet: nn.Module, path: Path, seed: int, rank: int = 2) -> Path:
    """A kohya-format LoRA for `unet`'s attention projections, random but not small (so it changes the image)."""
    g = torch.Generator().manual_seed(seed)
    sd = {}
    for name, module in unet.named_modules():
        if isinstance(module, nn.Linear) and name.endswith(("to_q", "to_k", "to_v")):
            key = "lora_unet_" + name.replace(".", "_")
            sd[f"{key}.lora_down.weight"] = torch.randn(rank, module.in_features, generator=g) * 0.5
            sd[f"{key}.lora_up.weight"] = torch.randn(module.out_features, rank, generator=g) * 0.5
            sd[f"{key}.alpha"] = torch.tensor(float(rank))
    save_file(sd, str(path))
    return path


@pytest.fixture(scope="module")
def loras(model: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    unet = LatentConsistencyModelPipeline.from_pretrained(model).unet
    folder = tmp_path_factory.mktemp("loras")
    return kohya_lora(unet, folder / "a.safetensors", 1), kohya_lora(unet, folder / "b.safetensors", 2)


def image(pipe, seed: int = 3) -> np.ndarray:
    pipe.set_progress_bar_config(disable=True)
    g = torch.Generator().manual_seed(seed)
    return pipe("a red circle", num_inference_steps=2, generator=g, output_type="np").images[0]


def taesd_folder(folder: Path) -> Path:
    torch.manual_seed(0)
    AutoencoderTiny(TAESD_8).save_pretrained(folder)
    return folder


# Checks when the spec is made ------------------------------------------------------------------------------

BAD = [
    ({"model": "{tmp}/missing"}, "--model {tmp}/missing: no such folder or file, and not a hub id"),
    ({"model": "owner/name.safetensors"}, "no such folder or file"),
    ({"model": "{tmp}/notes.txt"}, "--model {tmp}/notes.txt: a model file must be a .safetensors or .ckpt"),
    ({"model": "{tmp}"}, "this folder has no model_index.json"),
    ({"model": ""}, "--model must be a folder, a file or a hub id"),
    ({"loras": (("{tmp}/nope.safetensors", 1.0),)}, "--lora {tmp}/nope.safetensors: no such file or folder"),
    ({"loras": (("owner/lora", float("nan")),)}, "the weight of --lora owner/lora must be a finite number"),
    ({"loras": (("owner/lora",),)}, "--lora takes PATH[:WEIGHT]"),
    ({"loras": "owner/lora"}, "loras must be a sequence of (source, weight) pairs"),
    ({"tiny_vae": "{tmp}/nope"}, "--tiny-vae {tmp}/nope: not a folder with config.json"),
    ({"tiny_vae": "{tmp}"}, "--tiny-vae {tmp}: not a folder with config.json"),
    ({"freeu": (1, 2, 3)}, "--freeu takes 4 numbers"),
    ({"freeu": (1, 2, 3, float("inf"))}, "a --freeu value must be a finite number"),
    (
        {"openvino": "int8"},
        "--openvino 'int8' is not a precision lcmkit converts; allowed: fp32, int8-weights",
    ),
    ({"openvino": "fp32", "freeu": (0.9, 0.2, 1.5, 1.6)}, "--freeu cannot be combined with --openvino"),
    ({"openvino": "fp32", "device": "cuda"}, "--openvino runs on the CPU; drop --device cuda or --openvino"),
    ({"openvino": "fp32", "dtype": "float16"}, "--openvino runs float32"),
    ({"device": "CUDA 0"}, "--device must be a torch device such as cpu, cuda"),
    ({"dtype": "half"}, "--dtype 'half' is not supported; allowed: auto, float32, float16, bfloat16"),
    ({"vae_tiling": "yes"}, "--vae-tiling is on or off"),
    ({"name": " "}, "the model name must be a non-empty string"),
]


@pytest.mark.parametrize(("kwargs", "message"), BAD, ids=[str(k) for k, _ in BAD])
def test_a_bad_spec_is_refused_naming_the_option(kwargs, message, tmp_path):
    (tmp_path / "notes.txt").write_text("x")

    def fill(value):
        if isinstance(value, str):
            return value.format(tmp=tmp_path)
        if isinstance(value, tuple):
            return tuple(fill(v) for v in value)
        return value

    with pytest.raises(SpecError) as err:
        ModelSpec(**{k: fill(v) for k, v in kwargs.items()})
    assert isinstance(err.value, ValueError)
    assert message.format(tmp=tmp_path) in str(err.value)


def test_no_shipped_model_and_no_model_says_how_to_pass_one(monkeypatch, tmp_path):
    monkeypatch.setattr(lcmkit.spec, "DEFAULT_MODEL", tmp_path / "not-shipped")
    with pytest.raises(SpecError, match="no model: pass --model PATH_OR_HUB_ID"):
        ModelSpec()


def test_specs_check_themselves_without_torch(tmp_path):
    """Made and refused in a fresh process that never imports torch: the check is cheap enough to run before
    anything loads (the CLI does, the server does before it listens)."""
    code = f"""
import sys
from lcmkit.spec import ModelSpec, SpecError
ModelSpec(loras=(("owner/lora", 0.5),), freeu=(1, 1, 1, 1), vae_tiling=True, device="cuda:1", dtype="float16")
ModelSpec(model="owner/name", openvino="fp32")
for bad in ({{"model": {str(tmp_path / "missing")!r}}}, {{"openvino": "fp32", "freeu": (1, 1, 1, 1)}}):
    try:
        ModelSpec(**bad)
    except SpecError:
        pass
    else:
        raise SystemExit("not refused: " + repr(bad))
assert "torch" not in sys.modules, "torch was imported"
print("ok")
"""
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert run.returncode == 0 and run.stdout == "ok\n", run.stderr


def test_a_spec_is_frozen_and_normalised(tmp_path, model):
    spec = ModelSpec(model=model, loras=[[str(model), 1]], freeu=[1, 2, 3, 4])
    assert (
        spec.model == str(model) and spec.loras == ((str(model), 1.0),) and spec.freeu == (1.0, 2.0, 3.0, 4.0)
    )
    assert spec == ModelSpec(model=str(model), loras=((str(model), 1.0),), freeu=(1.0, 2.0, 3.0, 4.0))
    with pytest.raises(FrozenInstanceError):
        spec.model = "other/model"  # type: ignore[misc]


def test_model_name_is_what_the_infotext_says(model, tmp_path):
    (tmp_path / "sd15-lcm.safetensors").write_bytes(b"")
    assert ModelSpec().model_name == DEFAULT_MODEL.name == "tiny-lcm"
    assert ModelSpec(model=str(model) + "/").model_name == "tiny-model"
    assert ModelSpec(model=str(tmp_path / "sd15-lcm.safetensors")).model_name == "sd15-lcm"
    assert ModelSpec(model="SimianLuo/LCM_Dreamshaper_v7").model_name == "SimianLuo/LCM_Dreamshaper_v7"
    assert ModelSpec(model=str(model), name="mine").model_name == "mine"


# Loading ---------------------------------------------------------------------------------------------------


def test_load_pipeline_applies_every_switch_like_doing_it_by_hand(model, loras):
    """LoRAs at their weights, FreeU and VAE tiling: the same adapters and the same image as the diffusers-style
    calls made one by one on a pipeline loaded from the folder."""
    spec = ModelSpec(model=str(model), loras=((str(loras[0]), 0.7), (str(loras[1]), 0.4)),
                     freeu=(0.9, 0.2, 1.5, 1.6), vae_tiling=True)  # fmt: skip
    pipe, name = load_pipeline(spec)
    assert name == "tiny-model" and pipe.dtype == torch.float32
    assert pipe.get_active_adapters() == ["lora0", "lora1"] and pipe.vae.use_tiling
    assert pipe.unet.up_blocks[0].b1 == 1.5

    by_hand = LatentConsistencyModelPipeline.from_pretrained(model)
    plain = image(by_hand)
    by_hand.load_lora_weights(str(loras[0]), adapter_name="a")
    by_hand.load_lora_weights(str(loras[1]), adapter_name="b")
    by_hand.set_adapters(["a", "b"], [0.7, 0.4])
    by_hand.enable_freeu(0.9, 0.2, 1.5, 1.6)
    by_hand.enable_vae_tiling()
    assert np.array_equal(image(pipe), image(by_hand))
    assert np.abs(image(pipe) - plain).max() > 0.01  # the switches do change the image


def test_tiny_vae_replaces_the_full_vae_without_reading_it(model, tmp_path, monkeypatch):
    """With --tiny-vae the folder's AutoencoderKL is never loaded (it is handed to from_pretrained instead)."""
    from lcmkit.models.vae import AutoencoderKL

    def refuse(*args, **kwargs):
        raise AssertionError("the full VAE was loaded")

    monkeypatch.setattr(AutoencoderKL, "from_pretrained", classmethod(refuse))
    pipe, _ = load_pipeline(ModelSpec(model=str(model), tiny_vae=str(taesd_folder(tmp_path / "taesd"))))
    assert isinstance(pipe.vae, AutoencoderTiny)
    assert image(pipe).shape == (128, 128, 3)  # 16x16 latents, and this tiny VAE upsamples 8x


def test_single_files_and_hub_ids_take_their_own_routes(model, tmp_path, monkeypatch):
    """A .safetensors file goes to from_single_file in the spec's dtype; a hub id is fetched (the VAE skipped when
    a tiny VAE replaces it) and loaded from its snapshot folder, and keeps the hub id as its name."""
    calls = []
    monkeypatch.setattr(LatentConsistencyModelPipeline, "from_single_file",
                        classmethod(lambda cls, path, **kw: calls.append(("file", path, kw)) or "file-pipe"))  # fmt: skip
    monkeypatch.setattr(LatentConsistencyModelPipeline, "from_pretrained",
                        classmethod(lambda cls, path, **kw: calls.append(("folder", path, sorted(kw))) or "folder-pipe"))  # fmt: skip

    def resolve(name, skip_components=(), **kwargs):
        calls.append(("hub", name, tuple(skip_components)))
        return model

    monkeypatch.setattr("lcmkit.loading.hub.resolve_pretrained", resolve)
    (tmp_path / "m.safetensors").write_bytes(b"")
    assert load_pipeline(ModelSpec(model=str(tmp_path / "m.safetensors"), device="cpu")) == ("file-pipe", "m")
    assert calls.pop() == ("file", str(tmp_path / "m.safetensors"), {"torch_dtype": torch.float32})

    assert load_pipeline(ModelSpec(model="owner/name", device="cpu")) == ("folder-pipe", "owner/name")
    assert calls == [("hub", "owner/name", ()), ("folder", str(model), ["torch_dtype"])]
    fetched = fetch(ModelSpec(model="owner/name", tiny_vae=str(taesd_folder(tmp_path / "taesd"))))
    assert calls[-1] == ("hub", "owner/name", ("vae",))
    assert fetched.model == str(model) and fetched.model_name == "owner/name"
    assert fetch(ModelSpec(model=str(model))) == ModelSpec(
        model=str(model)
    )  # local: as it is, nothing fetched


def test_device_and_dtype_policy():
    cuda = torch.cuda.is_available()
    device, dtype = device_and_dtype(ModelSpec())
    assert (device.type, dtype) == (("cuda", torch.float16) if cuda else ("cpu", torch.float32))
    assert device_and_dtype(ModelSpec(device="cpu", dtype="bfloat16")) == (
        torch.device("cpu"),
        torch.bfloat16,
    )
    assert device_and_dtype(ModelSpec(openvino="fp32")) == (torch.device("cpu"), torch.float32)
    if not cuda:
        with pytest.raises(SpecError, match="--device cuda: CUDA is not available here"):
            device_and_dtype(ModelSpec(device="cuda"))
    with pytest.raises(SpecError, match="--device nosuchdevice: not a torch device"):
        device_and_dtype(ModelSpec(device="nosuchdevice"))


def test_float16_on_the_cpu_runs(model):
    """--dtype float16 is allowed on the CPU too (torch runs half precision there): it loads and makes an image
    close to the float32 one."""
    pipe, _ = load_pipeline(ModelSpec(model=str(model), device="cpu", dtype="float16"))
    assert pipe.dtype == torch.float16
    full, _ = load_pipeline(ModelSpec(model=str(model), device="cpu"))
    assert np.abs(image(pipe).astype(np.float32) - image(full)).max() < 0.1
