"""Typed, frozen model configs, and their translation to and from diffusers' `config.json`.

JSON appears only at this boundary: `from_diffusers` reads a diffusers config dict (rejecting features we do not
implement, by name), `to_diffusers` writes one that diffusers' own classes load.
"""

from __future__ import annotations

import dataclasses
import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

logger = logging.getLogger(__name__)

_META_KEYS = ("_class_name", "_diffusers_version", "_name_or_path", "_use_default_values")


class ConfigError(ValueError):
    """A config asks for something lcmkit does not implement, or is inconsistent."""


def _per_level(value: Any, n: int, name: str) -> tuple:
    """Broadcast an int (or None) to one entry per level; check a list has one entry per level."""
    if isinstance(value, (list, tuple)):
        if len(value) != n:
            raise ConfigError(
                f"`{name}` has {len(value)} entries but the model has {n} levels: {list(value)}"
            )
        return tuple(value)
    return (value,) * n


def _reject_unsupported(cfg: dict, unsupported: dict[str, Any], model: str) -> None:
    """Fail on any field whose value asks for a feature outside what lcmkit implements."""
    for key, allowed in unsupported.items():
        value = cfg.get(key)
        if value is None or value == allowed or (allowed in (None, False) and not value):
            continue
        raise ConfigError(f"{model}: `{key}={value!r}` is not supported (lcmkit supports only {allowed!r})")


def read_config_json(path: str | Path) -> dict:
    """Read a diffusers `config.json`, with an error that names the file when it is not valid JSON."""
    path = Path(path)
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        raise FileNotFoundError(f"config file not found: {path}") from None
    except json.JSONDecodeError as e:
        raise ConfigError(f"{path} is not valid JSON: {e}") from None


# ----------------------------------------------------------------------------------------------------------------------
# UNet

_UNET_DOWN = {"DownBlock2D": False, "CrossAttnDownBlock2D": True}
_UNET_UP = {"UpBlock2D": False, "CrossAttnUpBlock2D": True}
_UNET_UNSUPPORTED = {
    "center_input_sample": False,
    "only_cross_attention": False,
    "dual_cross_attention": False,
    "class_embed_type": None,
    "addition_embed_type": None,
    "num_class_embeds": None,
    "encoder_hid_dim": None,
    "encoder_hid_dim_type": None,
    "resnet_time_scale_shift": "default",
    "resnet_skip_time_act": False,
    "resnet_out_scale_factor": 1.0,
    "time_embedding_type": "positional",
    "time_embedding_act_fn": None,
    "timestep_post_act": None,
    "conv_in_kernel": 3,
    "conv_out_kernel": 3,
    "attention_type": "default",
    "class_embeddings_concat": False,
    "mid_block_only_cross_attention": None,
    "cross_attention_norm": None,
    "act_fn": "silu",
    "reverse_transformer_layers_per_block": None,
    "projection_class_embeddings_input_dim": None,
    "addition_time_embed_dim": None,
}


