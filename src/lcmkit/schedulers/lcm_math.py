"""The math of latent consistency models as plain functions: no state, no config objects.

Symbols follow the LCM paper (Luo et al. 2023, arXiv:2310.04378) and DDPM (Ho et al. 2020):

- `x_t`: the noisy latent at timestep t; `x0`: the clean latent; `eps`: the Gaussian noise;
- `alpha_bar`: the cumulative product of (1 - beta) over the training schedule, so that
  x_t = sqrt(alpha_bar_t) * x0 + sqrt(1 - alpha_bar_t) * eps;
- `c_skip`, `c_out`: the consistency boundary-condition scalings (paper eq. 6);
- `w`: the guidance scale given to the UNet as an embedding (paper eq. 8; Imagen convention).

The arithmetic order matches diffusers (0.42) operation for operation, because the scheduler and the
pipelines are tested bit-for-bit against it; please keep it that way when editing.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence

import numpy as np
import torch

logger = logging.getLogger(__name__)

BETA_SCHEDULES = ("linear", "scaled_linear", "squaredcos_cap_v2")
PREDICTION_TYPES = ("epsilon", "sample", "v_prediction")

Scalar = float | torch.Tensor


# ----------------------------------------------------------------------------------------------
# Noise schedules
# ----------------------------------------------------------------------------------------------


def cosine_betas(num_train_timesteps: int, max_beta: float = 0.999) -> torch.Tensor:
    """Betas of the "squaredcos_cap_v2" schedule (Nichol & Dhariwal 2021, eq. 17).

    alpha_bar(t) = cos(((t + s) / (1 + s)) * pi / 2)^2 with s = 0.008, and
    beta_i = min(1 - alpha_bar((i + 1) / T) / alpha_bar(i / T), max_beta). Computed in float64, returned float32.
    """

    def alpha_bar(t: float) -> float:
        return math.cos((t + 0.008) / 1.008 * math.pi / 2) ** 2

    betas = []
    for i in range(num_train_timesteps):
        t1 = i / num_train_timesteps
        t2 = (i + 1) / num_train_timesteps
        betas.append(min(1 - alpha_bar(t2) / alpha_bar(t1), max_beta))
    return torch.tensor(betas, dtype=torch.float32)


def make_betas(
    beta_schedule: str = "scaled_linear",
    num_train_timesteps: int = 1000,
    beta_start: float = 0.00085,
    beta_end: float = 0.012,
    trained_betas: Sequence[float] | np.ndarray | None = None,
) -> torch.Tensor:
    """Float32 betas of the training noise schedule; `trained_betas`, when given, wins over the named schedule.

    "scaled_linear" (the Stable Diffusion schedule) is linear in sqrt(beta): linspace(sqrt(b0), sqrt(b1), T)^2.
    Unknown schedules raise NotImplementedError, as the reference does.
    """
    if trained_betas is not None:
        return torch.tensor(trained_betas, dtype=torch.float32)
    if beta_schedule == "linear":
        return torch.linspace(beta_start, beta_end, num_train_timesteps, dtype=torch.float32)
    if beta_schedule == "scaled_linear":
        return torch.linspace(beta_start**0.5, beta_end**0.5, num_train_timesteps, dtype=torch.float32) ** 2
    if beta_schedule == "squaredcos_cap_v2":
        return cosine_betas(num_train_timesteps)
    raise NotImplementedError(
        f"beta_schedule={beta_schedule!r} is not implemented for the LCM scheduler; "
        f"use one of {list(BETA_SCHEDULES)} or pass `trained_betas`."
    )


def rescale_zero_terminal_snr(betas: torch.Tensor) -> torch.Tensor:
    """Rescale betas so that the last timestep has zero SNR (Lin et al. 2023, arXiv:2305.08891, Algorithm 1).

    sqrt(alpha_bar) is shifted so its last value is 0, then scaled so its first value is unchanged;
    the betas are recovered from the new alpha_bar.
    """
    alphas = 1.0 - betas
    alpha_bar = torch.cumprod(alphas, dim=0)
    sqrt_alpha_bar = alpha_bar.sqrt()

    sqrt_alpha_bar_0 = sqrt_alpha_bar[0].clone()
    sqrt_alpha_bar_T = sqrt_alpha_bar[-1].clone()
    sqrt_alpha_bar -= sqrt_alpha_bar_T
    sqrt_alpha_bar *= sqrt_alpha_bar_0 / (sqrt_alpha_bar_0 - sqrt_alpha_bar_T)

    alpha_bar = sqrt_alpha_bar**2
    alphas = alpha_bar[1:] / alpha_bar[:-1]
    alphas = torch.cat([alpha_bar[0:1], alphas])
    return 1 - alphas


# ----------------------------------------------------------------------------------------------
# Consistency parameterisation
# ----------------------------------------------------------------------------------------------


def boundary_scalings(
    t: Scalar, timestep_scaling: float = 10.0, sigma_data: float = 0.5
) -> tuple[Scalar, Scalar]:
    """The consistency boundary-condition scalings (c_skip(t), c_out(t)) (LCM paper eq. 6, after CM eq. 8).

    With s = t * timestep_scaling: c_skip = sigma_data^2 / (s^2 + sigma_data^2) and
    c_out = s / sqrt(s^2 + sigma_data^2), so f(x_t, t) = c_skip * x_t + c_out * x0 is the identity at t = 0.

    `t` may be a python number (python floats come back) or a tensor of timesteps of any shape
    (tensors of that shape come back; reshape them to broadcast against a batch of latents).
    """
    s = t * timestep_scaling
    c_skip = sigma_data**2 / (s**2 + sigma_data**2)
    c_out = s / (s**2 + sigma_data**2) ** 0.5
    return c_skip, c_out


def _as_tensor(alpha_bar_t: Scalar, like: torch.Tensor) -> torch.Tensor:
    if isinstance(alpha_bar_t, torch.Tensor):
        return alpha_bar_t
    return torch.tensor(alpha_bar_t, dtype=torch.float32, device=like.device)


def _check_prediction_type(prediction_type: str) -> None:
    if prediction_type not in PREDICTION_TYPES:
        raise ValueError(
            f"prediction_type given as {prediction_type!r} must be one of {list(PREDICTION_TYPES)} "
            "for the LCM scheduler."
        )


def x0_from_prediction(
    model_output: torch.Tensor, x_t: torch.Tensor, alpha_bar_t: Scalar, prediction_type: str = "epsilon"
) -> torch.Tensor:
    """The clean latent x0 implied by the model's output at x_t (DDPM eq. 15; v-prediction: Salimans & Ho 2022).

    - "epsilon": x0 = (x_t - sqrt(1 - alpha_bar_t) * eps) / sqrt(alpha_bar_t)
    - "sample":  x0 = model_output
    - "v_prediction": x0 = sqrt(alpha_bar_t) * x_t - sqrt(1 - alpha_bar_t) * v

    `alpha_bar_t` is a float, a 0-d tensor, or a tensor that broadcasts against x_t (training batches).
    """
    _check_prediction_type(prediction_type)
    alpha_bar_t = _as_tensor(alpha_bar_t, x_t)
    beta_bar_t = 1 - alpha_bar_t
    if prediction_type == "epsilon":
        return (x_t - beta_bar_t.sqrt() * model_output) / alpha_bar_t.sqrt()
    if prediction_type == "sample":
        return model_output
    return alpha_bar_t.sqrt() * x_t - beta_bar_t.sqrt() * model_output


def eps_from_prediction(
    model_output: torch.Tensor, x_t: torch.Tensor, alpha_bar_t: Scalar, prediction_type: str = "epsilon"
) -> torch.Tensor:
    """The noise eps implied by the model's output at x_t; the companion of `x0_from_prediction`.

    - "epsilon": eps = model_output
    - "sample":  eps = (x_t - sqrt(alpha_bar_t) * x0) / sqrt(1 - alpha_bar_t)
    - "v_prediction": eps = sqrt(alpha_bar_t) * v + sqrt(1 - alpha_bar_t) * x_t

    Used by distillation, where the teacher's DDIM step needs both x0 and eps (LCM paper eq. 9).
    """
    _check_prediction_type(prediction_type)
    if prediction_type == "epsilon":
        return model_output
    alpha_bar_t = _as_tensor(alpha_bar_t, x_t)
    beta_bar_t = 1 - alpha_bar_t
    if prediction_type == "sample":
        return (x_t - alpha_bar_t.sqrt() * model_output) / beta_bar_t.sqrt()
    return alpha_bar_t.sqrt() * model_output + beta_bar_t.sqrt() * x_t


def dynamic_threshold(x0: torch.Tensor, ratio: float = 0.995, max_value: float = 1.0) -> torch.Tensor:
    """Dynamic thresholding of a predicted x0 (Imagen, Saharia et al. 2022, section 2.3).

    Per sample, s = quantile(|x0|, ratio) clamped to [1, max_value]; x0 is clamped to [-s, s] and divided by s.
    Half precision is upcast to float32 for the quantile and cast back.
    """
    dtype = x0.dtype
    batch_size, channels, *rest = x0.shape
    if dtype not in (torch.float32, torch.float64):
        x0 = x0.float()
    x0 = x0.reshape(batch_size, channels * math.prod(rest))
    s = torch.quantile(x0.abs(), ratio, dim=1)
    s = torch.clamp(s, min=1, max=max_value).unsqueeze(1)
    x0 = torch.clamp(x0, -s, s) / s
    return x0.reshape(batch_size, channels, *rest).to(dtype)


# ----------------------------------------------------------------------------------------------
# Timestep schedules
# ----------------------------------------------------------------------------------------------


def _skipping_grid(num_train_timesteps: int, original_steps: int, strength: float) -> np.ndarray:
    """The ascending distillation grid {1..int(original_steps * strength)} * k - 1 with k = T // original_steps."""
    if original_steps < 1:
        raise ValueError(f"`original_inference_steps` must be a positive integer, got {original_steps}.")
    if original_steps > num_train_timesteps:
        raise ValueError(
            f"`original_steps`: {original_steps} cannot be larger than `num_train_timesteps`: "
            f"{num_train_timesteps}; the model was trained on {num_train_timesteps} timesteps at most."
        )
    k = num_train_timesteps // original_steps
    return np.arange(1, int(original_steps * strength) + 1, dtype=np.int64) * k - 1


