"""Hub ids resolved through a real huggingface_hub cache laid out on disk, never the network.

Each test builds `models--owner--name/{blobs,snapshots/<commit>,refs/main,trees/<commit>.json}` in tmp_path the
way huggingface_hub 2.x writes it (files in the snapshot are symlinks to content-addressed blobs), from a tiny
diffusers-saved pipeline, and runs with HF_HUB_OFFLINE=1. The tree listing (`trees/<commit>.json`) names files of
the repo that were never downloaded (a `.bin` beside the safetensors, other variants): huggingface_hub refuses an
offline snapshot whose requested files are missing, so loading succeeds only if lcmkit asks for exactly the files
it needs. The online path is checked with huggingface_hub's three network functions replaced by fakes.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import socket
from pathlib import Path

import numpy as np
import pytest
import torch
from huggingface_hub.utils import filter_repo_objects
from safetensors.torch import load_file, save_file

import lcmkit
from lcmkit.loading import hub
from lcmkit.loading.hub import ModelNotCachedError, allow_patterns, resolve_pretrained, weight_variant

REPO = "tiny-org/tiny-lcm"
COMMIT = "0123456789abcdef0123456789abcdef01234567"
WEIGHTED = ("unet/diffusion_pytorch_model", "vae/diffusion_pytorch_model", "text_encoder/model")


@pytest.fixture(autouse=True)
def offline(monkeypatch):
    """No test here may reach the network: offline unless a test replaces the network functions itself."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.delenv("HF_HUB_CACHE", raising=False)


def repo_files(folder: Path) -> dict[str, bytes]:
    return {
        p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()
    }


def fp16_files(folder: Path) -> dict[str, bytes]:
    """`*.fp16.safetensors` for each weighted component, holding half the fp32 weights (so they are told apart)."""
    out = {}
    for stem in WEIGHTED:
        tensors = load_file(str(folder / f"{stem}.safetensors"))
        half = {k: (v * 0.5).half() if v.is_floating_point() else v for k, v in tensors.items()}
        tmp = folder.parent / "fp16.tmp"
        save_file(half, str(tmp))
        out[f"{stem}.fp16.safetensors"] = tmp.read_bytes()
        tmp.unlink()
    return out


def lay_out_cache(
    cache: Path, repo_id: str, files: dict[str, bytes], listed: dict[str, bytes] | None = None
) -> Path:
    """Write `files` into a huggingface_hub cache snapshot (blobs + relative symlinks, refs/main), and the
    tree listing of the whole repo (`files` plus `listed`, which were not downloaded). Returns the snapshot."""
    repo = cache / f"models--{repo_id.replace('/', '--')}"
    snapshot = repo / "snapshots" / COMMIT
    for rel, data in files.items():
        blob = repo / "blobs" / hashlib.sha256(data).hexdigest()
        blob.parent.mkdir(parents=True, exist_ok=True)
        blob.write_bytes(data)
        link = snapshot / rel
        link.parent.mkdir(parents=True, exist_ok=True)
        link.symlink_to(os.path.relpath(blob, link.parent))
    (repo / "refs").mkdir(parents=True, exist_ok=True)
    (repo / "refs" / "main").write_text(COMMIT)
    tree = {
        rel: {"size": len(data), "blob_id": hashlib.sha1(data).hexdigest()}
        for rel, data in {**files, **(listed or {})}.items()
    }
    (repo / "trees").mkdir(exist_ok=True)
    (repo / "trees" / f"{COMMIT}.json").write_text(json.dumps({"format_version": 1, "files": tree}))
    return snapshot


@pytest.fixture
def sd15(tiny_folders) -> Path:
    return tiny_folders["sd15"]


@pytest.fixture
def extras(sd15) -> dict[str, bytes]:
    """Repo files a download must not need: a `.bin` beside the unet's safetensors, and the fp16 variant."""
    return {"unet/diffusion_pytorch_model.bin": b"pickle never fetched", **fp16_files(sd15)}


def generate(pipe) -> np.ndarray:
    pipe.set_progress_bar_config(disable=True)
    out = pipe("a cat", num_inference_steps=2, generator=torch.Generator().manual_seed(0), output_type="np")
    return out.images


