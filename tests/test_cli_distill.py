"""`lcmkit distill`, called in-process on a tiny random teacher (the `quick` architecture, 32 px) for 2-3 steps.

What it proves: without --lora-rank the command writes an LCM pipeline folder that lcmkit loads and samples from,
with its checkpoints and loss log under --out/train; with --lora-rank it writes a LoRA file holding exactly the
requested targets, trained on a --data folder, that lcmkit's `load_lora_weights` accepts; --resume continues the
run to more steps, and without it an existing --out is never touched. Every input mistake is one `lcmkit: error:`
line with exit status 2, found before any training starts. (The LoRA's parity with diffusers is proven in
tests/train/test_lcm_lora.py.)
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import PIL.Image
import pytest
import torch

from lcmkit.cli import main
from lcmkit.loading.weights import load_state_dict
from lcmkit.train.teacher import build_random_teacher

FAST = [
    "--steps",
    "2",
    "--batch-size",
    "2",
    "--w-min",
    "1",
    "--w-max",
    "3",
    "--num-ddim-timesteps",
    "10",
    "--quiet",
]


@pytest.fixture(scope="module")
def teacher(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_random_teacher(tmp_path_factory.mktemp("cli_distill") / "teacher", "quick", seed=0)


def logged_steps(out: Path) -> list[int]:
    """The steps in the loss log (every 10th step and the last; a resumed run appends)."""
    rows = (out / "train" / "distill_loss.csv").read_text().splitlines()[1:]
    return [int(float(row.split(",")[0])) for row in rows]


def test_full_distill_writes_an_lcm_folder_that_samples(teacher, tmp_path, capsys):
    import lcmkit

    out = tmp_path / "lcm"
    assert (
        main(["distill", "--teacher", str(teacher), "--out", str(out), "--noise-offset", "0.2", *FAST]) == 0
    )
    assert capsys.readouterr().out.split() == [str(out)]
    assert (out / "model_index.json").is_file() and (out / "unet_target").is_dir()
    assert (out / "train" / "checkpoints" / "step_0000002" / "state.pt").is_file()
    assert logged_steps(out) == [2]
    assert json.loads((out / "train" / "distill_config.json").read_text())["noise_offset"] == 0.2
    pipe = lcmkit.LatentConsistencyModelPipeline.from_pretrained(out)
    assert pipe.unet.config.time_cond_proj_dim == 256 and pipe.scheduler.config.original_inference_steps == 10
    pipe.set_progress_bar_config(disable=True)
    image = pipe("a red circle", num_inference_steps=1, output_type="np").images[0]
    assert image.shape == (32, 32, 3) and np.isfinite(image).all()


def test_lora_distill_on_a_data_folder_then_resume(teacher, tmp_path, capsys):
    import lcmkit

    data = tmp_path / "data"
    data.mkdir()
    rng = np.random.default_rng(0)
    for i, caption in enumerate(["a red circle", "a blue square"]):
        PIL.Image.fromarray(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)).save(data / f"{i}.png")
        (data / f"{i}.txt").write_text(caption)
    out = tmp_path / "lora"
    argv = ["distill", "--teacher", str(teacher), "--out", str(out), "--data", str(data), "--lora-rank", "2",
            "--lora-alpha", "1", "--lora-targets", "attention", "--lr", "1e-2", *FAST]  # fmt: skip
    assert main(argv) == 0
    lora_file = out / "pytorch_lora_weights.safetensors"
    assert capsys.readouterr().out.split() == [str(lora_file)]
    sd = load_state_dict(lora_file)
    layers = {k.rsplit(".", 2)[0] for k in sd if k.endswith(".lora_down.weight")}
    assert layers and all(n.endswith(("to_q", "to_k", "to_v", "to_out_0")) for n in layers)
    assert all(sd[f"{n}.alpha"].item() == 1.0 and sd[f"{n}.lora_down.weight"].shape[0] == 2 for n in layers)

    pipe = lcmkit.LatentConsistencyModelPipeline.from_pretrained(teacher, safety_checker=None)
    pipe.load_lora_weights(out, adapter_name="lcm")
    assert pipe.get_list_adapters() == {"unet": ["lcm"]}

    # An existing --out is refused without --resume, and continued with it.
    assert main(argv) == 2
    assert "exists and is not empty; pass --resume" in capsys.readouterr().err
    assert main([*argv, "--steps", "3", "--resume"]) == 0
    assert logged_steps(out) == [2, 3]
    resumed = load_state_dict(lora_file)
    assert not all(torch.equal(resumed[k], sd[k]) for k in sd), "the third step did not train"


ERRORS = [
    (["--teacher", "{tmp}/missing", "--out", "{tmp}/o"], "--teacher {tmp}/missing: no such folder"),
    (["--teacher", "{tmp}/empty", "--out", "{tmp}/o"], "no model_index.json"),
    (["--teacher", "{teacher}", "--out", "{tmp}/full"], "--out {tmp}/full exists and is not empty"),
    (["--teacher", "{teacher}", "--out", "{tmp}/full", "--resume"], "has no checkpoint to continue from"),
    (["--teacher", "{teacher}", "--out", "{tmp}/notes.txt"], "is a file"),
    (["--teacher", "{teacher}", "--out", "{tmp}/o", "--data", "{tmp}/nope"], "--data {tmp}/nope: no such"),
    (["--teacher", "{teacher}", "--out", "{tmp}/o", "--data", "{tmp}/notes.txt"], "a .jsonl file"),
    (["--teacher", "{teacher}", "--out", "{tmp}/o", "--w-min", "9", "--w-max", "3"], "need 0 <= --w-min <= --w-max"),
    (["--teacher", "{teacher}", "--out", "{tmp}/o", "--noise-offset", "1.5"], "--noise-offset must be between 0 and 1"),
    (["--teacher", "{teacher}", "--out", "{tmp}/o", "--lora-alpha", "8"], "add --lora-rank"),
    (["--teacher", "{teacher}", "--out", "{tmp}/o", "--lora-rank", "0"], "--lora-rank must be an integer"),
    (["--teacher", "{teacher}", "--out", "{tmp}/o", "--steps", "0"], "--steps must be an integer"),
    (["--teacher", "{teacher}", "--out", "{tmp}/o", "--lr", "0"], "--lr must be a number above 0"),
    (["--teacher", "{teacher}", "--out", "{tmp}/o", "--mixed-precision", "fp8"], "invalid choice: 'fp8'"),
    (["--out", "{tmp}/o"], "required: --teacher"),
]  # fmt: skip


@pytest.mark.parametrize(("argv", "message"), ERRORS, ids=[str(i) for i in range(len(ERRORS))])
def test_bad_input_is_one_line_and_trains_nothing(argv, message, teacher, tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "keep.txt").write_text("mine")
    (tmp_path / "notes.txt").write_text("a cat\n")
    fill = {"tmp": tmp_path, "teacher": teacher}
    code = main(["distill", *(a.format(**fill) for a in argv)])
    err = capsys.readouterr().err.strip()
    assert code == 2
    assert err.startswith("lcmkit: error: ") and "\n" not in err, err
    assert message.format(**fill) in err, err
    assert not (tmp_path / "o").exists() and sorted(p.name for p in (tmp_path / "full").iterdir()) == [
        "keep.txt"
    ]
