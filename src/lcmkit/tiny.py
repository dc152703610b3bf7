"""A tiny random LCM pipeline folder built with lcmkit's own models, for demos and smoke tests.

Its images are noise (the weights are random); it exists so that the whole path (folder -> pipeline -> PNG) can run
on any machine with no download. The tokenizer is a character-level CLIP BPE vocabulary (no merges), which the
standard `CLIPTokenizer` reads like any other.
"""

from __future__ import annotations

from pathlib import Path

import torch

from lcmkit.config import UNetConfig, VAEConfig
from lcmkit.io.tokenizer import bytes_to_unicode, write_char_clip_tokenizer  # noqa: F401  (re-exported)

TINY_UNET = UNetConfig(
    sample_size=16,
    block_out_channels=(32, 64),
    down_attention=(True, False),
    up_attention=(False, True),
    layers_per_block=(1, 1),
    transformer_layers_per_block=(1, 1),
    attention_head_dim=(4, 4),
    cross_attention_dim=32,
    norm_num_groups=8,
    time_cond_proj_dim=32,
)
TINY_VAE = VAEConfig(block_out_channels=(16, 32), layers_per_block=1, norm_num_groups=8, sample_size=32)


def build_tiny_lcm(folder: str | Path, seed: int = 0) -> Path:
    """Write a complete diffusers-layout LCM folder with seeded random weights (about 2 MB)."""
    from transformers import CLIPTextConfig, CLIPTextModel

    from lcmkit.loading.folders import save_components
    from lcmkit.models.text import load_tokenizer
    from lcmkit.models.unet import UNet2DConditionModel
    from lcmkit.models.vae import AutoencoderKL
    from lcmkit.schedulers import LCMScheduler

    folder = Path(folder)
    write_char_clip_tokenizer(folder / "tokenizer")
    torch.manual_seed(seed)
    text_encoder = CLIPTextModel(
        CLIPTextConfig(
            vocab_size=514,
            hidden_size=TINY_UNET.cross_attention_dim,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=4,
            max_position_embeddings=77,
            bos_token_id=512,
            eos_token_id=513,
            pad_token_id=513,
        )
    )
    components = {
        "unet": UNet2DConditionModel(TINY_UNET),
        "vae": AutoencoderKL(TINY_VAE),
        "text_encoder": text_encoder,
        "tokenizer": load_tokenizer(folder / "tokenizer"),
        "scheduler": LCMScheduler(),
    }
    save_components(
        components, folder, "LatentConsistencyModelPipeline", extra={"requires_safety_checker": False}
    )
    return folder