def test_loads_offline_from_cache_and_generates(tmp_path, sd15, extras, monkeypatch):
    """A cached download (fp32 safetensors only; the tree lists a .bin and fp16 files too) loads offline, by
    cache_dir and by HF_HUB_CACHE, and generates the same image as the source folder."""
    snapshot = lay_out_cache(tmp_path / "cache", REPO, repo_files(sd15), listed=extras)
    assert (snapshot / "unet/diffusion_pytorch_model.safetensors").is_symlink()
    assert resolve_pretrained(REPO, cache_dir=tmp_path / "cache") == snapshot

    pipe = lcmkit.LatentConsistencyModelPipeline.from_pretrained(REPO, cache_dir=tmp_path / "cache")
    expected = generate(lcmkit.LatentConsistencyModelPipeline.from_pretrained(sd15))
    assert np.array_equal(generate(pipe), expected)

    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "cache"))
    assert resolve_pretrained(REPO) == snapshot


def test_variant_fp16_picks_the_fp16_files(tmp_path, sd15, extras):
    """With the fp16 files cached too, variant="fp16" loads them (weights are half the fp32 ones) and generates;
    without a variant the fp32 files load."""
    files = {**repo_files(sd15), **{k: v for k, v in extras.items() if ".fp16." in k}}
    lay_out_cache(tmp_path / "cache", REPO, files, listed=extras)
    fp16 = lcmkit.LatentConsistencyModelPipeline.from_pretrained(
        REPO, variant="fp16", cache_dir=tmp_path / "cache", torch_dtype=torch.float32
    )
    fp32 = lcmkit.LatentConsistencyModelPipeline.from_pretrained(REPO, cache_dir=tmp_path / "cache")
    for a, b in (
        (fp16.unet.conv_in.weight, fp32.unet.conv_in.weight),
        (fp16.vae.encoder.conv_in.weight, fp32.vae.encoder.conv_in.weight),
    ):
        assert torch.allclose(a, (b * 0.5).half().float(), atol=0, rtol=0)
    te16 = fp16.text_encoder.get_input_embeddings().weight
    te32 = fp32.text_encoder.get_input_embeddings().weight
    assert torch.equal(te16, (te32 * 0.5).half().float())
    assert np.isfinite(generate(fp16)).all()


def test_missing_variant_is_reported_not_replaced(tmp_path, sd15, extras):
    """fp16 files the tree lists but the cache lacks: the error says the model is not completely cached,
    instead of silently loading the fp32 weights."""
    lay_out_cache(tmp_path / "cache", REPO, repo_files(sd15), listed=extras)
    with pytest.raises(ModelNotCachedError, match="not \\(completely\\) in the local"):
        resolve_pretrained(REPO, variant="fp16", cache_dir=tmp_path / "cache")


def test_not_cached_error_says_why_and_how_to_fix(tmp_path, monkeypatch):
    """Offline with an empty cache: the message names the model, the cache, the switch that blocks
    downloading, and both fixes."""
    with pytest.raises(ModelNotCachedError) as err:
        lcmkit.LatentConsistencyModelPipeline.from_pretrained(REPO, cache_dir=tmp_path / "empty")
    message = str(err.value)
    for part in (
        REPO,
        "not (completely) in the local Hugging Face cache",
        str(tmp_path / "empty"),
        "HF_HUB_OFFLINE=1",
    ):
        assert part in message
    assert "download it once" in message and "local diffusers-layout folder" in message

    monkeypatch.delenv("HF_HUB_OFFLINE")
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_OFFLINE", False)
    with pytest.raises(ModelNotCachedError, match="local_files_only=True forbids downloading"):
        resolve_pretrained(REPO, cache_dir=tmp_path / "empty", local_files_only=True)


@pytest.mark.parametrize(
    "name", ["no-slash-and-no-folder", "a/b/c", "bad--id/x", "./missing/folder", "C:\\models\\x"]
)
def test_neither_folder_nor_hub_id(name):
    with pytest.raises(ValueError, match="neither an existing local folder nor a hub repo id"):
        resolve_pretrained(name)


