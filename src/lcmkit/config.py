"""Typed, frozen model configs, and their translation to and from diffusers' `config.json`.

JSON appears only at this boundary: `from_diffusers` reads a diffusers config dict (rejecting features we do not
implement, by name), `to_diffusers` writes one that diffusers' own classes load.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from lcmkit.io.errors import MissingModelFileError, ModelFileError

logger = logging.getLogger(__name__)

_META_KEYS = ("_class_name", "_diffusers_version", "_name_or_path", "_use_default_values")


class ConfigError(ModelFileError):
    """A config asks for something lcmkit does not implement, is inconsistent, or has a value of the wrong type.

    Raised without a path by the dataclasses; the loaders that read the file add it (`with_path`).
    """


def _per_level(value: Any, n: int, name: str, model: str = "UNet") -> tuple:
    """Broadcast an int (or None) to one entry per level; check a list has one positive int per level."""
    if isinstance(value, (list, tuple)):
        if len(value) != n:
            raise ConfigError(
                f"`{name}` has {len(value)} entries but the model has {n} levels: {list(value)}"
            )
        for v in value:
            _check_int(v, name, model, f"a positive integer or a list of {n} of them")
        return tuple(value)
    if value is not None:
        _check_int(value, name, model, f"a positive integer or a list of {n} of them")
    return (value,) * n


def _reject_unsupported(cfg: dict, unsupported: dict[str, Any], model: str) -> None:
    """Fail on any field whose value asks for a feature outside what lcmkit implements."""
    for key, allowed in unsupported.items():
        value = cfg.get(key)
        if value is None or value == allowed or (allowed in (None, False) and not value):
            continue
        raise ConfigError(f"{model}: `{key}={value!r}` is not supported (lcmkit supports only {allowed!r})")


def _check_class(cfg: dict, allowed: tuple[str, ...]) -> None:
    """A config's `_class_name`, when it has one, must name a class this config describes."""
    name = cfg.get("_class_name")
    if name is not None and name not in allowed:
        raise ConfigError(
            f"`_class_name` is {name!r}; lcmkit needs a config of class {' or '.join(repr(a) for a in allowed)} "
            "here; is this the right component folder?"
        )


# Typed reads of diffusers config values: JSON gives any type, and a wrong one must fail here, naming the key,
# not deep inside model construction (a string of channels, a null where a number belongs).


def _short(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."


def _type_error(key: str, model: str, wanted: str, value: Any) -> ConfigError:
    return ConfigError(f"{model} config: `{key}` must be {wanted}, got {_short(value)}")


def _check_int(value: Any, key: str, model: str, wanted: str = "a positive integer", minimum: int = 1) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise _type_error(key, model, wanted, value)
    return value


def _int(cfg: dict, key: str, default: int, model: str, minimum: int = 1) -> int:
    value = cfg.get(key)
    if value is None:
        return default
    wanted = "a positive integer" if minimum == 1 else f"an integer >= {minimum}"
    return _check_int(value, key, model, wanted, minimum)


def _optional_int(cfg: dict, key: str, model: str) -> int | None:
    value = cfg.get(key)
    return None if value is None else _check_int(value, key, model, "a positive integer or null")


def _float(cfg: dict, key: str, default: float | None, model: str, positive: bool = False) -> float | None:
    value = cfg.get(key)
    if value is None:
        return default
    wanted = "a positive number" if positive else "a finite number"
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise _type_error(key, model, wanted, value)
    if positive and value <= 0:
        raise _type_error(key, model, wanted, value)
    return value


def _bool(cfg: dict, key: str, default: bool, model: str) -> bool:
    value = cfg.get(key)
    if value is None:
        return default
    if isinstance(value, bool) or value in (0, 1):
        return bool(value)
    raise _type_error(key, model, "true or false", value)


def _ints(cfg: dict, key: str, default: tuple[int, ...], model: str) -> tuple[int, ...]:
    value = cfg.get(key)
    if value is None:
        return default
    wanted = "a non-empty list of positive integers"
    if not isinstance(value, (list, tuple)) or not value:
        raise _type_error(key, model, wanted, value)
    for v in value:
        _check_int(v, key, model, wanted)
    return tuple(value)


def _floats(cfg: dict, key: str, model: str) -> tuple[float, ...] | None:
    value = cfg.get(key)
    if value is None:
        return None
    ok = isinstance(value, (list, tuple)) and all(
        isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) for v in value
    )
    if not ok:
        raise _type_error(key, model, "a list of finite numbers or null", value)
    return tuple(value)


