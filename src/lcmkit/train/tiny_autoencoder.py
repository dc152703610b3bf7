"""Distil a model's VAE into a tiny autoencoder in TAESD's layout (`AutoencoderTiny`): the decoder of fast mode.

TAESD itself is distilled from the SD VAE; this does the same for a VAE of our own (the shipped tiny model's), so
that fast mode can be measured on a model we have. Both halves learn from the frozen VAE, on the training images:

- the tiny decoder maps the VAE's *scaled* latents z (what a UNet makes), divided by its own `scaling_factor` t (as
  pipelines divide before decoding; TAESD has t = 1, here t is fitted so the latents fit TAESD's input clamp), to
  what the VAE decodes from them: L1 + L2 against `vae.decode(z / s)`, so it imitates exact mode rather than the
  data, and PSNR against exact-mode images is what it is trained for;
- the tiny encoder maps an image to the VAE's scaled posterior mean over t (L2; pipelines multiply by t after
  encoding), so img2img can encode with it too.

The result is an `AutoencoderTiny` folder (config.json + safetensors) that `pipe.vae = AutoencoderTiny.from_pretrained`
and the CLI's `--tiny-vae` load, and that diffusers' `AutoencoderTiny` loads as well.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from accelerate import Accelerator
from torch import nn

from lcmkit.models.tiny_vae import AutoencoderTiny, TinyVAEConfig
from lcmkit.models.vae import AutoencoderKL
from lcmkit.train.data import WorldConfig, open_dataset
from lcmkit.train.loop import LoopConfig, fit, make_accelerator
from lcmkit.train.teacher import sample_latents


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
    mixed_precision: str = "no"
    loop: LoopConfig = field(
        default_factory=lambda: LoopConfig(output_dir="runs/tiny/work/tiny-vae", learning_rate=1e-3)
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


class _BothHalves(nn.Module):
    """Encoder and decoder in one forward, so a multi-process run syncs both."""

    def __init__(self, tiny: AutoencoderTiny) -> None:
        super().__init__()
        self.tiny = tiny

    def forward(self, images: torch.Tensor, latents: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.tiny.encode(images).latents, self.tiny.decode(latents).sample


class ImitateVAE:
    """The loss: tiny decoder vs the VAE's decode of the same scaled latents, tiny encoder vs the scaled mean."""

    def __init__(self, vae: AutoencoderKL, tiny_scale: float = 1.0) -> None:
        self.vae = vae
        self.scale = vae.config.scaling_factor
        self.tiny_scale = tiny_scale  # the pipeline hands the tiny decoder latents / its scaling_factor

    def __call__(self, model: nn.Module, batch: tuple[torch.Tensor, list[str]]) -> tuple:
        images, _ = batch
        with torch.no_grad():
            posterior = self.vae.encode(images.to(self.vae.dtype)).latent_dist
            latents = posterior.sample().float() * self.scale
            target = self.vae.decode(latents / self.scale).sample.float().clamp(-1, 1)
            mean = posterior.mean.float() * self.scale
        encoded, decoded = model(images, latents / self.tiny_scale)
        mean = mean / self.tiny_scale
        decoder = F.l1_loss(decoded.float(), target) + F.mse_loss(decoded.float(), target)
        encoder = F.mse_loss(encoded.float(), mean)
        return decoder + encoder, {"decoder": decoder, "encoder": encoder}


def train_tiny_autoencoder(
    config: TinyAutoencoderTrainConfig, accelerator: Accelerator | None = None
) -> AutoencoderTiny:
    """Train the tiny autoencoder against the frozen VAE and save it to `config.save_dir`."""
    accelerator = accelerator or make_accelerator(
        config.loop.gradient_accumulation_steps, config.mixed_precision
    )
    vae = AutoencoderKL.from_pretrained(config.vae_dir).to(accelerator.device).eval()
    vae.requires_grad_(False)
    dataset = open_dataset(config.data, config.image_size, config.world)
    scale = config.latent_scale or fit_latent_scale(vae, dataset)
    torch.manual_seed(config.loop.seed)
    tiny = AutoencoderTiny(tiny_config_for(vae, config.channels, scale))
    model = fit(accelerator, _BothHalves(tiny), dataset, ImitateVAE(vae, scale), config.loop, name="tiny_vae")
    tiny = model.tiny.eval()
    if accelerator.is_main_process:
        tiny.save_pretrained(config.save_dir)
        out = Path(config.loop.output_dir)
        out.mkdir(parents=True, exist_ok=True)
        (out / "tiny_vae_config.json").write_text(json.dumps(asdict(config), indent=2, default=str) + "\n")
    accelerator.wait_for_everyone()
    return tiny