def lcm_timesteps(
    num_inference_steps: int,
    num_train_timesteps: int = 1000,
    original_steps: int = 50,
    strength: float = 1.0,
) -> list[int]:
    """The LCM sampling schedule: `num_inference_steps` evenly indexed points of the skipping-step grid.

    The distillation grid (LCM paper section 4.3, skipping step k = T // original_steps) is
    {1, ..., int(original_steps * strength)} * k - 1. Reversed, it is indexed at
    floor(linspace(0, len, n, endpoint=False)), so defaults give n=4 -> [999, 759, 499, 259]. For img2img,
    `strength` shrinks the grid *before* picking (strength 0.8, n=4 -> [799, 599, 399, 199]).
    """
    if num_inference_steps < 1:
        raise ValueError(f"`num_inference_steps` must be a positive integer, got {num_inference_steps}.")
    if strength > 1.0:
        # The reference accepts this and returns timesteps >= T that crash later; we refuse early.
        raise ValueError(f"`strength` must be in (0, 1], got {strength}.")
    grid = _skipping_grid(num_train_timesteps, original_steps, strength)
    if num_inference_steps > num_train_timesteps:
        raise ValueError(
            f"`num_inference_steps`: {num_inference_steps} cannot be larger than `num_train_timesteps`: "
            f"{num_train_timesteps}; the model was trained on {num_train_timesteps} timesteps at most."
        )
    if num_inference_steps > original_steps:
        raise ValueError(
            f"`num_inference_steps`: {num_inference_steps} cannot be larger than `original_inference_steps`: "
            f"{original_steps}, because the schedule is a subset of the {original_steps}-step distillation grid."
        )
    if len(grid) // num_inference_steps < 1:
        raise ValueError(
            f"The combination of `original_steps x strength`: {original_steps} x {strength} is smaller than "
            f"`num_inference_steps`: {num_inference_steps}. Reduce `num_inference_steps` to at most "
            f"{int(original_steps * strength)} or increase `strength` to at least "
            f"{float(num_inference_steps / original_steps)}."
        )
    grid = grid[::-1]
    indices = np.floor(np.linspace(0, len(grid), num=num_inference_steps, endpoint=False)).astype(np.int64)
    return grid[indices].tolist()


