"""Loaders say which file is wrong (issue 17, item 6).

Every way a model file can be damaged or of the wrong kind raises one error type, `lcmkit.ModelFileError` (a
ValueError), whose one-line message starts with the file's absolute path and says what is wrong; `.path` is that
file. NaN/Inf tensors in a LoRA or a textual-inversion embedding are refused, naming the file and the tensor key.
The broken fixtures are built here, from a tiny random LCM folder (`lcmkit.tiny.build_tiny_lcm`).
"""

from __future__ import annotations

import json
import re
import shutil
import struct
from pathlib import Path

import pytest
import torch
from helpers.original_layout import text_to_original, unet_to_original, vae_to_original
from safetensors.torch import load_file, save_file
from torch import nn

import lcmkit
from lcmkit import LatentConsistencyModelPipeline, ModelFileError
from lcmkit.config import ConfigError, replace
from lcmkit.loading.folders import PipelineFolderError
from lcmkit.loading.hub import ModelNotCachedError
from lcmkit.loading.single_file import SingleFileError
from lcmkit.loading.weights import WeightsError
from lcmkit.models.text import load_text_encoder, load_tokenizer
from lcmkit.models.unet import UNet2DConditionModel
from lcmkit.models.vae import AutoencoderKL
from lcmkit.schedulers import LCMScheduler
from lcmkit.tiny import TINY_UNET, TINY_VAE, build_tiny_lcm


@pytest.fixture(scope="module")
def tiny_lcm(tmp_path_factory) -> Path:
    return build_tiny_lcm(tmp_path_factory.mktemp("tiny_lcm"))


@pytest.fixture
def folder(tiny_lcm, tmp_path) -> Path:
    """A fresh copy of the tiny LCM folder, for one test to damage."""
    return Path(shutil.copytree(tiny_lcm, tmp_path / "model"))


@pytest.fixture(scope="module")
def pipe(tiny_lcm):
    pipe = LatentConsistencyModelPipeline.from_pretrained(tiny_lcm)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def expect(call, path: Path, *phrases: str, kind: type = ModelFileError) -> ModelFileError:
    """`call()` raises `kind`, a ModelFileError with `.path == path` whose one-line message names the absolute
    path and matches every regex in `phrases`."""
    with pytest.raises(kind) as info:
        call()
    error = info.value
    assert isinstance(error, ModelFileError) and isinstance(error, ValueError)
    message = str(error)
    assert "\n" not in message and "\r" not in message, message
    assert error.path == Path(path).absolute(), (error.path, message)
    assert str(Path(path).absolute()) in message, message
    for phrase in phrases:
        assert re.search(phrase, message), f"{phrase!r} not in {message!r}"
    return error


def load(folder: Path):
    return LatentConsistencyModelPipeline.from_pretrained(folder)


def edit_json(path: Path, **changes) -> None:
    data = json.loads(path.read_text())
    data.update(changes)
    path.write_text(json.dumps(data))


# ----------------------------------------------------------------------------------------------------------------------
# The error type


def test_one_error_type_for_every_loader_error():
    """ModelFileError is exported at the top level; the older error classes are its subclasses (still importable,
    still catchable as before: ModelNotCachedError stays a FileNotFoundError)."""
    assert lcmkit.ModelFileError is ModelFileError and "ModelFileError" in lcmkit.__all__
    assert issubclass(ModelFileError, ValueError)
    for cls in (PipelineFolderError, WeightsError, SingleFileError, ConfigError, ModelNotCachedError):
        assert issubclass(cls, ModelFileError), cls
    assert issubclass(ModelNotCachedError, FileNotFoundError)
    error = ModelFileError("line one\n  line two", "some/file.json")
    assert str(error) == f"{Path('some/file.json').absolute()}: line one line two"
    assert error.path == Path("some/file.json").absolute()


# ----------------------------------------------------------------------------------------------------------------------
# model_index.json


