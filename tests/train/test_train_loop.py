"""The shared training loop: data order, checkpoints and resume, the loss log and its plot.

The resume test proves a run stopped at a checkpoint and resumed gives bit-identical weights and the same loss
log as an uninterrupted run, with gradient accumulation on and randomness drawn in every step: so the model,
optimizer, LR schedule, RNG states and data position are all saved and restored.
"""

from __future__ import annotations

import csv
import math

import pytest
import torch
from accelerate import Accelerator
from PIL import Image
from torch import nn
from torch.utils.data import Dataset

from lcmkit.train.loop import LoopConfig, ShardedSampler, fit, latest_checkpoint, lr_factor, micro_batches
from lcmkit.train.runlog import LossLog


class _Points(Dataset):
    def __init__(self, n: int = 24) -> None:
        g = torch.Generator().manual_seed(0)
        self.x, self.y = torch.randn(n, 3, generator=g), torch.randn(n, 2, generator=g)

    def __len__(self) -> int:
        return len(self.x)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor, str]:
        return self.x[i], self.y[i], f"point {i}"


def _loss(model: nn.Module, batch) -> tuple[torch.Tensor, dict]:
    x, y, captions = batch
    assert isinstance(captions, (list, tuple)) and captions[0].startswith("point")
    noisy = x + 0.1 * torch.randn(x.shape)  # draws from the global RNG, which a resume must restore
    loss = ((model(noisy) - y) ** 2).mean()
    return loss, {"half": loss / 2}


def _fit(tmp_path, max_steps: int, resume: bool = False, lr_schedule: str = "constant") -> nn.Module:
    torch.manual_seed(0)
    cfg = LoopConfig(
        output_dir=tmp_path,
        max_steps=max_steps,
        batch_size=4,
        gradient_accumulation_steps=2,
        learning_rate=1e-2,
        lr_warmup_steps=3,
        lr_schedule=lr_schedule,
        checkpoint_every=2,
        checkpoints_total_limit=2,
        log_every=1,
        resume=resume,
        progress=False,
    )
    target = nn.Linear(3, 2)
    return fit(
        Accelerator(gradient_accumulation_steps=2),
        nn.Linear(3, 2),
        _Points(),
        _loss,
        cfg,
        extra_modules={"target": target},
        on_sync_step=lambda m: target.load_state_dict(m.state_dict()),
        name="toy",
    )


def _rows(path):
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def test_resume_continues_exactly(tmp_path):
    whole = _fit(tmp_path / "whole", 8)
    _fit(tmp_path / "split", 4)
    assert latest_checkpoint(tmp_path / "split").name == "step_0000004"
    resumed = _fit(tmp_path / "split", 8, resume=True)
    for a, b in zip(whole.parameters(), resumed.parameters(), strict=True):
        assert torch.equal(a, b)
    assert _rows(tmp_path / "whole" / "toy_loss.csv") == _rows(tmp_path / "split" / "toy_loss.csv")
    rows = _rows(tmp_path / "whole" / "toy_loss.csv")
    assert [float(r["step"]) for r in rows] == list(range(1, 9))
    assert float(rows[0]["lr"]) == pytest.approx(1e-2 / 3)  # warm-up, stepped once per optimizer step
    assert float(rows[-1]["half"]) == pytest.approx(float(rows[-1]["loss"]) / 2, rel=1e-6)
    # Only the newest two checkpoints are kept; each holds the model, the extra module and every state.
    kept = sorted(p.name for p in (tmp_path / "whole" / "checkpoints").iterdir())
    assert kept == ["step_0000006", "step_0000008"]
    state = torch.load(tmp_path / "whole" / "checkpoints" / "step_0000008" / "state.pt", weights_only=True)
    assert state["step"] == 8 and set(state) >= {"model", "extra", "optimizer", "lr_scheduler"}
    assert torch.equal(state["extra"]["target"]["weight"], whole.weight.cpu())
    with Image.open(tmp_path / "whole" / "toy_loss.png") as image:
        assert image.size == (720, 400)


