"""A pipeline's components: holding, loading and saving them, moving them, and the switches that reach them
(progress bar, FreeU, VAE slicing and tiling, fast paths). `LCMPipelineBase` (common.py) adds what a call does."""

from __future__ import annotations

import logging
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from lcmkit.accel.fast import enable_fast
from lcmkit.io.paging import release_weight_pages
from lcmkit.loading.controlnet import check_controlnet_fits, load_controlnet
from lcmkit.loading.folders import load_components, save_components
from lcmkit.loading.hub import resolve_pretrained
from lcmkit.models.controlnet import ControlNetModel
from lcmkit.nn.conv import Prepack, Winograd
from lcmkit.nn.paths import apply_fast_paths
from lcmkit.pipelines.control import as_net_list
from lcmkit.runtime import FastPaths

logger = logging.getLogger(__name__)

HUB_KWARGS = ("cache_dir", "local_files_only", "revision", "token", "force_download", "subfolder")


class PipelineComponents:
    """The models, tokenizer, scheduler and safety checker of an LCM pipeline, as diffusers names them."""

    _optional_components = ["safety_checker", "feature_extractor", "image_encoder"]
    model_cpu_offload_seq = "text_encoder->unet->vae"
    pipeline_class_name = "LatentConsistencyModelPipeline"

    def __init__(
        self,
        vae: Any,
        text_encoder: Any,
        tokenizer: Any,
        unet: Any,
        scheduler: Any,
        safety_checker: Any = None,
        feature_extractor: Any = None,
        image_encoder: Any = None,
        requires_safety_checker: bool = True,
        controlnet: Any = None,
    ) -> None:
        self.vae = vae
        self.text_encoder = text_encoder
        self.tokenizer = tokenizer
        self.unet = unet
        self.scheduler = scheduler
        self.safety_checker = safety_checker
        self.feature_extractor = feature_extractor
        self.image_encoder = image_encoder
        self.requires_safety_checker = requires_safety_checker
        if safety_checker is None and requires_safety_checker:
            logger.warning(
                "%s was built without a safety checker; images will not be screened for NSFW content.",
                type(self).__name__,
            )
        if safety_checker is not None and feature_extractor is None:
            raise ValueError(
                "a safety_checker needs a feature_extractor (CLIPImageProcessor) to prepare its input; pass one, "
                "or pass safety_checker=None"
            )
        self._progress_bar_config: dict[str, Any] = {}
        self._fast_paths = FastPaths.default()
        self.fast_mode = None  # what `lcmkit.accel.enable_fast` installed, once backend "openvino" is set
        self._controlnets: list[ControlNetModel] = []
        self._controlnet_list = False
        self.controlnet = controlnet

    @property
    def controlnet(self) -> ControlNetModel | list[ControlNetModel] | None:
        """The ControlNet (or the list of them) every call uses; None: no ControlNet. Setting it checks that each
        net fits the UNet (a ModelFileError names the file of one that does not, and nothing changes)."""
        nets = self._controlnets
        return None if not nets else nets[0] if len(nets) == 1 and not self._controlnet_list else list(nets)

    @controlnet.setter
    def controlnet(self, value: ControlNetModel | list[ControlNetModel] | None) -> None:
        nets = as_net_list(value)
        for net in nets:
            check_controlnet_fits(net, self.unet)
        self._controlnets = nets
        self._controlnet_list = isinstance(value, (list, tuple))
        for net in nets:
            if self._fast_paths.backend != "openvino":
                net.set_fast_paths(self._fast_paths)

    # ------------------------------------------------------------------------------------------------------------------
    # Components, loading, saving, devices

    @property
    def components(self) -> dict[str, Any]:
        return {
            "vae": self.vae,
            "text_encoder": self.text_encoder,
            "tokenizer": self.tokenizer,
            "unet": self.unet,
            "scheduler": self.scheduler,
            "safety_checker": self.safety_checker,
            "feature_extractor": self.feature_extractor,
            "image_encoder": self.image_encoder,
        }

    @classmethod
    def from_pretrained(
        cls,
        pretrained_model_name_or_path: str | Path,
        torch_dtype: torch.dtype | None = None,
        variant: str | None = None,
        requires_safety_checker: bool | None = None,
        dtype: torch.dtype | None = None,
        fast_paths: FastPaths | None = None,
        fast: bool = False,
        **components: Any,
    ) -> PipelineComponents:
        """Load a diffusers-layout folder. Keyword components (`scheduler=...`, `safety_checker=None`) replace the folder's.

        `controlnet=` takes ControlNetModels or their sources (folders, single files, hub ids; a list for
        several). `dtype` is accepted as a synonym of `torch_dtype` (newer diffusers spell it that way). `fast_paths`
        (`lcmkit.runtime.FastPaths`, default `FastPaths.default()`) picks the fast paths the models take;
        `fast=True` is `fast_paths=FastPaths.fast()`, the OpenVINO fast mode.
        """
        fast_paths = FastPaths.chosen(fast, fast_paths)
        torch_dtype = torch_dtype or dtype
        controlnet = components.pop("controlnet", None)
        if isinstance(controlnet, (str, Path)) or (
            isinstance(controlnet, (list, tuple)) and any(isinstance(c, (str, Path)) for c in controlnet)
        ):  # folders, single files or hub ids: loaded here, in the pipeline's dtype
            sources = controlnet if isinstance(controlnet, (list, tuple)) else [controlnet]
            loaded_nets = [load_controlnet(c, torch_dtype=torch_dtype) for c in sources]
            controlnet = loaded_nets if isinstance(controlnet, (list, tuple)) else loaded_nets[0]
        hub_kwargs = {k: components.pop(k) for k in HUB_KWARGS if k in components}
        # components the caller supplies (or disables with None) are not downloaded
        folder = resolve_pretrained(
            pretrained_model_name_or_path, variant=variant, skip_components=tuple(components), **hub_kwargs
        )
        loaded, index = load_components(folder, torch_dtype, variant, components)
        if requires_safety_checker is None:
            requires_safety_checker = bool(index.get("requires_safety_checker", True))
        pipe = cls(**loaded, requires_safety_checker=requires_safety_checker, controlnet=controlnet)
        if fast_paths is not None:
            pipe.set_fast_paths(fast_paths)
        return pipe

    @classmethod
    def from_pipe(cls, pipe: PipelineComponents, **overrides: Any) -> PipelineComponents:
        """Build this pipeline kind from another one's components (and its ControlNets), without copying weights;
        the models keep the fast paths they run, and the new pipeline reports the same `fast_paths`."""
        comps = {**pipe.components, "controlnet": pipe.controlnet, **overrides}
        new = cls(**comps, requires_safety_checker=pipe.requires_safety_checker)
        new._fast_paths = pipe.fast_paths
        return new

    def save_pretrained(self, save_directory: str | Path, safe_serialization: bool = True) -> None:
        """Write a diffusers-layout folder (safetensors weights) that diffusers and lcmkit both load."""
        if not safe_serialization:
            raise ValueError("lcmkit writes safetensors only; pickled .bin weights are not written")
        if getattr(self.unet, "image_proj", None) is not None:
            raise ValueError("an IP-Adapter is loaded: unload_ip_adapter() before save_pretrained (a diffusers UNet "
                             "folder has no place for its weights)")  # fmt: skip
        save_components(
            self.components,
            save_directory,
            self.pipeline_class_name,
            extra={"requires_safety_checker": self.requires_safety_checker},
        )

    def _modules(self) -> list[torch.nn.Module]:
        return [
            m
            for m in (
                self.unet,
                self.vae,
                self.text_encoder,
                self.safety_checker,
                self.image_encoder,
                *self._controlnets,
            )
            if isinstance(m, torch.nn.Module)
        ]

    def to(self, *args: Any, **kwargs: Any) -> PipelineComponents:
        """Move every model, like `torch.nn.Module.to` (`pipe.to("cuda")`, `pipe.to(torch.float16)`, both)."""
        for module in self._modules():
            module.to(*args, **kwargs)
        return self

    @property
    def device(self) -> torch.device:
        return self.unet.device

    @property
    def dtype(self) -> torch.dtype:
        return self.unet.dtype

    @property
    def vae_scale_factor(self) -> int:
        return 2 ** (len(self.vae.config.block_out_channels) - 1) if self.vae is not None else 8

    # ------------------------------------------------------------------------------------------------------------------
    # Switches

    def set_progress_bar_config(self, **kwargs: Any) -> None:
        """tqdm options for the step bar, e.g. `disable=True`."""
        self._progress_bar_config = kwargs

    def progress_bar(self, iterable: Any = None, total: int | None = None) -> tqdm:
        return tqdm(iterable, total=total, **self._progress_bar_config)

    def enable_freeu(self, s1: float, s2: float, b1: float, b2: float) -> None:
        """FreeU (Si et al., 2023) on the first two up stages; see the UNet for the arithmetic."""
        if self.unet is None:
            raise ValueError("The pipeline must have `unet` for using FreeU.")
        self.unet.enable_freeu(s1=s1, s2=s2, b1=b1, b2=b2)

    def disable_freeu(self) -> None:
        self.unet.disable_freeu()

    def enable_vae_slicing(self) -> None:
        """Decode one image at a time. Alias of `pipe.vae.enable_slicing()` (the diffusers <= 0.39 pipeline API)."""
        self.vae.enable_slicing()

    def disable_vae_slicing(self) -> None:
        self.vae.disable_slicing()

    # ------------------------------------------------------------------------------------------------------------------
    # Fast paths (lcmkit.runtime.FastPaths); the older switches below build a new FastPaths

    @property
    def fast_paths(self) -> FastPaths:
        """The fast paths the last `set_fast_paths` (or `from_pretrained(fast_paths=...)`) applied."""
        return self._fast_paths

    def set_fast_paths(self, fast_paths: FastPaths) -> None:
        """Apply `fast_paths` to the UNet and the VAE (where they are torch modules: an OpenVINO stand-in is not)
        and to the pipeline's weight paging. `FastPaths.reference()` gives the reference arithmetic in one call;
        backend "openvino" (`FastPaths.fast()`) hands the text encoder, UNet and VAE decoder to
        `lcmkit.accel.enable_fast` (compiled for the model's default size; other sizes compile on first use)."""
        if not isinstance(fast_paths, FastPaths):
            raise TypeError(
                f"set_fast_paths takes a lcmkit.runtime.FastPaths, got {type(fast_paths).__name__}"
            )
        if self._fast_paths.backend == "openvino" and fast_paths.backend != "openvino":
            raise ValueError(
                f"backend={fast_paths.backend!r}: this pipeline's models were replaced by OpenVINO graphs "
                "(backend 'openvino'); load the pipeline again to run it in torch"
            )
        for model in (self.unet, self.vae, *self._controlnets):
            if hasattr(model, "set_fast_paths"):
                model.set_fast_paths(fast_paths)
            elif isinstance(model, torch.nn.Module):  # e.g. AutoencoderTiny: its convolutions, if any
                apply_fast_paths(model, fast_paths, fast_paths.vae_subpixel)
        if fast_paths.backend == "openvino" and self._fast_paths.backend != "openvino":
            self.fast_mode = enable_fast(self)
        self._fast_paths = fast_paths

    def enable_weight_paging(self) -> None:
        """`FastPaths.weight_paging = True` (the default): release each model's memory-mapped weight pages after
        its stage of a call, so the peak resident memory is the largest stage rather than all weights plus the
        decode. Released pages stay in the OS page cache; only unmodified file pages are released
        (`lcmkit.io.paging`)."""
        self.set_fast_paths(replace(self._fast_paths, weight_paging=True))

    def disable_weight_paging(self) -> None:
        """`FastPaths.weight_paging = False`: keep every model's weights resident between stages and calls."""
        self.set_fast_paths(replace(self._fast_paths, weight_paging=False))

    @property
    def weight_paging(self) -> bool:
        return self._fast_paths.weight_paging

    def set_conv_prepacking(self, mode: Prepack) -> None:
        """`FastPaths.conv_prepack = mode` for the UNet's and VAE's 3x3 convolutions: "auto" (the default) packs
        memory-mapped weights, "always" in-memory ones too, "off" none. As before, "off" also turns off
        `residual_into_conv` (plain `F.conv2d` everywhere) and the other modes turn it on."""
        self.set_fast_paths(replace(self._fast_paths, conv_prepack=mode, residual_into_conv=mode != "off"))

    def set_conv_winograd(self, mode: Winograd) -> None:
        """`FastPaths.conv_winograd = mode`: where the 3x3 convolutions take NNPACK's Winograd path ("auto": large
        maps with many channels, on the CPU in float32; "always"; "off"). It rounds differently (~1e-5 relative)."""
        self.set_fast_paths(replace(self._fast_paths, conv_winograd=mode))

    def _page_out(self, *modules: Any) -> None:
        if self._fast_paths.weight_paging:
            release_weight_pages(*modules)

    def enable_vae_tiling(self) -> None:
        """Encode/decode in overlapping tiles. Alias of `pipe.vae.enable_tiling()`."""
        self.vae.enable_tiling()

    def disable_vae_tiling(self) -> None:
        self.vae.disable_tiling()