@pytest.mark.parametrize(
    ("content", "phrase"),
    [
        (b"[1, 2]", r"holds a JSON list \(\[1, 2\]\) where a JSON object is expected"),
        (b'"unet"', r"holds a JSON string"),
        (b"42", r"holds a JSON number"),
        (b'{"_class_name": "Latent\xe9"}', r"is not UTF-8 text \(byte 0xe9 at offset 23\)"),
        (b'{"unet": ["diffusers", "UNet2DConditionModel"]', r"is not valid JSON: .* at line 1 column"),
        (b"", r"is empty \(0 bytes\)"),
    ],
    ids=["list", "string", "number", "latin-1", "not-json", "empty"],
)
def test_model_index_that_is_not_a_json_object(folder, content, phrase):
    (folder / "model_index.json").write_bytes(content)
    expect(lambda: load(folder), folder / "model_index.json", phrase, kind=PipelineFolderError)


@pytest.mark.parametrize(
    "entry",
    [
        "x",
        ["diffusers", "UNet2DConditionModel", "extra"],
        ["diffusers", 3],
        [None, "UNet2DConditionModel"],
        5,
    ],
    ids=["string", "three", "number-class", "half-null", "number"],
)
def test_malformed_component_entry(folder, entry):
    """`"unet": "x"` used to read as 'no unet component'; `["diffusers", 3]` loaded as if it were fine."""
    edit_json(folder / "model_index.json", unet=entry)
    expect(
        lambda: load(folder),
        folder / "model_index.json",
        r"the `unet` entry is .*; expected a \[library, class name\] pair such as "
        r'\["diffusers", "UNet2DConditionModel"\]',
    )


def test_component_class_lcmkit_cannot_load(folder):
    edit_json(folder / "model_index.json", unet=["diffusers", "UNet2DModel"])
    expect(
        lambda: load(folder),
        folder / "model_index.json",
        r"`unet` is a 'UNet2DModel', which lcmkit cannot load .*'UNet2DConditionModel'",
    )


def test_sdxl_pipeline_folder_is_refused(folder):
    edit_json(folder / "model_index.json", text_encoder_2=["transformers", "CLIPTextModelWithProjection"])
    expect(lambda: load(folder), folder / "model_index.json", r"SDXL pipeline .*text_encoder_2.*1\.x/2\.x")


def test_requires_safety_checker_must_be_a_boolean(folder):
    """A string "no" was read as bool("no") == True."""
    edit_json(folder / "model_index.json", requires_safety_checker="no")
    expect(
        lambda: load(folder), folder / "model_index.json", r"`requires_safety_checker` must be true or false"
    )


# ----------------------------------------------------------------------------------------------------------------------
# Component configs


@pytest.mark.parametrize(
    ("component", "file"),
    [
        ("unet", "config.json"),
        ("vae", "config.json"),
        ("text_encoder", "config.json"),
        ("scheduler", "scheduler_config.json"),
    ],
)
@pytest.mark.parametrize(
    ("content", "phrase"),
    [(b"{}", r"holds no settings \(\{\}\)"), (b"", r"is empty \(0 bytes\)"), (b"[]", "holds a JSON list")],
    ids=["empty-object", "zero-bytes", "list"],
)
def test_empty_or_non_object_component_config(folder, component, file, content, phrase):
    """`{}` used to load SD 1.5 defaults and fail on 478 weight keys (UNet), load silently (scheduler), or print a
    transformers load report (text encoder); a zero-byte file gave JSONDecodeError / OSError without the name."""
    (folder / component / file).write_bytes(content)
    expect(lambda: load(folder), folder / component / file, phrase)


@pytest.mark.parametrize(
    ("changes", "phrase"),
    [
        (
            {"block_out_channels": "abc"},
            r"`block_out_channels` must be a non-empty list of positive integers, got 'abc'",
        ),
        (
            {"layers_per_block": "2"},
            r"`layers_per_block` must be a positive integer or a list of 2 of them, got '2'",
        ),
        ({"cross_attention_dim": "wide"}, r"`cross_attention_dim` must be a positive integer, got 'wide'"),
        ({"norm_num_groups": 0}, r"`norm_num_groups` must be a positive integer, got 0"),
        ({"norm_eps": "small"}, r"`norm_eps` must be a positive number, got 'small'"),
        (
            {"down_block_types": "CrossAttnDownBlock2D"},
            r"`down_block_types` must be a non-empty list of block type",
        ),
        (
            {"_class_name": "UNet2DModel"},
            r"`_class_name` is 'UNet2DModel'; lcmkit needs .*'UNet2DConditionModel'",
        ),
    ],
    ids=["channels", "layers", "cross", "groups", "eps", "block-types", "class"],
)
def test_unet_config_with_wrong_values(folder, changes, phrase):
    """Before: TypeErrors from inside model construction, a misleading length error, or (norm_eps, _class_name)
    a model that loaded."""
    edit_json(folder / "unet" / "config.json", **changes)
    expect(lambda: load(folder), folder / "unet" / "config.json", phrase, kind=ConfigError)
    # the model class's own loader names the file too
    expect(
        lambda: UNet2DConditionModel.from_pretrained(folder / "unet"), folder / "unet" / "config.json", phrase
    )


