"""The presets data file, LoRA recognition and the mismatch warnings (parity through the pipeline is in
tests/parity/test_preset_pipeline_parity.py)."""

from __future__ import annotations

import logging
from types import SimpleNamespace

import pytest
import torch
from safetensors.torch import save_file

from lcmkit.loading.lora import identify_lora
from lcmkit.presets import apply_preset, chosen_values, get_preset, mismatch_warnings, presets, suggest_preset
from lcmkit.schedulers import DDIMScheduler, LCMScheduler, TCDScheduler


@pytest.mark.parametrize("name", list(presets()))
def test_every_preset_is_complete_and_sourced(name: str) -> None:
    preset = get_preset(name)
    assert preset.source.startswith("https://"), "each value needs its model card / paper"
    assert preset.steps in preset.made_for_steps
    if preset.timesteps:
        assert len(preset.timesteps) == preset.steps
    assert apply_preset(SimpleNamespace(scheduler=LCMScheduler()), name, warn=False)["guidance_scale"] == (
        preset.guidance_scale
    )


def test_unknown_preset_names_the_known_ones() -> None:
    with pytest.raises(
        ValueError, match="unknown preset 'turbo'; known presets: lcm, lcm-lora, tcd, hyper-sd"
    ):
        get_preset("turbo")


@pytest.mark.parametrize(
    ("name", "family", "steps"),
    [
        ("Hyper-SD15-1step-lora.safetensors", "hyper-sd", 1),
        ("Hyper-SD15-8steps-CFG-lora.safetensors", "hyper-sd-cfg", 8),
        ("pcm_sd15_smallcfg_4step_converted.safetensors", "pcm", 4),
        ("models--h1t--TCD-SD15/snapshots/0123abc/pytorch_lora_weights.safetensors", "tcd", None),
        ("lcm-lora-sdv1-5/pytorch_lora_weights.safetensors", "lcm", None),
        ("dmd2_sd15_4step_lora.safetensors", "dmd2", 4),
        ("my_style_v2.safetensors", None, None),
        ("watercolor-sd15.safetensors", None, None),
    ],
)
def test_file_names_are_a_hint(name: str, family: str | None, steps: int | None) -> None:
    found = identify_lora(name)
    if family is None:
        assert found is None
    else:
        assert (found["family"], found["steps"], found["evidence"]) == (family, steps, "file name")


def test_descriptive_metadata_wins_over_the_file_name(tmp_path) -> None:
    path = tmp_path / "renamed.safetensors"
    save_file({"w": torch.zeros(1)}, str(path), metadata={"ss_output_name": "Hyper-SD15-2steps-lora"})
    assert identify_lora(path) == {
        "family": "hyper-sd",
        "steps": 2,
        "cfg": False,
        "evidence": "metadata ss_output_name",
    }
    assert suggest_preset(path) == "hyper-sd-2step"
    plain = tmp_path / "plain.safetensors"
    save_file({"w": torch.zeros(1)}, str(plain), metadata={"ss_tag_frequency": '{"tcd": 3}'})
    assert identify_lora(plain) is None  # only descriptive entries are read


def test_mismatches_warn(caplog) -> None:
    tcd_lora = "TCD-SD15/pytorch_lora_weights.safetensors"
    pipe = SimpleNamespace(scheduler=LCMScheduler(), lora_files={"lora0": tcd_lora, "lora1": None})
    with caplog.at_level(logging.WARNING, logger="lcmkit.presets"):
        args = apply_preset(pipe, "lcm-lora")
    assert type(pipe.scheduler) is LCMScheduler and args["num_inference_steps"] == 4
    assert any(
        "looks like a tcd adapter (by its file name)" in m and "try preset 'tcd'" in m
        for m in caplog.messages
    )
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="lcmkit.presets"):
        apply_preset(pipe, "tcd")
    assert isinstance(pipe.scheduler, TCDScheduler) and pipe.scheduler.gamma == 0.3 and not caplog.messages

    hyper = ["Hyper-SD15-8steps-lora.safetensors"]
    assert mismatch_warnings(get_preset("hyper-sd-8step"), 8, hyper) == []
    messages = mismatch_warnings(get_preset("hyper-sd-8step"), 4, hyper)
    assert (
        "was made for [8] steps, not 4" in messages[0]
        and "made for 8 steps (by its file name)" in messages[1]
    )


def test_fixed_timesteps_and_explicit_values() -> None:
    pipe = SimpleNamespace(scheduler=LCMScheduler())
    assert apply_preset(pipe, "dmd2", warn=False) == {
        "num_inference_steps": None,
        "timesteps": [999, 749, 499, 249],
        "guidance_scale": 0.0,
    }
    assert apply_preset(pipe, "dmd2", steps=2, guidance_scale=1.5, warn=False) == {
        "num_inference_steps": 2,
        "timesteps": None,
        "guidance_scale": 1.5,
    }
    apply_preset(pipe, "pcm-4step", warn=False)
    assert isinstance(pipe.scheduler, DDIMScheduler) and not pipe.scheduler.config.set_alpha_to_one
    apply_preset(pipe, "lcm", warn=False)  # back from a DDIM config
    assert type(pipe.scheduler) is LCMScheduler
    assert chosen_values("hyper-sd-8step", 4, 8.5) == (8, 0.0)
    assert chosen_values("hyper-sd-8step", 6, 2.0) == (6, 2.0)
