"""The training loop every lcmkit recipe shares: AdamW, warm-up, gradient accumulation and clipping, resumable
checkpoints, a loss log, progress, all on `accelerate`, so one command runs on a CPU, one GPU, or many GPUs
(`accelerate launch`).

A recipe supplies the trainable module (whose `forward` is what it differentiates, so DDP can sync it), a dataset
and `loss_fn(model, batch) -> (loss, metrics)`; `fit` does the rest.

Checkpoints are our own small format (`checkpoints/step_0000100/`): `state.pt` holds the model, extra modules
(e.g. the EMA target), optimizer, LR schedule, AMP scaler and step; `rng_<rank>.pt` each process's RNG states.
Both are read back with `torch.load(weights_only=True)`. Data order is a pure function of (seed, epoch), so
resuming at step s continues with exactly the batches an uninterrupted run would have seen.
"""

from __future__ import annotations

import logging
import math
import random
import shutil
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from accelerate import Accelerator
from torch import nn
from torch.utils.data import DataLoader, Dataset, Sampler
from tqdm.auto import tqdm

from lcmkit.train.runlog import LossLog

logger = logging.getLogger(__name__)

LossFn = Callable[[nn.Module, Any], tuple[torch.Tensor, dict[str, torch.Tensor]]]


@dataclass
class LoopConfig:
    """How to optimise (shared by the VAE, teacher and distillation stages). `batch_size` is per process."""

    output_dir: str | Path = "runs/train"
    max_steps: int = 1000
    batch_size: int = 32
    gradient_accumulation_steps: int = 1
    learning_rate: float = 1e-4
    adam_beta1: float = 0.9
    adam_beta2: float = 0.999
    adam_epsilon: float = 1e-8
    weight_decay: float = 0.0
    lr_warmup_steps: int = 0
    # After the warm-up the rate stays ("constant") or falls to 0 at max_steps ("linear", "cosine"), over the
    # last `lr_decay_steps` steps (None: all steps after the warm-up). Annealing averages out the step noise of
    # a small batch: the tiny teacher painted a shape's colour right far more often after 600 decaying steps.
    lr_schedule: str = "constant"
    lr_decay_steps: int | None = None
    max_grad_norm: float = 1.0
    checkpoint_every: int = 500
    checkpoints_total_limit: int | None = 2
    log_every: int = 10
    seed: int = 0
    resume: bool | str = False  # True: the newest checkpoint in output_dir, if any; a path: that checkpoint
    shuffle: bool = True
    num_workers: int = 0
    progress: bool = True

    def __post_init__(self) -> None:
        for name in (
            "max_steps",
            "batch_size",
            "gradient_accumulation_steps",
            "checkpoint_every",
            "log_every",
        ):
            if getattr(self, name) < 1:
                raise ValueError(f"LoopConfig.{name} must be >= 1, got {getattr(self, name)}")
        if self.learning_rate <= 0 or self.max_grad_norm <= 0:
            raise ValueError("LoopConfig.learning_rate and max_grad_norm must be > 0")
        if self.lr_schedule not in LR_SCHEDULES:
            raise ValueError(
                f"LoopConfig.lr_schedule must be one of {LR_SCHEDULES}, got {self.lr_schedule!r}"
            )
        if self.lr_decay_steps is not None and not 1 <= self.lr_decay_steps <= self.max_steps:
            raise ValueError(
                f"LoopConfig.lr_decay_steps must be None or 1..max_steps ({self.max_steps}), "
                f"got {self.lr_decay_steps}"
            )


LR_SCHEDULES = ("constant", "linear", "cosine")


def lr_factor(step: int, cfg: LoopConfig) -> float:
    """The learning-rate multiplier of optimizer step `step` (0-based): a linear warm-up over `lr_warmup_steps`,
    1 until the decay starts (`max_steps - lr_decay_steps`, or the warm-up's end), then `cfg.lr_schedule` from 1
    down to 0 at `max_steps`."""
    warmup = max(cfg.lr_warmup_steps, 1)
    warm = min(1.0, (step + 1) / warmup)
    start = warmup if cfg.lr_decay_steps is None else max(cfg.max_steps - cfg.lr_decay_steps, warmup)
    if step < start or cfg.lr_schedule == "constant":
        return warm
    done = min((step - start) / max(cfg.max_steps - start, 1), 1.0)
    if cfg.lr_schedule == "linear":
        return 1.0 - done
    return 0.5 * (1.0 + math.cos(math.pi * done))