@pytest.mark.parametrize(
    ("changes", "phrase"),
    [
        ({"scaling_factor": "x"}, r"`scaling_factor` must be a positive number, got 'x'"),
        ({"latents_mean": "abc"}, r"`latents_mean` must be a list of finite numbers or null"),
        ({"_class_name": "VQModel"}, r"`_class_name` is 'VQModel'; lcmkit needs .*'AutoencoderKL'"),
    ],
)
def test_vae_config_with_wrong_values(folder, changes, phrase):
    edit_json(folder / "vae" / "config.json", **changes)
    expect(lambda: AutoencoderKL.from_pretrained(folder / "vae"), folder / "vae" / "config.json", phrase)


def test_inconsistent_config_names_the_config(folder):
    """A check the config dataclass makes on values of the right type (GroupNorm groups that do not divide the
    widths) used to raise ConfigError without saying which file."""
    edit_json(folder / "unet" / "config.json", norm_num_groups=5)
    expect(lambda: load(folder), folder / "unet" / "config.json", r"not divisible by norm_num_groups=5")


def test_text_encoder_config_with_wrong_values(folder):
    config = folder / "text_encoder" / "config.json"
    edit_json(config, hidden_size="abc")
    expect(
        lambda: load_text_encoder(folder / "text_encoder"),
        config,
        r"not a valid CLIP text encoder config.*hidden_size",
    )
    edit_json(config, hidden_size=32, model_type="bert")
    expect(lambda: load(folder), config, r"`model_type` is 'bert': not a CLIP text encoder config")


@pytest.mark.parametrize(
    ("changes", "phrase"),
    [
        ({"num_train_timesteps": "abc"}, r"`num_train_timesteps` must be a int, got 'abc'"),
        ({"beta_schedule": "weird"}, r"beta_schedule='weird' is not implemented"),
    ],
)
def test_scheduler_config_with_wrong_values(folder, changes, phrase):
    """Before: a bare ValueError / NotImplementedError, without the file."""
    path = folder / "scheduler" / "scheduler_config.json"
    edit_json(path, **changes)
    expect(lambda: LCMScheduler.from_pretrained(folder / "scheduler"), path, phrase)
    expect(lambda: load(folder), path, phrase)


def test_missing_config_is_still_a_file_not_found(folder):
    (folder / "scheduler" / "scheduler_config.json").unlink()
    error = expect(
        lambda: load(folder), folder / "scheduler" / "scheduler_config.json", "config file not found"
    )
    assert isinstance(error, FileNotFoundError)


# ----------------------------------------------------------------------------------------------------------------------
# Tokenizer files


@pytest.fixture
def tokenizer_folder(folder) -> Path:
    """A tokenizer folder as SD repositories ship it: vocab.json + merges.txt + configs, no tokenizer.json."""
    (folder / "tokenizer" / "tokenizer.json").unlink()
    load_tokenizer(folder / "tokenizer")  # loads while intact
    return folder / "tokenizer"


