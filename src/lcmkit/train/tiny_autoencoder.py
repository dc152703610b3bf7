"""Distil a model's VAE into a tiny autoencoder in TAESD's layout (`AutoencoderTiny`): the decoder of fast mode.

TAESD itself is distilled from the SD VAE; this does the same for a VAE of our own (the shipped tiny model's), so
that fast mode can be measured on a model we have. Both halves learn from the frozen VAE:

- the tiny decoder maps the VAE's *scaled* latents z (what a UNet makes), divided by its own `scaling_factor` t (as
  pipelines divide before decoding; TAESD has t = 1, here t is fitted so the latents fit TAESD's input clamp), to
  what the VAE decodes from them: L1 + L2 against `vae.decode(z / s)`, so it imitates exact mode rather than the
  data, and PSNR against exact-mode images is what it is trained for;
- the tiny encoder maps an image to the VAE's scaled posterior mean over t (L2; pipelines multiply by t after
  encoding), so img2img can encode with it too. It learns on the training images only.

The decoder's inputs: the encoder latents of the training images, and, with `sampler_dir`, also latents that the
LCM itself makes. A fast-mode decoder only ever sees the latter, and they lie off the encoder's distribution: a
decoder trained on encoder latents alone reached 30.1 dB PSNR against the VAE on encoder latents but 21.4 dB on
the LCM sampler's final latents. So a pool of sampler latents (1, 2 and 4 steps, guidance 2..9, the training
captions) is drawn once before training, and each batch swaps a fixed fraction of its decoder inputs for pool
latents, with the VAE's decode of them as the target.

The result is an `AutoencoderTiny` folder (config.json + safetensors) that `pipe.vae = AutoencoderTiny.from_pretrained`
and the CLI's `--tiny-vae` load, and that diffusers' `AutoencoderTiny` loads as well.
"""

from __future__ import annotations

import json
import logging
import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from accelerate import Accelerator
from torch import nn

from lcmkit.models.tiny_vae import AutoencoderTiny, TinyVAEConfig
from lcmkit.models.vae import AutoencoderKL
from lcmkit.pipelines.text2img import LatentConsistencyModelPipeline
from lcmkit.train.data import WorldConfig, open_dataset
from lcmkit.train.loop import LoopConfig, fit, make_accelerator
from lcmkit.train.teacher import sample_latents

logger = logging.getLogger(__name__)


@dataclass
class TinyAutoencoderTrainConfig:
    """A VAE folder in, an `AutoencoderTiny` folder out. `channels` is every stage's width (TAESD's: 64)."""

    vae_dir: str | Path = "runs/tiny/vae"
    save_dir: str | Path = "runs/tiny/tiny-vae"
    image_size: int = 64
    data: str | None = None  # None: the synthetic world; else an image folder or a .jsonl file
    world: WorldConfig | None = None
    channels: int = 32
    # The tiny model's `scaling_factor`: it sees the VAE's scaled latents divided by this. TAESD's decoder soft-clamps
    # its input to (-3, 3), so latents that reach further (this VAE's reach |z| ~ 9) must be shrunk to fit.
    # None: fitted, so that 99.9% of sampled latent values lie within +-2.5.
    latent_scale: float | None = None
    # An LCM pipeline folder whose sampler outputs the decoder also learns on (its VAE must be `vae_dir`'s);
    # None: encoder latents only. `sampler_pool` latents are drawn once (captions of the first items of the
    # data), and `sampler_fraction` of every batch's decoder inputs are taken from them.
    sampler_dir: str | Path | None = None
    sampler_pool: int = 1024
    sampler_fraction: float = 0.5
    mixed_precision: str = "no"
    loop: LoopConfig = field(
        default_factory=lambda: LoopConfig(output_dir="runs/tiny/work/tiny-vae", learning_rate=1e-3)
    )

    def __post_init__(self) -> None:
        if self.sampler_pool < 1:
            raise ValueError(f"sampler_pool must be >= 1 (latents to draw), got {self.sampler_pool}")
        if not 0 < self.sampler_fraction <= 1:
            raise ValueError(
                f"sampler_fraction must be in (0, 1] (share of each batch from the pool), got {self.sampler_fraction}"
            )


def fit_latent_scale(vae: AutoencoderKL, dataset: torch.utils.data.Dataset, samples: int = 512) -> float:
    """max(1, q / 2.5) for q the 99.9th percentile of |scaled latent| over the first `samples` images (fixed seed)."""
    values = sample_latents(vae, dataset, samples).abs().flatten()[:1_000_000]
    q = float(torch.quantile(values, 0.999)) * vae.config.scaling_factor
    return max(1.0, round(q / 2.5, 3))