def make_accelerator(gradient_accumulation_steps: int = 1, mixed_precision: str = "no") -> Accelerator:
    """An `Accelerator` for the current launch (single process, or the `accelerate launch` world)."""
    if mixed_precision not in ("no", "fp16", "bf16"):
        raise ValueError(f"mixed_precision must be 'no', 'fp16' or 'bf16', got {mixed_precision!r}")
    return Accelerator(
        gradient_accumulation_steps=gradient_accumulation_steps, mixed_precision=mixed_precision
    )


def frozen_dtype(accelerator: Accelerator) -> torch.dtype:
    """The dtype for frozen helper networks (teacher, VAE, text encoder): the mixed-precision dtype, else float32."""
    return {"fp16": torch.float16, "bf16": torch.bfloat16}.get(accelerator.mixed_precision, torch.float32)


# ----------------------------------------------------------------------------------------------------------------------
# Data order


class ShardedSampler(Sampler[int]):
    """Epoch-seeded order (a permutation of seed and epoch, or 0..n-1), dealt round-robin to `world` processes.

    `set_epoch(epoch, start)` skips the first `start` indices of this process's share, which is how a resumed
    run lands on the very next batch. Each share is padded by wrapping around so all processes see equal counts.
    """

    def __init__(self, n: int, seed: int = 0, shuffle: bool = True, rank: int = 0, world: int = 1) -> None:
        if n < 1:
            raise ValueError("the dataset is empty")
        self.n, self.seed, self.shuffle, self.rank, self.world = n, seed, shuffle, rank, world
        self.per_rank = -(-n // world)
        self.epoch, self.start = 0, 0

    def set_epoch(self, epoch: int, start: int = 0) -> None:
        self.epoch, self.start = epoch, start

    def __len__(self) -> int:
        return self.per_rank - self.start

    def __iter__(self) -> Iterator[int]:
        if self.shuffle:
            order = torch.randperm(
                self.n, generator=torch.Generator().manual_seed(self.seed * 100_003 + self.epoch)
            )
        else:
            order = torch.arange(self.n)
        order = order.repeat(-(-self.per_rank * self.world // self.n))[: self.per_rank * self.world]
        yield from order[self.rank :: self.world][self.start :].tolist()


def micro_batches(
    dataset: Dataset, sampler: ShardedSampler, batch_size: int, start: int = 0, num_workers: int = 0
) -> Iterator[Any]:
    """Endless micro-batches, epoch after epoch, beginning at micro-batch number `start`."""
    per_epoch = sampler.per_rank // batch_size
    if per_epoch == 0:
        raise ValueError(
            f"each process gets {sampler.per_rank} samples, fewer than one batch of {batch_size}"
        )
    epoch, skip = divmod(start, per_epoch)
    while True:
        sampler.set_epoch(epoch, skip * batch_size)
        # Its own generator: a DataLoader otherwise draws worker seeds from the global RNG at every epoch start,
        # which would make a resumed run's noise differ from an uninterrupted one.
        generator = torch.Generator().manual_seed(sampler.seed * 100_003 + epoch)
        yield from DataLoader(
            dataset,
            batch_size=batch_size,
            sampler=sampler,
            num_workers=num_workers,
            drop_last=True,
            generator=generator,
        )
        epoch, skip = epoch + 1, 0


# ----------------------------------------------------------------------------------------------------------------------
# Checkpoints


def rng_state() -> dict[str, Any]:
    """Every RNG a step may draw from (torch CPU and CUDA, numpy, python), in a `weights_only`-loadable form."""
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    return {
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
        "numpy": [kind, torch.from_numpy(keys.astype(np.int64)), pos, has_gauss, cached],
        "python": random.getstate(),
    }


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    if state["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
    kind, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), pos, has_gauss, cached))
    random.setstate(state["python"])


def checkpoint_dir(output_dir: str | Path, step: int) -> Path:
    return Path(output_dir) / "checkpoints" / f"step_{step:07d}"


def latest_checkpoint(output_dir: str | Path) -> Path | None:
    """The finished checkpoint with the highest step under `output_dir/checkpoints`, or None."""
    folders = sorted(
        p for p in (Path(output_dir) / "checkpoints").glob("step_*") if (p / "state.pt").is_file()
    )
    return folders[-1] if folders else None


def save_checkpoint(accelerator: Accelerator, folder: Path, state: dict[str, Any], keep: int | None) -> None:
    """Write `state` (main process) and every process's RNG state to `folder`, atomically; keep the newest `keep`."""
    tmp = folder.with_name(folder.name + ".tmp")
    if accelerator.is_main_process:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    accelerator.wait_for_everyone()
    torch.save(rng_state(), tmp / f"rng_{accelerator.process_index}.pt")
    if accelerator.is_main_process:
        torch.save(state, tmp / "state.pt")
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        shutil.rmtree(folder, ignore_errors=True)
        tmp.rename(folder)
        if keep is not None:
            finished = sorted(p for p in folder.parent.glob("step_*") if p.suffix != ".tmp")
            for old in finished[:-keep]:
                shutil.rmtree(old)
        logger.info("saved checkpoint %s", folder)
    accelerator.wait_for_everyone()


def load_checkpoint(folder: Path, process_index: int = 0) -> tuple[dict[str, Any], dict[str, Any] | None]:
    """(state, this process's RNG state or None when the checkpoint came from a smaller world)."""
    state = torch.load(folder / "state.pt", map_location="cpu", weights_only=True)
    rng_file = folder / f"rng_{process_index}.pt"
    rng = torch.load(rng_file, map_location="cpu", weights_only=True) if rng_file.is_file() else None
    return state, rng


def _resume_path(cfg: LoopConfig) -> Path | None:
    if cfg.resume is False or cfg.resume is None:
        return None
    if cfg.resume is True:
        found = latest_checkpoint(cfg.output_dir)
        if found is None:
            logger.info("resume requested but %s has no checkpoint; starting from step 0", cfg.output_dir)
        return found
    path = Path(cfg.resume)
    if not (path / "state.pt").is_file():
        raise ValueError(
            f"resume={cfg.resume!r} is not a checkpoint folder (no state.pt); pass True or a step_* folder"
        )
    return path


# ----------------------------------------------------------------------------------------------------------------------
# The loop


@dataclass
class _Run:
    """The prepared objects of one `fit` call."""

    accelerator: Accelerator
    model: nn.Module
    optimizer: Any
    lr_scheduler: torch.optim.lr_scheduler.LambdaLR
    extra: dict[str, nn.Module]
    cfg: LoopConfig

    def state(self, step: int) -> dict[str, Any]:
        scaler = self.accelerator.scaler
        return {
            "step": step,
            "model": self.accelerator.unwrap_model(self.model).state_dict(),
            "extra": {k: m.state_dict() for k, m in self.extra.items()},
            "optimizer": self.optimizer.state_dict(),
            "lr_scheduler": self.lr_scheduler.state_dict(),
            "scaler": scaler.state_dict() if scaler is not None else None,
        }

    def restore(self, folder: Path) -> int:
        state, rng = load_checkpoint(folder, self.accelerator.process_index)
        self.accelerator.unwrap_model(self.model).load_state_dict(state["model"])
        for name, module in self.extra.items():
            module.load_state_dict(state["extra"][name])
        self.optimizer.load_state_dict(state["optimizer"])
        self.lr_scheduler.load_state_dict(state["lr_scheduler"])
        if state["scaler"] is not None and self.accelerator.scaler is not None:
            self.accelerator.scaler.load_state_dict(state["scaler"])
        if rng is None:
            logger.warning(
                "%s has no RNG state for process %d; reseeding", folder, self.accelerator.process_index
            )
            _seed(self.cfg.seed + 1 + state["step"], self.accelerator.process_index)
        else:
            set_rng_state(rng)
        logger.info("resumed from %s at step %d", folder, state["step"])
        return int(state["step"])


def _seed(seed: int, rank: int) -> None:
    """Seed every RNG; processes get different streams (their noise must differ) from one user seed."""
    seed = seed * 1009 + rank
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def _param_groups(model: nn.Module, lr: float, lr_scales: dict[str, float] | None) -> list[dict[str, Any]]:
    """Trainable parameters grouped by learning rate: `lr * lr_scales[prefix]` for names under a prefix, else `lr`."""
    lr_scales = lr_scales or {}
    groups: dict[float, list[nn.Parameter]] = {}
    for name, param in model.named_parameters():
        if param.requires_grad:
            scale = next((v for k, v in lr_scales.items() if name == k or name.startswith(k + ".")), 1.0)
            groups.setdefault(lr * scale, []).append(param)
    if not groups:
        raise ValueError("the model has no trainable parameters")
    return [{"params": params, "lr": group_lr} for group_lr, params in groups.items()]


def _prepare(
    accelerator: Accelerator,
    model: nn.Module,
    cfg: LoopConfig,
    extra: dict[str, nn.Module] | None,
    lr_scales: dict[str, float] | None = None,
) -> _Run:
    optimizer = torch.optim.AdamW(
        _param_groups(model, cfg.learning_rate, lr_scales),
        lr=cfg.learning_rate,
        betas=(cfg.adam_beta1, cfg.adam_beta2),
        eps=cfg.adam_epsilon,
        weight_decay=cfg.weight_decay,
    )
    # Stepped by us once per optimizer step (accelerate would step a prepared schedule once per process).
    lr_scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: lr_factor(s, cfg))
    accelerator.gradient_accumulation_steps = cfg.gradient_accumulation_steps
    model, optimizer = accelerator.prepare(model, optimizer)
    return _Run(accelerator, model, optimizer, lr_scheduler, dict(extra or {}), cfg)


