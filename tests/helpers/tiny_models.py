"""Every tiny model the tests build, in one place: configs as data, plus the seeded builders.

Two kinds of config live here. lcmkit's own frozen configs (`UNetConfig`, `VAEConfig`, `TinyVAEConfig`) for tests
that build only our models, and diffusers constructor keyword dicts (`DIFFUSERS_*`) for parity tests, where
diffusers builds the weights and both libraries load them. A config that only one test needs stays in that test.

The numbers are what the tests were written against: change one and the expected outcomes of several files move.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from lcmkit.config import UNetConfig, VAEConfig
from lcmkit.models.tiny_vae import TinyVAEConfig

# ----------------------------------------------------------------------------------------------------------------------
# lcmkit configs

# Two levels, attention on the outer one, an LCM w-embedding of 6: the model and LoRA unit tests' UNet.
SMALL_UNET = UNetConfig(
    sample_size=8,
    block_out_channels=(8, 16),
    down_attention=(True, False),
    up_attention=(False, True),
    layers_per_block=(1, 1),
    transformer_layers_per_block=(1, 1),
    attention_head_dim=(2, 2),
    cross_attention_dim=12,
    norm_num_groups=4,
    time_cond_proj_dim=6,
)

# The minute teacher UNet the training tests share: 8x8 latents, two levels, cross-attention width 16, no w-embedding.
MINUTE_UNET = UNetConfig(
    sample_size=8,
    block_out_channels=(16, 32),
    down_attention=(True, False),
    up_attention=(False, True),
    layers_per_block=(1, 1),
    transformer_layers_per_block=(1, 1),
    attention_head_dim=(2, 2),
    cross_attention_dim=16,
    norm_num_groups=8,
)

# The VAE of diffusers' LCM fast pipeline tests (4 and 8 channels), as our config; DIFFUSERS_SMALL_VAE is the same.
SMALL_VAE = VAEConfig(block_out_channels=(4, 8), latent_channels=4, norm_num_groups=2, sample_size=32)

# The training tests' VAE: 16-pixel images, no mid-block attention.
MINUTE_VAE = VAEConfig(
    block_out_channels=(8, 16), norm_num_groups=4, sample_size=16, mid_block_add_attention=False
)

# TAESD's layout (four stages, 8 pixels per latent) at 8 channels: what the CLI and spec tests save as a --tiny-vae.
TAESD_8 = TinyVAEConfig(encoder_block_out_channels=(8,) * 4, decoder_block_out_channels=(8,) * 4)

# The same, with one block per stage: the fastest TAESD-shaped model, for the AutoencoderTiny unit tests.
TAESD_8_ONE_BLOCK = TinyVAEConfig(
    encoder_block_out_channels=(8, 8, 8, 8),
    decoder_block_out_channels=(8, 8, 8, 8),
    num_encoder_blocks=(1, 1, 1, 1),
    num_decoder_blocks=(1, 1, 1, 1),
)

# ----------------------------------------------------------------------------------------------------------------------
# diffusers constructor arguments

DIFFUSERS_SD15_UNET = dict(
    block_out_channels=(32, 64),
    layers_per_block=2,
    sample_size=16,
    in_channels=4,
    out_channels=4,
    down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
    up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
    cross_attention_dim=32,
    norm_num_groups=8,
    attention_head_dim=4,
    time_cond_proj_dim=32,
)

DIFFUSERS_SMALL_VAE = dict(
    block_out_channels=[4, 8],
    in_channels=3,
    out_channels=3,
    down_block_types=["DownEncoderBlock2D"] * 2,
    up_block_types=["UpDecoderBlock2D"] * 2,
    latent_channels=4,
    norm_num_groups=2,
)

# SD 1.x in miniature for the single-file tests: four UNet levels (three with attention, two resnets each), a
# three-level VAE, 32 groups everywhere (the group count the original checkpoint layout assumes).
DIFFUSERS_SD1_MINIATURE_UNET = dict(
    block_out_channels=(32, 32, 64, 64),
    layers_per_block=2,
    sample_size=16,
    down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
    up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
    cross_attention_dim=64,
    attention_head_dim=8,
    norm_num_groups=32,
    time_cond_proj_dim=32,
)
DIFFUSERS_SD1_MINIATURE_VAE = dict(
    block_out_channels=[32, 32, 64],
    down_block_types=["DownEncoderBlock2D"] * 3,
    up_block_types=["UpDecoderBlock2D"] * 3,
    norm_num_groups=32,
    layers_per_block=2,
)


def tiny_safety_clip_config(image_size: int = 32):
    """A CLIPConfig for a tiny safety checker (32-wide towers, 4-pixel patches); only its vision half has weights."""
    from transformers import CLIPConfig

    return CLIPConfig(
        text_config=dict(
            hidden_size=32, intermediate_size=37, num_attention_heads=4, num_hidden_layers=2, vocab_size=1000,
            bos_token_id=0, eos_token_id=2, pad_token_id=1,
        ),
        vision_config=dict(
            hidden_size=32, intermediate_size=37, num_attention_heads=4, num_hidden_layers=2,
            image_size=image_size, patch_size=4,
        ),
        projection_dim=32,
    )  # fmt: skip


# ----------------------------------------------------------------------------------------------------------------------
# Whole pipelines, saved by diffusers as folders (the `tiny_folders` fixture)


@dataclass(frozen=True)
class TinySpec:
    """One tiny model family. Each field feeds a diffusers constructor."""

    name: str
    unet: dict
    vae: dict
    scheduler: dict
    text_hidden: int = 32


SD15 = TinySpec(
    name="sd15",
    unet=DIFFUSERS_SD15_UNET,
    vae=dict(
        block_out_channels=[8, 16],
        in_channels=3,
        out_channels=3,
        down_block_types=["DownEncoderBlock2D"] * 2,
        up_block_types=["UpDecoderBlock2D"] * 2,
        latent_channels=4,
        norm_num_groups=4,
        sample_size=32,
    ),
    scheduler=dict(
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        clip_sample=False,
        set_alpha_to_one=False,
    ),
)

SD2 = TinySpec(
    name="sd2",
    unet=dict(
        block_out_channels=(32, 64, 64),
        layers_per_block=1,
        sample_size=8,
        in_channels=4,
        out_channels=4,
        down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=32,
        norm_num_groups=8,
        attention_head_dim=[2, 4, 4],
        use_linear_projection=True,
        upcast_attention=True,
        time_cond_proj_dim=16,
    ),
    vae=dict(
        block_out_channels=[8, 16, 16],
        in_channels=3,
        out_channels=3,
        down_block_types=["DownEncoderBlock2D"] * 3,
        up_block_types=["UpDecoderBlock2D"] * 3,
        latent_channels=4,
        norm_num_groups=4,
        layers_per_block=1,
        sample_size=32,
    ),
    scheduler=dict(
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        prediction_type="v_prediction",
        original_inference_steps=100,
        timestep_spacing="trailing",
    ),
)

# An ordinary SD-style UNet (no w-embedding input): what an LCM-LoRA is applied to; guidance is real CFG.
SD15_PLAIN = TinySpec(
    name="sd15_plain",
    unet={k: v for k, v in SD15.unet.items() if k != "time_cond_proj_dim"},
    vae=SD15.vae,
    scheduler=SD15.scheduler,
)

SPECS = {s.name: s for s in (SD15, SD2, SD15_PLAIN)}


def build_diffusers_components(spec: TinySpec, tokenizer_dir: Path) -> dict:
    """Seeded random diffusers components (and a tiny CLIP tokenizer) for `spec`."""
    from diffusers import AutoencoderKL, LCMScheduler, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    torch.manual_seed(0)
    unet = UNet2DConditionModel(**spec.unet)
    torch.manual_seed(0)
    vae = AutoencoderKL(**spec.vae)
    torch.manual_seed(0)
    text_encoder = CLIPTextModel(
        CLIPTextConfig(
            bos_token_id=0,
            eos_token_id=2,
            hidden_size=spec.text_hidden,
            intermediate_size=64,
            layer_norm_eps=1e-05,
            num_attention_heads=4,
            num_hidden_layers=3,
            pad_token_id=1,
            vocab_size=1000,
        )
    )
    return {
        "unet": unet.eval(),
        "vae": vae.eval(),
        "text_encoder": text_encoder.eval(),
        "tokenizer": CLIPTokenizer.from_pretrained(tokenizer_dir),
        "scheduler": LCMScheduler(**spec.scheduler),
        "safety_checker": None,
        "feature_extractor": None,
        "image_encoder": None,
    }


def save_diffusers_pipeline(spec: TinySpec, folder: Path, tokenizer_dir: Path) -> Path:
    """Build the tiny pipeline with diffusers and `save_pretrained` it: the folder both libraries load."""
    from diffusers import LatentConsistencyModelPipeline

    pipe = LatentConsistencyModelPipeline(
        **build_diffusers_components(spec, tokenizer_dir), requires_safety_checker=False
    )
    pipe.save_pretrained(folder)
    return folder