def custom_lcm_timesteps(
    timesteps: Sequence[int],
    num_train_timesteps: int = 1000,
    original_steps: int = 50,
    strength: float = 1.0,
) -> list[int]:
    """Validate a user-given descending schedule and cut it for img2img `strength`.

    Raises when the schedule is not strictly descending, empty, negative, or starts at or beyond T. Warns
    (as the reference does) when it does not start at T - 1 (strength 1 only), when points after the first
    are off the distillation grid, or when it is longer than `original_steps`. Strength keeps the last
    min(int(n * strength), n) points, as Stable Diffusion img2img does.
    """
    timesteps = [int(t) for t in timesteps]
    if not timesteps:
        raise ValueError("`timesteps` must hold at least one timestep.")
    grid = set(_skipping_grid(num_train_timesteps, original_steps, strength).tolist())
    off_grid = []
    for prev, t in zip(timesteps, timesteps[1:], strict=False):
        if t >= prev:
            raise ValueError(f"`custom_timesteps` must be in descending order, got {timesteps}.")
        if t not in grid:
            off_grid.append(t)
    if timesteps[0] >= num_train_timesteps:
        raise ValueError(
            f"`timesteps` must start before `num_train_timesteps`: {num_train_timesteps}, got {timesteps[0]}."
        )
    if timesteps[-1] < 0:
        raise ValueError(f"`timesteps` must be >= 0, got {timesteps[-1]}.")

    if strength == 1.0 and timesteps[0] != num_train_timesteps - 1:
        logger.warning(
            "The first timestep on the custom timestep schedule is %s, not `num_train_timesteps - 1`: %s. "
            "You may get unexpected results when using this timestep schedule.",
            timesteps[0],
            num_train_timesteps - 1,
        )
    if off_grid:
        logger.warning(
            "The custom timestep schedule contains the following timesteps which are not on the original "
            "training/distillation timestep schedule: %s. You may get unexpected results when using this "
            "timestep schedule.",
            off_grid,
        )
    if len(timesteps) > original_steps:
        logger.warning(
            "The number of timesteps in the custom timestep schedule is %s, which exceeds the length of the "
            "timestep schedule used for training: %s. You may get unexpected results when using this "
            "timestep schedule.",
            len(timesteps),
            original_steps,
        )

    n = len(timesteps)
    t_start = max(n - min(int(n * strength), n), 0)
    return timesteps[t_start:]


