"""IP-Adapter files (h94/IP-Adapter layout) onto our UNet, and the pipeline methods around them.

A file holds two groups of tensors: `image_proj.*` (the image projection, `lcmkit.models.ip_adapter`: its keys
are our attribute names) and `ip_adapter.{N}.to_k_ip.weight` / `.to_v_ip.weight`, where N counts the attention
layers of the UNet in the order the reference implementation enumerates its attention processors: the down blocks,
then the up blocks, then the mid block, each transformer block's self-attention (even N) before its
cross-attention (odd N). Only cross-attentions carry weights, so N = 1, 3, 5, ... name our `attn2` layers in that
order. Safetensors files store the groups flattened (`image_proj.proj.weight`); torch `.bin` files as two nested
dicts (`{"image_proj": {...}, "ip_adapter": {...}}`, read with `weights_only=True`).

Everything is checked before the UNet is touched: a file that does not fit (another cross-attention width, another
number of attention layers such as an SDXL adapter, an unknown projection, NaN or infinite values) raises a
`ModelFileError` naming it, and the pipeline is left as it was.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn

from lcmkit.io.errors import MissingModelFileError, ModelFileError
from lcmkit.io.weights import check_finite, load_state_dict, sniff_weights_file
from lcmkit.loading.hub import hub_file, is_hub_id
from lcmkit.models.ip_adapter import PERCEIVER_HEAD_DIM, ImageProjection, Resampler, encode_ip_image
from lcmkit.nn.attention import Attention

logger = logging.getLogger(__name__)

IP_WEIGHT_NAMES = ("ip-adapter_sd15.safetensors", "ip-adapter_sd15.bin")
_IP_KEY = re.compile(r"^(\d+)\.(to_k_ip|to_v_ip)\.weight$")
_PLAIN_TOKENS = 4  # ip-adapter_sd15 makes four tokens (the file does not store the count)


# ----------------------------------------------------------------------------------------------------------------------
# Reading a file


def find_ip_adapter_file(path: str | Path, weight_name: str | None = None) -> Path:
    """The adapter file: `path` itself, or `weight_name` (default `ip-adapter_sd15.safetensors`/`.bin`) in folder
    `path`."""
    path = Path(path).expanduser()
    if path.is_file():
        return path
    if not path.is_dir():
        raise MissingModelFileError("IP-Adapter weights not found: neither a file nor a folder", path)
    names = [weight_name] if weight_name else list(IP_WEIGHT_NAMES)
    for name in names:
        if (path / name).is_file():
            return path / name
    found = sorted(p.name for p in path.iterdir() if p.suffix in (".safetensors", ".bin"))
    raise MissingModelFileError(
        f"no IP-Adapter file {names} in this folder; it holds {found or 'no weight files'} (pass weight_name=...)",
        path,
    )


def split_ip_state_dict(
    state_dict: Mapping[str, Any], path: Path | None
) -> dict[str, dict[str, torch.Tensor]]:
    """{"image_proj": {...}, "ip_adapter": {...}} from either layout (nested dicts, or flattened prefixes)."""
    if isinstance(state_dict.get("image_proj"), Mapping) and isinstance(
        state_dict.get("ip_adapter"), Mapping
    ):
        groups = {"image_proj": dict(state_dict["image_proj"]), "ip_adapter": dict(state_dict["ip_adapter"])}
        others = sorted(set(state_dict) - {"image_proj", "ip_adapter"})
    else:
        groups = {"image_proj": {}, "ip_adapter": {}}
        others = []
        for key, value in state_dict.items():
            prefix, _, rest = key.partition(".")
            if prefix in groups and rest:
                groups[prefix][rest] = value
            else:
                others.append(key)
    if others:
        raise ModelFileError(
            f"not an IP-Adapter file: keys {others[:6]} are outside `image_proj` and `ip_adapter`", path
        )
    if not groups["image_proj"] or not groups["ip_adapter"]:
        empty = [name for name, group in groups.items() if not group]
        raise ModelFileError(f"not an IP-Adapter file: no `{'`/`'.join(empty)}` weights", path)
    for name, group in groups.items():
        for key, value in group.items():
            if not isinstance(value, torch.Tensor):
                raise ModelFileError(
                    f"IP-Adapter key `{name}.{key}` holds a {type(value).__name__}, not a tensor", path
                )
        check_finite(((f"{name}.{k}", v) for k, v in group.items()), path, "IP-Adapter")
    return groups


def read_ip_adapter(path: Path) -> dict[str, dict[str, torch.Tensor]]:
    """Read and split an adapter file; safetensors by its header, pickles with `weights_only=True`."""
    if sniff_weights_file(path) == "safetensors":
        return split_ip_state_dict(load_state_dict(path), path)
    try:
        raw = torch.load(str(path), map_location="cpu", weights_only=True)
    except Exception as e:  # as lcmkit.io.weights: any damage, or a pickle that is more than tensors
        raise ModelFileError(
            f"could not be loaded safely as a torch pickle of tensors: {type(e).__name__}", path
        ) from None
    if not isinstance(raw, Mapping):
        raise ModelFileError(f"does not hold a state dict (found a {type(raw).__name__})", path)
    return split_ip_state_dict(raw, path)


# ----------------------------------------------------------------------------------------------------------------------
# Fitting it to a UNet


def cross_attentions(unet: nn.Module) -> list[tuple[str, Attention]]:
    """The UNet's cross-attention layers (`attn2`) in the adapter files' order: down blocks, up blocks, mid block."""
    named = dict(unet.named_modules())
    found = []
    for part in ("down_blocks.", "up_blocks.", "mid_block."):
        found += [(n, m) for n, m in named.items() if n.startswith(part) and n.endswith(".attn2")]
    return found


def build_projection(weights: Mapping[str, torch.Tensor], cross_dim: int, path: Path | None) -> nn.Module:
    """The image projection the `image_proj` weights describe, loaded strictly; refused unless it makes tokens of
    the UNet's cross-attention width."""
    if "proj.weight" in weights and "norm.weight" in weights:
        out_dim, clip_dim = weights["proj.weight"].shape
        token_dim = weights["norm.weight"].shape[0]
        if out_dim != _PLAIN_TOKENS * token_dim:
            raise ModelFileError(
                f"image_proj.proj makes {out_dim} values, not {_PLAIN_TOKENS} tokens of width {token_dim}: only the "
                "ip-adapter_sd15 (4 tokens) and ip-adapter-plus (resampler) projections are supported",
                path,
            )
        projection: nn.Module = ImageProjection(clip_dim, token_dim, _PLAIN_TOKENS)
    elif "latents" in weights and "proj_in.weight" in weights and "layers.0.0.to_q.weight" in weights:
        _, num_tokens, hidden = weights["latents"].shape
        depth = len({k.split(".")[1] for k in weights if k.startswith("layers.")})
        projection = Resampler(
            embed_dim=weights["proj_in.weight"].shape[1],
            hidden_dim=hidden,
            output_dim=weights["proj_out.weight"].shape[0],
            depth=depth,
            heads=weights["layers.0.0.to_q.weight"].shape[0] // PERCEIVER_HEAD_DIM,
            num_tokens=num_tokens,
            ff_mult=weights["layers.0.1.1.weight"].shape[0] // hidden,
        )
    else:
        raise ModelFileError(
            f"unknown IP-Adapter image projection (keys {sorted(weights)[:6]}): supported are ip-adapter_sd15 "
            "(image_proj.proj, image_proj.norm) and ip-adapter-plus (image_proj.latents, proj_in, layers, ...)",
            path,
        )
    if projection.cross_attention_dim != cross_dim:
        raise ModelFileError(
            f"this IP-Adapter makes image tokens of width {projection.cross_attention_dim}, but the UNet's "
            f"cross-attention width is {cross_dim}: it was made for another model family (an SDXL adapter on an "
            "SD 1.x UNet, say)",
            path,
        )
    missing, unexpected = _key_mismatch(projection, weights)
    if missing or unexpected:
        raise ModelFileError(
            f"the image projection's keys do not fit its layout: missing {missing[:6]}, unexpected {unexpected[:6]}",
            path,
        )
    try:
        projection.load_state_dict(dict(weights), strict=True)
    except RuntimeError as e:  # a shape that contradicts the others
        raise ModelFileError(f"the image projection's weights do not fit together: {e}", path) from None
    return projection