def tiny_config_for(vae: AutoencoderKL, channels: int, latent_scale: float = 1.0) -> TinyVAEConfig:
    """TAESD's layout at the VAE's pixels-per-latent factor (one stage per factor of 2, plus the first)."""
    factor = vae.vae_scale_factor
    stages = int(math.log2(factor)) + 1
    if 2 ** (stages - 1) != factor:
        raise ValueError(f"the VAE's pixels-per-latent factor must be a power of 2, got {factor}")
    return TinyVAEConfig(
        encoder_block_out_channels=(channels,) * stages,
        decoder_block_out_channels=(channels,) * stages,
        num_encoder_blocks=(1,) + (3,) * (stages - 1),
        num_decoder_blocks=(3,) * (stages - 1) + (1,),
        latent_channels=vae.config.latent_channels,
        scaling_factor=latent_scale,
    )


def sample_pipeline_latents(
    lcm_dir: str | Path,
    captions: Sequence[str],
    steps: Sequence[int] = (1, 2, 4),
    guidance_range: tuple[float, float] = (2.0, 9.0),
    seed: int = 0,
    batch_size: int = 32,
    device: str | torch.device = "cpu",
) -> torch.Tensor:
    """The LCM's final latents for `captions`: (N, 4, h, w) float32 on the CPU, the same for the same seed.

    These are the *scaled* latents z that the pipeline would hand to `vae.decode(z / scaling_factor)`
    (`output_type="latent"`). Captions go in chunks of at most `batch_size`, small enough that every step count
    gets one when there are few; chunk i uses `steps[i % len(steps)]` and a guidance scale drawn uniformly from
    `guidance_range` = (low, high) by a generator seeded with `seed`. The initial noise comes from a second
    generator, also seeded with `seed`, shared by all chunks in order.
    """
    low, high = guidance_range
    if not captions:
        raise ValueError("captions is empty; give at least one caption to sample")
    if not steps or any(s < 1 for s in steps):
        raise ValueError(f"steps must be a non-empty list of step counts >= 1, got {tuple(steps)}")
    if not low <= high:
        raise ValueError(f"guidance_range must be (low, high) with low <= high, got {guidance_range}")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    pipe = LatentConsistencyModelPipeline.from_pretrained(lcm_dir, safety_checker=None).to(device)
    pipe.set_progress_bar_config(disable=True)
    chunk = min(batch_size, -(-len(captions) // len(steps)))
    guidance_rng = torch.Generator().manual_seed(seed)
    noise_rng = torch.Generator().manual_seed(seed)
    latents = []
    for i, start in enumerate(range(0, len(captions), chunk)):
        w = low + (high - low) * float(torch.rand((), generator=guidance_rng))
        out = pipe(
            list(captions[start : start + chunk]),
            num_inference_steps=steps[i % len(steps)],
            guidance_scale=w,
            generator=noise_rng,
            output_type="latent",
        )
        latents.append(out.images.float().cpu())
    return torch.cat(latents)


def _captions(dataset: torch.utils.data.Dataset, n: int) -> list[str]:
    """The captions of the first `n` items (cycling if there are fewer), without drawing images where possible."""
    caption = getattr(dataset, "caption", None) or (lambda i: dataset[i][1])
    return [caption(i % len(dataset)) for i in range(n)]


class _BothHalves(nn.Module):
    """Encoder and decoder in one forward, so a multi-process run syncs both."""

    def __init__(self, tiny: AutoencoderTiny) -> None:
        super().__init__()
        self.tiny = tiny

    def forward(self, images: torch.Tensor, latents: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.tiny.encode(images).latents, self.tiny.decode(latents).sample


class ImitateVAE:
    """The loss: tiny decoder vs the VAE's decode of the same scaled latents, tiny encoder vs the scaled mean.

    With a `pool` of scaled sampler latents, the first round(`fraction` * batch) decoder inputs of every batch
    (at least one) are pool latents instead of the images' encoder latents. Their indices are drawn from torch's
    *global* CPU RNG, which `fit` seeds from the loop's seed and saves and restores in its checkpoints, so a resumed
    run draws what an uninterrupted one would (an own generator would restart on resume). Without a pool nothing
    extra is drawn and the loss is the encoder-latents-only one.
    """

    def __init__(
        self,
        vae: AutoencoderKL,
        tiny_scale: float = 1.0,
        pool: torch.Tensor | None = None,
        fraction: float = 0.5,
    ) -> None:
        if not 0 < fraction <= 1:
            raise ValueError(f"fraction must be in (0, 1], got {fraction}")
        self.vae = vae
        self.scale = vae.config.scaling_factor
        self.tiny_scale = tiny_scale  # the pipeline hands the tiny decoder latents / its scaling_factor
        self.pool = pool
        self.fraction = fraction

    def _swap_in_pool(self, latents: torch.Tensor) -> tuple[torch.Tensor, int]:
        """`latents` with its first k rows replaced by random pool latents; k."""
        k = min(len(latents), max(1, int(self.fraction * len(latents) + 0.5)))
        index = torch.randint(len(self.pool), (k,))  # global CPU RNG: checkpointed by the loop
        if self.pool.device != latents.device:
            self.pool = self.pool.to(latents.device)
        drawn = self.pool[index.to(latents.device)].to(latents.dtype)
        return torch.cat([drawn, latents[k:]]), k

    def __call__(self, model: nn.Module, batch: tuple[torch.Tensor, list[str]]) -> tuple:
        images, _ = batch
        k = 0
        with torch.no_grad():
            posterior = self.vae.encode(images.to(self.vae.dtype)).latent_dist
            latents = posterior.sample().float() * self.scale
            if self.pool is not None:
                latents, k = self._swap_in_pool(latents)
            target = self.vae.decode(latents / self.scale).sample.float().clamp(-1, 1)
            mean = posterior.mean.float() * self.scale
        encoded, decoded = model(images, latents / self.tiny_scale)
        mean = mean / self.tiny_scale
        decoder = F.l1_loss(decoded.float(), target) + F.mse_loss(decoded.float(), target)
        encoder = F.mse_loss(encoded.float(), mean)
        metrics = {"decoder": decoder, "encoder": encoder}
        if k:
            with torch.no_grad():
                ours, theirs = decoded[:k].float(), target[:k]
                metrics["decoder_sampler"] = F.l1_loss(ours, theirs) + F.mse_loss(ours, theirs)
        return decoder + encoder, metrics


def _sampler_pool(
    config: TinyAutoencoderTrainConfig,
    vae: AutoencoderKL,
    dataset: torch.utils.data.Dataset,
    device: torch.device,
) -> torch.Tensor:
    """The LCM latents the decoder also learns on, checked against the VAE they will be decoded with."""
    vae_config = Path(config.sampler_dir) / "vae" / "config.json"
    if vae_config.is_file():
        theirs = json.loads(vae_config.read_text()).get("scaling_factor")
        if theirs is not None and not math.isclose(theirs, vae.config.scaling_factor, rel_tol=1e-6):
            raise ValueError(
                f"the LCM in {config.sampler_dir} scales latents by {theirs}, the VAE in {config.vae_dir} by "
                f"{vae.config.scaling_factor}; sampler_dir must be an LCM built on this VAE"
            )
    captions = _captions(dataset, config.sampler_pool)
    pool = sample_pipeline_latents(config.sampler_dir, captions, seed=config.loop.seed, device=device)
    side = config.image_size // vae.vae_scale_factor
    expected = (vae.config.latent_channels, side, side)
    if tuple(pool.shape[1:]) != expected:
        raise ValueError(
            f"the LCM in {config.sampler_dir} makes latents of shape {tuple(pool.shape[1:])}, but "
            f"{config.image_size}px images encode to {expected}"
        )
    logger.info(
        "drew %d sampler latents from %s (99.9%% of |z| below %.3g)",
        len(pool),
        config.sampler_dir,
        float(torch.quantile(pool.abs().flatten()[:1_000_000], 0.999)),
    )
    return pool


def train_tiny_autoencoder(
    config: TinyAutoencoderTrainConfig, accelerator: Accelerator | None = None
) -> AutoencoderTiny:
    """Train the tiny autoencoder against the frozen VAE and save it to `config.save_dir`.

    With `config.sampler_dir`, every process draws the same sampler pool (same seed) before training starts.
    """
    accelerator = accelerator or make_accelerator(
        config.loop.gradient_accumulation_steps, config.mixed_precision
    )
    vae = AutoencoderKL.from_pretrained(config.vae_dir).to(accelerator.device).eval()
    vae.requires_grad_(False)
    dataset = open_dataset(config.data, config.image_size, config.world)
    scale = config.latent_scale or fit_latent_scale(vae, dataset)
    pool = None
    if config.sampler_dir is not None:
        pool = _sampler_pool(config, vae, dataset, accelerator.device)
    torch.manual_seed(config.loop.seed)
    tiny = AutoencoderTiny(tiny_config_for(vae, config.channels, scale))
    objective = ImitateVAE(vae, scale, pool, config.sampler_fraction)
    model = fit(accelerator, _BothHalves(tiny), dataset, objective, config.loop, name="tiny_vae")
    tiny = model.tiny.eval()
    if accelerator.is_main_process:
        tiny.save_pretrained(config.save_dir)
        out = Path(config.loop.output_dir)
        out.mkdir(parents=True, exist_ok=True)
        (out / "tiny_vae_config.json").write_text(json.dumps(asdict(config), indent=2, default=str) + "\n")
    accelerator.wait_for_everyone()
    return tiny