def _names(cfg: dict, key: str, default: tuple[str, ...], model: str) -> tuple[str, ...]:
    value = cfg.get(key)
    if value is None:
        return default
    if not isinstance(value, (list, tuple)) or not value or not all(isinstance(v, str) for v in value):
        raise _type_error(key, model, "a non-empty list of block type names", value)
    return tuple(value)


def _value(cfg: dict, key: str, default: Any) -> Any:
    """`cfg[key]`, or `default` when it is absent or null (diffusers writes null for "use the default")."""
    value = cfg.get(key)
    return default if value is None else value


def _sample_size(cfg: dict, default: int, model: str) -> int:
    """An int, or diffusers' [height, width] list (the first entry is kept, as before)."""
    value = cfg.get("sample_size")
    if isinstance(value, (list, tuple)) and value:
        value = value[0]
    if value is None:
        return default
    return _check_int(value, "sample_size", model, "a positive integer or a list of them")


def read_config_json(path: str | Path) -> dict:
    """Read a diffusers JSON config (`config.json`, `model_index.json`, ...) as a dict.

    Every way the file can be wrong raises an error that names it: missing (`MissingModelFileError`, also a
    FileNotFoundError), unreadable, empty, not UTF-8, not JSON, or JSON that is not an object.
    """
    path = Path(path)
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        raise MissingModelFileError("config file not found", path) from None
    except OSError as e:
        raise ConfigError(f"cannot be read: {e.strerror or e}", path) from None
    if not data.strip():
        raise ConfigError(f"is empty ({len(data)} bytes); expected a JSON object", path)
    try:
        text = data.decode("utf-8-sig")  # a byte-order mark is tolerated; any other non-UTF-8 byte is not
    except UnicodeDecodeError as e:
        raise ConfigError(
            f"is not UTF-8 text (byte 0x{data[e.start]:02x} at offset {e.start}); JSON files must be UTF-8",
            path,
        ) from None
    try:
        value = json.loads(text)
    except json.JSONDecodeError as e:
        raise ConfigError(f"is not valid JSON: {e.msg} at line {e.lineno} column {e.colno}", path) from None
    if not isinstance(value, dict):
        raise ConfigError(
            f"holds a JSON {_json_kind(value)} ({_short(value)}) where a JSON object is expected", path
        )
    return value


def _json_kind(value: Any) -> str:
    if isinstance(value, list):
        return "list"
    if isinstance(value, str):
        return "string"
    if isinstance(value, bool):
        return "boolean"
    if isinstance(value, (int, float)):
        return "number"
    return "null" if value is None else type(value).__name__