# ----------------------------------------------------------------------------------------------
# Guidance embedding
# ----------------------------------------------------------------------------------------------


def guidance_scale_embedding(
    w: torch.Tensor, embedding_dim: int = 512, dtype: torch.dtype = torch.float32
) -> torch.Tensor:
    """Sinusoidal embedding of the guidance scale w, shape (len(w), embedding_dim) (LCM paper eq. 8; VDM).

    w is scaled by 1000; with half = embedding_dim // 2 the frequencies are f_i = exp(-i * ln(10000) / (half - 1)),
    and the embedding is [sin(1000 w f), cos(1000 w f)], sin first, zero-padded by one column if the dimension
    is odd. The pipelines pass w = guidance_scale - 1 (the Imagen convention of the UNet's training).
    """
    if w.ndim != 1:
        raise ValueError(f"`w` must be a 1-D tensor of guidance scales, got shape {tuple(w.shape)}.")
    if embedding_dim < 4:
        raise ValueError(f"`embedding_dim` must be at least 4, got {embedding_dim}.")
    w = w * 1000.0
    half = embedding_dim // 2
    log_step = torch.log(torch.tensor(10000.0)) / (half - 1)
    freqs = torch.exp(torch.arange(half, dtype=dtype) * -log_step)
    angles = w.to(dtype)[:, None] * freqs[None, :]
    emb = torch.cat([torch.sin(angles), torch.cos(angles)], dim=1)
    if embedding_dim % 2 == 1:
        emb = torch.nn.functional.pad(emb, (0, 1))
    return emb
