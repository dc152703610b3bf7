"""Latent consistency distillation (LCD; Luo et al. 2023, arXiv:2310.04378, Algorithm 1).

A student UNet f_phi (the teacher's weights plus a zero-initialised w-embedding input, `time_embedding.cond_proj`)
learns to map any point of the teacher's probability-flow trajectory straight to its origin. Per sample:

1. z0 = E(x); draw eps (with offset noise if the teacher was trained with it), a solver index n and a guidance
   scale w ~ U[w_min, w_max];
2. t_{n+k} = tau_n on the skipping-step grid {k-1, 2k-1, ..., T-1} (k = T / N), t_n = max(t_{n+k} - k, 0);
   z_{t_{n+k}} = sqrt(alpha_bar) z0 + sqrt(1 - alpha_bar) eps;
3. online: f_phi(z_{t_{n+k}}, w, c, t_{n+k}) = c_skip z + c_out x0_hat (paper eq. 6);
4. teacher with classifier-free guidance in the paper's form (x0 = x0_c + w (x0_c - x0_u), same for eps) and one
   DDIM step to t_n (paper eq. 9);
5. target: f_phi^-(z_{t_n}, w, c, t_n) with the EMA network phi^- (no gradient);
6. loss d(online, target), Huber (c = 0.001) or L2; AdamW; after each optimizer step phi^- <- mu phi^- + (1 - mu) phi.

The LCM-LoRA variant (`DistillConfig.lora_rank`; pieces in `lcmkit.train.distill_lora`) runs the same objective
with a different student: the teacher UNet itself plus a trainable adapter, without w-embedding (w reaches only the
teacher's guided step). The teacher is that UNet with its adapters switched off, and the target f_phi^- is the
online student under stop-gradient, as in diffusers' LCM-LoRA training script (train_lcm_distill_lora_sd_wds.py): no
EMA copy.

The boundary scalings, x0/eps conversions, skipping-step grid and w-embedding are `lcm_math`'s, the very
functions the LCM scheduler samples with, so training and sampling cannot drift apart.
"""

from __future__ import annotations

import contextlib
import copy
import json
import logging
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from accelerate import Accelerator
from torch import nn

from lcmkit.config import replace
from lcmkit.loading.folders import load_components
from lcmkit.models.text import encode_prompt
from lcmkit.models.unet import UNet2DConditionModel
from lcmkit.nn.lora import scale_lora
from lcmkit.pipelines.text2img import LatentConsistencyModelPipeline
from lcmkit.schedulers import LCMScheduler
from lcmkit.schedulers.lcm_math import (
    boundary_scalings,
    eps_from_prediction,
    guidance_scale_embedding,
    lcm_timesteps,
    x0_from_prediction,
)
from lcmkit.train.data import WorldConfig, open_dataset
from lcmkit.train.distill_lora import (
    LCM_LORA_TARGETS,
    LoraStudent,
    add_lcm_lora,
    resolve_targets,
    save_lcm_lora,
)
from lcmkit.train.loop import LoopConfig, fit, frozen_dtype, make_accelerator
from lcmkit.train.teacher import draw_noise, encode_latents

logger = logging.getLogger(__name__)

LOSS_TYPES = ("huber", "l2")
_NO_SAFETY = {"safety_checker": None, "feature_extractor": None, "image_encoder": None}

# ----------------------------------------------------------------------------------------------------------------------
# The pieces, as pure functions


def _per_sample(value: float | torch.Tensor, like: torch.Tensor) -> float | torch.Tensor:
    """A number stays a number; a (B,) tensor becomes (B, 1, 1, 1) to broadcast against a batch of latents."""
    if not isinstance(value, torch.Tensor) or value.ndim == 0:
        return value
    return value.to(like.device).reshape(-1, *([1] * (like.ndim - 1)))


def ddim_timesteps(num_train_timesteps: int = 1000, num_ddim_timesteps: int = 50) -> torch.Tensor:
    """The ascending solver grid tau_n = (n + 1) k - 1, n = 0..N-1, k = T // N: the LCM scheduler's skipping grid."""
    return torch.tensor(
        lcm_timesteps(num_ddim_timesteps, num_train_timesteps, original_steps=num_ddim_timesteps)[::-1]
    )


