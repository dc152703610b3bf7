"""The `lcmkit` command line, end to end on a tiny random model folder.

What these tests prove: arguments reach the pipeline (read back from the PNG's AUTOMATIC1111 `parameters` tEXt
chunk, which is written from what `run_request` actually ran), batch files honour their per-line options, files are
never overwritten (even by concurrent writers), every user mistake is one `lcmkit: error:` line with a non-zero
exit status (a traceback only with --debug) found before a model loads, stdout lists each image with its seed,
a failing batch line is named by file:line (--keep-going runs the rest), a hub id without network fails at once,
--quiet silences stderr, and --help shows every default.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import logging
import os
import re
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import PIL.Image
import pytest

import lcmkit.server
from lcmkit import LatentConsistencyModelPipeline, cli, spec
from lcmkit.cli import main
from lcmkit.io.png import save_png
from lcmkit.request import MAX_SEED, GenerationRequest, run_request
from lcmkit.spec import ModelSpec, load_pipeline


@pytest.fixture(scope="module")
def model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from lcmkit.tiny import build_tiny_lcm

    return build_tiny_lcm(tmp_path_factory.mktemp("tiny") / "m")


def parameters(path: str | Path) -> tuple[list[str], dict[str, str]]:
    """The `parameters` text of a PNG: its lines, and the last line's `Key: value` pairs."""
    with PIL.Image.open(path) as im:
        text = im.text["parameters"]
    lines = text.split("\n")
    return lines, dict(item.split(": ", 1) for item in lines[-1].split(", "))


def printed(stdout: str) -> list[tuple[str, int]]:
    """Stdout, one `PATH<TAB>seed N` line per image, as (path, seed) pairs; any other line fails the test."""
    rows = []
    for line in stdout.splitlines():
        path, _, seed = line.partition("\tseed ")
        assert path and seed.isdigit(), f"not a PATH<TAB>seed N line: {line!r}"
        rows.append((path, int(seed)))
    return rows


def paths(stdout: str) -> list[str]:
    return [path for path, _ in printed(stdout)]


def noise_png(path: Path, size: tuple[int, int]) -> Path:
    pixels = np.random.default_rng(0).integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
    PIL.Image.fromarray(pixels).save(path)
    return path


def test_generate_png_carries_a1111_parameters(model, tmp_path, capsys):
    """Prompt, steps, seed (+1 per image), size and CFG scale land in a tEXt `parameters` chunk; --quiet: no bars."""
    argv = ["generate", "a red circle", "--model", str(model), "--out", str(tmp_path), "--steps", "2",
            "--seed", "42", "--size", "48x32", "--guidance", "7.5", "-n", "2", "--quiet"]  # fmt: skip
    assert main(argv) == 0
    out = capsys.readouterr()
    assert printed(out.out) == [
        (str(tmp_path / "a-red-circle-0000.png"), 42),
        (str(tmp_path / "a-red-circle-0001.png"), 43),
    ]
    assert "it/s" not in out.err and "%" not in out.err
    for path, seed in zip(paths(out.out), ("42", "43"), strict=True):
        lines, fields = parameters(path)
        assert lines[0] == "a red circle"
        assert fields["Steps"] == "2" and fields["Seed"] == seed and fields["Size"] == "48x32"
        assert fields["CFG scale"] == "7.5" and fields["Sampler"] == "LCM" and fields["Model"] == "m"
        with PIL.Image.open(path) as im:
            assert im.size == (48, 32)
    assert b"tEXtparameters\x00a red circle\n" in Path(paths(out.out)[0]).read_bytes()


