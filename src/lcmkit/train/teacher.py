"""Train the tiny teacher from scratch: a small VAE, then a text encoder and an epsilon-prediction UNet jointly.

The result is a diffusers-layout Stable-Diffusion-style folder (vae/, text_encoder/, tokenizer/, unet/ and a
DDPM-style scheduler config), so it is a teacher like any other for `lcmkit.train.distill`, and diffusers'
`StableDiffusionPipeline` loads it too.

Recipe, deliberately plain: the VAE learns with L1 + L2 reconstruction and a small KL term (no perceptual or
adversarial loss; flat-coloured scenes do not need them), and its latents are scaled to unit variance as in LDM.
The UNet learns the DDPM epsilon objective (Ho et al. 2020, eq. 14) with 10% of captions dropped to "" so that
classifier-free guidance works; the CLIP-architecture text encoder learns through the same loss.
"""

from __future__ import annotations

import json
import logging
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from accelerate import Accelerator
from torch import nn
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

from lcmkit.config import UNetConfig, VAEConfig, replace
from lcmkit.loading.folders import save_components
from lcmkit.models.text import load_tokenizer
from lcmkit.models.unet import UNet2DConditionModel
from lcmkit.models.vae import AutoencoderKL
from lcmkit.schedulers import LCMScheduler
from lcmkit.train.data import WorldConfig, open_dataset, world_words
from lcmkit.train.loop import LoopConfig, fit, frozen_dtype, latest_checkpoint, make_accelerator
from lcmkit.train.text_pretrain import TextPretrainConfig, dataset_captions, pretrain_text_encoder
from lcmkit.train.tokenizer import tokenize, write_word_clip_tokenizer

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class TextEncoderSpec:
    """A small CLIP text transformer; `max_length` is both the tokenizer's padded length and the position count."""

    hidden_size: int = 128
    num_layers: int = 4
    num_heads: int = 4
    intermediate_size: int = 512
    max_length: int = 32


@dataclass(frozen=True)
class Architecture:
    """Image size and the three networks of a teacher. The UNet's sample size is the latent size."""

    image_size: int
    vae: VAEConfig
    unet: UNetConfig
    text: TextEncoderSpec


ARCHITECTURES: dict[str, Architecture] = {
    # The shipped model, sized so the whole recipe runs on 2 CPU cores in well under 2 hours:
    # 64x64 RGB -> 16x16x4 latents; about 0.65M (VAE), 3.5M (UNet) and 0.1M (text) parameters. The 16x16 level
    # has no attention (it was a quarter of the step time); positions are read at 8x8 and 4x4.
    "cpu": Architecture(
        image_size=64,
        vae=VAEConfig(
            block_out_channels=(16, 32, 64),
            layers_per_block=1,
            norm_num_groups=8,
            sample_size=64,
            mid_block_add_attention=False,
        ),
        unet=UNetConfig(
            sample_size=16,
            block_out_channels=(32, 64, 128),
            down_attention=(False, True, True),
            up_attention=(True, True, False),  # deepest level first
            layers_per_block=(1, 1, 1),
            transformer_layers_per_block=(1, 1, 1),
            attention_head_dim=(2, 4, 4),
            cross_attention_dim=64,
            norm_num_groups=16,
        ),
        text=TextEncoderSpec(hidden_size=64, num_layers=2, num_heads=2, intermediate_size=256),
    ),
    # 64x64 RGB -> 16x16x4 latents; about 3M (VAE), 15M (UNet) and 1M (text) parameters.
    "tiny": Architecture(
        image_size=64,
        vae=VAEConfig(
            block_out_channels=(32, 64, 128), layers_per_block=1, norm_num_groups=16, sample_size=64
        ),
        unet=UNetConfig(
            sample_size=16,
            block_out_channels=(64, 128, 256),
            down_attention=(True, True, True),
            up_attention=(True, True, True),
            layers_per_block=(2, 2, 2),
            transformer_layers_per_block=(1, 1, 1),
            attention_head_dim=(4, 8, 8),
            cross_attention_dim=128,
            norm_num_groups=32,
        ),
        text=TextEncoderSpec(),
    ),
    # For smoke runs on a CPU: 32x32 -> 8x8x4.
    "quick": Architecture(
        image_size=32,
        vae=VAEConfig(
            block_out_channels=(16, 32, 32),
            layers_per_block=1,
            norm_num_groups=8,
            sample_size=32,
            mid_block_add_attention=False,
        ),
        unet=UNetConfig(
            sample_size=8,
            block_out_channels=(32, 64),
            down_attention=(True, True),
            up_attention=(True, True),
            layers_per_block=(1, 1),
            transformer_layers_per_block=(1, 1),
            attention_head_dim=(2, 4),
            cross_attention_dim=32,
            norm_num_groups=8,
        ),
        text=TextEncoderSpec(hidden_size=32, num_layers=2, num_heads=2, intermediate_size=64),
    ),
}