def _key_mismatch(module: nn.Module, weights: Mapping[str, torch.Tensor]) -> tuple[list[str], list[str]]:
    own = set(module.state_dict())
    return sorted(own - set(weights)), sorted(set(weights) - own)


def attention_weights(
    unet: nn.Module, weights: Mapping[str, torch.Tensor], path: Path | None
) -> list[tuple[Attention, torch.Tensor, torch.Tensor]]:
    """(attn2, to_k_ip weight, to_v_ip weight) for every cross-attention, each weight checked against its layer."""
    layers = cross_attentions(unet)
    bad = sorted(k for k in weights if not _IP_KEY.match(k))
    if bad:
        raise ModelFileError(
            f"unsupported `ip_adapter` keys {bad[:6]} (only to_k_ip/to_v_ip weights are read: FaceID LoRA "
            "layers and other variants are not supported)",
            path,
        )
    wanted = [f"{2 * i + 1}.{proj}.weight" for i in range(len(layers)) for proj in ("to_k_ip", "to_v_ip")]
    if set(weights) != set(wanted):
        have = len({k.split(".")[0] for k in weights})
        raise ModelFileError(
            f"this IP-Adapter has weights for {have} attention layers, but the UNet has {len(layers)} "
            f"cross-attention layers (keys {wanted[0]} ... {wanted[-1]} expected): it was made for another UNet",
            path,
        )
    cross_dim = unet.config.cross_attention_dim
    out = []
    for i, (name, attn) in enumerate(layers):
        k, v = weights[f"{2 * i + 1}.to_k_ip.weight"], weights[f"{2 * i + 1}.to_v_ip.weight"]
        want = (attn.heads * attn.dim_head, cross_dim)
        for key, w in ((f"{2 * i + 1}.to_k_ip.weight", k), (f"{2 * i + 1}.to_v_ip.weight", v)):
            if tuple(w.shape) != want:
                raise ModelFileError(
                    f"ip_adapter.{key} has shape {tuple(w.shape)}, but {name} needs {want}: the adapter was made "
                    "for another UNet",
                    path,
                )
        out.append((attn, k, v))
    return out