@pytest.mark.parametrize(
    ("file", "content", "phrase"),
    [
        ("vocab.json", b"{nope", r"is not valid JSON"),
        ("vocab.json", b"[1, 2]", r"holds a JSON list"),
        (
            "vocab.json",
            b'{"a": "b"}',
            r"maps the token 'a' to 'b'; every token must map to a non-negative integer",
        ),
        ("vocab.json", b'{"\xe9": 1}', r"is not UTF-8 text"),
        (
            "merges.txt",
            b"#version: 0.2\nabc\n",
            r"line 2 is 'abc'; each line after '#version' must be two tokens",
        ),
        (
            "merges.txt",
            b"#version: 0.2\nQQ RR\n",
            r"line 2 .* merges tokens that vocab.json does not have: \['QQ'",
        ),
        ("merges.txt", b"\xff\xfe\x00garbage", r"is not UTF-8 text \(byte 0xff at offset 0\)"),
        ("tokenizer_config.json", b"{nope", r"is not valid JSON"),
        ("tokenizer_config.json", b"[]", r"holds a JSON list"),
        (
            "tokenizer_config.json",
            b'{"model_max_length": "abc"}',
            r"`model_max_length` must be a positive number",
        ),
        ("special_tokens_map.json", b"{nope", r"is not valid JSON"),
    ],
    ids=[
        "vocab-not-json",
        "vocab-list",
        "vocab-string-ids",
        "vocab-latin-1",
        "merges-one-token",
        "merges-unknown-tokens",
        "merges-binary",
        "config-not-json",
        "config-list",
        "config-max-length",
        "special-tokens-not-json",
    ],
)
def test_malformed_tokenizer_file(tokenizer_folder, file, content, phrase):
    """transformers raised a bare Exception from the Rust tokenizer, a JSONDecodeError or a TypeError ('pop
    expected at most 1 argument'), none naming the file."""
    (tokenizer_folder / file).write_bytes(content)
    expect(lambda: load_tokenizer(tokenizer_folder), tokenizer_folder / file, phrase)


def test_malformed_tokenizer_file_through_the_pipeline(tokenizer_folder):
    (tokenizer_folder / "vocab.json").write_text("[1, 2]")
    expect(lambda: load(tokenizer_folder.parent), tokenizer_folder / "vocab.json", "holds a JSON list")


def test_missing_merges_next_to_vocab(tokenizer_folder):
    (tokenizer_folder / "merges.txt").unlink()
    error = expect(
        lambda: load_tokenizer(tokenizer_folder), tokenizer_folder / "merges.txt", "needs merges.txt"
    )
    assert isinstance(error, FileNotFoundError)


@pytest.mark.parametrize(
    ("content", "phrase"),
    [(b"{nope", "is not valid JSON"), (b"[]", "holds a JSON list"), (b"{}", "has no `model` object")],
)
def test_malformed_tokenizer_json(folder, content, phrase):
    """transformers read these as a JSONDecodeError, a TypeError and a KeyError('added_tokens')."""
    (folder / "tokenizer" / "tokenizer.json").write_bytes(content)
    expect(lambda: load_tokenizer(folder / "tokenizer"), folder / "tokenizer" / "tokenizer.json", phrase)


# ----------------------------------------------------------------------------------------------------------------------
# Component weights


def truncate(path: Path) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


@pytest.mark.parametrize(
    ("component", "file"),
    [
        ("unet", "diffusion_pytorch_model.safetensors"),
        ("vae", "diffusion_pytorch_model.safetensors"),
        ("text_encoder", "model.safetensors"),
    ],
)
def test_truncated_component_weights(folder, component, file):
    """The text encoder's used to raise safetensors' own SafetensorError, without the file."""
    truncate(folder / component / file)
    expect(
        lambda: load(folder),
        folder / component / file,
        r"not a readable safetensors file \(corrupt or truncated",
    )


@pytest.mark.parametrize(
    ("component", "safetensors", "bin_name"),
    [
        ("vae", "diffusion_pytorch_model.safetensors", "diffusion_pytorch_model.bin"),
        ("text_encoder", "model.safetensors", "pytorch_model.bin"),
    ],
)
@pytest.mark.parametrize(
    ("content", "phrase"),
    [
        (
            b"not a torch file at all",
            r"is neither a torch checkpoint \(zip or pickle\) nor a safetensors file",
        ),
        (b"version https://git-lfs.github.com/spec/v1\noid sha256:0\nsize 9\n", r"is a Git LFS pointer"),
        (b"", r"is empty \(0 bytes\)"),
    ],
    ids=["garbage", "lfs-pointer", "empty"],
)
def test_bin_that_is_not_a_torch_file(folder, component, safetensors, bin_name, content, phrase):
    """The text encoder's used to raise torch's UnpicklingError, without the file."""
    (folder / component / safetensors).unlink()
    (folder / component / bin_name).write_bytes(content)
    expect(lambda: load(folder), folder / component / bin_name, phrase, kind=WeightsError)


def test_weights_that_do_not_fit_the_config_name_the_weights_file(folder):
    edit_json(folder / "vae" / "config.json", latent_channels=8)
    expect(
        lambda: load(folder),
        folder / "vae" / "diffusion_pytorch_model.safetensors",
        r"do not match AutoencoderKL: .*shape mismatches",
        kind=WeightsError,
    )