@dataclass(frozen=True)
class UNetConfig:
    """A Stable Diffusion 1.x / 2.x style conditional UNet (diffusers `UNet2DConditionModel` subset).

    Block layout is data: `down_attention[i]` says whether level i has cross-attention transformers;
    the up path mirrors it (`up_attention`, deepest level first, as stored in diffusers configs).
    """

    sample_size: int = 64
    in_channels: int = 4
    out_channels: int = 4
    block_out_channels: tuple[int, ...] = (320, 640, 1280, 1280)
    down_attention: tuple[bool, ...] = (True, True, True, False)
    up_attention: tuple[bool, ...] = (False, True, True, True)
    mid_attention: bool = True
    layers_per_block: tuple[int, ...] = (2, 2, 2, 2)
    transformer_layers_per_block: tuple[int, ...] = (1, 1, 1, 1)
    attention_head_dim: tuple[int, ...] = (8, 8, 8, 8)
    num_attention_heads: tuple[int, ...] | None = None
    cross_attention_dim: int = 768
    use_linear_projection: bool = False
    upcast_attention: bool = False
    time_cond_proj_dim: int | None = None
    time_embedding_dim: int | None = None
    flip_sin_to_cos: bool = True
    freq_shift: int = 0
    norm_num_groups: int = 32
    norm_eps: float = 1e-5
    downsample_padding: int = 1
    mid_block_scale_factor: float = 1.0
    dropout: float = 0.0

    def __post_init__(self) -> None:
        n = len(self.block_out_channels)
        for name in ("down_attention", "up_attention", "layers_per_block", "transformer_layers_per_block"):
            if len(getattr(self, name)) != n:
                raise ConfigError(
                    f"UNetConfig.{name} needs {n} entries (one per level), got {getattr(self, name)}"
                )
        if len(self.attention_head_dim) != n:
            raise ConfigError(
                f"UNetConfig.attention_head_dim needs {n} entries, got {self.attention_head_dim}"
            )
        for c in self.block_out_channels:
            if c % self.norm_num_groups:
                raise ConfigError(
                    f"block_out_channels {c} is not divisible by norm_num_groups={self.norm_num_groups}"
                )

    @property
    def heads(self) -> tuple[int, ...]:
        """Attention heads per level. diffusers' `attention_head_dim` historically means the number of heads."""
        return tuple(self.num_attention_heads) if self.num_attention_heads else tuple(self.attention_head_dim)

    @classmethod
    def from_diffusers(cls, cfg: dict) -> UNetConfig:
        cfg = dict(cfg)
        _reject_unsupported(cfg, _UNET_UNSUPPORTED, "UNet")
        down = cfg.get("down_block_types", ("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",))
        up = cfg.get("up_block_types", ("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3)
        for t in down:
            if t not in _UNET_DOWN:
                raise ConfigError(
                    f"UNet down block type {t!r} is not supported (supported: {sorted(_UNET_DOWN)})"
                )
        for t in up:
            if t not in _UNET_UP:
                raise ConfigError(
                    f"UNet up block type {t!r} is not supported (supported: {sorted(_UNET_UP)})"
                )
        mid = cfg.get("mid_block_type", "UNetMidBlock2DCrossAttn")
        if mid != "UNetMidBlock2DCrossAttn":
            raise ConfigError(
                f"UNet mid block type {mid!r} is not supported (supported: 'UNetMidBlock2DCrossAttn')"
            )
        n = len(down)
        if len(up) != n:
            raise ConfigError(f"UNet has {n} down blocks but {len(up)} up blocks")
        channels = tuple(cfg.get("block_out_channels", (320, 640, 1280, 1280)))
        if len(channels) != n:
            raise ConfigError(f"block_out_channels has {len(channels)} entries for {n} levels")
        cross = cfg.get("cross_attention_dim", 1280)
        if isinstance(cross, (list, tuple)):
            if len(set(cross)) != 1:
                raise ConfigError(f"per-level cross_attention_dim {cross} is not supported")
            cross = cross[0]
        heads_dim = _per_level(cfg.get("attention_head_dim", 8), n, "attention_head_dim")
        heads_dim = tuple(h if h is not None else c for h, c in zip(heads_dim, channels, strict=True))
        num_heads = cfg.get("num_attention_heads")
        return cls(
            sample_size=cfg.get("sample_size", 64),
            in_channels=cfg.get("in_channels", 4),
            out_channels=cfg.get("out_channels", 4),
            block_out_channels=channels,
            down_attention=tuple(_UNET_DOWN[t] for t in down),
            up_attention=tuple(_UNET_UP[t] for t in up),
            layers_per_block=_per_level(cfg.get("layers_per_block", 2), n, "layers_per_block"),
            transformer_layers_per_block=_per_level(
                cfg.get("transformer_layers_per_block", 1), n, "transformer_layers_per_block"
            ),
            attention_head_dim=heads_dim,
            num_attention_heads=_per_level(num_heads, n, "num_attention_heads") if num_heads else None,
            cross_attention_dim=cross,
            use_linear_projection=bool(cfg.get("use_linear_projection", False)),
            upcast_attention=bool(cfg.get("upcast_attention", False)),
            time_cond_proj_dim=cfg.get("time_cond_proj_dim"),
            time_embedding_dim=cfg.get("time_embedding_dim"),
            flip_sin_to_cos=bool(cfg.get("flip_sin_to_cos", True)),
            freq_shift=cfg.get("freq_shift", 0),
            norm_num_groups=cfg.get("norm_num_groups", 32),
            norm_eps=cfg.get("norm_eps", 1e-5),
            downsample_padding=cfg.get("downsample_padding", 1),
            mid_block_scale_factor=cfg.get("mid_block_scale_factor", 1.0),
            dropout=cfg.get("dropout", 0.0),
        )

    def to_diffusers(self) -> dict:
        down_types = {v: k for k, v in _UNET_DOWN.items()}
        up_types = {v: k for k, v in _UNET_UP.items()}
        return {
            "_class_name": "UNet2DConditionModel",
            "sample_size": self.sample_size,
            "in_channels": self.in_channels,
            "out_channels": self.out_channels,
            "down_block_types": [down_types[a] for a in self.down_attention],
            "mid_block_type": "UNetMidBlock2DCrossAttn",
            "up_block_types": [up_types[a] for a in self.up_attention],
            "block_out_channels": list(self.block_out_channels),
            "layers_per_block": list(self.layers_per_block),
            "transformer_layers_per_block": list(self.transformer_layers_per_block),
            "attention_head_dim": list(self.attention_head_dim),
            "num_attention_heads": list(self.num_attention_heads) if self.num_attention_heads else None,
            "cross_attention_dim": self.cross_attention_dim,
            "use_linear_projection": self.use_linear_projection,
            "upcast_attention": self.upcast_attention,
            "time_cond_proj_dim": self.time_cond_proj_dim,
            "time_embedding_dim": self.time_embedding_dim,
            "flip_sin_to_cos": self.flip_sin_to_cos,
            "freq_shift": self.freq_shift,
            "norm_num_groups": self.norm_num_groups,
            "norm_eps": self.norm_eps,
            "downsample_padding": self.downsample_padding,
            "mid_block_scale_factor": self.mid_block_scale_factor,
            "dropout": self.dropout,
            "act_fn": "silu",
            "center_input_sample": False,
        }


# ----------------------------------------------------------------------------------------------------------------------
# VAE

_VAE_UNSUPPORTED = {"act_fn": "silu"}


@dataclass(frozen=True)
class VAEConfig:
    """An SD-style `AutoencoderKL`: one down/up block per entry of `block_out_channels`."""

    in_channels: int = 3
    out_channels: int = 3
    block_out_channels: tuple[int, ...] = (64,)
    layers_per_block: int = 1
    latent_channels: int = 4
    norm_num_groups: int = 32
    sample_size: int = 32
    scaling_factor: float = 0.18215
    shift_factor: float | None = None
    latents_mean: tuple[float, ...] | None = None
    latents_std: tuple[float, ...] | None = None
    force_upcast: bool = True
    use_quant_conv: bool = True
    use_post_quant_conv: bool = True
    mid_block_add_attention: bool = True

    def __post_init__(self) -> None:
        for c in self.block_out_channels:
            if c % self.norm_num_groups:
                raise ConfigError(
                    f"VAE block_out_channels {c} is not divisible by norm_num_groups={self.norm_num_groups}"
                )

    @classmethod
    def from_diffusers(cls, cfg: dict) -> VAEConfig:
        cfg = dict(cfg)
        _reject_unsupported(cfg, _VAE_UNSUPPORTED, "AutoencoderKL")
        channels = tuple(cfg.get("block_out_channels", (64,)))
        for key, allowed in (
            ("down_block_types", "DownEncoderBlock2D"),
            ("up_block_types", "UpDecoderBlock2D"),
        ):
            types = cfg.get(key, (allowed,) * len(channels))
            if any(t != allowed for t in types):
                raise ConfigError(
                    f"AutoencoderKL {key}={list(types)} is not supported (only {allowed!r} blocks)"
                )
            if len(types) != len(channels):
                raise ConfigError(
                    f"AutoencoderKL has {len(types)} {key} but {len(channels)} block_out_channels"
                )
        sample_size = cfg.get("sample_size", 32)
        if isinstance(sample_size, (list, tuple)):
            sample_size = sample_size[0]
        mean, std = cfg.get("latents_mean"), cfg.get("latents_std")
        return cls(
            in_channels=cfg.get("in_channels", 3),
            out_channels=cfg.get("out_channels", 3),
            block_out_channels=channels,
            layers_per_block=cfg.get("layers_per_block", 1),
            latent_channels=cfg.get("latent_channels", 4),
            norm_num_groups=cfg.get("norm_num_groups", 32),
            sample_size=sample_size,
            scaling_factor=cfg.get("scaling_factor", 0.18215),
            shift_factor=cfg.get("shift_factor"),
            latents_mean=tuple(mean) if mean is not None else None,
            latents_std=tuple(std) if std is not None else None,
            force_upcast=bool(cfg.get("force_upcast", True)),
            use_quant_conv=bool(cfg.get("use_quant_conv", True)),
            use_post_quant_conv=bool(cfg.get("use_post_quant_conv", True)),
            mid_block_add_attention=bool(cfg.get("mid_block_add_attention", True)),
        )

    def to_diffusers(self) -> dict:
        n = len(self.block_out_channels)
        return {
            "_class_name": "AutoencoderKL",
            "in_channels": self.in_channels,
            "out_channels": self.out_channels,
            "down_block_types": ["DownEncoderBlock2D"] * n,
            "up_block_types": ["UpDecoderBlock2D"] * n,
            "block_out_channels": list(self.block_out_channels),
            "layers_per_block": self.layers_per_block,
            "act_fn": "silu",
            "latent_channels": self.latent_channels,
            "norm_num_groups": self.norm_num_groups,
            "sample_size": self.sample_size,
            "scaling_factor": self.scaling_factor,
            "shift_factor": self.shift_factor,
            "latents_mean": list(self.latents_mean) if self.latents_mean is not None else None,
            "latents_std": list(self.latents_std) if self.latents_std is not None else None,
            "force_upcast": self.force_upcast,
            "use_quant_conv": self.use_quant_conv,
            "use_post_quant_conv": self.use_post_quant_conv,
            "mid_block_add_attention": self.mid_block_add_attention,
        }


def replace(cfg: Any, **changes: Any) -> Any:
    """`dataclasses.replace` re-exported so callers need not import dataclasses for a config tweak."""
    return dataclasses.replace(cfg, **changes)
