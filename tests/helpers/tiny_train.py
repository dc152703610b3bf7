"""The minute teacher UNet the training tests share: 8x8 latents, two levels, cross-attention width 16."""

from lcmkit.config import UNetConfig

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