# ----------------------------------------------------------------------------------------------------------------------
# Single-file checkpoints


@pytest.fixture(scope="module")
def sd1_single_file(tiny_lcm) -> dict[str, torch.Tensor]:
    """A tiny original SD 1.x single file (CompVis key layout): the tiny LCM's UNet and VAE with SD's 32 GroupNorm
    groups (which single-file loading assumes), and its text encoder."""
    torch.manual_seed(0)
    unet = UNet2DConditionModel(replace(TINY_UNET, norm_num_groups=32))
    vae = AutoencoderKL(replace(TINY_VAE, block_out_channels=(32, 64), norm_num_groups=32))
    text = load_file(tiny_lcm / "text_encoder" / "model.safetensors")
    sd = unet_to_original(dict(unet.state_dict()), layers=1)
    sd.update(vae_to_original(dict(vae.state_dict()), levels=2))
    sd.update(text_to_original(text))
    return {k: v.detach().contiguous().clone() for k, v in sd.items()}


def _sdxl(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """SDXL's layout: both CLIP towers under conditioner.embedders.*, a size-conditioned UNet (label_emb)."""
    out = {k: v for k, v in sd.items() if not k.startswith("cond_stage_model.")}
    out.update(
        {
            k.replace("cond_stage_model.", "conditioner.embedders.0."): v
            for k, v in sd.items()
            if k.startswith("cond_stage_model.")
        }
    )
    out["conditioner.embedders.1.model.ln_final.weight"] = torch.ones(32)
    out["model.diffusion_model.label_emb.0.0.weight"] = torch.zeros(32, 16)
    return out


@pytest.mark.parametrize(
    ("change", "phrase"),
    [
        (_sdxl, r"is an SDXL checkpoint .*which lcmkit does not support: it loads SD 1\.x single files"),
        (
            lambda sd: {**sd, "model.diffusion_model.label_emb.0.0.weight": torch.zeros(32, 16)},
            r"is an SDXL-style checkpoint \(its UNet is conditioned on sizes or classes",
        ),
        (
            lambda sd: {"model.diffusion_model.joint_blocks.0.x_block.attn.qkv.weight": torch.zeros(6, 2)},
            r"is a Stable Diffusion 3 checkpoint",
        ),
        (lambda sd: {"double_blocks.0.img_attn.qkv.weight": torch.zeros(6, 2)}, r"is a FLUX checkpoint"),
        (
            lambda sd: {**sd, "cond_stage_model.model.token_embedding.weight": torch.zeros(2, 2)},
            r"is an SD 2\.x checkpoint .*not supported yet",
        ),
        (
            lambda sd: {k: v for k, v in sd.items() if k != "model.diffusion_model.out.2.weight"},
            r"the UNet weights lack `out\.2\.weight`",
        ),
    ],
    ids=["sdxl", "label-emb", "sd3", "flux", "sd2", "unet-part-missing"],
)
def test_single_file_of_another_model_family(sd1_single_file, tmp_path, change, phrase):
    """SDXL files used to fail on a missing CLIP tower or an unknown `label_emb` key, never saying SDXL; the
    errors found while reading the tensors did not name the file."""
    path = tmp_path / "model.safetensors"
    save_file(change(dict(sd1_single_file)), str(path))
    expect(lambda: LatentConsistencyModelPipeline.from_single_file(path), path, phrase, kind=SingleFileError)


def test_single_file_that_is_not_a_torch_file(tmp_path):
    path = tmp_path / "model.ckpt"
    path.write_bytes(b"<!DOCTYPE html><html><body>Not found</body></html>")
    expect(lambda: LatentConsistencyModelPipeline.from_single_file(path), path, "is an HTML/XML page")


def test_single_file_config_folder_names_its_file(sd1_single_file, folder, tmp_path):
    """The SD 1.x file the refusals above start from loads (what they add is what is refused); a broken config in
    the `config=` folder is named."""
    path = tmp_path / "sd1.safetensors"
    save_file(sd1_single_file, str(path))
    LatentConsistencyModelPipeline.from_single_file(path)
    edit_json(folder / "unet" / "config.json", block_out_channels="abc")
    expect(
        lambda: LatentConsistencyModelPipeline.from_single_file(path, config=folder),
        folder / "unet" / "config.json",
        "`block_out_channels` must be",
    )


# ----------------------------------------------------------------------------------------------------------------------
# LoRA files


def _lora_module(unet: nn.Module) -> tuple[str, nn.Linear]:
    return next((n, m) for n, m in unet.named_modules() if isinstance(m, nn.Linear) and "attn1.to_q" in n)


def kohya_lora(unet: nn.Module, rank: int = 2) -> dict[str, torch.Tensor]:
    name, layer = _lora_module(unet)
    key = "lora_unet_" + name.replace(".", "_")
    return {
        f"{key}.lora_down.weight": torch.randn(rank, layer.in_features) * 0.1,
        f"{key}.lora_up.weight": torch.randn(layer.out_features, rank) * 0.1,
        f"{key}.alpha": torch.tensor(float(rank)),
    }


def peft_lora(unet: nn.Module, rank: int = 2) -> dict[str, torch.Tensor]:
    name, layer = _lora_module(unet)
    return {
        f"unet.{name}.lora_A.weight": torch.randn(rank, layer.in_features) * 0.1,
        f"unet.{name}.lora_B.weight": torch.randn(layer.out_features, rank) * 0.1,
    }


def raw_safetensors(path: Path, tensors: dict[str, torch.Tensor], metadata: dict) -> Path:
    """A safetensors file written by hand, so that its `__metadata__` can break the str -> str rule."""
    header, blobs, offset = {"__metadata__": metadata}, [], 0
    for key, tensor in tensors.items():
        data = tensor.contiguous().numpy().tobytes()
        header[key] = {
            "dtype": "F32",
            "shape": list(tensor.shape),
            "data_offsets": [offset, offset + len(data)],
        }
        blobs.append(data)
        offset += len(data)
    encoded = json.dumps(header).encode()
    encoded += b" " * (-len(encoded) % 8)
    path.write_bytes(struct.pack("<Q", len(encoded)) + encoded + b"".join(blobs))
    return path


def assert_no_adapter(pipe) -> None:
    """A refused LoRA leaves the pipeline as it was."""
    assert pipe.get_list_adapters() == {}


@pytest.mark.parametrize(
    ("value", "kind"), [(float("nan"), "NaN"), (float("inf"), r"\+inf"), (float("-inf"), "-inf")]
)
@pytest.mark.parametrize("role", ["lora_up.weight", "alpha"])
def test_lora_with_non_finite_values_is_refused(pipe, tmp_path, value, kind, role):
    """Before, a NaN LoRA loaded and turned every image black."""
    sd = kohya_lora(pipe.unet)
    key = next(k for k in sd if k.endswith(role))
    sd[key] = sd[key].clone()
    sd[key].view(-1)[0] = value
    path = tmp_path / "nan.safetensors"
    save_file(sd, str(path))
    expect(
        lambda: pipe.load_lora_weights(path),
        path,
        rf"LoRA tensor `{re.escape(key)}` .* holds non-finite values \(1 {kind}\)",
    )
    assert_no_adapter(pipe)


def test_lora_state_dict_with_nan_is_refused_without_a_file(pipe):
    sd = kohya_lora(pipe.unet)
    key = next(k for k in sd if k.endswith("lora_down.weight"))
    sd[key][0, 0] = float("nan")
    with pytest.raises(ModelFileError, match=rf"LoRA tensor `{re.escape(key)}`.*non-finite") as info:
        pipe.load_lora_weights(sd)
    assert info.value.path is None
    assert_no_adapter(pipe)


def test_lora_metadata_that_is_not_str_to_str(pipe, tmp_path):
    """kohya's `ss_network_alpha` written as a number, not a string: safetensors cannot parse the header."""
    path = raw_safetensors(tmp_path / "kohya.safetensors", kohya_lora(pipe.unet), {"ss_network_alpha": 8})
    expect(lambda: pipe.load_lora_weights(path), path, r"not a readable safetensors file.*expected a string")
    assert_no_adapter(pipe)


@pytest.mark.parametrize(
    ("raw", "phrase"),
    [
        ("{not json", r"the `lora_adapter_metadata` metadata entry is not valid JSON"),
        (
            "[4, 8]",
            r"the `lora_adapter_metadata` metadata must be a JSON object \(a LoraConfig\), got \[4, 8\]",
        ),
        ('{"unet.lora_alpha": "eight"}', r"`unet\.lora_alpha` must be a number, got 'eight'"),
        (
            '{"unet.lora_alpha": 4, "unet.alpha_pattern": [1]}',
            r"`unet\.alpha_pattern` must map module patterns",
        ),
        ('{"unet.alpha_pattern": {"to_q": "x"}}', r"`unet\.alpha_pattern\['to_q'\]` must be a number"),
        ('{"unet.alpha_pattern": {"to_q(": 2}}', r"holds 'to_q\(', not a valid regular expression"),
    ],
    ids=["not-json", "list", "alpha-string", "pattern-list", "pattern-alpha", "pattern-regex"],
)
def test_malformed_lora_config_metadata(pipe, tmp_path, raw, phrase):
    """diffusers' LoraConfig JSON, where lcmkit reads alpha from: before, JSONDecodeError / AttributeError /
    ValueError('could not convert string to float') / re.error, none naming the file."""
    path = tmp_path / "peft.safetensors"
    save_file(peft_lora(pipe.unet), str(path), metadata={"lora_adapter_metadata": raw})
    expect(lambda: pipe.load_lora_weights(path), path, phrase)
    assert_no_adapter(pipe)


def test_kohya_informational_metadata_is_not_read(pipe, tmp_path):
    """kohya's `ss_*` entries are informational (alpha comes from the `.alpha` tensors, as in kohya's and A1111's
    loaders), so a non-numeric `ss_network_alpha` string does not stop the file from loading; an unusable
    LoraConfig value, which lcmkit does read, does. The kohya and PEFT files the other refusals start from load."""
    path = tmp_path / "kohya.safetensors"
    save_file(kohya_lora(pipe.unet), str(path), metadata={"ss_network_alpha": "abc", "ss_network_dim": "?"})
    pipe.load_lora_weights(path, adapter_name="kohya")
    peft = tmp_path / "peft.safetensors"
    save_file(peft_lora(pipe.unet), str(peft), metadata={"lora_adapter_metadata": '{"unet.lora_alpha": 4}'})
    pipe.load_lora_weights(peft, adapter_name="peft")
    assert sorted(pipe.get_list_adapters()["unet"]) == ["kohya", "peft"]
    pipe.delete_adapters(["kohya", "peft"])
    save_file(kohya_lora(pipe.unet), str(path), metadata={"lora_adapter_metadata": '{"lora_alpha": "abc"}'})
    expect(lambda: pipe.load_lora_weights(path), path, r"`lora_alpha` must be a number")
    assert_no_adapter(pipe)


def test_lora_alpha_that_is_not_a_scalar(pipe, tmp_path):
    """Before: RuntimeError 'a Tensor with 2 elements cannot be converted to Scalar'."""
    sd = kohya_lora(pipe.unet)
    key = next(k for k in sd if k.endswith(".alpha"))
    sd[key] = torch.tensor([2.0, 2.0])
    path = tmp_path / "alpha.safetensors"
    save_file(sd, str(path))
    expect(
        lambda: pipe.load_lora_weights(path),
        path,
        rf"`{re.escape(key)}` must be a single number .*shape \(2,\)",
    )
    assert_no_adapter(pipe)


@pytest.mark.parametrize(
    ("name", "damage", "phrase"),
    [
        ("lora.safetensors", truncate, r"not a readable safetensors file \(corrupt or truncated"),
        (
            "lora.safetensors",
            lambda p: p.write_bytes(b"PK\x03\x04 a zip, not safetensors"),
            r"could not be loaded safely",
        ),
        ("lora.bin", lambda p: p.write_bytes(b"garbage bytes"), r"is neither a torch checkpoint"),
        ("lora.pt", lambda p: p.write_bytes(b"\x80\x02garbage"), r"could not be loaded safely"),
    ],
    ids=["truncated", "zip-named-safetensors", "bin-garbage", "broken-pickle"],
)
def test_lora_file_that_is_not_readable(pipe, tmp_path, name, damage, phrase):
    path = tmp_path / name
    save_file(kohya_lora(pipe.unet), str(path))
    damage(path)
    expect(lambda: pipe.load_lora_weights(path), path, phrase, kind=WeightsError)
    assert_no_adapter(pipe)


# ----------------------------------------------------------------------------------------------------------------------
# Textual-inversion embeddings


def _vectors(pipe, n: int = 2) -> torch.Tensor:
    return torch.randn(n, pipe.text_encoder.get_input_embeddings().embedding_dim)


@pytest.mark.parametrize("layout", ["a1111-safetensors", "a1111-pt", "diffusers"])
def test_embedding_with_non_finite_values_is_refused(pipe, tmp_path, layout):
    """Before, a NaN embedding loaded and every prompt with its token gave NaN embeddings (a black image)."""
    vectors = _vectors(pipe)
    vectors[1, 3] = float("nan")
    vocab = len(pipe.tokenizer)
    if layout == "a1111-safetensors":
        path, key = tmp_path / "badtok.safetensors", "emb_params"
        save_file({"emb_params": vectors}, str(path))
    elif layout == "a1111-pt":
        path, key = tmp_path / "badtok.pt", r"string_to_param\.\*"
        torch.save({"string_to_param": {"*": vectors}, "name": "badtok", "step": 100}, str(path))
    else:
        path, key = tmp_path / "learned_embeds.safetensors", "<badtok>"
        save_file({"<badtok>": vectors}, str(path))
    expect(
        lambda: pipe.load_textual_inversion(path),
        path,
        rf"textual inversion embedding '.*' tensor `{key}` \(2, \d+\) holds non-finite values \(1 NaN\)",
    )
    assert len(pipe.tokenizer) == vocab  # nothing was added


def test_embedding_tensor_with_inf_is_refused_without_a_file(pipe):
    vectors = _vectors(pipe, 1)
    vectors[0, 0] = float("inf")
    with pytest.raises(ModelFileError, match=r"embedding '<inf>' tensor `<inf>` .*1 \+inf") as info:
        pipe.load_textual_inversion(vectors, token="<inf>")
    assert info.value.path is None


def test_embedding_file_of_unknown_layout_names_the_file(pipe, tmp_path):
    path = tmp_path / "sdxl_embedding.safetensors"
    save_file({"clip_l": _vectors(pipe), "clip_g": torch.randn(2, 64)}, str(path))
    expect(
        lambda: pipe.load_textual_inversion(path), path, r"unknown textual inversion layout.*SDXL embedding"
    )


def test_embedding_file_that_is_not_a_torch_file(pipe, tmp_path):
    path = tmp_path / "embedding.pt"
    path.write_bytes(b"version https://git-lfs.github.com/spec/v1\n")
    expect(
        lambda: pipe.load_textual_inversion(path, token="<x>"),
        path,
        "is a Git LFS pointer",
        kind=WeightsError,
    )


def test_lora_for_another_model_names_the_file(pipe, tmp_path):
    """Keys that fit no module (here an SDXL-sized UNet's) used to raise a ValueError that did not say which of
    the user's LoRA files it was about."""
    path = tmp_path / "sdxl_lora.safetensors"
    save_file(
        {
            "lora_unet_input_blocks_4_1_transformer_blocks_9_attn1_to_q.lora_down.weight": torch.zeros(
                2, 640
            ),
            "lora_unet_input_blocks_4_1_transformer_blocks_9_attn1_to_q.lora_up.weight": torch.zeros(640, 2),
        },
        str(path),
    )
    expect(
        lambda: pipe.load_lora_weights(path),
        path,
        r"cannot load this LoRA: 2 keys name no Linear/Conv2d module",
    )
    save_file({}, str(path))
    expect(lambda: pipe.load_lora_weights(path), path, r"the LoRA state dict is empty")
    assert_no_adapter(pipe)


def test_cached_hub_model_index_that_is_a_list(tmp_path, monkeypatch):
    """A hub model's cached model_index.json is read the same way (before: AttributeError "'list' object has no
    attribute 'items'"). Offline, from a hand-made Hugging Face cache."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    commit = "0123456789abcdef0123456789abcdef01234567"
    repo = tmp_path / "cache" / "models--tiny-org--broken"
    snapshot = repo / "snapshots" / commit
    snapshot.mkdir(parents=True)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(commit)
    (snapshot / "model_index.json").write_text('["diffusers", "UNet2DConditionModel"]')
    expect(
        lambda: LatentConsistencyModelPipeline.from_pretrained(
            "tiny-org/broken", cache_dir=tmp_path / "cache"
        ),
        snapshot / "model_index.json",
        "holds a JSON list",
    )