# ----------------------------------------------------------------------------------------------------------------------
# Pieces shared with distillation


def encode_latents(vae: AutoencoderKL, images: torch.Tensor) -> torch.Tensor:
    """z0 = sample of q(z | x) times the VAE's scaling factor (the latents a UNet of this VAE sees)."""
    with torch.no_grad():
        posterior = vae.encode(images.to(vae.dtype)).latent_dist
        return posterior.sample().float() * vae.config.scaling_factor


def draw_noise(
    shape: torch.Size | tuple[int, ...],
    noise_offset: float = 0.0,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """eps ~ N(0, I), plus `noise_offset` times one N(0, 1) draw per sample and channel ("offset noise").

    Why: the noise schedule keeps sqrt(alpha_bar_T) of the image at t = T (0.068 for SD's), and on a small latent
    the mean of N(0, I) over its pixels is small too (std 1/16 on 16x16), so the image's mean colour stays readable
    in x_t up to the last step. A model then learns the background from that leak instead of the caption, and at
    inference the pure noise's mean picks it. A per-channel offset hides the mean, so only the text can set it.
    `noise_offset` 0 draws exactly `torch.randn(shape)` (same random stream as before it existed).
    """
    if noise_offset < 0:
        raise ValueError(f"noise_offset must be >= 0, got {noise_offset}")
    eps = torch.randn(shape, generator=generator)
    if noise_offset:
        eps = eps + noise_offset * torch.randn((*shape[:2], *[1] * (len(shape) - 2)), generator=generator)
    return eps


def build_text_encoder(spec: TextEncoderSpec, tokenizer: CLIPTokenizer) -> CLIPTextModel:
    if tokenizer.model_max_length > spec.max_length:
        raise ValueError(
            f"the tokenizer pads to {tokenizer.model_max_length} tokens but the text encoder has only "
            f"{spec.max_length} positions"
        )
    config = CLIPTextConfig(
        vocab_size=len(tokenizer),
        hidden_size=spec.hidden_size,
        intermediate_size=spec.intermediate_size,
        projection_dim=spec.hidden_size,
        num_hidden_layers=spec.num_layers,
        num_attention_heads=spec.num_heads,
        max_position_embeddings=spec.max_length,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    return CLIPTextModel(config)


def ddpm_scheduler_config(prediction_type: str = "epsilon", **schedule: object) -> dict:
    """A diffusers `DDPMScheduler` config with the Stable Diffusion noise schedule (override with `schedule`)."""
    config = {
        "_class_name": "DDPMScheduler",
        "_diffusers_version": "0.30.0",
        "num_train_timesteps": 1000,
        "beta_start": 0.00085,
        "beta_end": 0.012,
        "beta_schedule": "scaled_linear",
        "trained_betas": None,
        "variance_type": "fixed_small",
        "clip_sample": False,
        "prediction_type": prediction_type,
        "steps_offset": 1,
        "timestep_spacing": "leading",
        "rescale_betas_zero_snr": False,
    }
    config.update(schedule)
    return config


def save_teacher_folder(
    folder: str | Path,
    vae: AutoencoderKL,
    text_encoder: CLIPTextModel,
    tokenizer: CLIPTokenizer,
    unet: UNet2DConditionModel,
    scheduler_config: dict | None = None,
) -> Path:
    """Write a diffusers Stable Diffusion folder (no safety checker) with a DDPM scheduler config."""
    folder = Path(folder)
    components = {"vae": vae, "text_encoder": text_encoder, "tokenizer": tokenizer, "unet": unet}
    save_components(components, folder, "StableDiffusionPipeline", extra={"requires_safety_checker": False})
    (folder / "scheduler").mkdir(exist_ok=True)
    config = scheduler_config or ddpm_scheduler_config()
    (folder / "scheduler" / "scheduler_config.json").write_text(json.dumps(config, indent=2) + "\n")
    index = json.loads((folder / "model_index.json").read_text())
    index["scheduler"] = ["diffusers", config["_class_name"]]
    (folder / "model_index.json").write_text(json.dumps(index, indent=2) + "\n")
    return folder


def build_random_teacher(
    folder: str | Path, architecture: str | Architecture = "quick", seed: int = 0
) -> Path:
    """A teacher folder with seeded random weights and the world's word tokenizer (tests, dry runs)."""
    arch = ARCHITECTURES[architecture] if isinstance(architecture, str) else architecture
    folder = Path(folder)
    write_word_clip_tokenizer(folder / "tokenizer", world_words(), arch.text.max_length)
    tokenizer = load_tokenizer(folder / "tokenizer")
    torch.manual_seed(seed)
    return save_teacher_folder(
        folder,
        AutoencoderKL(arch.vae),
        build_text_encoder(arch.text, tokenizer),
        tokenizer,
        UNet2DConditionModel(arch.unet),
    )


# ----------------------------------------------------------------------------------------------------------------------
# Stage 1: the VAE


class _VAEWithKL(nn.Module):
    """Encode, sample, decode in one forward (DDP syncs what runs in forward); returns (reconstruction, KL)."""

    def __init__(self, vae: AutoencoderKL) -> None:
        super().__init__()
        self.vae = vae

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        posterior = self.vae.encode(images).latent_dist
        return self.vae.decode(posterior.sample()).sample, posterior.kl()


@dataclass
class VAETrainConfig:
    """Stage 1. `kl_weight` is LDM's (1e-6 against per-image summed reconstruction error)."""

    save_dir: str | Path = "runs/tiny/vae"
    vae: VAEConfig = field(default_factory=lambda: ARCHITECTURES["tiny"].vae)
    image_size: int = 64
    data: str | None = None  # None: the synthetic world; else an image folder or a .jsonl file
    world: WorldConfig | None = None
    kl_weight: float = 1e-6
    scaling_samples: int = 512
    mixed_precision: str = "no"
    loop: LoopConfig = field(
        default_factory=lambda: LoopConfig(output_dir="runs/tiny/work/vae", learning_rate=2e-4)
    )


def _vae_loss(model: nn.Module, batch: tuple[torch.Tensor, list[str]], kl_weight: float) -> tuple:
    images, _ = batch
    recon, kl = model(images)
    l1 = F.l1_loss(recon.float(), images)
    l2 = F.mse_loss(recon.float(), images)
    kl_term = kl.float().mean() / images[0].numel()  # per pixel value, like the reconstruction means
    return l1 + l2 + kl_weight * kl_term, {"l1": l1, "l2": l2, "kl": kl_term}


@torch.no_grad()
def fit_scaling_factor(vae: AutoencoderKL, dataset: torch.utils.data.Dataset, samples: int = 512) -> float:
    """1 / std of sampled latents (LDM section 3.1), so the diffusion model sees unit-variance latents.

    The first `samples` images and a fixed CPU generator: every process of a multi-GPU run gets the same number.
    """
    return float(1.0 / sample_latents(vae, dataset, samples).std())


@torch.no_grad()
def sample_latents(vae: AutoencoderKL, dataset: torch.utils.data.Dataset, samples: int = 512) -> torch.Tensor:
    """Unscaled latents q(z | x) of the first `samples` images, drawn with a fixed CPU generator (seed 0)."""
    loader = torch.utils.data.DataLoader(dataset, batch_size=64)
    generator = torch.Generator().manual_seed(0)
    latents, seen = [], 0
    for images, _ in loader:
        posterior = vae.encode(images.to(vae.device, vae.dtype)).latent_dist
        latents.append(posterior.sample(generator=generator).float().cpu())
        seen += len(images)
        if seen >= samples:
            break
    return torch.cat(latents)[:samples]


def train_vae(config: VAETrainConfig, accelerator: Accelerator | None = None) -> AutoencoderKL:
    """Train the VAE, fit its latent scaling factor, save it to `config.save_dir` (config.json + safetensors)."""
    accelerator = accelerator or make_accelerator(
        config.loop.gradient_accumulation_steps, config.mixed_precision
    )
    vae_config = replace(
        config.vae, sample_size=config.image_size
    )  # sample_size is the tiled-decoding tile size
    dataset = open_dataset(config.data, config.image_size, config.world)
    torch.manual_seed(config.loop.seed)
    model = _VAEWithKL(AutoencoderKL(vae_config))
    model = fit(
        accelerator,
        model,
        dataset,
        lambda m, b: _vae_loss(m, b, config.kl_weight),
        config.loop,
        name="vae",
    )
    vae = model.vae.eval()
    scaling = fit_scaling_factor(vae, dataset, config.scaling_samples)
    vae.config = replace(vae.config, scaling_factor=scaling)
    logger.info("VAE latent scaling factor: %.5f", scaling)
    if accelerator.is_main_process:
        vae.save_pretrained(config.save_dir)
    accelerator.wait_for_everyone()
    return vae


# ----------------------------------------------------------------------------------------------------------------------
# Stage 2: text encoder + UNet


class TextConditionedUNet(nn.Module):
    """The UNet and the text encoder as one module, so both learn from the diffusion loss under one DDP forward."""

    def __init__(self, unet: UNet2DConditionModel, text_encoder: CLIPTextModel) -> None:
        super().__init__()
        self.unet = unet
        self.text_encoder = text_encoder

    def forward(self, x_t: torch.Tensor, t: torch.Tensor, input_ids: torch.Tensor) -> torch.Tensor:
        return self.unet(x_t, t, self.text_encoder(input_ids)[0]).sample


class DiffusionObjective:
    """The DDPM epsilon loss E ||eps - eps_theta(x_t, t, c)||^2 with caption dropout (for classifier-free guidance)."""

    def __init__(
        self,
        vae: AutoencoderKL,
        tokenizer: CLIPTokenizer,
        scheduler: LCMScheduler,
        caption_dropout: float = 0.1,
        noise_offset: float = 0.0,
    ) -> None:
        if scheduler.config.prediction_type != "epsilon":
            raise ValueError(
                f"the teacher recipe trains epsilon prediction, not {scheduler.config.prediction_type!r}"
            )
        self.vae, self.tokenizer, self.scheduler = vae, tokenizer, scheduler
        self.caption_dropout = caption_dropout
        self.noise_offset = noise_offset

    def __call__(self, model: nn.Module, batch: tuple[torch.Tensor, list[str]]) -> tuple:
        images, captions = batch
        device = images.device
        z0 = encode_latents(self.vae, images)
        drop = (torch.rand(len(captions)) < self.caption_dropout).tolist()
        ids = tokenize(self.tokenizer, ["" if d else c for c, d in zip(captions, drop, strict=True)], device)
        eps = draw_noise(z0.shape, self.noise_offset).to(device)
        t = torch.randint(0, self.scheduler.config.num_train_timesteps, (len(z0),), device=device)
        x_t = self.scheduler.add_noise(z0, eps, t)
        loss = F.mse_loss(model(x_t, t, ids).float(), eps)
        return loss, {}


@dataclass
class TeacherTrainConfig:
    """Stage 2: a trained VAE folder in, a diffusers teacher folder out."""

    vae_dir: str | Path = "runs/tiny/vae"
    save_dir: str | Path = "runs/tiny/teacher"
    unet: UNetConfig = field(default_factory=lambda: ARCHITECTURES["tiny"].unet)
    text: TextEncoderSpec = field(default_factory=TextEncoderSpec)
    image_size: int = 64
    data: str | None = None
    world: WorldConfig | None = None
    caption_dropout: float = 0.1
    # Offset noise (`draw_noise`): 0 is plain DDPM; the shipped recipe uses RecipeConfig.noise_offset.
    noise_offset: float = 0.0
    # Learning-rate multiplier of the text encoder. At the full rate a from-scratch encoder pulled all caption
    # embeddings together in our CPU trials (the UNet then ignores text); 0 freezes it at its random init.
    text_encoder_lr_scale: float = 0.1
    # Next-token pretraining of the text encoder on the captions before the diffusion loss (text_pretrain.py).
    text_pretrain: TextPretrainConfig = field(default_factory=TextPretrainConfig)
    scheduler: dict = field(default_factory=ddpm_scheduler_config)
    mixed_precision: str = "no"
    loop: LoopConfig = field(
        default_factory=lambda: LoopConfig(
            output_dir="runs/tiny/work/teacher", learning_rate=2e-4, lr_warmup_steps=500
        )
    )


def train_teacher(config: TeacherTrainConfig, accelerator: Accelerator | None = None) -> Path:
    """Train text encoder + UNet on the frozen VAE's latents; write the teacher folder to `config.save_dir`."""
    accelerator = accelerator or make_accelerator(
        config.loop.gradient_accumulation_steps, config.mixed_precision
    )
    save_dir = Path(config.save_dir)
    work = Path(config.loop.output_dir)
    if accelerator.is_main_process:
        words = world_words(config.world)
        write_word_clip_tokenizer(work / "tokenizer", words, config.text.max_length)
    accelerator.wait_for_everyone()
    tokenizer = load_tokenizer(work / "tokenizer")
    vae = AutoencoderKL.from_pretrained(config.vae_dir).to(accelerator.device, frozen_dtype(accelerator))
    vae.requires_grad_(False)
    latent = config.image_size // vae.vae_scale_factor
    unet_config = replace(config.unet, sample_size=latent, time_cond_proj_dim=None)
    torch.manual_seed(config.loop.seed)
    model = TextConditionedUNet(UNet2DConditionModel(unet_config), build_text_encoder(config.text, tokenizer))
    scheduler = LCMScheduler.from_config(config.scheduler)
    objective = DiffusionObjective(vae, tokenizer, scheduler, config.caption_dropout, config.noise_offset)
    dataset = open_dataset(config.data, config.image_size, config.world)
    resume = config.loop.resume
    resuming = bool(resume) and (resume is not True or latest_checkpoint(config.loop.output_dir) is not None)
    if config.text_pretrain.steps and not resuming:  # a checkpoint holds the pretrained encoder already
        captions = dataset_captions(dataset, config.text_pretrain.caption_pool)
        losses = pretrain_text_encoder(
            model.text_encoder, tokenizer, captions, config.text_pretrain, accelerator.device
        )
        logger.info("text encoder pretrained: next-token loss %.4f -> %.4f", losses[0], losses[-1])
    if config.text_encoder_lr_scale == 0:
        model.text_encoder.requires_grad_(False)
    scales = {"text_encoder": config.text_encoder_lr_scale}
    model = fit(accelerator, model, dataset, objective, config.loop, lr_scales=scales, name="teacher")
    if accelerator.is_main_process:
        save_teacher_folder(
            save_dir, vae.float(), model.text_encoder.eval(), tokenizer, model.unet.eval(), config.scheduler
        )
        (work / "teacher_config.json").write_text(json.dumps(asdict(config), indent=2, default=str) + "\n")
    accelerator.wait_for_everyone()
    return save_dir
