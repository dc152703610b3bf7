"""TAESD, a tiny distilled autoencoder (Bohan, 2023), in diffusers' `AutoencoderTiny` checkpoint layout.

It replaces the SD VAE where decode time matters (previews, a fast mode on CPU): 1.2 M parameters per half instead
of about 50 M, and 1/18 of the decoder's arithmetic (35 instead of 620 GFLOP at 256², 141 instead of 2510 at 512²).
It is not the same function as the SD VAE, so images differ slightly; the weights are a separate download
(`madebyollin/taesd`).

Module attribute names are the diffusers checkpoint keys (`encoder.layers.1.conv.0.weight`,
`decoder.layers.14.weight`, ...): both halves are one `nn.Sequential` each, whose indices count the parameter-free
activation and upsampling modules too, exactly as the reference builds them. A diffusers `vae/` folder written for
`AutoencoderTiny` therefore loads with strict key checks and no renaming, and `save_pretrained` writes one back.

Conventions (the reference's): `encode` takes images in [-1, 1] and returns raw latents in the diffusion space
(`scaling_factor` is 1.0: TAESD was trained on the SD VAE's already-scaled latents); `decode` takes such latents
and returns images in [-1, 1]. `scale_latents` / `unscale_latents` map raw latents to and from [0, 1] for storing
them as 8-bit images.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from lcmkit.config import ConfigError
from lcmkit.models.base import ModelMixin, SlicingTilingMixin
from lcmkit.models.vae import DecoderOutput, TupleLike

logger = logging.getLogger(__name__)

# The decoder first soft-clamps its input to (-3, 3) with tanh(z / 3) * 3; this 3 is part of TAESD's trained
# function and, in the reference too, independent of `latent_magnitude`.
_INPUT_CLAMP = 3.0

_ACTIVATIONS: dict[str, Callable[[], nn.Module]] = {
    "relu": nn.ReLU,
    "silu": nn.SiLU,
    "swish": nn.SiLU,
    "mish": nn.Mish,
    "gelu": nn.GELU,
}
_UPSAMPLE_MODES = ("nearest", "nearest-exact", "bilinear", "bicubic")


# ----------------------------------------------------------------------------------------------------------------------
# Config


@dataclass(frozen=True)
class TinyVAEConfig:
    """Fields and defaults of diffusers' `AutoencoderTiny` config; the defaults are TAESD for SD 1.x / 2.x.

    Each encoder stage is a conv (stride 2 except in the first stage) followed by `num_encoder_blocks[i]` residual
    blocks; each decoder stage is `num_decoder_blocks[i]` blocks, then (except in the last stage) an upsampling
    and a conv. Channel counts must be equal across the stages of each half: the reference builds every stage
    with `block_out_channels[i]` inputs, so any other layout cannot run there either.
    """

    in_channels: int = 3
    out_channels: int = 3
    encoder_block_out_channels: tuple[int, ...] = (64, 64, 64, 64)
    decoder_block_out_channels: tuple[int, ...] = (64, 64, 64, 64)
    act_fn: str = "relu"
    upsample_fn: str = "nearest"
    latent_channels: int = 4
    upsampling_scaling_factor: int = 2
    num_encoder_blocks: tuple[int, ...] = (1, 3, 3, 3)
    num_decoder_blocks: tuple[int, ...] = (3, 3, 3, 1)
    latent_magnitude: float = 3.0
    latent_shift: float = 0.5
    force_upcast: bool = False
    scaling_factor: float = 1.0
    shift_factor: float = 0.0

    def __post_init__(self) -> None:
        for half in ("encoder", "decoder"):
            channels = getattr(self, f"{half}_block_out_channels")
            blocks = getattr(self, f"num_{half}_blocks")
            if len(channels) != len(blocks) or not channels:
                raise ConfigError(
                    f"TinyVAEConfig: {half}_block_out_channels {channels} and num_{half}_blocks {blocks} "
                    "need the same, non-zero number of entries (one per stage)"
                )
            if len(set(channels)) != 1:
                raise ConfigError(
                    f"TinyVAEConfig: {half}_block_out_channels {channels} must all be equal (the AutoencoderTiny "
                    "layout feeds each stage's output into the next stage unchanged)"
                )
        if self.act_fn.lower() not in _ACTIVATIONS:
            raise ConfigError(
                f"TinyVAEConfig: act_fn {self.act_fn!r} is not supported (use one of {sorted(_ACTIVATIONS)})"
            )
        if self.upsample_fn not in _UPSAMPLE_MODES:
            raise ConfigError(
                f"TinyVAEConfig: upsample_fn {self.upsample_fn!r} is not supported (use one of {list(_UPSAMPLE_MODES)})"
            )
        if not isinstance(self.upsampling_scaling_factor, int) or self.upsampling_scaling_factor < 1:
            raise ConfigError(
                f"TinyVAEConfig: upsampling_scaling_factor must be a positive int, got {self.upsampling_scaling_factor!r}"
            )

    @property
    def block_out_channels(self) -> tuple[int, ...]:
        """The decoder's channels, one per stage, so `2 ** (len(block_out_channels) - 1)` is the pixels-per-latent
        factor, as pipelines compute it for any VAE (the reference registers the same alias in its config)."""
        return self.decoder_block_out_channels

    @property
    def encoder_scale(self) -> int:
        """Pixels per latent of the encoder: one stride-2 conv per stage after the first."""
        return 2 ** (len(self.encoder_block_out_channels) - 1)

    @property
    def decoder_scale(self) -> int:
        """Pixels per latent of the decoder: one upsampling per stage before the last."""
        return self.upsampling_scaling_factor ** (len(self.decoder_block_out_channels) - 1)

    @classmethod
    def from_diffusers(cls, cfg: dict) -> TinyVAEConfig:
        """Read an `AutoencoderTiny` config. `block_out_channels`, which the reference also writes, is derived here."""
        cfg = dict(cfg)
        name = cfg.get("_class_name", "AutoencoderTiny")
        if name != "AutoencoderTiny":
            raise ConfigError(
                f"this config is for {name!r}, not 'AutoencoderTiny'; load it with the matching class"
            )
        alias = cfg.get("block_out_channels")
        decoder = tuple(cfg.get("decoder_block_out_channels", cls.decoder_block_out_channels))
        if alias is not None and tuple(alias) != decoder:
            logger.warning(
                "AutoencoderTiny config: block_out_channels %s differs from decoder_block_out_channels %s; "
                "using the decoder's",
                list(alias),
                list(decoder),
            )
        defaults = cls()
        return cls(
            in_channels=cfg.get("in_channels", defaults.in_channels),
            out_channels=cfg.get("out_channels", defaults.out_channels),
            encoder_block_out_channels=tuple(
                cfg.get("encoder_block_out_channels", defaults.encoder_block_out_channels)
            ),
            decoder_block_out_channels=decoder,
            act_fn=cfg.get("act_fn", defaults.act_fn),
            upsample_fn=cfg.get("upsample_fn", defaults.upsample_fn),
            latent_channels=cfg.get("latent_channels", defaults.latent_channels),
            upsampling_scaling_factor=cfg.get(
                "upsampling_scaling_factor", defaults.upsampling_scaling_factor
            ),
            num_encoder_blocks=tuple(cfg.get("num_encoder_blocks", defaults.num_encoder_blocks)),
            num_decoder_blocks=tuple(cfg.get("num_decoder_blocks", defaults.num_decoder_blocks)),
            latent_magnitude=cfg.get("latent_magnitude", defaults.latent_magnitude),
            latent_shift=cfg.get("latent_shift", defaults.latent_shift),
            force_upcast=bool(cfg.get("force_upcast", defaults.force_upcast)),
            scaling_factor=cfg.get("scaling_factor", defaults.scaling_factor),
            shift_factor=cfg.get("shift_factor", defaults.shift_factor) or 0.0,
        )

    def to_diffusers(self) -> dict:
        return {
            "_class_name": "AutoencoderTiny",
            "in_channels": self.in_channels,
            "out_channels": self.out_channels,
            "encoder_block_out_channels": list(self.encoder_block_out_channels),
            "decoder_block_out_channels": list(self.decoder_block_out_channels),
            "act_fn": self.act_fn,
            "upsample_fn": self.upsample_fn,
            "latent_channels": self.latent_channels,
            "upsampling_scaling_factor": self.upsampling_scaling_factor,
            "num_encoder_blocks": list(self.num_encoder_blocks),
            "num_decoder_blocks": list(self.num_decoder_blocks),
            "latent_magnitude": self.latent_magnitude,
            "latent_shift": self.latent_shift,
            "force_upcast": self.force_upcast,
            "scaling_factor": self.scaling_factor,
            "shift_factor": self.shift_factor,
            "block_out_channels": list(self.block_out_channels),
        }


# ----------------------------------------------------------------------------------------------------------------------
# Layers


@dataclass
class AutoencoderTinyOutput(TupleLike):
    latents: torch.Tensor


def _activation(name: str) -> nn.Module:
    return _ACTIVATIONS[name.lower()]()


def _conv3x3(c_in: int, c_out: int, stride: int = 1, bias: bool = True) -> nn.Conv2d:
    return nn.Conv2d(c_in, c_out, 3, stride=stride, padding=1, bias=bias)


class TinyBlock(nn.Module):
    """relu(conv(act(conv(act(conv(x))))) + x): three 3x3 convs and an identity skip (`conv.0/2/4`, `fuse`)."""

    def __init__(self, channels: int, act_fn: str) -> None:
        super().__init__()
        act = _activation(act_fn)  # one module used twice, as the reference does (no parameters, same keys)
        self.conv = nn.Sequential(
            _conv3x3(channels, channels), act, _conv3x3(channels, channels), act, _conv3x3(channels, channels)
        )
        self.fuse = nn.ReLU()  # always ReLU, whatever `act_fn` is

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fuse(self.conv(x) + x)


class Upsample(nn.Module):
    """Parameter-free `F.interpolate` by a fixed factor (holds a `layers` index like the reference's nn.Upsample)."""

    def __init__(self, factor: int, mode: str) -> None:
        super().__init__()
        self.factor = factor
        self.mode = mode

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.interpolate(x, scale_factor=self.factor, mode=self.mode)


class TinyEncoder(nn.Module):
    """Image in [-1, 1] (B, in_channels, H, W) -> raw latents (B, latent_channels, H / f, W / f)."""

    def __init__(self, config: TinyVAEConfig) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        for i, (c, n) in enumerate(
            zip(config.encoder_block_out_channels, config.num_encoder_blocks, strict=True)
        ):
            layers.append(_conv3x3(config.in_channels, c) if i == 0 else _conv3x3(c, c, stride=2, bias=False))
            layers.extend(TinyBlock(c, config.act_fn) for _ in range(n))
        layers.append(_conv3x3(config.encoder_block_out_channels[-1], config.latent_channels))
        self.layers = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layers(x.add(1).div(2))  # TAESD was trained on images in [0, 1]


class TinyDecoder(nn.Module):
    """Raw latents (B, latent_channels, h, w) -> image in [-1, 1] (B, out_channels, h * f, w * f)."""

    def __init__(self, config: TinyVAEConfig) -> None:
        super().__init__()
        channels, blocks = config.decoder_block_out_channels, config.num_decoder_blocks
        layers: list[nn.Module] = [_conv3x3(config.latent_channels, channels[0]), _activation(config.act_fn)]
        for i, (c, n) in enumerate(zip(channels, blocks, strict=True)):
            last = i == len(channels) - 1
            layers.extend(TinyBlock(c, config.act_fn) for _ in range(n))
            if not last:
                layers.append(Upsample(config.upsampling_scaling_factor, config.upsample_fn))
            layers.append(_conv3x3(c, config.out_channels if last else c, bias=last))
        self.layers = nn.Sequential(*layers)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        z = torch.tanh(z / _INPUT_CLAMP) * _INPUT_CLAMP
        return self.layers(z).mul(2).sub(1)  # trained to output [0, 1]; pipelines expect [-1, 1]


# ----------------------------------------------------------------------------------------------------------------------
# The model


class AutoencoderTiny(SlicingTilingMixin, ModelMixin):
    """TAESD: `encode(x).latents` gives raw latents; `decode(z).sample` gives the image in [-1, 1].

    A drop-in for the pipelines' `vae`: `pipe.vae = AutoencoderTiny.from_pretrained(folder)`. It has no posterior,
    so image-to-image must read `.latents` where it reads `.latent_dist` from `AutoencoderKL`.

    `enable_slicing()` runs a batch one sample at a time. `enable_tiling()` runs every input (whatever its size) as
    overlapping tiles of `tile_sample_min_size` pixels / `tile_latent_min_size` latents, overlapping by
    `tile_overlap_factor`; each tile is pasted over the output so far with a linear ramp on its top and left edges.
    """

    config_class = TinyVAEConfig

    def __init__(self, config: TinyVAEConfig) -> None:
        super().__init__()
        self.config = config
        self.encoder = TinyEncoder(config)
        self.decoder = TinyDecoder(config)
        self.use_slicing = False
        self.use_tiling = False
        self.tile_overlap_factor: float = 0.125
        self.tile_sample_min_size: int = 512
        self.tile_latent_min_size: int = self.tile_sample_min_size // config.decoder_scale

    @property
    def latent_magnitude(self) -> float:
        return self.config.latent_magnitude

    @property
    def latent_shift(self) -> float:
        return self.config.latent_shift

    @property
    def scaling_factor(self) -> float:
        return self.config.scaling_factor

    # -- latent storage ----------------------------------------------------------------------------------------------

    def scale_latents(self, x: torch.Tensor) -> torch.Tensor:
        """Raw latents -> [0, 1]: x / (2 m) + s, clamped (m = latent_magnitude, s = latent_shift)."""
        return x.div(2 * self.config.latent_magnitude).add(self.config.latent_shift).clamp(0, 1)

    def unscale_latents(self, x: torch.Tensor) -> torch.Tensor:
        """[0, 1] -> raw latents: (x - s) * 2 m, the inverse of `scale_latents` inside the clamp."""
        return x.sub(self.config.latent_shift).mul(2 * self.config.latent_magnitude)

    # -- encode / decode ---------------------------------------------------------------------------------------------

    def _run(
        self, x: torch.Tensor, whole: Callable[[torch.Tensor], torch.Tensor], tiled: Callable
    ) -> torch.Tensor:
        run = tiled if self.use_tiling else whole
        if self.use_slicing and x.shape[0] > 1:
            return torch.cat([run(part) for part in x.split(1)])
        return run(x)

    def encode(
        self, x: torch.Tensor, return_dict: bool = True
    ) -> AutoencoderTinyOutput | tuple[torch.Tensor]:
        """Encode images in [-1, 1] of shape (B, C, H, W) into raw latents (no sampling: TAESD is deterministic)."""
        if x.ndim != 4:
            raise ValueError(
                f"AutoencoderTiny.encode expects (batch, channels, height, width), got {tuple(x.shape)}"
            )
        latents = self._run(x, self.encoder, self._tiled_encode)
        return AutoencoderTinyOutput(latents=latents) if return_dict else (latents,)

    def decode(
        self, z: torch.Tensor, generator: torch.Generator | None = None, return_dict: bool = True
    ) -> DecoderOutput | tuple[torch.Tensor]:
        """Decode raw latents into images in [-1, 1] (`generator` is accepted, as by the reference, and unused)."""
        if z.ndim != 4:
            raise ValueError(
                f"AutoencoderTiny.decode expects (batch, channels, height, width), got {tuple(z.shape)}"
            )
        image = self._run(z, self.decoder, self._tiled_decode)
        return DecoderOutput(sample=image) if return_dict else (image,)

    def forward(self, sample: torch.Tensor, return_dict: bool = True) -> DecoderOutput | tuple[torch.Tensor]:
        """Reconstruct through 8-bit latents, as if the latents were stored in an RGBA image and read back."""
        latents = self.encode(sample).latents
        stored = self.scale_latents(latents).mul_(255).round_().byte()
        image = self.decode(self.unscale_latents(stored / 255.0)).sample
        return DecoderOutput(sample=image) if return_dict else (image,)

    # -- tiling ------------------------------------------------------------------------------------------------------

    def _tiled_encode(self, x: torch.Tensor) -> torch.Tensor:
        f = self.config.encoder_scale
        return _paste_tiles(
            x,
            self.encoder,
            self.tile_sample_min_size,
            self.tile_overlap_factor,
            self.config.latent_channels,
            1 / f,
        )

    def _tiled_decode(self, z: torch.Tensor) -> torch.Tensor:
        f = self.config.decoder_scale
        return _paste_tiles(
            z, self.decoder, self.tile_latent_min_size, self.tile_overlap_factor, self.config.out_channels, f
        )


def _paste_tiles(
    x: torch.Tensor,
    run: Callable[[torch.Tensor], torch.Tensor],
    tile: int,
    overlap: float,
    out_channels: int,
    scale: float,
) -> torch.Tensor:
    """Run `run` on `tile`-sized input windows every `tile - blend` positions; paste each result with a ramp.

    With b = int(tile * overlap) input positions of overlap and n = b * scale output positions, a tile's output
    pixel (r, c) gets weight ramp(r) * ramp(c), ramp(k) = min(k / (n - 1), 1) (a ramp of 1 along the image's top
    row or left column of tiles), and out = weight * tile + (1 - weight) * out. These are the reference's
    masks and arithmetic order, so results match it to the bit in float32. The output starts as zeros in the
    input's dtype (the reference always starts in float32).
    """
    if tile < 1:
        raise ValueError(
            f"tiling needs a tile size >= 1, got {tile} (tile_sample_min_size / tile_latent_min_size)"
        )
    blend = int(tile * overlap)
    stride = tile - blend
    if stride < 1:
        raise ValueError(
            f"tile_overlap_factor={overlap} leaves no stride for tiles of {tile}; use a factor below 1"
        )
    n_out = int(tile * scale)
    ramp = (torch.arange(n_out, dtype=torch.float32) / (blend * scale - 1)).clamp(0, 1).to(x.device)
    ones = torch.ones_like(ramp)
    height, width = x.shape[-2:]
    out = torch.zeros(
        x.shape[0], out_channels, int(height * scale), int(width * scale), device=x.device, dtype=x.dtype
    )
    for i in range(0, height, stride):
        for j in range(0, width, stride):
            result = run(x[..., i : i + tile, j : j + tile])
            h, w = result.shape[-2:]
            top, left = int(i * scale), int(j * scale)
            target = out[..., top : top + h, left : left + w]
            weight = (ones if i == 0 else ramp)[:h, None] * (ones if j == 0 else ramp)[None, :w]
            target.copy_(weight * result + (1 - weight) * target)
    return out
