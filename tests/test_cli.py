"""The `lcmkit` command line, end to end on a tiny random model folder.

What these tests prove: arguments reach the pipeline (read back from the PNG's AUTOMATIC1111 `parameters` tEXt
chunk, which is written from what `run_request` actually ran), batch files honour their per-line options, files are
never overwritten (even by concurrent writers), and every user mistake is one `lcmkit: error:` line with a non-zero
exit status (a traceback only with --debug).
"""

from __future__ import annotations

import json
import logging
import re
import subprocess
import sys
import threading
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import PIL.Image
import pytest

import lcmkit.server
from lcmkit import LatentConsistencyModelPipeline, cli
from lcmkit.cli import main
from lcmkit.request import GenerationRequest, run_request


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
    paths = out.out.split()
    assert paths == [str(tmp_path / "a-red-circle-0000.png"), str(tmp_path / "a-red-circle-0001.png")]
    assert "it/s" not in out.err and "%" not in out.err
    for path, seed in zip(paths, ("42", "43"), strict=True):
        lines, fields = parameters(path)
        assert lines[0] == "a red circle"
        assert fields["Steps"] == "2" and fields["Seed"] == seed and fields["Size"] == "48x32"
        assert fields["CFG scale"] == "7.5" and fields["Sampler"] == "LCM" and fields["Model"] == "m"
        with PIL.Image.open(path) as im:
            assert im.size == (48, 32)
    assert b"tEXtparameters\x00a red circle\n" in Path(paths[0]).read_bytes()


