"""Sampler presets for the few-step family (LCM, LCM-LoRA, TCD, Hyper-SD, PCM, DMD2-style timesteps).

A preset names a scheduler, its config overrides, a step count, a guidance scale and optionally custom
timesteps and TCD's gamma. The values live in one data file shipped with the package, `presets.toml`, each with
the model card or paper it comes from. `apply_preset` puts the scheduler on a pipeline and returns the call
arguments; `mismatch_warnings` says when the loaded LoRA files or the step count do not fit the preset.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from functools import cache
from importlib import resources
from pathlib import Path
from typing import Any

import tomllib

logger = logging.getLogger(__name__)

# The pipelines' (and the CLI's) defaults: with a preset, a value equal to these counts as "not given".
DEFAULT_STEPS = 4
DEFAULT_GUIDANCE = 8.5

# Scheduler names of the data file -> classes in lcmkit.schedulers (imported on use: the CLI reads the preset
# names before it imports torch).
SCHEDULERS = {
    "lcm": "LCMScheduler",
    "tcd": "TCDScheduler",
    "ddim": "DDIMScheduler",
    "euler": "EulerDiscreteScheduler",
}
# The family a recognised LoRA file belongs to -> the preset to suggest (by steps for the n-step families).
_SUGGEST = {
    "lcm": "lcm-lora",
    "tcd": "tcd",
    "dmd2": "dmd2",
    "hyper-sd": "hyper-sd-{steps}step",
    "hyper-sd-cfg": "hyper-sd-8step-cfg",
    "pcm": "pcm-{steps}step",
}


@dataclass(frozen=True)
class Preset:
    """One row of `presets.toml`; `timesteps`, when set, replaces `steps` (its length is the step count)."""

    name: str
    scheduler: str
    steps: int
    guidance_scale: float
    source: str
    family: str
    made_for_steps: tuple[int, ...]
    description: str = ""
    timesteps: tuple[int, ...] | None = None
    gamma: float | None = None
    scheduler_config: dict[str, Any] = field(default_factory=dict)


def _preset(name: str, row: dict[str, Any]) -> Preset:
    row = dict(row)
    if row.get("scheduler") not in SCHEDULERS:
        raise ValueError(
            f"preset {name!r}: scheduler {row.get('scheduler')!r} is not one of {sorted(SCHEDULERS)}"
        )
    for key in ("made_for_steps", "timesteps"):
        if row.get(key) is not None:
            row[key] = tuple(int(t) for t in row[key])
    return Preset(name=name, **row)


@cache
def presets() -> dict[str, Preset]:
    """All presets of the shipped `presets.toml`, by name."""
    text = resources.files("lcmkit").joinpath("presets.toml").read_text(encoding="utf-8")
    return {name: _preset(name, row) for name, row in tomllib.loads(text).items()}


def get_preset(name: str) -> Preset:
    """The preset called `name`; an unknown name raises ValueError listing the known ones."""
    table = presets()
    if name not in table:
        raise ValueError(f"unknown preset {name!r}; known presets: {', '.join(table)}")
    return table[name]


def suggest_preset(lora_file: str | Path) -> str | None:
    """The preset that fits a recognised LoRA file (see `identify_lora`), if there is one in the table."""
    from lcmkit.loading.lora import identify_lora

    found = identify_lora(lora_file)
    if found is None:
        return None
    name = _SUGGEST[found["family"]].format(steps=found["steps"])
    return name if name in presets() else None


def mismatch_warnings(preset: Preset, steps: int, lora_files: list[str | Path] = ()) -> list[str]:
    """Why `preset` at `steps` may not fit: a step count the adapter was not made for, or a loaded LoRA that
    looks like another family (recognised by metadata or file name, so a hint) or another step count."""
    from lcmkit.loading.lora import identify_lora

    out = []
    if steps not in preset.made_for_steps:
        out.append(
            f"preset {preset.name!r} was made for {list(preset.made_for_steps)} steps, not {steps} "
            f"(source: {preset.source})"
        )
    for path in lora_files:
        found = identify_lora(path)
        if found is None:
            continue
        if found["family"] != preset.family and not (
            found["family"] == "lcm" and preset.family == "lcm-model"
        ):
            better = suggest_preset(path)
            hint = f"; try preset {better!r}" if better else ""
            out.append(
                f"LoRA {Path(path).name} looks like a {found['family']} adapter (by its {found['evidence']}), "
                f"but preset {preset.name!r} is for {preset.family}{hint}"
            )
        elif (
            found["steps"] is not None and found["family"] in ("hyper-sd", "pcm") and steps != found["steps"]
        ):
            out.append(
                f"LoRA {Path(path).name} was made for {found['steps']} steps (by its {found['evidence']}), "
                f"not {steps}"
            )
    return out


def make_scheduler(preset: Preset, base_config: Any) -> Any:
    """The preset's scheduler, built from the pipeline's scheduler config (betas etc.) plus its overrides."""
    from lcmkit import schedulers

    values = base_config.to_dict() if hasattr(base_config, "to_dict") else dict(base_config)
    scheduler_class = getattr(schedulers, SCHEDULERS[preset.scheduler])
    scheduler = scheduler_class.from_config(values, **preset.scheduler_config)
    if preset.gamma is not None:
        scheduler.gamma = preset.gamma
    return scheduler


def apply_preset(
    pipe: Any, name: str, steps: int | None = None, guidance_scale: float | None = None, warn: bool = True
) -> dict[str, Any]:
    """Put preset `name`'s scheduler on `pipe` and return the call arguments it sets.

    `steps` / `guidance_scale`, when given, win over the preset's (a fixed-timesteps preset then keeps its
    list only if `steps` equals its length). Mismatches are logged as warnings (see `mismatch_warnings`).
    """
    preset = get_preset(name)
    pipe.scheduler = make_scheduler(preset, pipe.scheduler.config)
    timesteps = list(preset.timesteps) if preset.timesteps else None
    n = preset.steps if steps is None else steps
    if timesteps is not None and n != len(timesteps):
        timesteps = None
    if warn:
        files = [p for p in getattr(pipe, "lora_files", {}).values() if p is not None]
        for message in mismatch_warnings(preset, n, files):
            logger.warning(message)
    return {
        "num_inference_steps": None if timesteps else n,
        "timesteps": timesteps,
        "guidance_scale": preset.guidance_scale if guidance_scale is None else guidance_scale,
    }


def preset_names() -> list[str]:
    """The preset names, in the data file's order (for `--preset` choices and error messages)."""
    return list(presets())


def chosen_values(name: str, steps: int, guidance_scale: float) -> tuple[int, float]:
    """(steps, guidance) a call with preset `name` runs with: the preset's, except where the caller changed the
    defaults (`DEFAULT_STEPS`, `DEFAULT_GUIDANCE`)."""
    preset = get_preset(name)
    return (
        preset.steps if steps == DEFAULT_STEPS else steps,
        preset.guidance_scale if guidance_scale == DEFAULT_GUIDANCE else guidance_scale,
    )