def _to_device(batch: Any, device: torch.device) -> Any:
    if isinstance(batch, torch.Tensor):
        return batch.to(device, non_blocking=True)
    if isinstance(batch, (list, tuple)) and not all(isinstance(b, str) for b in batch):
        return type(batch)(_to_device(b, device) for b in batch)
    return batch


def _micro_step(run: _Run, loss_fn: LossFn, batch: Any) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Forward, backward and (on a sync step) clip and update; returns the detached loss and metrics."""
    accelerator = run.accelerator
    with accelerator.accumulate(run.model):
        loss, metrics = loss_fn(run.model, _to_device(batch, accelerator.device))
        accelerator.backward(loss)
        if accelerator.sync_gradients:
            accelerator.clip_grad_norm_(run.model.parameters(), run.cfg.max_grad_norm)
        run.optimizer.step()
        run.optimizer.zero_grad(set_to_none=True)
    return loss.detach().float(), {k: v.detach().float() for k, v in metrics.items()}


def fit(
    accelerator: Accelerator,
    model: nn.Module,
    dataset: Dataset,
    loss_fn: LossFn,
    cfg: LoopConfig,
    *,
    extra_modules: dict[str, nn.Module] | None = None,
    on_sync_step: Callable[[nn.Module], None] | None = None,
    lr_scales: dict[str, float] | None = None,
    name: str = "train",
) -> nn.Module:
    """Optimise `model` for `cfg.max_steps` optimizer steps; returns it unwrapped (on the accelerator's device).

    `extra_modules` are checkpointed with it (an EMA target); `on_sync_step(unwrapped_model)` runs after every
    optimizer step (the EMA update). `lr_scales` maps a submodule name to a learning-rate multiplier
    (`{"text_encoder": 0.1}`). The loss log is `<output_dir>/<name>_loss.csv` and `.png`.
    """
    out = Path(cfg.output_dir)
    run = _prepare(accelerator, model, cfg, extra_modules, lr_scales)
    resume_from = _resume_path(cfg)
    step = run.restore(resume_from) if resume_from is not None else 0
    if resume_from is None:
        _seed(cfg.seed + 1, accelerator.process_index)
    log = LossLog(out / f"{name}_loss.csv", resume_step=step) if accelerator.is_main_process else None
    sampler = ShardedSampler(
        len(dataset), cfg.seed, cfg.shuffle, accelerator.process_index, accelerator.num_processes
    )
    accum = cfg.gradient_accumulation_steps
    batches = micro_batches(dataset, sampler, cfg.batch_size, step * accum, cfg.num_workers)
    bar = tqdm(
        total=cfg.max_steps,
        initial=step,
        desc=name,
        disable=not (cfg.progress and accelerator.is_local_main_process),
    )
    sums: dict[str, torch.Tensor] = {}
    logged = 0
    run.model.train()
    while step < cfg.max_steps:
        for _ in range(accum):
            loss, metrics = _micro_step(run, loss_fn, next(batches))
            for k, v in {"loss": loss, **metrics}.items():
                sums[k] = sums.get(k, 0.0) + v / accum
        lr = run.lr_scheduler.get_last_lr()[0]  # the rate this step used
        run.lr_scheduler.step()
        step += 1
        logged += 1
        if on_sync_step is not None:
            on_sync_step(accelerator.unwrap_model(run.model))
        bar.update(1)
        if step % cfg.log_every == 0 or step == cfg.max_steps:
            means = {k: accelerator.reduce(v / logged, "mean").item() for k, v in sums.items()}
            if log is not None:
                log.append(step, means.pop("loss"), lr=lr, **means)
                bar.set_postfix(loss=f"{log.rows[-1]['loss']:.4g}")
            sums, logged = {}, 0
        if step % cfg.checkpoint_every == 0 or step == cfg.max_steps:
            save_checkpoint(
                accelerator, checkpoint_dir(out, step), run.state(step), cfg.checkpoints_total_limit
            )
            if log is not None:
                log.plot(out / f"{name}_loss.png", title=f"{name} loss")
    bar.close()
    accelerator.wait_for_everyone()
    unwrapped = accelerator.unwrap_model(run.model)
    accelerator.free_memory()
    return unwrapped