def test_python_m_lcmkit_in_a_subprocess(model, tmp_path):
    """`python -m lcmkit generate` works as a real process: exit 0, the path on stdout, the step bar on stderr."""
    argv = ["-m", "lcmkit", "generate", "a blue square", "--model", str(model), "--out", "o", "--steps", "1",
            "--seed", "7"]  # fmt: skip
    run = subprocess.run([sys.executable, *argv], cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr
    assert run.stdout.split() == [str(Path("o") / "a-blue-square-0000.png")]
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
    first, second = capsys.readouterr().out.split()
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

    from lcmkit.models.tiny_vae import AutoencoderTiny, TinyVAEConfig

    torch.manual_seed(0)
    AutoencoderTiny(
        TinyVAEConfig(encoder_block_out_channels=(8,) * 4, decoder_block_out_channels=(8,) * 4)
    ).save_pretrained(tmp_path / "taesd")
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
    eager, fast = (np.asarray(PIL.Image.open(p), dtype=int) for p in capsys.readouterr().out.split())
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
    from lcmkit.accel import OpenVINOUNetPerShape, OpenVINOVAEDecoder
    from lcmkit.models.tiny_vae import AutoencoderTiny, TinyVAEConfig

    monkeypatch.setenv("LCMKIT_OPENVINO_CACHE", str(tmp_path / "cache"))
    argv = ["generate", "a red circle", "--model", str(model), "--openvino", "fp32"]
    pipe, _ = cli.load_pipeline(cli.build_parser().parse_args(argv))
    assert isinstance(pipe.unet, OpenVINOUNetPerShape) and isinstance(pipe.vae.decoder, OpenVINOVAEDecoder)
    AutoencoderTiny(
        TinyVAEConfig(encoder_block_out_channels=(8,) * 4, decoder_block_out_channels=(8,) * 4)
    ).save_pretrained(tmp_path / "taesd")
    pipe, _ = cli.load_pipeline(cli.build_parser().parse_args([*argv, "--tiny-vae", str(tmp_path / "taesd")]))
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
    paths = out.out.split()
    assert [Path(p).name for p in paths] == ["a-cat-0000.png", "a-dog-0000.png"]
    assert [parameters(p)[0][0] for p in paths] == ["a cat", "a dog"]
    assert all(parameters(p)[1]["Seed"] == "5" for p in paths)
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
    got = [parameters(p) for p in capsys.readouterr().out.split()]
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
    assert [Path(p).name for p in capsys.readouterr().out.split()] == ["a-cat-0001.png", "a-cat-0002.png"]
    with PIL.Image.open(tmp_path / "a-cat-0001.png") as a, PIL.Image.open(tmp_path / "a-cat-0002.png") as b:
        assert np.array_equal(np.asarray(a), np.asarray(b))


def test_concurrent_writers_get_distinct_files(tmp_path):
    """Exclusive create: 8 threads saving under one name at once end up with 8 files, none overwritten."""
    # one image object per thread: PIL keeps per-save settings on the image object, so sharing one across
    # threads would mix up their text chunks (a PIL property, not what this test is about)
    images = [PIL.Image.new("RGB", (8, 8)) for _ in range(8)]
    paths: list[Path] = []
    threads = [
        threading.Thread(target=lambda i=i: paths.append(cli.save_png(images[i], tmp_path, "race", f"p{i}")))
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
    monkeypatch.setattr(cli, "DEFAULT_MODEL", tmp_path / "not-shipped-yet")
    assert main(["generate", "x", "--out", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "--model PATH_OR_HUB_ID" in err and "lcmkit demo" in err


def test_shipped_model_folder_is_the_default(monkeypatch, model, tmp_path, capsys):
    monkeypatch.setattr(cli, "DEFAULT_MODEL", model)
    assert main(["generate", "x", "--out", str(tmp_path), "--steps", "1", "--quiet"]) == 0
    assert parameters(capsys.readouterr().out.split()[0])[1]["Model"] == "m"


def test_debug_shows_the_traceback(tmp_path, capsys):
    level = logging.getLogger("lcmkit").level
    try:
        assert main(["generate", "x", "--model", str(tmp_path / "missing"), "--debug"]) == 2
    finally:
        logging.getLogger("lcmkit").setLevel(level)
    err = capsys.readouterr().err
    assert "Traceback (most recent call last)" in err and "CliError" in err
    assert err.strip().splitlines()[-1].startswith("lcmkit: error: --model")
    assert main(["generate", "x", "--model", str(tmp_path / "missing")]) == 2
    assert "Traceback" not in capsys.readouterr().err


class FakePipe:
    """Records what the CLI asks of a pipeline; returns grey images."""

    def __init__(self, source: str, calls: list) -> None:
        self.calls = calls
        calls.append(("load", source))
        self._progress_bar_config: dict = {}

    def __getattr__(self, name: str):
        return lambda *args, **kwargs: self.calls.append((name, *args, *kwargs.values()))

    def __call__(self, prompt, num_images_per_prompt=1, width=None, height=None, **kwargs):
        return SimpleNamespace(
            images=[PIL.Image.new("RGB", (width or 8, height or 8))] * num_images_per_prompt
        )


@pytest.mark.parametrize("kind", ["folder", "single_file", "hub_id"])
def test_model_loading_lora_and_freeu_calls(kind, monkeypatch, tmp_path, capsys):
    """Folders and hub ids go to from_pretrained, .safetensors/.ckpt files to from_single_file; each --lora is
    loaded as lora{i} and weighted through one set_adapters call; --freeu without values uses the SD1.5 set."""
    calls: list = []
    fake = classmethod(lambda cls, source, **kw: FakePipe(source, calls))
    monkeypatch.setattr(LatentConsistencyModelPipeline, "from_pretrained", fake)
    monkeypatch.setattr(LatentConsistencyModelPipeline, "from_single_file", fake, raising=False)
    (tmp_path / "a.safetensors").write_bytes(b"")
    model = {"folder": tmp_path, "single_file": tmp_path / "a.safetensors", "hub_id": "owner/name"}[kind]
    argv = ["generate", "x", "--model", str(model), "--out", str(tmp_path / "o"), "--lora",
            f"{tmp_path / 'a.safetensors'}:0.5", "--lora", "owner/lora", "--freeu", "--vae-tiling", "--quiet"]  # fmt: skip
    assert main(argv) == 0, capsys.readouterr().err
    lora = str(tmp_path / "a.safetensors")
    assert calls == [
        ("load", str(model)),
        ("set_progress_bar_config", True, False),
        ("enable_vae_tiling",),
        ("enable_freeu", 0.9, 0.2, 1.5, 1.6),
        ("load_lora_weights", lora, "lora0"),
        ("load_lora_weights", "owner/lora", "lora1"),
        ("set_adapters", ["lora0", "lora1"], [0.5, 1.0]),
    ]
    name = {"folder": tmp_path.name, "single_file": "a", "hub_id": "owner/name"}[kind]
    assert parameters(capsys.readouterr().out.split()[0])[1]["Model"] == name


def test_freeu_values(monkeypatch, tmp_path, capsys):
    calls: list = []
    monkeypatch.setattr(
        LatentConsistencyModelPipeline,
        "from_pretrained",
        classmethod(lambda cls, s, **kw: FakePipe(s, calls)),
    )
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
    assert ("enable_freeu", 1.0, 1.1, 1.2, 1.3) in calls


def test_demo_labels_its_noise(tmp_path, capsys):
    assert main(["demo", "--out", str(tmp_path), "--steps", "1", "--quiet"]) == 0
    out = capsys.readouterr()
    assert "NOISE" in out.err and "RANDOM" in out.err
    assert parameters(out.out.split()[0])[1]["Model"] == "tiny-random-noise"


def test_serve_passes_its_arguments(monkeypatch, tmp_path):
    """`lcmkit serve` calls lcmkit.server.serve(model, host, port, api_key, device, **limits)."""
    seen = []
    monkeypatch.setattr(lcmkit.server, "serve", lambda *a, **kw: seen.append((a, kw)), raising=False)
    argv = ["serve", "--model", "owner/name", "--host", "0.0.0.0", "--port", "9000", "--api-key", "k",
            "--limit", "max_steps=8", "--limit", "queue_size=2"]  # fmt: skip
    assert main(argv) == 0
    assert seen[-1] == (
        ("owner/name",),
        dict(
            host="0.0.0.0",
            port=9000,
            api_key="k",
            device=None,
            tiny_vae=None,
            openvino=None,
            max_steps=8,
            queue_size=2,
        ),
    )
    monkeypatch.setattr(cli, "DEFAULT_MODEL", tmp_path / "not-shipped-yet")
    monkeypatch.setenv("LCMKIT_API_KEY", "from-env")
    assert main(["serve"]) == 0
    assert seen[-1] == (
        (None,),
        dict(host="127.0.0.1", port=7860, api_key="from-env", device=None, tiny_vae=None, openvino=None),
    )


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