def install_ip_adapter(
    unet: nn.Module, projection: nn.Module, layers: list[tuple[Attention, torch.Tensor, torch.Tensor]]
) -> None:
    """Put a checked adapter on the UNet (replacing one already there), in the UNet's dtype and device."""
    param = next(unet.parameters())
    for attn, k, v in layers:
        for name, weight in (("to_k_ip", k), ("to_v_ip", v)):
            linear = nn.Linear(
                weight.shape[1], weight.shape[0], bias=False, device=param.device, dtype=param.dtype
            )
            with torch.no_grad():
                linear.weight.copy_(weight)
            setattr(attn, name, linear)
        attn.ip_scale = 1.0
    unet.image_proj = projection.to(device=param.device, dtype=param.dtype).eval()


def remove_ip_adapter(unet: nn.Module) -> None:
    for _, attn in cross_attentions(unet):
        attn.to_k_ip = attn.to_v_ip = None
        attn.ip_scale = 1.0
    unet.image_proj = None


# ----------------------------------------------------------------------------------------------------------------------
# The pipeline methods


class IPAdapterMixin:
    """`load_ip_adapter`, `set_ip_adapter_scale`, `unload_ip_adapter` and the image encoding (diffusers'
    `IPAdapterMixin` and the pipelines' `encode_image` / `prepare_ip_adapter_image_embeds`). One adapter at a time."""

    def load_ip_adapter(
        self,
        pretrained_model_name_or_path_or_dict: str | Path | Mapping[str, Any],
        subfolder: str | None = None,
        weight_name: str | None = None,
        image_encoder_folder: str | None = "image_encoder",
        **kwargs: Any,
    ) -> None:
        """Load an IP-Adapter (a file, a folder with `weight_name`, a hub id, or a state dict) onto the UNet, and
        the CLIP vision encoder from `image_encoder_folder` (inside `subfolder` when it has no "/", else relative to
        the folder or repo; None: no encoder, pass `ip_adapter_image_embeds=`) unless the pipeline has one."""
        hub_kwargs = {
            k: kwargs.pop(k) for k in ("cache_dir", "local_files_only", "revision", "token") if k in kwargs
        }
        for ignored in ("low_cpu_mem_usage", "force_download", "proxies"):
            kwargs.pop(ignored, None)
        if kwargs:
            raise TypeError(f"load_ip_adapter got unexpected keyword arguments {sorted(kwargs)}")
        self._check_exact_mode("load an IP-Adapter")
        for given in (pretrained_model_name_or_path_or_dict, subfolder, weight_name):
            if isinstance(given, list):
                raise ValueError("lcmkit holds one IP-Adapter at a time: pass one source, not a list")
        source = pretrained_model_name_or_path_or_dict
        path = None
        if isinstance(source, Mapping):
            groups = split_ip_state_dict(source, None)
        else:
            path = self._ip_adapter_file(source, subfolder, weight_name, hub_kwargs)
            groups = read_ip_adapter(path)
        projection = build_projection(groups["image_proj"], self.unet.config.cross_attention_dim, path)
        layers = attention_weights(self.unet, groups["ip_adapter"], path)
        encoder = self.image_encoder
        if encoder is None and image_encoder_folder is not None:
            if isinstance(source, Mapping):
                raise ValueError(
                    "the image encoder cannot be loaded from a state dict: pass image_encoder_folder=None and "
                    "ip_adapter_image_embeds= at call time, or set pipe.image_encoder first"
                )
            encoder = self._load_image_encoder(source, subfolder, image_encoder_folder, hub_kwargs)
        elif encoder is None:
            logger.warning(
                "no image encoder loaded (image_encoder_folder=None): pass ip_adapter_image_embeds="
            )
        install_ip_adapter(self.unet, projection, layers)
        self.image_encoder = encoder
        self._ip_adapter_file_path = path
        logger.info("loaded IP-Adapter %s (%d cross-attention layers)", path or "state dict", len(layers))

    def _check_exact_mode(self, action: str) -> None:
        if self.fast_paths.backend == "openvino":
            raise ValueError(
                f"cannot {action}: IP-Adapter needs exact mode, and this pipeline runs on OpenVINO graphs (fast "
                "mode) that have no image branch; load the pipeline without fast=True / --fast"
            )

    def _ip_adapter_file(
        self, source: str | Path, subfolder: str | None, weight_name: str | None, hub_kwargs: dict
    ) -> Path:
        local = Path(source).expanduser()
        if local.exists() or not is_hub_id(str(source)):
            return find_ip_adapter_file(local / subfolder if subfolder else local, weight_name)
        return hub_file(str(source), weight_name or IP_WEIGHT_NAMES[0], subfolder=subfolder, **hub_kwargs)

    def _load_image_encoder(
        self, source: str | Path, subfolder: str | None, folder: str, hub_kwargs: dict
    ) -> nn.Module:
        """transformers' `CLIPVisionModelWithProjection` from a local folder or the hub, in the UNet's dtype/device."""
        from transformers import CLIPVisionModelWithProjection

        inner = folder if "/" in folder or not subfolder else f"{subfolder}/{folder}"
        local = Path(source).expanduser()
        if local.is_file():
            local = local.parent
        if local.is_dir():
            where = local / inner
            if not (where / "config.json").is_file():
                raise MissingModelFileError(
                    f"no image encoder here (no config.json); pass image_encoder_folder= (a folder inside "
                    f"{local}) or None and use ip_adapter_image_embeds=",
                    where,
                )
        else:
            config = hub_file(str(source), "config.json", subfolder=inner, **hub_kwargs)
            for name in ("model.safetensors", "pytorch_model.bin"):
                try:
                    hub_file(str(source), name, subfolder=inner, **hub_kwargs)
                    break
                except FileNotFoundError:
                    continue
            where = config.parent
        param = next(self.unet.parameters())
        encoder = CLIPVisionModelWithProjection.from_pretrained(where, dtype=param.dtype)
        return encoder.to(param.device).eval()

    def set_ip_adapter_scale(self, scale: float) -> None:
        """How strongly the image prompt acts: the image attention is added times `scale` (0 = off, exactly)."""
        if isinstance(scale, (list, dict)):
            raise ValueError(
                "set_ip_adapter_scale takes one number here (per-block scales are not supported)"
            )
        if isinstance(scale, bool) or not isinstance(scale, (int, float)) or scale != scale:
            raise ValueError(f"the IP-Adapter scale must be a number, got {scale!r}")
        if self.unet.image_proj is None:
            raise ValueError("no IP-Adapter is loaded: call load_ip_adapter first")
        for _, attn in cross_attentions(self.unet):
            attn.ip_scale = float(scale)

    def unload_ip_adapter(self) -> None:
        """Remove the adapter and the image encoder; the UNet computes exactly what it did before loading."""
        remove_ip_adapter(self.unet)
        self.image_encoder = None
        self._ip_adapter_file_path = None

    @property
    def ip_adapter_loaded(self) -> bool:
        return getattr(self.unet, "image_proj", None) is not None

    def encode_image(
        self, image: Any, device: torch.device, num_images_per_prompt: int, output_hidden_states: bool = False
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(embeds, unconditional embeds) of PIL images (or preprocessed pixels) from the image encoder, each
        repeated per prompt image; see `lcmkit.models.ip_adapter.encode_ip_image`."""
        if self.image_encoder is None:
            raise ValueError(
                "ip_adapter_image needs an image encoder: load_ip_adapter(..., image_encoder_folder=...) or pass "
                "ip_adapter_image_embeds="
            )
        param = next(self.image_encoder.parameters())
        if not isinstance(image, torch.Tensor):
            image = self._clip_processor()(image, return_tensors="pt").pixel_values
        pixels = image.to(device=device, dtype=param.dtype)
        embeds, uncond = encode_ip_image(self.image_encoder, pixels, output_hidden_states)
        return (
            embeds.repeat_interleave(num_images_per_prompt, dim=0),
            uncond.repeat_interleave(num_images_per_prompt, dim=0),
        )

    def _clip_processor(self) -> Any:
        """CLIP preprocessing at the encoder's size: shortest side resized (bicubic), center crop, CLIP mean/std."""
        from transformers import CLIPImageProcessor

        size = self.image_encoder.config.image_size
        return CLIPImageProcessor(size=size, crop_size=size)

    def prepare_ip_adapter_image_embeds(
        self,
        ip_adapter_image: Any,
        ip_adapter_image_embeds: list[torch.Tensor] | None,
        device: torch.device,
        num_images_per_prompt: int,
        do_classifier_free_guidance: bool,
    ) -> list[torch.Tensor]:
        """`[embeds]` for `added_cond_kwargs["image_embeds"]`, repeated to `num_images_per_prompt` rows (the
        whole batch), with the unconditional rows first when guidance runs (as diffusers builds them).

        `ip_adapter_image` is one image, or a one-entry list (one adapter) of an image or a list of images;
        `ip_adapter_image_embeds` a one-entry list of (1, N, D) tensors (2 rows, negative first, with guidance;
        with 1 row the plain adapter's negative is zeros, as encode_image makes it)."""
        projection = self.unet.image_proj
        if projection is None:
            raise ValueError("ip_adapter_image needs a loaded IP-Adapter: call load_ip_adapter first")
        if ip_adapter_image_embeds is None:
            images = ip_adapter_image if isinstance(ip_adapter_image, list) else [ip_adapter_image]
            if len(images) != 1:
                raise ValueError(
                    f"ip_adapter_image has {len(images)} entries for 1 IP-Adapter: pass one image, or [[img1, img2]] "
                    "for several images on the one adapter"
                )
            embeds, uncond = self.encode_image(images[0], device, 1, projection.uses_hidden_states)
            embeds, uncond = embeds[None], uncond[None]
        else:
            embeds, uncond = self._split_given_embeds(ip_adapter_image_embeds, do_classifier_free_guidance)
        embeds = torch.cat([embeds] * num_images_per_prompt, dim=0)
        if do_classifier_free_guidance:
            embeds = torch.cat([torch.cat([uncond] * num_images_per_prompt, dim=0), embeds], dim=0)
        return [embeds.to(device=device)]

    def _split_given_embeds(self, given: Any, cfg: bool) -> tuple[torch.Tensor, torch.Tensor | None]:
        if isinstance(given, torch.Tensor) or not isinstance(given, (list, tuple)) or len(given) != 1:
            raise ValueError(
                "ip_adapter_image_embeds must be a list with one tensor (lcmkit holds one IP-Adapter)"
            )
        embeds = given[0]
        ndim = 4 if self.unet.image_proj.uses_hidden_states else 3
        if not isinstance(embeds, torch.Tensor) or embeds.ndim != ndim or embeds.shape[0] not in (1, 2):
            shape = tuple(embeds.shape) if isinstance(embeds, torch.Tensor) else type(embeds).__name__
            raise ValueError(
                f"ip_adapter_image_embeds[0] must be a {ndim}-d tensor with 1 row (2 rows, negative first, when "
                f"guidance runs), got {shape}"
            )
        if embeds.shape[0] == 2:
            if not cfg:
                raise ValueError(
                    "ip_adapter_image_embeds[0] has 2 rows (negative, positive) but this call runs no classifier-free "
                    "guidance: pass the positive row only"
                )
            uncond, embeds = embeds.chunk(2)
            return embeds, uncond
        if cfg and self.unet.image_proj.uses_hidden_states:
            raise ValueError(
                "with classifier-free guidance this IP-Adapter needs ip_adapter_image_embeds[0] with 2 rows "
                "(the hidden states of an all-zero image first)"
            )
        return embeds, torch.zeros_like(embeds)