def test_python_m_lcmkit_in_a_subprocess(model, tmp_path):
    """`python -m lcmkit generate` works as a real process: exit 0, the path and seed on stdout, the step bar on
    stderr."""
    argv = ["-m", "lcmkit", "generate", "a blue square", "--model", str(model), "--out", "o", "--steps", "1",
            "--seed", "7"]  # fmt: skip
    run = subprocess.run([sys.executable, *argv], cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr
    assert run.stdout.splitlines() == [f"{Path('o') / 'a-blue-square-0000.png'}\tseed 7"]
    # the pipeline's tqdm step bar (it is cleared when done, so its last frame may still read 0/1)
    assert re.search(r"\d/1 \[", run.stderr), run.stderr
    lines, fields = parameters(tmp_path / "o" / "a-blue-square-0000.png")
    assert lines[0] == "a blue square"
    assert (fields["Steps"], fields["Seed"], fields["Size"], fields["CFG scale"]) == (
        "1",
        "7",
        "32x32",
        "8.5",
    )


def test_img2img_keeps_or_resizes_the_input(model, tmp_path, capsys):
    """img2img records its strength; the output has the input's size, or --size when given."""
    image = noise_png(tmp_path / "in.png", (40, 48))
    base = ["img2img", str(image), "a cat", "--model", str(model), "--out", str(tmp_path / "o"), "--steps", "2",
            "--strength", "0.5", "--seed", "1", "--quiet"]  # fmt: skip
    assert main(base) == 0
    assert main([*base, "--size", "32x24"]) == 0
    first, second = paths(capsys.readouterr().out)
    _, fields = parameters(first)
    assert fields["Denoising strength"] == "0.5" and fields["Size"] == "40x48" and fields["Seed"] == "1"
    assert parameters(second)[1]["Size"] == "32x24"


def test_negative_prompt_and_switches_reach_the_pipeline(model, tmp_path, capsys):
    """--negative is written as A1111's `Negative prompt:` line; --freeu and --vae-tiling run on a real pipeline."""
    argv = ["generate", "a house", "--negative", "blurry", "--freeu", "--vae-tiling", "--model", str(model),
            "--out", str(tmp_path), "--steps", "1", "--seed", "3", "--quiet"]  # fmt: skip
    assert main(argv) == 0
    lines, fields = parameters(capsys.readouterr().out.split()[0])
    assert lines[:2] == ["a house", "Negative prompt: blurry"] and fields["Seed"] == "3"


def test_tiny_vae_fast_mode(model, tmp_path, capsys):
    """--tiny-vae decodes with an AutoencoderTiny folder (random weights here: this checks the wiring)."""
    import torch
    from helpers.tiny_models import TAESD_8

    from lcmkit.models.tiny_vae import AutoencoderTiny

    torch.manual_seed(0)
    AutoencoderTiny(TAESD_8).save_pretrained(tmp_path / "taesd")
    argv = ["generate", "a red circle", "--model", str(model), "--out", str(tmp_path / "o"), "--steps", "1",
            "--seed", "3", "--tiny-vae", str(tmp_path / "taesd"), "--quiet"]  # fmt: skip
    assert main(argv) == 0
    with PIL.Image.open(capsys.readouterr().out.split()[0]) as im:
        # 16x16 latents, and this tiny VAE upsamples 8x (the model's own VAE: 2x)
        assert im.size == (128, 128)
    assert main([*argv[:-3], "--tiny-vae", str(tmp_path / "nope"), "--quiet"]) == 2
    assert "--tiny-vae" in capsys.readouterr().err


def test_openvino_fast_mode(model, tmp_path, capsys, monkeypatch):
    """--openvino fp32 gives the eager image (within 1/255) and caches the graph; --freeu is refused with it."""
    pytest.importorskip("openvino")
    monkeypatch.setenv("LCMKIT_OPENVINO_CACHE", str(tmp_path / "cache"))
    base = ["generate", "a red circle", "--model", str(model), "--steps", "2", "--seed", "3", "--quiet"]
    assert main([*base, "--out", str(tmp_path / "eager")]) == 0
    assert main([*base, "--out", str(tmp_path / "ov"), "--openvino", "fp32"]) == 0
    eager, fast = (np.asarray(PIL.Image.open(p), dtype=int) for p in paths(capsys.readouterr().out))
    assert eager.shape == fast.shape and np.abs(eager - fast).max() <= 1
    assert list((tmp_path / "cache").glob("unet-fp32-*.xml"))  # converted once, kept for the next run
    assert list((tmp_path / "cache").glob("vae-decoder-fp32-*.xml"))  # the decoder too, still within 1/255
    assert main([*base, "--out", str(tmp_path / "o"), "--openvino", "fp32", "--freeu"]) == 2
    assert "--freeu cannot be combined with --openvino" in capsys.readouterr().err
    assert main([*base, "--openvino", "int8"]) == 2
    err = capsys.readouterr().err
    assert "invalid choice: 'int8'" in err and "'int8-weights'" in err


def test_openvino_installs_the_unet_and_the_vae_decoder(model, tmp_path, monkeypatch):
    """--openvino puts both the UNet and the full VAE's decoder on OpenVINO; a --tiny-vae stays eager."""
    pytest.importorskip("openvino")
    from helpers.tiny_models import TAESD_8

    from lcmkit.accel import OpenVINOUNetPerShape, OpenVINOVAEDecoder
    from lcmkit.models.tiny_vae import AutoencoderTiny

    monkeypatch.setenv("LCMKIT_OPENVINO_CACHE", str(tmp_path / "cache"))
    argv = ["generate", "a red circle", "--model", str(model), "--openvino", "fp32"]
    pipe, _ = load_pipeline(cli.model_spec(cli.build_parser().parse_args(argv)))
    assert isinstance(pipe.unet, OpenVINOUNetPerShape) and isinstance(pipe.vae.decoder, OpenVINOVAEDecoder)
    AutoencoderTiny(TAESD_8).save_pretrained(tmp_path / "taesd")
    args = cli.build_parser().parse_args([*argv, "--tiny-vae", str(tmp_path / "taesd")])
    pipe, _ = load_pipeline(cli.model_spec(args))
    assert isinstance(pipe.unet, OpenVINOUNetPerShape) and isinstance(pipe.vae, AutoencoderTiny)
    assert not isinstance(pipe.vae.decoder, OpenVINOVAEDecoder)


def test_batch_text_file(model, tmp_path, capsys):
    """One prompt per line (blank lines and # comments skipped), each with the command-line options; a batch bar."""
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a cat\n\n# not a prompt\n  a dog  \n")
    argv = ["generate", "--prompts", str(prompts), "--model", str(model), "--out", str(tmp_path / "o"),
            "--steps", "1", "--seed", "5"]  # fmt: skip
    assert main(argv) == 0
    out = capsys.readouterr()
    written = paths(out.out)
    assert [Path(p).name for p in written] == ["a-cat-0000.png", "a-dog-0000.png"]
    assert [parameters(p)[0][0] for p in written] == ["a cat", "a dog"]
    assert all(parameters(p)[1]["Seed"] == "5" for p in written)
    assert "batch" in out.err and "2/2" in out.err


def test_batch_jsonl_honours_per_line_options(model, tmp_path, capsys):
    """JSONL keys override the options for their line only; `image` (relative to the file) makes it img2img."""
    noise_png(tmp_path / "in.png", (24, 40))
    lines = [
        {"prompt": "first", "steps": 1, "seed": 3, "size": "48x32"},
        {"prompt": "second", "guidance": 2, "n": 2, "width": 40, "height": 24},
        {"prompt": "third", "image": "in.png", "strength": 0.5, "steps": 2},
    ]
    batch = tmp_path / "batch.jsonl"
    batch.write_text("\n".join(json.dumps(line) for line in lines) + "\n")
    argv = ["generate", "--prompts", str(batch), "--model", str(model), "--out", str(tmp_path / "o"),
            "--steps", "3", "--seed", "9", "--quiet"]  # fmt: skip
    assert main(argv) == 0
    got = [parameters(p) for p in paths(capsys.readouterr().out)]
    assert [g[0][0] for g in got] == ["first", "second", "second", "third"]
    one, two_a, two_b, three = (g[1] for g in got)
    assert (one["Steps"], one["Seed"], one["Size"], one["CFG scale"]) == ("1", "3", "48x32", "8.5")
    assert (two_a["Steps"], two_a["Seed"], two_a["Size"], two_a["CFG scale"]) == ("3", "9", "40x24", "2")
    assert two_b["Seed"] == "10"
    assert (three["Steps"], three["Denoising strength"], three["Size"]) == ("2", "0.5", "24x40")
    assert "Denoising strength" not in one


def test_never_overwrites(model, tmp_path, capsys):
    """An existing file keeps its bytes; the same seed twice gives two files with the same pixels."""
    (tmp_path / "a-cat-0000.png").write_bytes(b"precious")
    argv = [
        "generate",
        "a cat",
        "--model",
        str(model),
        "--out",
        str(tmp_path),
        "--steps",
        "1",
        "--seed",
        "1",
        "--quiet",
    ]
    assert main(argv) == 0 and main(argv) == 0
    assert (tmp_path / "a-cat-0000.png").read_bytes() == b"precious"
    assert [Path(p).name for p in paths(capsys.readouterr().out)] == ["a-cat-0001.png", "a-cat-0002.png"]
    with PIL.Image.open(tmp_path / "a-cat-0001.png") as a, PIL.Image.open(tmp_path / "a-cat-0002.png") as b:
        assert np.array_equal(np.asarray(a), np.asarray(b))


def test_concurrent_writers_get_distinct_files(tmp_path):
    """Exclusive create: 8 threads saving under one name at once end up with 8 files, none overwritten."""
    # one image object per thread: PIL keeps per-save settings on the image object, so sharing one across
    # threads would mix up their text chunks (a PIL property, not what this test is about)
    images = [PIL.Image.new("RGB", (8, 8)) for _ in range(8)]
    paths: list[Path] = []
    threads = [
        threading.Thread(target=lambda i=i: paths.append(save_png(images[i], tmp_path, "race", f"p{i}")))
        for i in range(8)
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(set(paths)) == 8 and len(list(tmp_path.glob("race-*.png"))) == 8
    texts = set()
    for p in paths:
        with PIL.Image.open(p) as im:
            texts.add(im.text["parameters"])
    assert texts == {f"p{i}" for i in range(8)}


ERRORS = [
    (["generate", "x", "--size", "30x30"], "multiple of 8"),
    (["generate", "x", "--size", "big"], "WIDTHxHEIGHT"),
    (["generate", "x", "--steps", "0"], "--steps must be an integer at least 1"),
    (["generate", "x", "--seed", "-5"], "seed must be"),
    (["generate", "x", "--strength", "1.5"], "--strength"),
    (["generate", "x", "--model", "{tmp}/missing"], "no such folder or file"),
    (["generate", "x", "--model", "{tmp}/notes.txt"], "single-file checkpoint"),
    (["generate", "--model", "{model}"], "no prompt"),
    (["generate", "x", "--prompts", "{tmp}/notes.txt", "--model", "{model}"], "not both"),
    (["img2img", "{tmp}/nope.png", "x", "--model", "{model}"], "input image not found"),
    (["img2img", "{tmp}/notes.txt", "x", "--model", "{model}"], "cannot read image"),
    (["generate", "--prompts", "{tmp}/nope.txt", "--model", "{model}"], "cannot read --prompts file"),
    (["generate", "--prompts", "{tmp}/empty.txt", "--model", "{model}"], "has no prompts"),
    (["generate", "--prompts", "{tmp}/bad_json.jsonl", "--model", "{model}"], "bad_json.jsonl:2: not valid JSON"),
    (["generate", "--prompts", "{tmp}/bad_key.jsonl", "--model", "{model}"], "bad_key.jsonl:1: unknown key(s) ['stepz']"),
    (["generate", "--prompts", "{tmp}/bad_value.jsonl", "--model", "{model}"], "bad_value.jsonl:3: steps must be"),
    (["generate", "--prompts", "{tmp}/bad_image.jsonl", "--model", "{model}"], "bad_image.jsonl:1: input image not found"),
    (["generate", "x", "--lora", "a.safetensors:heavy"], "weight in --lora"),
    (["generate", "x", "--lora", ":0.5"], "PATH[:WEIGHT]"),
    (["generate", "x", "--lora", "{tmp}/missing.safetensors"], "--lora file not found"),
    (["generate", "x", "--freeu", "1,2"], "4 comma-separated numbers"),
    (["generate", "x", "--model", "{model}", "--freeu", "1,2,3,x"], "--freeu value must be a number"),
    (["serve", "--port", "99999"], "--port"),
    (["serve", "--limit", "max_steps"], "NAME=VALUE"),
    (["frobnicate"], "invalid choice"),
]  # fmt: skip


@pytest.mark.parametrize(("argv", "message"), ERRORS, ids=[" ".join(a[:1] + a[2:4]) for a, _ in ERRORS])
def test_errors_are_one_line(argv, message, model, tmp_path, capsys):
    (tmp_path / "notes.txt").write_text("a cat\n")
    (tmp_path / "empty.txt").write_text("\n# only a comment\n")
    (tmp_path / "bad_json.jsonl").write_text('{"prompt": "ok"}\n{"prompt": "oops",}\n')
    (tmp_path / "bad_key.jsonl").write_text('{"prompt": "ok", "stepz": 2}\n')
    (tmp_path / "bad_value.jsonl").write_text('{"prompt": "a"}\n\n{"prompt": "b", "steps": 0}\n')
    (tmp_path / "bad_image.jsonl").write_text('{"prompt": "a", "image": "nope.png"}\n')
    argv = [a.format(tmp=tmp_path, model=model) for a in argv]
    code = main(argv)
    err = capsys.readouterr().err.strip()
    assert code != 0
    assert err.startswith("lcmkit: error: ") and "\n" not in err, err
    assert message in err
    assert not list(tmp_path.glob("**/*.png")), "nothing is generated when the input is wrong"


def test_no_model_names_how_to_pass_one(monkeypatch, tmp_path, capsys):
    """Without --model and without the shipped model folder: one line naming --model and `lcmkit demo`, exit 2."""
    monkeypatch.setattr(spec, "DEFAULT_MODEL", tmp_path / "not-shipped-yet")
    assert main(["generate", "x", "--out", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "--model PATH_OR_HUB_ID" in err and "lcmkit demo" in err


def test_shipped_model_folder_is_the_default(monkeypatch, model, tmp_path, capsys):
    monkeypatch.setattr(spec, "DEFAULT_MODEL", model)
    assert main(["generate", "x", "--out", str(tmp_path), "--steps", "1", "--quiet"]) == 0
    assert parameters(capsys.readouterr().out.split()[0])[1]["Model"] == "m"


def test_debug_shows_the_traceback(tmp_path, capsys):
    level = logging.getLogger("lcmkit").level
    try:
        assert main(["generate", "x", "--model", str(tmp_path / "missing"), "--debug"]) == 2
    finally:
        logging.getLogger("lcmkit").setLevel(level)
    err = capsys.readouterr().err
    assert "Traceback (most recent call last)" in err and "SpecError" in err
    assert err.strip().splitlines()[-1].startswith("lcmkit: error: --model")
    assert main(["generate", "x", "--model", str(tmp_path / "missing")]) == 2
    assert "Traceback" not in capsys.readouterr().err


class FakePipe:
    """Records what the CLI asks of a pipeline; returns grey images, and fails on the prompt "boom"."""

    def __init__(self, source: str, calls: list) -> None:
        self.calls = calls
        calls.append(("load", source))
        self._progress_bar_config: dict = {}

    def __getattr__(self, name: str):
        return lambda *args, **kwargs: self.calls.append((name, *args, *kwargs.values()))

    def __call__(self, prompt, num_images_per_prompt=1, width=None, height=None, **kwargs):
        if prompt == "boom":
            raise RuntimeError("out of memory (pretend)")
        return SimpleNamespace(
            images=[PIL.Image.new("RGB", (width or 8, height or 8))] * num_images_per_prompt
        )


def pipeline_folder(folder: Path) -> Path:
    """A folder that passes ModelSpec's check (it has a model_index.json); the fakes never read it."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "model_index.json").write_text("{}")
    return folder


@pytest.fixture
def fake_loading(monkeypatch, tmp_path) -> list:
    """from_pretrained/from_single_file build a FakePipe; a hub id resolves to a local snapshot folder (no
    network). Returns the list of calls, hub look-ups as ("hub", repo_id, skipped components)."""
    calls: list = []
    fake = classmethod(lambda cls, source, **kw: FakePipe(source, calls))
    monkeypatch.setattr(LatentConsistencyModelPipeline, "from_pretrained", fake)
    monkeypatch.setattr(LatentConsistencyModelPipeline, "from_single_file", fake, raising=False)
    snapshot = pipeline_folder(tmp_path / "hub-snapshot")

    def resolve(name, skip_components=(), **kwargs):
        calls.append(("hub", name, tuple(skip_components)))
        return snapshot

    monkeypatch.setattr("lcmkit.loading.hub.resolve_pretrained", resolve)
    return calls


@pytest.mark.parametrize("kind", ["folder", "single_file", "hub_id"])
def test_model_loading_lora_and_freeu_calls(kind, fake_loading, tmp_path, capsys):
    """Folders and hub ids go to from_pretrained (a hub id through its cached snapshot), .safetensors/.ckpt files
    to from_single_file; each --lora is loaded as lora{i} and weighted through one set_adapters call; --freeu
    without values uses the SD1.5 set; the infotext names the model as given."""
    calls = fake_loading
    (tmp_path / "a.safetensors").write_bytes(b"")
    folder = pipeline_folder(tmp_path / "model")
    model = {"folder": folder, "single_file": tmp_path / "a.safetensors", "hub_id": "owner/name"}[kind]
    argv = ["generate", "x", "--model", str(model), "--out", str(tmp_path / "o"), "--lora",
            f"{tmp_path / 'a.safetensors'}:0.5", "--lora", "owner/lora", "--freeu", "--vae-tiling", "--quiet"]  # fmt: skip
    assert main(argv) == 0, capsys.readouterr().err
    lora = str(tmp_path / "a.safetensors")
    loaded = {"folder": [("load", str(folder))], "single_file": [("load", str(model))],
              "hub_id": [("hub", "owner/name", ()), ("load", str(tmp_path / "hub-snapshot"))]}[kind]  # fmt: skip
    assert calls == [
        *loaded,
        ("load_lora_weights", lora, "lora0"),
        ("load_lora_weights", "owner/lora", "lora1"),
        ("set_adapters", ["lora0", "lora1"], [0.5, 1.0]),
        ("enable_vae_tiling",),
        ("enable_freeu", 0.9, 0.2, 1.5, 1.6),
        ("set_progress_bar_config", True, False),
    ]
    name = {"folder": "model", "single_file": "a", "hub_id": "owner/name"}[kind]
    assert parameters(paths(capsys.readouterr().out)[0])[1]["Model"] == name


def test_freeu_values(fake_loading, tmp_path):
    argv = [
        "generate",
        "x",
        "--model",
        "owner/name",
        "--freeu",
        "1,1.1,1.2,1.3",
        "--out",
        str(tmp_path),
        "--quiet",
    ]
    assert main(argv) == 0
    assert ("enable_freeu", 1.0, 1.1, 1.2, 1.3) in fake_loading


def test_demo_labels_its_noise(tmp_path, capsys):
    """The demo says on stderr that its model is random (not under --quiet), and its infotext says so too."""
    assert main(["demo", "--out", str(tmp_path), "--steps", "1"]) == 0
    out = capsys.readouterr()
    assert "NOISE" in out.err and "RANDOM" in out.err
    assert parameters(paths(out.out)[0])[1]["Model"] == "tiny-random-noise"
    assert main(["demo", "--out", str(tmp_path), "--steps", "1", "--quiet"]) == 0
    out = capsys.readouterr()
    assert out.err == "" and parameters(paths(out.out)[0])[1]["Model"] == "tiny-random-noise"


def test_serve_passes_its_arguments(monkeypatch, tmp_path):
    """`lcmkit serve` builds the same ModelSpec as generate from the same options and calls
    lcmkit.server.serve(spec, host, port, api_key, **limits)."""
    seen = []
    monkeypatch.setattr(lcmkit.server, "serve", lambda *a, **kw: seen.append((a, kw)), raising=False)
    argv = ["serve", "--model", "owner/name", "--host", "0.0.0.0", "--port", "9000", "--api-key", "k",
            "--limit", "max_steps=8", "--limit", "queue_size=2"]  # fmt: skip
    assert main(argv) == 0
    assert seen[-1] == (
        (ModelSpec(model="owner/name"),),
        dict(host="0.0.0.0", port=9000, api_key="k", max_steps=8, queue_size=2, unsupported="refuse"),
    )
    monkeypatch.setenv("LCMKIT_API_KEY", "from-env")
    assert main(["serve"]) == 0
    assert seen[-1] == (
        (ModelSpec(),),
        dict(host="127.0.0.1", port=7860, api_key="from-env", unsupported="refuse"),
    )


def test_serve_takes_every_model_option_generate_takes(monkeypatch, tmp_path):
    """A single file, LoRAs with weights, a tiny VAE, FreeU, tiling, OpenVINO, device and dtype: the spec serve
    gets equals the one generate loads from the same options."""
    seen = []
    monkeypatch.setattr(lcmkit.server, "serve", lambda *a, **kw: seen.append(a[0]), raising=False)
    (tmp_path / "m.safetensors").write_bytes(b"")
    (tmp_path / "l.safetensors").write_bytes(b"")
    pipeline_folder(tmp_path / "taesd").joinpath("config.json").write_text("{}")
    options = ["--model", str(tmp_path / "m.safetensors"), "--lora", f"{tmp_path / 'l.safetensors'}:0.7",
               "--lora", "owner/lora", "--tiny-vae", str(tmp_path / "taesd"), "--vae-tiling", "--device", "cpu",
               "--dtype", "float32"]  # fmt: skip
    assert main(["serve", *options, "--freeu", "1,2,3,4"]) == 0
    assert seen[-1] == ModelSpec(model=str(tmp_path / "m.safetensors"),
                                 loras=((str(tmp_path / "l.safetensors"), 0.7), ("owner/lora", 1.0)),
                                 tiny_vae=str(tmp_path / "taesd"), freeu=(1.0, 2.0, 3.0, 4.0), vae_tiling=True,
                                 device="cpu", dtype="float32")  # fmt: skip
    generate_args = cli.build_parser().parse_args(["generate", "x", *options, "--freeu", "1,2,3,4"])
    assert cli.model_spec(generate_args) == seen[-1]
    if importlib.util.find_spec("openvino"):  # check_runtime refuses --openvino without the package
        assert main(["serve", "--openvino", "int8-weights"]) == 0
        assert seen[-1] == ModelSpec(openvino="int8-weights")


SERVE_ERRORS = [
    (["--model", "{tmp}/missing"], "--model {tmp}/missing: no such folder or file"),
    (["--model", "{tmp}/notes.txt"], "single-file checkpoint"),
    (["--model", "{tmp}"], "no model_index.json"),
    (["--openvino", "fp32", "--freeu"], "--freeu cannot be combined with --openvino"),
    (["--openvino", "fp32", "--device", "cuda"], "--openvino runs on the CPU"),
    (["--device", "cuda:99"], "--device cuda:99"),
    (["--device", "warp-drive"], "--device must be a torch device"),
    (["--tiny-vae", "{tmp}"], "--tiny-vae"),
    (["--lora", "{tmp}/nope"], "--lora {tmp}/nope: no such file or folder"),
    (["--limit", "max_widht=512"], "--limit max_widht: not a server limit"),
    (["--limit", "max_steps=0"], "max_steps must be a positive integer"),
]  # fmt: skip


@pytest.mark.parametrize(("argv", "message"), SERVE_ERRORS, ids=[" ".join(a) for a, _ in SERVE_ERRORS])
def test_serve_refuses_a_bad_spec_before_listening(argv, message, monkeypatch, tmp_path, capsys):
    """A model option that cannot work is one `lcmkit: error:` line naming the option, exit status 2, and the
    server never starts (uvicorn is not called)."""
    import uvicorn

    (tmp_path / "notes.txt").write_text("x")
    started = []
    monkeypatch.setattr(uvicorn, "run", lambda *a, **kw: started.append(a))
    code = main(["serve", *(a.format(tmp=tmp_path) for a in argv)])
    err = capsys.readouterr().err
    assert code == 2 and not started
    assert err.startswith("lcmkit: error: ") and err.count("\n") == 1, err
    assert message.format(tmp=tmp_path) in err


def test_help_and_entry_points(capsys):
    import lcmkit.__main__

    assert lcmkit.__main__.main is main
    assert main(["--help"]) == 0
    out = capsys.readouterr().out
    assert all(c in out for c in ("generate", "img2img", "demo", "serve")), out


def test_run_request_rejects_a_negative_prompt_the_pipeline_cannot_take():
    """A pipeline whose __call__ has no `negative_prompt` gets a clear ValueError, not an 'unexpected kwarg'."""

    class NoNegative:
        _progress_bar_config: dict = {}

        def __call__(self, prompt, **kwargs):
            raise AssertionError("must not be called")

    with pytest.raises(ValueError, match="takes no negative prompt"):
        run_request(NoNegative(), GenerationRequest("x", negative_prompt="blurry", seed=0))


# --out is checked before the model loads -------------------------------------------------------------------


def unwritable_folder(tmp_path: Path) -> Path:
    """A folder this process cannot write in: a read-only one, or for root (whom permissions do not stop) one in
    sysfs, which refuses new files to everybody."""
    if os.geteuid() != 0:
        folder = tmp_path / "read-only"
        folder.mkdir()
        folder.chmod(0o500)
        return folder
    if not Path("/sys/kernel").is_dir():
        pytest.skip("running as root without /sys: no folder here refuses root's writes")
    return Path("/sys/kernel")


BAD_OUT = {
    "existing file": lambda tmp: tmp / "notes.txt",
    "path under a file": lambda tmp: tmp / "notes.txt" / "sub",
    "unwritable folder": unwritable_folder,
    "new folder in an unwritable one": lambda tmp: unwritable_folder(tmp) / "new",
}


@pytest.mark.parametrize("command", ["generate", "img2img", "demo"])
@pytest.mark.parametrize("case", list(BAD_OUT))
def test_bad_out_is_refused_before_the_model_loads(case, command, monkeypatch, tmp_path, capsys):
    """An --out that cannot hold the images is one line naming --out, exit status 2, and no model is loaded or
    built (loading is made to blow up, so a check that came after it would show)."""
    (tmp_path / "notes.txt").write_text("precious")
    image = noise_png(tmp_path / "in.png", (16, 16))

    def no_loading(*args, **kwargs):
        raise AssertionError("the model was loaded before --out was checked")

    monkeypatch.setattr(LatentConsistencyModelPipeline, "from_pretrained", classmethod(no_loading))
    monkeypatch.setattr("lcmkit.tiny.build_tiny_lcm", no_loading)
    out = BAD_OUT[case](tmp_path)
    argv = {"generate": ["generate", "a cat"], "img2img": ["img2img", str(image), "a cat"], "demo": ["demo"]}
    try:
        code = main([*argv[command], "--out", str(out), "--steps", "1"])
    finally:
        if out.parent.name == "read-only" or out.name == "read-only":
            (tmp_path / "read-only").chmod(0o700)
    err = capsys.readouterr().err
    assert code == 2, err
    assert err.startswith(f"lcmkit: error: --out {out}") and err.count("\n") == 1, err
    assert (tmp_path / "notes.txt").read_text() == "precious"


def test_out_folder_is_created_when_missing(model, tmp_path, capsys):
    argv = [
        "generate",
        "a cat",
        "--model",
        str(model),
        "--out",
        str(tmp_path / "new" / "deeper"),
        "--steps",
        "1",
    ]
    assert main([*argv, "--quiet"]) == 0
    assert paths(capsys.readouterr().out) == [str(tmp_path / "new" / "deeper" / "a-cat-0000.png")]


# Seeds -------------------------------------------------------------------------------------------------------


def test_every_image_prints_the_seed_it_was_made_with(model, tmp_path, capsys):
    """Without --seed each prompt gets a random start; stdout says each image's seed, the one its infotext (and
    so A1111's PNG info) records, and consecutive within a prompt."""
    prompts = tmp_path / "p.txt"
    prompts.write_text("a cat\na dog\n")
    argv = ["generate", "--prompts", str(prompts), "-n", "2", "--model", str(model), "--out", str(tmp_path / "o"),
            "--steps", "1", "--quiet"]  # fmt: skip
    assert main(argv) == 0
    rows = printed(capsys.readouterr().out)
    assert len(rows) == 4
    for path, seed in rows:
        assert parameters(path)[1]["Seed"] == str(seed) and 0 <= seed <= MAX_SEED
    assert rows[1][1] == rows[0][1] + 1 and rows[3][1] == rows[2][1] + 1


def test_seeds_past_the_largest_are_refused_before_loading(model, tmp_path, capsys):
    """--seed MAX with -n 2 would make image 2's seed MAX+1, which A1111 cannot take back: refused up front."""
    argv = [
        "generate",
        "a cat",
        "--model",
        str(model),
        "--out",
        str(tmp_path),
        "--seed",
        str(MAX_SEED),
        "-n",
        "2",
    ]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and f"between -1 (random) and {MAX_SEED - 1} for 2 images" in err, err
    assert not list(tmp_path.glob("*.png"))
    assert main([*argv[:-2], "--steps", "1", "--quiet"]) == 0  # one image at the largest seed is fine
    assert printed(capsys.readouterr().out)[0][1] == MAX_SEED


# Batches -----------------------------------------------------------------------------------------------------


def test_batch_stops_at_a_failing_line_and_names_it(fake_loading, tmp_path, capsys):
    """Without --keep-going the batch stops at the first line that fails at run time, saying file:line, how far it
    got and how to go on; the images of the lines before stay on disk; exit status 1."""
    prompts = tmp_path / "p.txt"
    prompts.write_text("a cat\n# comment\nboom\na dog\n")
    argv = ["generate", "--prompts", str(prompts), "--model", str(pipeline_folder(tmp_path / "m")), "--out",
            str(tmp_path / "o"), "--seed", "1", "--quiet"]  # fmt: skip
    assert main(argv) == 1
    out = capsys.readouterr()
    assert paths(out.out) == [str(tmp_path / "o" / "a-cat-0000.png")]
    assert (tmp_path / "o" / "a-cat-0000.png").is_file() and not (tmp_path / "o" / "a-dog-0000.png").exists()
    assert out.err.count("\n") == 1, out.err
    assert out.err.startswith(f"lcmkit: error: {prompts}:3: RuntimeError: out of memory (pretend)")
    assert "1 of 3 prompts done" in out.err and "--keep-going" in out.err


def test_keep_going_runs_the_other_lines_and_lists_the_failures(fake_loading, tmp_path, capsys):
    prompts = tmp_path / "p.jsonl"
    lines = [{"prompt": "boom"}, {"prompt": "a cat"}, {"prompt": "boom", "seed": 3}, {"prompt": "a dog"}]
    prompts.write_text("".join(json.dumps(line) + "\n" for line in lines))
    argv = ["generate", "--prompts", str(prompts), "--model", str(pipeline_folder(tmp_path / "m")), "--out",
            str(tmp_path / "o"), "--keep-going", "--quiet"]  # fmt: skip
    assert main(argv) == 1
    out = capsys.readouterr()
    assert [Path(p).name for p in paths(out.out)] == ["a-cat-0000.png", "a-dog-0000.png"]
    summary = out.err[out.err.index("lcmkit: error: 2 of 4 prompts failed:") :].splitlines()
    assert summary[1:] == [f"  {prompts}:{n}: RuntimeError: out of memory (pretend)" for n in (1, 3)]
    assert out.err.count(f"{prompts}:1:") == 2  # once when it failed, once in the summary


def test_batch_failure_on_the_real_model_names_the_line(model, tmp_path, capsys):
    """A real img2img batch whose second image is not an image: the first image is written, the error names the
    second line and the file it could not read; --keep-going then also runs the third."""
    noise_png(tmp_path / "in.png", (32, 32))
    (tmp_path / "broken.png").write_bytes(b"not a png")
    lines = [{"prompt": "one", "image": "in.png"}, {"prompt": "two", "image": "broken.png"},
             {"prompt": "three", "image": "in.png"}]  # fmt: skip
    prompts = tmp_path / "b.jsonl"
    prompts.write_text("".join(json.dumps(line) + "\n" for line in lines))
    argv = ["img2img", str(tmp_path / "in.png"), "--prompts", str(prompts), "--model", str(model), "--out",
            str(tmp_path / "o"), "--steps", "1", "--strength", "1", "--quiet"]  # fmt: skip
    assert main(argv) == 1
    out = capsys.readouterr()
    assert [Path(p).name for p in paths(out.out)] == ["one-0000.png"]
    assert out.err.startswith(f"lcmkit: error: {prompts}:2: cannot read image {tmp_path / 'broken.png'}")
    assert main([*argv, "--keep-going"]) == 1
    out = capsys.readouterr()
    assert [Path(p).name for p in paths(out.out)] == ["one-0001.png", "three-0000.png"]
    assert f"1 of 3 prompts failed:\n  {prompts}:2: cannot read image" in out.err


# Hub ids without network -------------------------------------------------------------------------------------


def closed_port() -> int:
    """A loopback port nothing listens on (the OS hands it out, and it is closed again before use)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def lcmkit_process(argv: list[str], cwd: Path, **env: str) -> tuple[subprocess.CompletedProcess, float]:
    clean = {k: v for k, v in os.environ.items() if not k.startswith(("HF_", "TRANSFORMERS_", "HUGGINGFACE"))}
    start = time.monotonic()
    run = subprocess.run([sys.executable, "-m", "lcmkit", *argv], cwd=cwd, capture_output=True, text=True,
                         timeout=120, env={**clean, **env})  # fmt: skip
    return run, time.monotonic() - start


def test_hub_id_without_network_fails_at_once_in_one_line(tmp_path):
    """The hub unreachable (HF_ENDPOINT on a closed port, empty HF_HOME): one error line naming the model, the
    endpoint and the fixes, within 5 s of starting the process, instead of huggingface_hub's retries (about
    30 s and a dozen warning lines)."""
    endpoint = f"http://127.0.0.1:{closed_port()}"
    argv = ["generate", "a cat", "--model", "owner/no-such-model", "--out", "o"]
    run, seconds = lcmkit_process(argv, tmp_path, HF_ENDPOINT=endpoint, HF_HOME=str(tmp_path / "hf"))
    assert run.returncode == 1 and run.stdout == ""
    lines = run.stderr.splitlines()
    assert len(lines) == 1, run.stderr
    assert lines[0].startswith("lcmkit: error: 'owner/no-such-model' is not a local path")
    assert f"the hub at {endpoint} could not be reached" in lines[0] and "HF_ENDPOINT" in lines[0]
    assert seconds < 5, f"took {seconds:.1f} s"


def test_hub_id_offline_mode_says_it_is_not_cached(tmp_path):
    argv = ["generate", "a cat", "--model", "owner/no-such-model", "--out", "o"]
    run, _ = lcmkit_process(argv, tmp_path, HF_HUB_OFFLINE="1", HF_HOME=str(tmp_path / "hf"))
    assert run.returncode == 1 and run.stderr.count("\n") == 1, run.stderr
    assert (
        "'owner/no-such-model'" in run.stderr
        and "not (completely) in the local Hugging Face cache" in run.stderr
    )
    assert "offline mode is on (HF_HUB_OFFLINE=1" in run.stderr


# --quiet, --help -------------------------------------------------------------------------------------------------

LONG_PROMPT = " ".join(["a very detailed painting of a cat"] * 20)  # past CLIP's 77 tokens: lcmkit warns


def test_quiet_is_quiet(tmp_path):
    """A run that warns (a prompt longer than CLIP takes) and shows a step bar: with --quiet stderr is empty and
    stdout still lists the image; an error still prints its one line."""
    argv = ["generate", LONG_PROMPT, "--steps", "1", "--seed", "1", "--out", "o"]
    loud, _ = lcmkit_process(argv, tmp_path)
    assert loud.returncode == 0, loud.stderr
    assert "WARNING lcmkit" in loud.stderr and "truncated" in loud.stderr  # what --quiet must hide, and
    assert re.search(r"\d/1 \[", loud.stderr)  # the step bar (cleared when done: its last frame may read 0/1)
    quiet, _ = lcmkit_process([*argv, "--quiet"], tmp_path)
    assert quiet.returncode == 0 and quiet.stderr == "", quiet.stderr
    assert printed(quiet.stdout) == [(str(Path("o") / f"{cli.slug(LONG_PROMPT)}-0001.png"), 1)]
    failed, _ = lcmkit_process(["generate", "x", "--model", "missing/../x", "--quiet"], tmp_path)
    assert failed.returncode == 2 and failed.stderr.startswith("lcmkit: error: --model missing/../x")
    assert failed.stderr.count("\n") == 1, failed.stderr


def help_entries(text: str) -> dict[str, str]:
    """`--option ...` -> its help entry, whitespace collapsed, from argparse's help text."""
    entries: dict[str, str] = {}
    current = None
    for line in text.splitlines():
        match = re.match(r"  (-{1,2}[\w-]+)", line)
        if match:
            current = match[1]
            entries[current] = line
        elif current and line.startswith("      "):
            entries[current] += " " + line
        else:
            current = None
    return {k: " ".join(v.split()) for k, v in entries.items()}


@pytest.mark.parametrize("command", ["generate", "img2img", "demo", "serve", "distill"])
def test_help_shows_every_default(command, capsys):
    """Every option whose value is not None/off/empty when left out shows that value in --help."""
    parser = cli.build_parser()
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction)).choices[command]
    assert main([command, "--help"]) == 0
    entries = help_entries(capsys.readouterr().out)
    defaults = {a.option_strings[-1]: a.default for a in sub._actions
                if a.option_strings and a.default not in (None, False, "", [], argparse.SUPPRESS)}  # fmt: skip
    assert defaults, "every subcommand has options with defaults"
    for option, default in defaults.items():
        assert f"(default: {default})" in entries[option], (option, entries[option])
    known = {"generate": {"--steps": "4", "--guidance": "8.5", "-n": "1", "--out": "out", "--strength": "0.8",
                          "--dtype": "auto"},
             "serve": {"--host": "127.0.0.1", "--port": "7860", "--dtype": "auto"},
             "distill": {"--steps": "1000", "--lr": "0.0001", "--mixed-precision": "no"}}  # fmt: skip
    for option, shown in known.get(command, {}).items():
        assert f"(default: {shown})" in entries[option], (option, entries[option])


def test_preset_sets_steps_guidance_and_timesteps(model, tmp_path, capsys, caplog):
    """--preset fills steps and guidance (written to the PNG with the preset's name); changed values win and a
    step count the preset was not made for warns."""
    argv = ["generate", "a cat", "--model", str(model), "--out", str(tmp_path), "--size", "32x32"]
    assert main([*argv, "--preset", "dmd2"]) == 0
    out = capsys.readouterr()
    _, fields = parameters(paths(out.out)[0])
    assert (fields["Steps"], fields["CFG scale"], fields["Preset"]) == ("4", "0", "dmd2")
    assert main([*argv, "--preset", "hyper-sd-8step", "--steps", "2", "--guidance", "1.5"]) == 0
    out = capsys.readouterr()
    _, fields = parameters(paths(out.out)[0])
    assert (fields["Steps"], fields["CFG scale"], fields["Preset"]) == ("2", "1.5", "hyper-sd-8step")
    assert any("preset 'hyper-sd-8step' was made for [8] steps, not 2" in m for m in caplog.messages)
    assert not any("not on the original" in m for m in caplog.messages)  # dmd2's timesteps are on its grid