def require_settings(cfg: dict, path: str | Path, what: str) -> dict:
    """Refuse a config file that holds no settings (`{}`, or only `_class_name` and the like).

    The dataclasses would fill every field with SD 1.5's defaults, and the mismatch would only show later, as a
    long list of weight keys that do not fit: say what is wrong where it is wrong.
    """
    if not any(not str(k).startswith("_") for k in cfg):
        raise ConfigError(
            f"holds no settings ({_short(cfg)}); the {what} config must list them (diffusers writes every field)",
            path,
        )
    return cfg


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
        """Read a diffusers `UNet2DConditionModel` config; ConfigError names any field lcmkit cannot use."""
        if not isinstance(cfg, dict):
            raise ConfigError(f"a UNet config must be a dict of settings, got {type(cfg).__name__}")
        cfg = dict(cfg)
        m = "UNet"
        _check_class(cfg, ("UNet2DConditionModel",))
        _reject_unsupported(cfg, _UNET_UNSUPPORTED, m)
        down = _names(cfg, "down_block_types", ("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",), m)
        up = _names(cfg, "up_block_types", ("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3, m)
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
        channels = _ints(cfg, "block_out_channels", (320, 640, 1280, 1280), m)
        if len(channels) != n:
            raise ConfigError(f"block_out_channels has {len(channels)} entries for {n} levels")
        cross = cfg.get("cross_attention_dim")
        if isinstance(cross, (list, tuple)):
            if len(set(cross)) != 1:
                raise ConfigError(f"per-level cross_attention_dim {cross} is not supported")
            cross = cross[0]
        cross = _int({"cross_attention_dim": cross}, "cross_attention_dim", 1280, m)
        heads_dim = _per_level(cfg.get("attention_head_dim", 8), n, "attention_head_dim")
        heads_dim = tuple(h if h is not None else c for h, c in zip(heads_dim, channels, strict=True))
        num_heads = cfg.get("num_attention_heads")
        return cls(
            sample_size=_sample_size(cfg, 64, m),
            in_channels=_int(cfg, "in_channels", 4, m),
            out_channels=_int(cfg, "out_channels", 4, m),
            block_out_channels=channels,
            down_attention=tuple(_UNET_DOWN[t] for t in down),
            up_attention=tuple(_UNET_UP[t] for t in up),
            layers_per_block=_per_level(_value(cfg, "layers_per_block", 2), n, "layers_per_block"),
            transformer_layers_per_block=_per_level(
                _value(cfg, "transformer_layers_per_block", 1), n, "transformer_layers_per_block"
            ),
            attention_head_dim=heads_dim,
            num_attention_heads=_per_level(num_heads, n, "num_attention_heads") if num_heads else None,
            cross_attention_dim=cross,
            use_linear_projection=_bool(cfg, "use_linear_projection", False, m),
            upcast_attention=_bool(cfg, "upcast_attention", False, m),
            time_cond_proj_dim=_optional_int(cfg, "time_cond_proj_dim", m),
            time_embedding_dim=_optional_int(cfg, "time_embedding_dim", m),
            flip_sin_to_cos=_bool(cfg, "flip_sin_to_cos", True, m),
            freq_shift=_int(cfg, "freq_shift", 0, m, minimum=0),
            norm_num_groups=_int(cfg, "norm_num_groups", 32, m),
            norm_eps=_float(cfg, "norm_eps", 1e-5, m, positive=True),
            downsample_padding=_int(cfg, "downsample_padding", 1, m, minimum=0),
            mid_block_scale_factor=_float(cfg, "mid_block_scale_factor", 1.0, m),
            dropout=_float(cfg, "dropout", 0.0, m),
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
# ControlNet

_CONTROLNET_OWN_KEYS = (
    "conditioning_channels",
    "conditioning_embedding_out_channels",
    "controlnet_conditioning_channel_order",
    "global_pool_conditions",
    "addition_embed_type_num_heads",
)


@dataclass(frozen=True)
class ControlNetConfig(UNetConfig):
    """A ControlNet (diffusers `ControlNetModel`, SD 1.x / 2.x layout): the UNet's encoder half and mid block
    (every `UNetConfig` field but the up path), plus the hint encoder for the control image.

    `conditioning_embedding_out_channels` are the widths of the hint encoder's convolutions; the control image has
    `conditioning_channels` channels in `conditioning_channel_order` ("rgb", or "bgr": flipped before use);
    `global_pool_conditions` averages every residual over the image (the shuffle ControlNet).
    `time_cond_proj_dim` (an LCM w-embedding input) is lcmkit's own extension: diffusers' ControlNet has none.
    """

    conditioning_channels: int = 3
    conditioning_embedding_out_channels: tuple[int, ...] = (16, 32, 96, 256)
    conditioning_channel_order: str = "rgb"
    global_pool_conditions: bool = False

    def __post_init__(self) -> None:
        super().__post_init__()
        if len(set(self.layers_per_block)) != 1:
            raise ConfigError(
                f"a ControlNet has the same number of resnets on every level, got layers_per_block={self.layers_per_block}"
            )
        if self.conditioning_channel_order not in ("rgb", "bgr"):
            raise ConfigError(
                f"controlnet_conditioning_channel_order={self.conditioning_channel_order!r}; allowed: 'rgb', 'bgr'"
            )

    @classmethod
    def from_diffusers(cls, cfg: dict) -> ControlNetConfig:
        """Read a diffusers `ControlNetModel` config; ConfigError names any field lcmkit cannot use (an SDXL
        ControlNet's `addition_embed_type`, for one)."""
        if not isinstance(cfg, dict):
            raise ConfigError(f"a ControlNet config must be a dict of settings, got {type(cfg).__name__}")
        cfg = dict(cfg)
        m = "ControlNet"
        _check_class(cfg, ("ControlNetModel",))
        own = {k: cfg.pop(k) for k in _CONTROLNET_OWN_KEYS if k in cfg}
        cfg.pop("_class_name", None)
        # the trunk is read as a UNet whose up path mirrors the down path (a ControlNet has none)
        mirror = {"CrossAttnDownBlock2D": "CrossAttnUpBlock2D", "DownBlock2D": "UpBlock2D"}
        down = _names(cfg, "down_block_types", ("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",), m)
        cfg["up_block_types"] = [mirror.get(t, t) for t in reversed(down)]
        trunk = UNetConfig.from_diffusers(cfg)
        order = _value(own, "controlnet_conditioning_channel_order", "rgb")
        if not isinstance(order, str):
            raise _type_error("controlnet_conditioning_channel_order", m, "'rgb' or 'bgr'", order)
        return cls(
            **{f.name: getattr(trunk, f.name) for f in dataclasses.fields(UNetConfig)},
            conditioning_channels=_int(own, "conditioning_channels", 3, m),
            conditioning_embedding_out_channels=_ints(
                own, "conditioning_embedding_out_channels", (16, 32, 96, 256), m
            ),
            conditioning_channel_order=order,
            global_pool_conditions=_bool(own, "global_pool_conditions", False, m),
        )

    def to_diffusers(self) -> dict:
        out = super().to_diffusers()
        for key in (
            "up_block_types",
            "out_channels",
            "time_embedding_dim",
            "dropout",
            "sample_size",
            "center_input_sample",
        ):
            out.pop(key)
        if self.time_cond_proj_dim is None:
            out.pop("time_cond_proj_dim")
        out.update(
            _class_name="ControlNetModel",
            layers_per_block=self.layers_per_block[0],
            conditioning_channels=self.conditioning_channels,
            conditioning_embedding_out_channels=list(self.conditioning_embedding_out_channels),
            controlnet_conditioning_channel_order=self.conditioning_channel_order,
            global_pool_conditions=self.global_pool_conditions,
        )
        return out


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
        """Read a diffusers `AutoencoderKL` config; ConfigError names any field lcmkit cannot use."""
        if not isinstance(cfg, dict):
            raise ConfigError(f"an AutoencoderKL config must be a dict of settings, got {type(cfg).__name__}")
        cfg = dict(cfg)
        m = "AutoencoderKL"
        _check_class(cfg, ("AutoencoderKL",))
        _reject_unsupported(cfg, _VAE_UNSUPPORTED, m)
        channels = _ints(cfg, "block_out_channels", (64,), m)
        for key, allowed in (
            ("down_block_types", "DownEncoderBlock2D"),
            ("up_block_types", "UpDecoderBlock2D"),
        ):
            types = _names(cfg, key, (allowed,) * len(channels), m)
            if any(t != allowed for t in types):
                raise ConfigError(
                    f"AutoencoderKL {key}={list(types)} is not supported (only {allowed!r} blocks)"
                )
            if len(types) != len(channels):
                raise ConfigError(
                    f"AutoencoderKL has {len(types)} {key} but {len(channels)} block_out_channels"
                )
        return cls(
            in_channels=_int(cfg, "in_channels", 3, m),
            out_channels=_int(cfg, "out_channels", 3, m),
            block_out_channels=channels,
            layers_per_block=_int(cfg, "layers_per_block", 1, m),
            latent_channels=_int(cfg, "latent_channels", 4, m),
            norm_num_groups=_int(cfg, "norm_num_groups", 32, m),
            sample_size=_sample_size(cfg, 32, m),
            scaling_factor=_float(cfg, "scaling_factor", 0.18215, m, positive=True),
            shift_factor=_float(cfg, "shift_factor", None, m),
            latents_mean=_floats(cfg, "latents_mean", m),
            latents_std=_floats(cfg, "latents_std", m),
            force_upcast=_bool(cfg, "force_upcast", True, m),
            use_quant_conv=_bool(cfg, "use_quant_conv", True, m),
            use_post_quant_conv=_bool(cfg, "use_post_quant_conv", True, m),
            mid_block_add_attention=_bool(cfg, "mid_block_add_attention", True, m),
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