def test_lr_schedules_warm_up_then_fall_to_zero_at_max_steps():
    """Each schedule: the same linear warm-up, then constant, a straight line, or a half cosine to 0 at max_steps."""
    cfg = {
        s: LoopConfig(max_steps=13, lr_warmup_steps=3, lr_schedule=s)
        for s in ("constant", "linear", "cosine")
    }
    for c in cfg.values():
        assert [lr_factor(k, c) for k in range(3)] == pytest.approx([1 / 3, 2 / 3, 1.0])
    assert [lr_factor(k, cfg["constant"]) for k in (3, 8, 12, 13)] == [1.0] * 4
    assert [lr_factor(k, cfg["linear"]) for k in (3, 8, 12, 13)] == pytest.approx([1.0, 0.5, 0.1, 0.0])
    assert [lr_factor(k, cfg["cosine"]) for k in (3, 8, 13)] == pytest.approx([1.0, 0.5, 0.0])
    assert lr_factor(5, cfg["cosine"]) == pytest.approx(0.5 * (1 + math.cos(math.pi * 0.2)))
    # Warm-up, stable, then decay over the last 4 steps only (the tiny teacher's recipe).
    wsd = LoopConfig(max_steps=13, lr_warmup_steps=3, lr_schedule="linear", lr_decay_steps=4)
    assert [lr_factor(k, wsd) for k in (0, 3, 8, 9, 10, 12, 13)] == pytest.approx(
        [1 / 3, 1.0, 1.0, 1.0, 0.75, 0.25, 0.0]
    )
    with pytest.raises(ValueError, match="lr_schedule must be one of"):
        LoopConfig(lr_schedule="step")
    with pytest.raises(ValueError, match="lr_decay_steps must be None or 1..max_steps"):
        LoopConfig(max_steps=10, lr_decay_steps=11)


def test_resume_mid_cosine_schedule_continues_exactly(tmp_path, monkeypatch):
    """A run killed half-way through a cosine decay and resumed ends with the weights and logged rates of one
    uninterrupted run: the schedule is a function of the step, restored from the checkpoint."""
    whole = _fit(tmp_path / "whole", 8, lr_schedule="cosine")
    calls, loss = [], _loss

    def dies_after_four_steps(model, batch):
        calls.append(1)
        if len(calls) > 4 * 2:  # 2 micro-batches per optimizer step
            raise KeyboardInterrupt
        return loss(model, batch)

    monkeypatch.setitem(globals(), "_loss", dies_after_four_steps)
    with pytest.raises(KeyboardInterrupt):
        _fit(tmp_path / "split", 8, lr_schedule="cosine")
    monkeypatch.undo()
    assert latest_checkpoint(tmp_path / "split").name == "step_0000004"
    resumed = _fit(tmp_path / "split", 8, resume=True, lr_schedule="cosine")
    for a, b in zip(whole.parameters(), resumed.parameters(), strict=True):
        assert torch.equal(a, b)
    rates = [float(r["lr"]) for r in _rows(tmp_path / "split" / "toy_loss.csv")]
    assert rates == [float(r["lr"]) for r in _rows(tmp_path / "whole" / "toy_loss.csv")]
    cfg = LoopConfig(max_steps=8, lr_warmup_steps=3, lr_schedule="cosine")
    assert rates == pytest.approx([1e-2 * lr_factor(k, cfg) for k in range(8)]) and rates[-1] < rates[3] / 5


def test_resume_true_without_checkpoint_starts_fresh(tmp_path):
    model = _fit(tmp_path, 2, resume=True)
    assert len(_rows(tmp_path / "toy_loss.csv")) == 2 and isinstance(model, nn.Linear)
    with pytest.raises(ValueError, match="not a checkpoint folder"):
        LoopConfig_resume = LoopConfig(output_dir=tmp_path, resume=str(tmp_path / "nope"), progress=False)
        fit(Accelerator(), nn.Linear(3, 2), _Points(), _loss, LoopConfig_resume)


def test_sharded_sampler_splits_and_skips():
    """Ranks partition each epoch's order; epochs reshuffle; `start` drops the first indices of a rank's share."""
    shares = []
    for rank in range(3):
        sampler = ShardedSampler(10, seed=1, rank=rank, world=3)
        sampler.set_epoch(0)
        shares.append(list(sampler))
    assert all(len(s) == 4 for s in shares)
    assert set(sum(shares, [])) == set(range(10))  # 12 slots, 2 wrapped around
    sampler = ShardedSampler(10, seed=1)
    sampler.set_epoch(0)
    epoch0 = list(sampler)
    sampler.set_epoch(1)
    assert list(sampler) != epoch0 and sorted(sampler) == list(range(10))
    sampler.set_epoch(0, start=4)
    assert list(sampler) == epoch0[4:] and len(sampler) == 6
    ordered = ShardedSampler(5, shuffle=False)
    ordered.set_epoch(3)
    assert list(ordered) == [0, 1, 2, 3, 4]
    batches = micro_batches(_Points(10), ShardedSampler(10, shuffle=False), batch_size=4, start=3)
    # 2 batches per epoch (drop_last): micro-batch 3 is the second batch of epoch 1.
    assert list(next(batches)[2]) == [f"point {i}" for i in range(4, 8)]
    with pytest.raises(ValueError, match="fewer than one batch"):
        next(micro_batches(_Points(3), ShardedSampler(3), batch_size=4))