def test_local_folder_and_file(sd15, tmp_path):
    """A folder comes back as it is (with subfolder joined); a file is refused with a pointer to from_single_file."""
    assert resolve_pretrained(sd15) == sd15
    assert resolve_pretrained(str(sd15), subfolder="unet") == sd15 / "unet"
    with pytest.raises(ValueError, match="from_single_file"):
        resolve_pretrained(sd15 / "unet" / "diffusion_pytorch_model.safetensors")


LISTING = [
    "model_index.json",
    "v1-5-pruned-emaonly.ckpt",
    "unet/config.json",
    "unet/diffusion_pytorch_model.bin",
    "unet/diffusion_pytorch_model.safetensors",
    "unet/diffusion_pytorch_model.fp16.safetensors",
    "unet/diffusion_pytorch_model.fp16.bin",
    "unet/diffusion_flax_model.msgpack",
    "text_encoder/config.json",
    "text_encoder/model.safetensors.index.json",
    "text_encoder/model-00001-of-00002.safetensors",
    "text_encoder/model-00002-of-00002.safetensors",
    "text_encoder/model.fp16-00001-of-00001.safetensors",
    "text_encoder/pytorch_model.bin",
    "tokenizer/merges.txt",
    "tokenizer/vocab.json",
    "tokenizer/tokenizer_config.json",
    "safety_checker/config.json",
    "safety_checker/pytorch_model.bin",
    "feature_extractor/preprocessor_config.json",
    "image_encoder/config.json",
    "image_encoder/model.safetensors",
    "scheduler/scheduler_config.json",
]
INDEX = {
    "_class_name": "LatentConsistencyModelPipeline",
    **{name: ["x", "Y"] for name in ("unet", "text_encoder", "tokenizer", "scheduler", "safety_checker")},
    **{name: ["x", "Y"] for name in ("feature_extractor", "image_encoder")},
    "vae": [None, None],
}


def selected(patterns) -> set[str]:
    return set(filter_repo_objects(LISTING, allow_patterns=patterns))


def test_allow_patterns_fetch_only_what_loading_reads():
    """Filtered the way huggingface_hub filters: configs and tokenizer files of listed components; weights of
    the variant only, safetensors over .bin (all shards), default weights where a component lacks the variant;
    no root checkpoint, no flax, no image-encoder weights, nothing of an absent component."""
    common = {
        "model_index.json",
        "unet/config.json",
        "text_encoder/config.json",
        "text_encoder/model.safetensors.index.json",
        "tokenizer/merges.txt",
        "tokenizer/vocab.json",
        "tokenizer/tokenizer_config.json",
        "safety_checker/config.json",
        "safety_checker/pytorch_model.bin",  # no safetensors, and no fp16: its default .bin in both cases
        "feature_extractor/preprocessor_config.json",
        "image_encoder/config.json",
        "scheduler/scheduler_config.json",
    }
    assert selected(allow_patterns(INDEX, LISTING)) == common | {
        "unet/diffusion_pytorch_model.safetensors",
        "text_encoder/model-00001-of-00002.safetensors",
        "text_encoder/model-00002-of-00002.safetensors",
    }
    assert selected(allow_patterns(INDEX, LISTING, variant="fp16")) == common | {
        "unet/diffusion_pytorch_model.fp16.safetensors",
        "text_encoder/model.fp16-00001-of-00001.safetensors",
    }
    skipped = selected(allow_patterns(INDEX, LISTING, skip_components=("safety_checker",)))
    assert not any(f.startswith("safety_checker/") for f in skipped)


def test_allow_patterns_subfolder_and_odd_names():
    listing = [
        "sub/model_index.json",
        "sub/unet/config.json",
        "sub/unet/w[1].safetensors",
        "sub/unet/w1.safetensors",
    ]
    patterns = allow_patterns({"unet": ["diffusers", "UNet2DConditionModel"]}, listing, subfolder="sub")
    assert set(filter_repo_objects(listing, allow_patterns=patterns)) == set(listing)
    assert "sub/unet/w[[]1].safetensors" in patterns  # glob-escaped, so it names that one file