def ddim_solver_step(
    x0: torch.Tensor, eps: torch.Tensor, alpha_bar_prev: float | torch.Tensor
) -> torch.Tensor:
    """Deterministic DDIM (eta = 0) step to the previous time: sqrt(alpha_bar_prev) x0 + sqrt(1 - alpha_bar_prev) eps.

    (DDIM, Song et al. 2021, eq. 12 with sigma = 0; LCM paper eq. 9.) `alpha_bar_prev` is a number or (B,).
    """
    alpha_bar_prev = torch.as_tensor(_per_sample(alpha_bar_prev, x0), dtype=x0.dtype, device=x0.device)
    return alpha_bar_prev.sqrt() * x0 + (1 - alpha_bar_prev).sqrt() * eps


def guided(cond: torch.Tensor, uncond: torch.Tensor, w: float | torch.Tensor) -> torch.Tensor:
    """Classifier-free guidance in the LCM paper's form (eq. 8): cond + w (cond - uncond); w = 0 is unguided."""
    return cond + _per_sample(w, cond) * (cond - uncond)


def consistency_output(
    x_t: torch.Tensor,
    x0: torch.Tensor,
    t: int | torch.Tensor,
    timestep_scaling: float = 10.0,
    sigma_data: float = 0.5,
) -> torch.Tensor:
    """The consistency function f(x_t, t) = c_skip(t) x_t + c_out(t) x0 (paper eq. 6), scalings from `lcm_math`."""
    c_skip, c_out = boundary_scalings(t, timestep_scaling, sigma_data)
    return _per_sample(c_skip, x_t) * x_t + _per_sample(c_out, x_t) * x0


def huber_loss(pred: torch.Tensor, target: torch.Tensor, c: float = 0.001) -> torch.Tensor:
    """Pseudo-Huber loss mean(sqrt((pred - target)^2 + c^2) - c) (Song & Dhariwal 2023): L2 near 0, L1 far out."""
    return torch.mean(torch.sqrt((pred.float() - target.float()) ** 2 + c**2) - c)


@torch.no_grad()
def ema_update(target: nn.Module, online: nn.Module, mu: float = 0.95) -> None:
    """phi^- <- mu phi^- + (1 - mu) phi, parameter by parameter (matched by name), in place."""
    if not 0.0 <= mu <= 1.0:
        raise ValueError(f"the EMA decay mu must be in [0, 1], got {mu}")
    online_params = dict(online.named_parameters())
    target_params = dict(target.named_parameters())
    if online_params.keys() != target_params.keys():
        missing = sorted(online_params.keys() ^ target_params.keys())[:5]
        raise ValueError(f"target and online networks have different parameters, e.g. {missing}")
    for name, p_target in target_params.items():
        p_target.mul_(mu).add_(online_params[name].detach().to(p_target.dtype), alpha=1 - mu)


def make_student(teacher: UNet2DConditionModel, w_embedding_dim: int = 256) -> UNet2DConditionModel:
    """The teacher's UNet with a w-embedding input: same weights, `time_embedding.cond_proj` zero-initialised.

    With cond_proj = 0 the w-embedding adds exactly nothing, so at initialisation the student equals the teacher
    for every w. A teacher that already has a w-embedding keeps its dimension and weights.
    """
    dim = teacher.config.time_cond_proj_dim or w_embedding_dim
    student = UNet2DConditionModel(replace(teacher.config, time_cond_proj_dim=dim))
    missing, unexpected = student.load_state_dict(teacher.state_dict(), strict=False)
    if unexpected or set(missing) - {"time_embedding.cond_proj.weight"}:
        raise ValueError(f"student and teacher UNets differ: missing {missing}, unexpected {unexpected}")
    if missing:
        nn.init.zeros_(student.time_embedding.cond_proj.weight)
    return student.to(device=teacher.device, dtype=torch.float32)


# ----------------------------------------------------------------------------------------------------------------------
# The objective