def test_loss_log_truncates_on_resume_and_checks_columns(tmp_path):
    log = LossLog(tmp_path / "l.csv")
    for step in range(1, 6):
        log.append(step, 1.0 / step, lr=0.1)
    resumed = LossLog(tmp_path / "l.csv", resume_step=3)
    assert [s for s, _ in resumed.losses()] == [1, 2, 3]
    resumed.append(4, 0.2, lr=0.1)
    assert len(_rows(tmp_path / "l.csv")) == 4
    with pytest.raises(ValueError, match="columns"):
        resumed.append(5, 0.1, other=1.0)
    resumed.plot(tmp_path / "l.png")
    assert (tmp_path / "l.png").stat().st_size > 0
    LossLog(tmp_path / "empty.csv").plot(tmp_path / "empty.png")  # nothing logged: still a picture
    assert (tmp_path / "empty.png").is_file()


def test_param_groups_scale_learning_rates_by_submodule():
    """`lr_scales` gives a submodule its own learning rate; frozen parameters are left out of the optimizer."""
    from lcmkit.train.loop import _param_groups

    model = nn.ModuleDict(
        {"unet": nn.Linear(2, 2), "text_encoder": nn.Linear(2, 2), "frozen": nn.Linear(2, 2)}
    )
    model["frozen"].requires_grad_(False)
    groups = _param_groups(model, 1e-3, {"text_encoder": 0.1})
    by_lr = {g["lr"]: g["params"] for g in groups}
    assert sorted(by_lr) == pytest.approx([1e-4, 1e-3])
    assert {id(p) for p in by_lr[1e-3]} == {id(p) for p in model["unet"].parameters()}
    scaled = next(params for lr, params in by_lr.items() if lr != 1e-3)
    assert {id(p) for p in scaled} == {id(p) for p in model["text_encoder"].parameters()}
    with pytest.raises(ValueError, match="no trainable parameters"):
        _param_groups(model["frozen"], 1e-3, None)


def test_recipe_plans_reach_the_loop_and_the_script_overrides_them():
    """The shipped recipe's teacher decays over its last 600 steps, distillation over its last 200 and the tiny
    autoencoder over the last 1,200 of 2,400; the script's --<stage>-lr-schedule changes the shape, and a stage cut
    shorter than its decay decays over all its steps."""
    import importlib.util
    from pathlib import Path

    from lcmkit.train.recipe import RecipeConfig, _stage_configs

    _, teacher, student, tiny = _stage_configs(RecipeConfig())
    assert (tiny.loop.lr_schedule, tiny.loop.lr_decay_steps, tiny.loop.max_steps) == ("linear", 1200, 2400)
    assert (teacher.loop.lr_schedule, teacher.loop.lr_decay_steps, teacher.loop.max_steps) == (
        "linear",
        600,
        4600,
    )
    assert (student.loop.lr_schedule, student.loop.lr_decay_steps) == ("linear", 200)
    script = Path(__file__).resolve().parents[2] / "scripts" / "train_tiny.py"
    spec = importlib.util.spec_from_file_location("train_tiny_script", script)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    args = module.parse_args(["--teacher-steps", "300", "--distill-lr-schedule", "cosine"])
    _, teacher, student, _ = _stage_configs(module.config_from_args(args))
    assert (teacher.loop.lr_schedule, teacher.loop.lr_decay_steps, teacher.loop.max_steps) == (
        "linear",
        300,
        300,
    )
    assert (student.loop.lr_schedule, student.loop.lr_decay_steps) == ("cosine", 200)
    with pytest.raises(SystemExit):
        module.parse_args(["--teacher-lr-schedule", "step"])