@pytest.mark.parametrize(
    ("name", "variant"),
    [
        ("unet/diffusion_pytorch_model.safetensors", None),
        ("unet/diffusion_pytorch_model.fp16.safetensors", "fp16"),
        ("text_encoder/model.fp16-00001-of-00002.safetensors", "fp16"),
        ("text_encoder/model-00001-of-00002.safetensors", None),
        ("unet/diffusion_pytorch_model.non_ema.bin", "non_ema"),
    ],
)
def test_weight_variant(name, variant):
    assert weight_variant(name) == variant


def test_online_download_asks_for_the_selected_files_at_one_commit(tmp_path, sd15, extras, monkeypatch):
    """Online (network functions faked): model_index.json first, then the repo listing and the snapshot at the
    commit model_index.json came from, with only the needed files allowed."""
    monkeypatch.delenv("HF_HUB_OFFLINE")
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_OFFLINE", False)
    snapshot = lay_out_cache(tmp_path / "cache", REPO, repo_files(sd15))
    listing = sorted({*repo_files(sd15), *extras})
    calls = {}

    def fake_hf_hub_download(repo_id, filename, **kwargs):
        calls["file"] = (repo_id, filename, kwargs["local_files_only"], kwargs["token"])
        return str(snapshot / filename)

    def fake_list_repo_files(self, repo_id, revision=None, token=None, **kwargs):
        calls["list"] = (repo_id, revision)
        return listing

    def fake_snapshot_download(repo_id, **kwargs):
        calls["snapshot"] = kwargs
        return str(snapshot)

    def fake_get_hf_file_metadata(url, token=None, **kwargs):  # the one look-up that tells the hub answers
        calls["probe"] = (url, token)

    monkeypatch.setattr("huggingface_hub.hf_hub_download", fake_hf_hub_download)
    monkeypatch.setattr("huggingface_hub.HfApi.list_repo_files", fake_list_repo_files)
    monkeypatch.setattr("huggingface_hub.snapshot_download", fake_snapshot_download)
    monkeypatch.setattr("huggingface_hub.get_hf_file_metadata", fake_get_hf_file_metadata)

    assert resolve_pretrained(REPO, variant="fp16", token="hf_x", cache_dir=tmp_path / "cache") == snapshot
    assert (
        calls["probe"][0].endswith(f"/{REPO}/resolve/main/model_index.json") and calls["probe"][1] == "hf_x"
    )
    assert calls["file"] == (REPO, "model_index.json", False, "hf_x")
    assert calls["list"] == (REPO, COMMIT)
    kwargs = calls["snapshot"]
    assert kwargs["revision"] == COMMIT and kwargs["local_files_only"] is False
    fetched = set(filter_repo_objects(listing, allow_patterns=kwargs["allow_patterns"]))
    assert {f for f in fetched if f.endswith((".safetensors", ".bin"))} == {
        f"{stem}.fp16.safetensors" for stem in WEIGHTED
    }


def test_textual_inversion_from_a_cached_hub_repo(tmp_path, sd15):
    """`load_textual_inversion("owner/name")` reads learned_embeds.safetensors from the cache, offline."""
    data_dir = tmp_path / "emb"
    data_dir.mkdir()
    vectors = torch.randn(2, 32, generator=torch.Generator().manual_seed(3))
    save_file({"<cat-toy>": vectors}, str(data_dir / "learned_embeds.safetensors"))
    lay_out_cache(tmp_path / "cache", "concepts/cat-toy", repo_files(data_dir))
    pipe = lcmkit.LatentConsistencyModelPipeline.from_pretrained(sd15)
    pipe.load_textual_inversion("concepts/cat-toy", cache_dir=tmp_path / "cache")
    ids = pipe.tokenizer.convert_tokens_to_ids(["<cat-toy>", "<cat-toy>_1"])
    assert torch.equal(pipe.text_encoder.get_input_embeddings().weight[ids], vectors)
    with pytest.raises(ModelNotCachedError, match="concepts/missing"):
        pipe.load_textual_inversion("concepts/missing", cache_dir=tmp_path / "cache")


