"""Tiny random diffusers pipelines, saved as folders, for parity tests (diffusers is the oracle, tests only)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch


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
    unet=dict(
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
    ),
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