class LCDObjective:
    """One LCD loss evaluation (module docstring, steps 1-6) given a frozen teacher, the target and the encoders.

    Full LCD: `target` is the EMA copy. LCM-LoRA: `teacher` and `target` are both the student's own UNet; the
    teacher pass runs with its adapters off, and a target without a w-embedding input gets no w (`timestep_cond`
    None), so w acts only through the teacher's guidance.
    """

    def __init__(
        self,
        teacher: UNet2DConditionModel,
        target: UNet2DConditionModel,
        scheduler: LCMScheduler,
        *,
        vae: nn.Module | None = None,
        text_encoder: nn.Module | None = None,
        tokenizer: object | None = None,
        num_ddim_timesteps: int = 50,
        w_min: float = 5.0,
        w_max: float = 15.0,
        loss_type: str = "huber",
        huber_c: float = 0.001,
        timestep_scaling: float = 10.0,
        noise_offset: float = 0.0,
        autocast: Callable[[], contextlib.AbstractContextManager] = contextlib.nullcontext,
    ) -> None:
        if loss_type not in LOSS_TYPES:
            raise ValueError(f"loss_type must be one of {list(LOSS_TYPES)}, got {loss_type!r}")
        if not 0 <= w_min <= w_max:
            raise ValueError(f"need 0 <= w_min <= w_max, got w_min={w_min}, w_max={w_max}")
        T = scheduler.config.num_train_timesteps
        self.teacher, self.target, self.vae, self.scheduler = teacher, target, vae, scheduler
        self.text_encoder, self.tokenizer = text_encoder, tokenizer
        self.prediction_type = scheduler.config.prediction_type
        self.alpha_bar = scheduler.alphas_cumprod.clone().float()
        self.timesteps = ddim_timesteps(T, num_ddim_timesteps)
        self.k = T // num_ddim_timesteps
        self.w_min, self.w_max = w_min, w_max
        self.loss_type, self.huber_c, self.timestep_scaling = loss_type, huber_c, timestep_scaling
        self.w_dim = target.config.time_cond_proj_dim
        self.noise_offset = noise_offset
        self.autocast = autocast
        self._uncond: torch.Tensor | None = None

    def encode_text(self, captions: list[str], device: torch.device) -> torch.Tensor:
        with torch.no_grad():
            return encode_prompt(captions, self.tokenizer, self.text_encoder, device)

    def __call__(self, student: nn.Module, batch: tuple[torch.Tensor, list[str]]) -> tuple:
        images, captions = batch
        if self._uncond is None:
            self._uncond = self.encode_text([""], images.device)
        z0 = encode_latents(self.vae, images)
        return self.loss(student, z0, self.encode_text(captions, images.device), self._uncond)

    def _alpha_bar(self, t: torch.Tensor) -> torch.Tensor:
        if self.alpha_bar.device != t.device:
            self.alpha_bar = self.alpha_bar.to(t.device)
        return self.alpha_bar[t]

    def _x0_eps(
        self, out: torch.Tensor, x_t: torch.Tensor, t: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        alpha_bar_t = _per_sample(self._alpha_bar(t), x_t)
        return (
            x0_from_prediction(out, x_t, alpha_bar_t, self.prediction_type),
            eps_from_prediction(out, x_t, alpha_bar_t, self.prediction_type),
        )

    @torch.no_grad()
    def teacher_solver_step(
        self,
        x_t: torch.Tensor,
        t: torch.Tensor,
        t_prev: torch.Tensor,
        c: torch.Tensor,
        uncond: torch.Tensor,
        w: torch.Tensor,
    ) -> torch.Tensor:
        """z_{t_n}: one guided DDIM step of the teacher from (x_t, t); cond and uncond run as one batch."""
        b, dtype = len(x_t), self.teacher.dtype
        context = torch.cat([c, uncond.expand(b, -1, -1)]).to(dtype)
        x_in, t_in = torch.cat([x_t, x_t]), torch.cat([t, t])
        # The base model: adapters off, also when this UNet carries the LCM-LoRA student.
        with self.autocast(), scale_lora(self.teacher, 0.0):
            out = self.teacher(x_in.to(dtype), t_in, context, return_dict=False)[0].float()
        x0, eps = self._x0_eps(out, x_in, t_in)
        (x0_c, x0_u), (eps_c, eps_u) = x0.chunk(2), eps.chunk(2)
        alpha_bar_prev = self._alpha_bar(t_prev)
        return ddim_solver_step(guided(x0_c, x0_u, w), guided(eps_c, eps_u, w), alpha_bar_prev)

    def consistency(
        self,
        unet: nn.Module,
        x_t: torch.Tensor,
        t: torch.Tensor,
        c: torch.Tensor,
        w_emb: torch.Tensor | None,
    ) -> torch.Tensor:
        """f(x_t, w, c, t) = c_skip x_t + c_out x0(unet output) for the online or the target network."""
        out = unet(x_t, t, c, timestep_cond=w_emb, return_dict=False)[0].float()
        x0, _ = self._x0_eps(out, x_t, t)
        return consistency_output(x_t, x0, t, self.timestep_scaling)

    def loss(
        self,
        student: nn.Module,
        z0: torch.Tensor,
        c: torch.Tensor,
        uncond: torch.Tensor,
        generator: torch.Generator | None = None,
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """The LCD loss on clean latents z0 with text embeddings c; draws eps, n, w (in that order) on the CPU."""
        b, device = len(z0), z0.device
        # 1. Randomness, drawn on the CPU so one seed gives the same run on any device.
        eps = draw_noise(z0.shape, self.noise_offset, generator).to(device)
        n = torch.randint(0, len(self.timesteps), (b,), generator=generator)
        w = (self.w_max - self.w_min) * torch.rand(b, generator=generator) + self.w_min
        # 2. Start and end times on the skipping-step grid; forward process to the start.
        t = self.timesteps[n].to(device)
        t_prev = (t - self.k).clamp(min=0)
        x_t = self.scheduler.add_noise(z0, eps, t)
        w_emb = None
        if self.w_dim is not None:
            w_emb = guidance_scale_embedding(w, self.w_dim).to(device, z0.dtype)
        w = w.to(device)
        # 3. Online consistency output.
        online = self.consistency(student, x_t, t, c, w_emb)
        # 4. Teacher: guided DDIM step to t_prev. 5. Target consistency output there.
        with torch.no_grad():
            x_prev = self.teacher_solver_step(x_t, t, t_prev, c, uncond, w)
            with self.autocast():
                target = self.consistency(self.target, x_prev, t_prev, c, w_emb)
        # 6. Distance.
        if self.loss_type == "huber":
            loss = huber_loss(online, target, self.huber_c)
        else:
            loss = torch.mean((online.float() - target.float()) ** 2)
        return loss, {}


# ----------------------------------------------------------------------------------------------------------------------
# The run


@dataclass
class DistillConfig:
    """LCD of a teacher folder (any diffusers-layout SD folder lcmkit loads) into `save_dir`.

    `lora_rank` None: full LCD, an LCM pipeline folder. A rank r: LCM-LoRA, `save_dir/pytorch_lora_weights.safetensors`
    (kohya format, adapters on `lora_targets` with scale `lora_alpha` / r; alpha defaults to r) plus the LCM scheduler
    config it was distilled for in `save_dir/scheduler`. `ema_decay`, `w_embedding_dim` and `save_target_unet`
    concern full LCD only.
    """

    teacher: str | Path = "runs/tiny/teacher"
    save_dir: str | Path = "runs/tiny/lcm"
    data: str | None = None  # None: the synthetic world; else an image folder or a .jsonl file
    world: WorldConfig | None = None
    image_size: int | None = None  # default: the teacher UNet's sample size times the VAE's downscale
    num_ddim_timesteps: int = 50
    w_min: float = 5.0
    w_max: float = 15.0
    w_embedding_dim: int = 256
    loss_type: str = "huber"
    huber_c: float = 0.001
    ema_decay: float = 0.95
    timestep_scaling: float = 10.0
    # Offset noise on z_{t_{n+k}} (`teacher.draw_noise`); use the teacher's own training value (0 for SD teachers).
    noise_offset: float = 0.0
    save_target_unet: bool = True  # also write the EMA target to <save_dir>/unet_target
    lora_rank: int | None = None
    lora_alpha: float | None = None
    lora_targets: str | tuple[str, ...] = LCM_LORA_TARGETS  # module-name suffixes, or "lcm" / "attention"
    mixed_precision: str = "no"
    loop: LoopConfig = field(default_factory=lambda: LoopConfig(output_dir="runs/tiny/work/distill"))

    def __post_init__(self) -> None:
        if self.lora_rank is not None and (isinstance(self.lora_rank, bool) or self.lora_rank < 1):
            raise ValueError(
                f"DistillConfig.lora_rank must be None (full LCD) or >= 1, got {self.lora_rank!r}"
            )

    @property
    def is_lora(self) -> bool:
        return self.lora_rank is not None


def lcm_scheduler_for(teacher_scheduler: LCMScheduler, config: DistillConfig) -> LCMScheduler:
    """The student's sampler: the teacher's noise schedule, the distillation grid, no clipping (training had none)."""
    return LCMScheduler.from_config(
        teacher_scheduler.config,
        original_inference_steps=config.num_ddim_timesteps,
        timestep_scaling=config.timestep_scaling,
        clip_sample=False,
        thresholding=False,
    )


def save_lcm_folder(
    folder: str | Path,
    student: UNet2DConditionModel,
    teacher_folder: str | Path,
    scheduler: LCMScheduler,
    target: UNet2DConditionModel | None = None,
) -> Path:
    """Write a complete LCM folder: the student, the teacher's VAE / text encoder / tokenizer, an LCMScheduler."""
    parts, _ = load_components(
        teacher_folder, overrides={**_NO_SAFETY, "unet": student, "scheduler": scheduler}
    )
    pipe = LatentConsistencyModelPipeline(
        vae=parts["vae"],
        text_encoder=parts["text_encoder"],
        tokenizer=parts["tokenizer"],
        unet=student,
        scheduler=scheduler,
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    pipe.save_pretrained(folder)
    if target is not None:
        target.save_pretrained(Path(folder) / "unet_target")
    return Path(folder)


@dataclass
class _Student:
    """What `fit` trains and how the target follows it, for one variant."""

    model: nn.Module  # the module `fit` optimises
    target: nn.Module  # f_phi^- for the objective
    extra: dict[str, nn.Module] | None  # checkpointed alongside
    on_sync_step: Callable[[nn.Module], None] | None


def _full_student(teacher: UNet2DConditionModel, config: DistillConfig, device: torch.device) -> _Student:
    student = make_student(teacher, config.w_embedding_dim)
    target = copy.deepcopy(student).requires_grad_(False).to(device).eval()
    return _Student(
        student, target, {"target": target}, lambda online: ema_update(target, online, config.ema_decay)
    )


def _lora_student(teacher: UNet2DConditionModel, config: DistillConfig) -> _Student:
    """The (already frozen) teacher with a trainable float32 adapter; the target is that same network."""
    add_lcm_lora(teacher, config.lora_rank, config.lora_alpha, config.lora_targets)
    return _Student(LoraStudent(teacher), teacher, None, None)


def _lora_info(config: DistillConfig, adapter: LoraStudent) -> dict:
    """What a LoRA file records about its making (safetensors header metadata)."""
    return {
        "rank": config.lora_rank,
        "alpha": config.lora_alpha if config.lora_alpha is not None else config.lora_rank,
        "targets": resolve_targets(config.lora_targets),
        "layers": len(adapter.state_dict()) // 2,
        "teacher": str(config.teacher),
        "steps": config.loop.max_steps,
        "w_min": config.w_min,
        "w_max": config.w_max,
        "original_inference_steps": config.num_ddim_timesteps,
        "timestep_scaling": config.timestep_scaling,
    }


def distill(config: DistillConfig, accelerator: Accelerator | None = None) -> Path:
    """Run LCD (or LCM-LoRA) for `config.loop.max_steps` optimizer steps and save the result; returns `save_dir`."""
    accelerator = accelerator or make_accelerator(
        config.loop.gradient_accumulation_steps, config.mixed_precision
    )
    device, dtype = accelerator.device, frozen_dtype(accelerator)
    parts, _ = load_components(config.teacher, overrides=_NO_SAFETY)
    teacher, vae, scheduler = parts["unet"], parts["vae"], parts["scheduler"]
    torch.manual_seed(config.loop.seed)
    # Full LCD copies the teacher before it is cast to the frozen dtype, so the student starts at full precision.
    student = None if config.is_lora else _full_student(teacher, config, device)
    for frozen in (teacher, vae, parts["text_encoder"]):
        frozen.requires_grad_(False).to(device, dtype).eval()
    if student is None:
        student = _lora_student(teacher, config)
    objective = LCDObjective(
        teacher,
        student.target,
        scheduler,
        vae=vae,
        text_encoder=parts["text_encoder"],
        tokenizer=parts["tokenizer"],
        num_ddim_timesteps=config.num_ddim_timesteps,
        w_min=config.w_min,
        w_max=config.w_max,
        loss_type=config.loss_type,
        huber_c=config.huber_c,
        timestep_scaling=config.timestep_scaling,
        noise_offset=config.noise_offset,
        autocast=accelerator.autocast,
    )
    image_size = config.image_size or teacher.config.sample_size * vae.vae_scale_factor
    dataset = open_dataset(config.data, image_size, config.world)
    trained = fit(
        accelerator,
        student.model,
        dataset,
        objective,
        config.loop,
        extra_modules=student.extra,
        on_sync_step=student.on_sync_step,
        name="distill",
    )
    if accelerator.is_main_process:
        lcm_scheduler = lcm_scheduler_for(scheduler, config)
        if config.is_lora:
            save_lcm_lora(config.save_dir, trained.unet, info=_lora_info(config, trained))
            lcm_scheduler.save_pretrained(Path(config.save_dir) / "scheduler")
        else:
            target_out = student.target if config.save_target_unet else None
            save_lcm_folder(config.save_dir, trained.eval(), config.teacher, lcm_scheduler, target_out)
        work = Path(config.loop.output_dir)
        (work / "distill_config.json").write_text(json.dumps(asdict(config), indent=2, default=str) + "\n")
    accelerator.wait_for_everyone()
    return Path(config.save_dir)