def test_offline_flag_sources(monkeypatch):
    monkeypatch.delenv("HF_HUB_OFFLINE")
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_OFFLINE", False)
    assert not hub.is_offline()
    assert hub.is_offline(local_files_only=True)
    monkeypatch.setenv("TRANSFORMERS_OFFLINE", "yes")
    assert hub.is_offline()


def test_cache_layout_helper_matches_huggingface_hub(tmp_path, sd15):
    """Guard for the helper above: huggingface_hub's own cache scanner accepts the layout it writes."""
    from huggingface_hub import scan_cache_dir

    lay_out_cache(tmp_path / "cache", REPO, repo_files(sd15))
    info = scan_cache_dir(tmp_path / "cache")
    assert [r.repo_id for r in info.repos] == [REPO] and not info.warnings
    assert [r.commit_hash for r in next(iter(info.repos)).revisions] == [COMMIT]


# The hub unreachable: one look-up, no retries ---------------------------------------------------------------


@pytest.fixture
def unreachable_hub(monkeypatch) -> list[float]:
    """Online mode with HF_ENDPOINT on a loopback port nothing listens on; huggingface_hub's backoff sleeps are
    recorded instead of slept (so a retrying implementation fails fast here too). Returns the sleeps."""
    monkeypatch.delenv("HF_HUB_OFFLINE")
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_OFFLINE", False)
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        endpoint = f"http://127.0.0.1:{sock.getsockname()[1]}"
    monkeypatch.setattr("huggingface_hub.constants.ENDPOINT", endpoint)
    template = endpoint + "/{repo_id}/resolve/{revision}/{filename}"
    monkeypatch.setattr("huggingface_hub.constants.HUGGINGFACE_CO_URL_TEMPLATE", template)
    sleeps: list[float] = []
    monkeypatch.setattr("huggingface_hub.utils._http.time.sleep", sleeps.append)
    return sleeps


def test_unreachable_hub_fails_at_once_without_retries(tmp_path, unreachable_hub, caplog):
    """Not cached and no hub: one ModelNotCachedError that names the endpoint and the fixes, after a single
    request: no backoff, no warnings (huggingface_hub alone would retry 5 times over about 30 s, warning each time)."""
    from huggingface_hub import constants

    with caplog.at_level(logging.INFO), pytest.raises(ModelNotCachedError) as err:
        resolve_pretrained(REPO, cache_dir=tmp_path / "empty")
    message = str(err.value)
    assert f"the hub at {constants.ENDPOINT} could not be reached" in message and "HF_ENDPOINT" in message
    assert REPO in message and str(tmp_path / "empty") in message and f"hf download {REPO}" in message
    assert unreachable_hub == [], "huggingface_hub backed off and retried"
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING], caplog.text


def test_unreachable_hub_uses_the_cache(tmp_path, sd15, extras, unreachable_hub, caplog):
    """Cached, and no hub: loads from the cache as if offline, with no retries and no warnings (the file listing
    and the snapshot are not asked of the hub that did not answer)."""
    snapshot = lay_out_cache(tmp_path / "cache", REPO, repo_files(sd15), listed=extras)
    with caplog.at_level(logging.INFO):
        assert resolve_pretrained(REPO, cache_dir=tmp_path / "cache") == snapshot
    assert unreachable_hub == []
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING], caplog.text
    assert "could not be reached" in caplog.text  # said at INFO, for --debug


@pytest.mark.parametrize(("status", "unreachable"), [(503, True), (500, True), (404, False), (401, False)])
def test_only_no_answer_or_a_server_error_counts_as_unreachable(status, unreachable, monkeypatch):
    """A 404 or 401 is an answer about the repo: left to hf_hub_download, whose errors name it (repo not found,
    gated). A 5xx means the hub cannot serve now: the cache is used at once, as for no connection."""
    import httpx2
    from huggingface_hub.utils import HfHubHTTPError

    def answer(url, **kwargs):
        response = httpx2.Response(status, request=httpx2.Request("HEAD", url))
        raise HfHubHTTPError(f"{status} from the hub", response=response)

    monkeypatch.setattr("huggingface_hub.get_hf_file_metadata", answer)
    got = hub._unreachable(REPO, "model_index.json", None, None, None)
    assert (got is not None) is unreachable
