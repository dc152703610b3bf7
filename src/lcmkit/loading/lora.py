"""LoRA files (kohya and PEFT/diffusers) on lcmkit's UNet and the CLIP text encoder, and the pipeline methods.

A LoRA (Hu et al., 2021) adds a low-rank update to a frozen layer; the layers themselves are in `lcmkit.nn.lora`.

Every foreign key name is translated here and nowhere else:
1. kohya / sd-scripts with diffusers module names: `lora_unet_<path with . as _>.lora_down.weight|lora_up.weight|alpha`,
   `lora_te_<path>` for the text encoder;
2. kohya with SGM/LDM block names (`input_blocks.4.1`, `middle_block`, `output_blocks`, `in_layers.2`, ...),
   derived from the UNet config;
3. PEFT / diffusers: `[unet.|text_encoder.]<path>.lora_A.weight|lora_B.weight` (alpha from `.alpha` keys, else from
   the file's diffusers metadata, else alpha = rank), and the older diffusers `lora.down/up` and attention-processor
   (`attn1.processor.to_q_lora.down.weight`) spellings.
"""

from __future__ import annotations

import json
import logging
import math
import re
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from lcmkit.io.errors import MissingModelFileError, ModelFileError, describe
from lcmkit.io.weights import check_finite, load_state_dict
from lcmkit.nn.lora import (  # re-exported: the adapter layer API is used through this module too
    LoraLayer,
    LoraWeights,
    check_adapter_name,
    inject_adapter,
    lora_layers,
    lora_parameters,
    remove_adapter,
    scale_lora,
    set_active_adapters,
    unload_adapters,
)

logger = logging.getLogger(__name__)

LORA_WEIGHT_NAMES = ("pytorch_lora_weights.safetensors", "pytorch_lora_weights.bin")
COMPONENTS = ("unet", "text_encoder")
METADATA_KEY = "lora_adapter_metadata"  # where diffusers' `save_lora_weights` writes the LoraConfig as JSON


def _sample(items: Sequence[str], n: int = 12) -> str:
    head = ", ".join(items[:n])
    return head + (f", ... ({len(items) - n} more)" if len(items) > n else "")


def lora_state_dict_kohya(
    unet: nn.Module, adapter_name: str, prefix: str = "lora_unet_"
) -> dict[str, torch.Tensor]:
    """One adapter as a kohya / sd-scripts state dict with diffusers module names (what LCM-LoRA files use):
    `lora_unet_<path>.lora_down.weight`, `.lora_up.weight`, `.alpha`. Tensors are detached CPU copies."""
    out = {}
    for name, layer in lora_layers(unet):
        if adapter_name not in layer.scales:
            continue
        key = prefix + name.replace(".", "_")
        out[f"{key}.lora_down.weight"] = layer.lora_down[adapter_name].detach().cpu().clone()
        out[f"{key}.lora_up.weight"] = layer.lora_up[adapter_name].detach().cpu().clone()
        out[f"{key}.alpha"] = torch.tensor(layer.alpha(adapter_name), dtype=torch.float32)
    if not out:
        present = sorted({n for _, layer in lora_layers(unet) for n in layer.scales})
        raise ValueError(f"no adapter named {adapter_name!r} in this model; it has {present}")
    return out


# ----------------------------------------------------------------------------------------------------------------------
# Key translation: every foreign name is mapped to a module path of our models here

_SGM_RESNET_LEAVES = {
    "conv1": "in_layers.2",
    "conv2": "out_layers.3",
    "conv_shortcut": "skip_connection",
    "time_emb_proj": "emb_layers.1",
}
_SGM_TOP = {
    "conv_in": "input_blocks.0.0",
    "time_embedding.linear_1": "time_embed.0",
    "time_embedding.linear_2": "time_embed.2",
    "conv_out": "out.2",
}


def sgm_block_names(config: Any) -> dict[str, str]:
    """diffusers block path -> SGM/LDM block path, for the UNet layout in `config`.

    The LDM UNet numbers its blocks in forward order: `input_blocks.0` is conv_in, then per level one entry per
    resnet (`.0`, with its transformer as `.1`) and one for the downsampler (`.0.op`); `middle_block.0/1/2` is
    resnet, transformer, resnet; `output_blocks` has `layers + 1` entries per stage, deepest first, with the
    upsampler after the resnet and transformer of the stage's last entry.
    """
    n = len(config.block_out_channels)
    blocks = {
        "mid_block.resnets.0": "middle_block.0",
        "mid_block.attentions.0": "middle_block.1",
        "mid_block.resnets.1": "middle_block.2",
    }
    i = 0
    for level in range(n):
        for j in range(config.layers_per_block[level]):
            i += 1
            blocks[f"down_blocks.{level}.resnets.{j}"] = f"input_blocks.{i}.0"
            if config.down_attention[level]:
                blocks[f"down_blocks.{level}.attentions.{j}"] = f"input_blocks.{i}.1"
        if level < n - 1:
            i += 1
            blocks[f"down_blocks.{level}.downsamplers.0.conv"] = f"input_blocks.{i}.0.op"
    i = 0
    for stage in range(n):
        has_attention = config.up_attention[stage]
        for j in range(config.layers_per_block[n - 1 - stage] + 1):
            blocks[f"up_blocks.{stage}.resnets.{j}"] = f"output_blocks.{i}.0"
            if has_attention:
                blocks[f"up_blocks.{stage}.attentions.{j}"] = f"output_blocks.{i}.1"
            i += 1
        if stage < n - 1:
            blocks[f"up_blocks.{stage}.upsamplers.0.conv"] = (
                f"output_blocks.{i - 1}.{2 if has_attention else 1}.conv"
            )
    return blocks


def _to_sgm(name: str, blocks: Mapping[str, str]) -> str | None:
    if name in _SGM_TOP:
        return _SGM_TOP[name]
    parts = name.split(".")
    for k in (5, 4, 3):
        prefix = ".".join(parts[:k])
        if prefix not in blocks:
            continue
        rest = ".".join(parts[k:])
        if ".resnets." in f".{prefix}":
            rest = _SGM_RESNET_LEAVES.get(rest, rest)
        return f"{blocks[prefix]}.{rest}" if rest else blocks[prefix]
    return None


def _module_names(component: str, model: nn.Module) -> dict[str, str]:
    """Every name a file may use for a LoRA-able module of `model` (dotted) -> the module's path in `model`."""
    names = {n: n for n, m in model.named_modules() if isinstance(m, (nn.Linear, nn.Conv2d, LoraLayer)) and n}
    if component == "text_encoder":
        # transformers 5 dropped CLIPTextModel's `text_model.` level; files (and 4.x models) keep it
        for n in list(names):
            names.setdefault(
                n.removeprefix("text_model.") if n.startswith("text_model.") else f"text_model.{n}", n
            )
    config = getattr(model, "config", None)
    if component == "unet" and hasattr(config, "layers_per_block") and hasattr(config, "down_attention"):
        blocks = sgm_block_names(config)
        names.update({sgm: n for n in list(names) if (sgm := _to_sgm(n, blocks)) is not None})
    return names


def _underscored(names: Mapping[str, str]) -> dict[str, str]:
    out: dict[str, str] = {}
    for alias, target in names.items():
        key = alias.replace(".", "_")
        if out.get(key, target) != target:
            raise AssertionError(f"two modules share the kohya name {key}")
        out[key] = target
    return out


_KOHYA_PREFIXES = {"lora_unet_": "unet", "lora_te_": "text_encoder", "lora_te1_": "text_encoder"}
_KOHYA_ROLES = {"lora_down.weight": "down", "lora_up.weight": "up", "alpha": "alpha"}
_PEFT = re.compile(r"^(?P<module>.+?)\.(?P<role>lora_A|lora_B)(?:\.[\w-]+)?\.weight$")
_DIFFUSERS_OLD = re.compile(r"^(?P<module>.+?)\.(?:lora|lora_linear_layer)\.(?P<role>down|up)\.weight$")
_PROCESSOR = re.compile(
    r"^(?P<module>.+?)(?:\.processor)?\.(?P<proj>to_q|to_k|to_v|to_out)_lora\.(?P<role>down|up)\.weight$"
)
_ALPHA = re.compile(r"^(?P<module>.+)\.alpha$")
_ROLE = {"lora_A": "down", "lora_B": "up", "down": "down", "up": "up"}
_PROCESSOR_PROJ = {
    "unet": {"to_q": "to_q", "to_k": "to_k", "to_v": "to_v", "to_out": "to_out.0"},
    "text_encoder": {"to_q": "q_proj", "to_k": "k_proj", "to_v": "v_proj", "to_out": "out_proj"},
}


def _parse_key(key: str) -> tuple[str, str | None, str, str] | None:
    """(format, component or None, module name as written, role) for one key, or None if it is not a LoRA key."""
    for prefix, component in _KOHYA_PREFIXES.items():
        if key.startswith(prefix):
            name, _, suffix = key[len(prefix) :].partition(".")
            return ("kohya", component, name, _KOHYA_ROLES[suffix]) if suffix in _KOHYA_ROLES else None
    component = None
    for c in COMPONENTS:
        if key.startswith(f"{c}."):
            component, key = c, key[len(c) + 1 :]
            break
    if m := _PEFT.match(key) or _DIFFUSERS_OLD.match(key):
        return "dotted", component, m["module"], _ROLE[m["role"]]
    if m := _PROCESSOR.match(key):
        return "processor", component, f"{m['module']}|{m['proj']}", _ROLE[m["role"]]
    if m := _ALPHA.match(key):
        return "dotted", component, m["module"], "alpha"
    return None


def _resolve(
    fmt: str, component: str | None, written: str, lookups: Mapping[str, Mapping[str, Mapping[str, str]]]
) -> tuple[str, str] | None:
    """(component, module path) that a key's module name refers to, or None."""
    candidates = [component] if component else [c for c in COMPONENTS if c in lookups]
    for c in candidates:
        if c not in lookups:
            continue
        if fmt == "kohya":
            target = lookups[c]["kohya"].get(written)
        elif fmt == "processor":
            module, proj = written.split("|")
            target = lookups[c]["dotted"].get(f"{module}.{_PROCESSOR_PROJ[c][proj]}")
        else:
            target = lookups[c]["dotted"].get(written)
        if target is not None:
            return c, target
    return None


def _metadata_alpha(metadata: Mapping[str, Any] | None, component: str, written: str) -> float | None:
    """alpha for one module from diffusers' saved LoraConfig (`lora_alpha`, `alpha_pattern`), if there is one."""
    if not metadata:
        return None
    scoped = {k[len(component) + 1 :]: v for k, v in metadata.items() if k.startswith(f"{component}.")}
    if not scoped and not any(k.startswith(tuple(f"{c}." for c in COMPONENTS)) for k in metadata):
        scoped = dict(metadata)
    if scoped.get("use_dora"):
        raise ValueError("DoRA adapters (use_dora=True in the file's metadata) are not supported")
    if scoped.get("use_rslora"):
        raise ValueError("rank-stabilised LoRA (use_rslora=True in the file's metadata) is not supported")
    for pattern, alpha in (scoped.get("alpha_pattern") or {}).items():
        if re.match(rf"(.*\.)?({pattern})$", written):  # PEFT's rule: the pattern matches a dotted suffix
            return float(alpha)
    alpha = scoped.get("lora_alpha")
    return float(alpha) if alpha is not None else None


def split_lora_state_dict(
    state_dict: Mapping[str, torch.Tensor],
    models: Mapping[str, nn.Module],
    metadata: Mapping[str, Any] | None = None,
) -> dict[str, dict[str, LoraWeights]]:
    """Translate a LoRA state dict (any supported format) to {component: {module path: LoraWeights}}.

    Raises ValueError naming every key that is not a LoRA key, or names no module of the given models, and
    every module that lacks its down or up tensor. The input is not modified.
    """
    lookups = {}
    for component, model in models.items():
        dotted = _module_names(component, model)
        lookups[component] = {"dotted": dotted, "kohya": _underscored(dotted)}
    grouped: dict[tuple[str, str], dict[str, tuple[str, torch.Tensor]]] = {}
    written_names: dict[tuple[str, str], str] = {}
    unknown, unmatched = [], []
    for key, tensor in state_dict.items():
        parsed = _parse_key(key)
        if parsed is None:
            unknown.append(key)
            continue
        fmt, component, written, role = parsed
        target = _resolve(fmt, component, written, lookups)
        if target is None:
            unmatched.append(key)
            continue
        grouped.setdefault(target, {})[role] = (key, tensor)
        written_names[target] = written
    problems = []
    if unknown:
        problems.append(f"{len(unknown)} keys are not LoRA weights of a known format: {_sample(unknown)}")
    if unmatched:
        problems.append(
            f"{len(unmatched)} keys name no Linear/Conv2d module of {sorted(models)}: {_sample(unmatched)}"
        )
    out: dict[str, dict[str, LoraWeights]] = {}
    for (component, module), parts in grouped.items():
        if "down" not in parts or "up" not in parts:
            have = ", ".join(key for key, _ in parts.values())
            problems.append(f"{component}.{module} needs both down and up weights; the file has only {have}")
            continue
        down, up = parts["down"][1], parts["up"][1]
        down, up = _match_layout(models[component].get_submodule(module), down, up)
        if "alpha" in parts:
            alpha = float(parts["alpha"][1])
        else:
            alpha = _metadata_alpha(metadata, component, written_names[(component, module)])
        out.setdefault(component, {})[module] = LoraWeights(
            down, up, alpha if alpha is not None else float(down.shape[0])
        )
    if problems:
        raise ValueError("cannot load this LoRA: " + "; ".join(problems))
    return out


def _match_layout(
    module: nn.Module, down: torch.Tensor, up: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Files store 1x1-conv LoRAs as 2-D or 4-D; give each the layout of the layer it lands on."""
    if module.weight.ndim == 4 and module.weight.shape[2:] == (1, 1) and down.ndim == 2 and up.ndim == 2:
        return down[:, :, None, None], up[:, :, None, None]
    if module.weight.ndim == 2 and down.ndim == 4 and down.shape[2:] == (1, 1) and up.shape[2:] == (1, 1):
        return down.flatten(1), up.flatten(1)
    return down, up


# ----------------------------------------------------------------------------------------------------------------------
# Reading files


def _read_metadata(path: Path) -> dict[str, Any] | None:
    """diffusers' LoraConfig saved as JSON in the safetensors metadata (`lora_adapter_metadata`), if present.

    Only this entry is read; kohya's `ss_*` entries are informational (kohya's and A1111's loaders take alpha
    from the `.alpha` tensors too), so whatever they hold never stops a file from loading.
    """
    if path.suffix != ".safetensors":
        return None
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            raw = (f.metadata() or {}).get(METADATA_KEY)
    except Exception as e:  # SafetensorError: a header the tensors could be read past, but not the metadata
        raise ModelFileError(f"the safetensors metadata cannot be read: {describe(e)}", path) from e
    if not raw:
        return None
    try:
        return json.loads(raw)
    except json.JSONDecodeError as e:
        raise ModelFileError(
            f"the `{METADATA_KEY}` metadata entry is not valid JSON ({e.msg} at column {e.colno}): {raw[:60]!r}",
            path,
        ) from None


def _check_metadata(metadata: Any, path: Path | None) -> None:
    """The LoraConfig values lcmkit reads (`lora_alpha`, `alpha_pattern`, per component or not) have usable types."""
    if metadata is None:
        return
    if not isinstance(metadata, Mapping):
        raise ModelFileError(
            f"the `{METADATA_KEY}` metadata must be a JSON object (a LoraConfig), got {_short(metadata)}",
            path,
        )
    for key, value in metadata.items():
        field = str(key).rpartition(".")[2]
        if field == "lora_alpha" and value is not None and not _is_number(value):
            raise ModelFileError(f"`{METADATA_KEY}`: `{key}` must be a number, got {_short(value)}", path)
        if field == "alpha_pattern" and value is not None:
            if not isinstance(value, Mapping):
                raise ModelFileError(
                    f"`{METADATA_KEY}`: `{key}` must map module patterns to numbers, got {_short(value)}",
                    path,
                )
            for pattern, alpha in value.items():
                if not _is_number(alpha):
                    raise ModelFileError(
                        f"`{METADATA_KEY}`: `{key}[{pattern!r}]` must be a number, got {_short(alpha)}", path
                    )
                try:
                    re.compile(rf"(.*\.)?({pattern})$")  # as _metadata_alpha uses it
                except re.error as e:
                    raise ModelFileError(
                        f"`{METADATA_KEY}`: `{key}` holds {pattern!r}, not a valid regular expression ({e})",
                        path,
                    ) from None


def _check_tensors(state_dict: Mapping[str, Any], path: Path | None) -> None:
    """Every value a tensor, every `.alpha` a single number, and no NaN or infinity anywhere."""
    for key, value in state_dict.items():
        if not isinstance(value, torch.Tensor):
            raise ModelFileError(f"LoRA key `{key}` holds a {type(value).__name__}, not a tensor", path)
        if key.endswith(".alpha") and value.numel() != 1:
            raise ModelFileError(
                f"LoRA key `{key}` must be a single number (the adapter's alpha), got shape {tuple(value.shape)}",
                path,
            )
    check_finite(state_dict.items(), path, "LoRA")


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _short(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def find_lora_file(path: str | Path, weight_name: str | None = None) -> Path:
    """A LoRA file: `path` itself, or in folder `path` the `weight_name`, the diffusers default name, or the
    folder's only `.safetensors` file."""
    path = Path(path).expanduser()
    if path.is_file():
        return path
    if not path.is_dir():
        raise MissingModelFileError(
            f"LoRA weights not found: {path} is neither a file nor a folder (hub ids are not fetched here; "
            "download the file and pass its path)",
            path,
        )
    names = [weight_name] if weight_name else list(LORA_WEIGHT_NAMES)
    for name in names:
        if (path / name).is_file():
            return path / name
    found = sorted(p.name for p in path.glob("*.safetensors"))
    if weight_name is None and len(found) == 1:
        return path / found[0]
    raise MissingModelFileError(
        f"no LoRA file {names} in {path}; it holds {found or 'no .safetensors files'} (pass weight_name=...)",
        path,
    )


def read_lora(
    source: str | Path | Mapping[str, torch.Tensor],
    weight_name: str | None = None,
    subfolder: str | None = None,
    metadata: Mapping[str, Any] | None = None,
) -> tuple[dict[str, torch.Tensor], dict[str, Any] | None]:
    """(state dict, diffusers LoRA metadata or None). A passed-in dict is shallow-copied, never modified.

    A file that is damaged, holds NaN/Inf values, a non-scalar alpha or unusable LoraConfig metadata raises a
    `ModelFileError` naming it (and the tensor key).
    """
    if isinstance(source, Mapping):
        state_dict, path = dict(source), None
        meta = dict(metadata) if metadata else None
    else:
        folder = Path(source) / subfolder if subfolder else Path(source)
        path = find_lora_file(folder, weight_name)
        state_dict = load_state_dict(path)
        meta = dict(metadata) if metadata else _read_metadata(path)
    _check_tensors(state_dict, path)
    _check_metadata(meta, None if metadata else path)
    return state_dict, meta


# ----------------------------------------------------------------------------------------------------------------------
# The pipeline mixin


class LoraLoaderMixin:
    """Pipeline methods for LoRA: load, weight, fuse, unfuse, unload (diffusers' `StableDiffusionLoraLoaderMixin`).

    The UNet honours `cross_attention_kwargs={"scale": s}`; for the text encoder wrap prompt encoding in
    `scale_lora(self.text_encoder, s)`.
    """

    _lora_loadable_modules = COMPONENTS

    def _lora_models(self, components: Sequence[str] = COMPONENTS) -> dict[str, nn.Module]:
        if isinstance(components, str):
            components = [components]
        bad = [c for c in components if c not in COMPONENTS]
        if bad:
            raise ValueError(f"unknown LoRA components {bad}; allowed: {list(COMPONENTS)}")
        return {c: m for c in components if isinstance(m := getattr(self, c, None), nn.Module)}

    def _check_loaded(self, names: Sequence[str], action: str) -> None:
        present = {n for per in self.get_list_adapters().values() for n in per}
        missing = [n for n in names if n not in present]
        if missing:
            raise ValueError(
                f"cannot {action} adapters {missing}: not loaded; loaded adapters: {sorted(present)}"
            )

    def load_lora_weights(
        self,
        pretrained_model_name_or_path_or_dict: str | Path | Mapping[str, torch.Tensor],
        adapter_name: str | None = None,
        weight_name: str | None = None,
        **kwargs: Any,
    ) -> None:
        """Add a LoRA (kohya, SGM-named kohya or PEFT/diffusers file, or a state dict) as adapter `adapter_name`.

        The new adapter becomes the only active one, as in diffusers; combine adapters with `set_adapters`.
        """
        subfolder = kwargs.pop("subfolder", None)
        metadata = kwargs.pop("metadata", None)
        if kwargs.pop("hotswap", False):
            raise ValueError("hotswap=True is not supported; delete_adapters() and load again")
        for ignored in ("low_cpu_mem_usage", "local_files_only", "use_safetensors"):
            kwargs.pop(ignored, None)
        if kwargs:
            raise TypeError(f"load_lora_weights got unexpected keyword arguments {sorted(kwargs)}")
        models = self._lora_models()
        existing = {n for names in self.get_list_adapters().values() for n in names}
        if adapter_name is None:
            i = len(existing)
            while f"default_{i}" in existing:
                i += 1
            adapter_name = f"default_{i}"
        check_adapter_name(adapter_name)
        if adapter_name in existing:
            raise ValueError(
                f"adapter name {adapter_name!r} is already in use; loaded adapters: {sorted(existing)}"
            )
        source = pretrained_model_name_or_path_or_dict
        path = None
        if not isinstance(source, Mapping):
            path = find_lora_file(Path(source) / subfolder if subfolder else Path(source), weight_name)
            source, weight_name, subfolder = path, None, None
        state_dict, meta = read_lora(source, weight_name, subfolder, metadata)
        try:
            per_component = split_lora_state_dict(state_dict, models, meta)
            if not per_component:
                raise ValueError("the LoRA state dict is empty: no weights to load")
        except ValueError as e:  # keys that fit no module of these models: name the file that holds them
            if path is None or isinstance(e, ModelFileError):
                raise
            raise ModelFileError(str(e), path) from None
        for component, layers in per_component.items():
            inject_adapter(models[component], adapter_name, layers)
            set_active_adapters(models[component], [adapter_name], [1.0])
        self.__dict__.setdefault("_lora_files", {})[adapter_name] = path
        logger.info(
            "loaded LoRA %r: %s",
            adapter_name,
            ", ".join(f"{len(layers)} {c} layers" for c, layers in per_component.items()),
        )

    def set_adapters(
        self,
        adapter_names: str | Sequence[str],
        adapter_weights: float | Mapping[str, float] | Sequence[float | Mapping[str, float]] | None = None,
    ) -> None:
        """Activate `adapter_names` with weights w (a number each, or {"unet": w, "text_encoder": w})."""
        names = [adapter_names] if isinstance(adapter_names, str) else list(adapter_names)
        if adapter_weights is None or not isinstance(adapter_weights, Sequence):
            adapter_weights = [1.0 if adapter_weights is None else adapter_weights] * len(names)
        weights = list(adapter_weights)
        if len(weights) != len(names):
            raise ValueError(f"{len(names)} adapter names but {len(weights)} adapter weights")
        self._check_loaded(names, "activate")
        listed = self.get_list_adapters()
        for component, model in self._lora_models().items():
            chosen, ws = [], []
            for name, w in zip(names, weights, strict=True):
                if isinstance(w, Mapping):
                    bad = [k for k in w if k not in COMPONENTS]
                    if bad:
                        raise ValueError(
                            f"adapter weight keys {bad} are not supported; use a number or a dict with keys "
                            f"{list(COMPONENTS)} (per-block weights are not implemented)"
                        )
                    w = w.get(component, 1.0)
                if name in listed.get(component, []):
                    chosen.append(name)
                    ws.append(float(w))
            set_active_adapters(model, chosen, ws)

    @property
    def lora_files(self) -> dict[str, Path | None]:
        """{adapter name: the file it was loaded from (None for a state dict passed in)} of the loaded adapters, in
        load order; what servers list (A1111's /sdapi/v1/loras)."""
        loaded = {n for names in self.get_list_adapters().values() for n in names}
        files = self.__dict__.get("_lora_files", {})
        return {name: path for name, path in files.items() if name in loaded}

    def get_active_adapters(self) -> list[str]:
        """Adapters in effect in any component, in activation order."""
        active: list[str] = []
        for model in self._lora_models().values():
            layer = next((layer for _, layer in lora_layers(model)), None)
            if layer is not None:
                active += [n for n in layer.active if n not in active]
        return active

    def get_list_adapters(self) -> dict[str, list[str]]:
        """{component: loaded adapter names}, only for components that hold any."""
        out = {}
        for component, model in self._lora_models().items():
            names: list[str] = []
            for _, layer in lora_layers(model):
                names += [n for n in layer.scales if n not in names]
            if names:
                out[component] = names
        return out

    def disable_lora(self) -> None:
        """Run without any adapter (fused adapters are unfused first, as PEFT does)."""
        for model in self._lora_models().values():
            for _, layer in lora_layers(model):
                if layer.fused:
                    logger.info("disable_lora(): unfusing %s", sorted(layer.fused))
                    layer.unfuse()
                layer.enabled = False

    def enable_lora(self) -> None:
        for model in self._lora_models().values():
            for _, layer in lora_layers(model):
                layer.enabled = True

    def delete_adapters(self, adapter_names: str | Sequence[str]) -> None:
        names = [adapter_names] if isinstance(adapter_names, str) else list(adapter_names)
        self._check_loaded(names, "delete")
        for model in self._lora_models().values():
            for name in names:
                remove_adapter(model, name)

    def fuse_lora(
        self,
        components: Sequence[str] = COMPONENTS,
        lora_scale: float = 1.0,
        safe_fusing: bool = False,
        adapter_names: Sequence[str] | None = None,
    ) -> None:
        """Merge adapters into the weights: W <- W + lora_scale * sum_i w_i * (alpha_i / r_i) * B_i @ A_i.

        `adapter_names=None` fuses the active adapters. Unlike diffusers, `lora_scale` does not stay applied to the
        adapters after `unfuse_lora()`.
        """
        if isinstance(components, (int, float)):
            raise TypeError("fuse_lora's first argument is `components`; pass the scale as lora_scale=...")
        if adapter_names is not None:
            adapter_names = [adapter_names] if isinstance(adapter_names, str) else list(adapter_names)
            self._check_loaded(adapter_names, "fuse")
        for model in self._lora_models(components).values():
            for _, layer in lora_layers(model):
                if layer.enabled:
                    layer.fuse(
                        adapter_names if adapter_names is not None else layer.active, lora_scale, safe_fusing
                    )

    def unfuse_lora(self, components: Sequence[str] = COMPONENTS) -> None:
        """Restore the weights saved before fusing, exactly."""
        for model in self._lora_models(components).values():
            for _, layer in lora_layers(model):
                layer.unfuse()

    def unload_lora_weights(self) -> None:
        """Remove every adapter and put the plain modules back (weights fused before stay fused)."""
        for model in self._lora_models().values():
            unload_adapters(model)

    @property
    def fused_loras(self) -> set[str]:
        return {
            n
            for model in self._lora_models().values()
            for _, layer in lora_layers(model)
            for n in layer.fused
        }

    @property
    def num_fused_loras(self) -> int:
        return len(self.fused_loras)


__all__ = [
    "LoraLayer",
    "LoraLoaderMixin",
    "LoraWeights",
    "inject_adapter",
    "lora_layers",
    "lora_parameters",
    "lora_state_dict_kohya",
    "scale_lora",
    "set_active_adapters",
]


# ----------------------------------------------------------------------------------------------
# Recognising the few-step adapters (for presets and their mismatch warnings)
# ----------------------------------------------------------------------------------------------

# LCM-LoRA, TCD, Hyper-SD, PCM and DMD2 files are ordinary LoRAs: same layers, same key layouts, and as published
# they carry no metadata entry that says which method trained them. So a file is recognised by the words its
# descriptive metadata (kohya's `ss_output_name` / `ss_training_comment`, the modelspec title and description)
# or, failing that, its file and folder name contain: a hint, not a proof. Order matters: "Hyper-SD" before
# "SD", "PCM"/"TCD" before "LCM".
_FAMILY_WORDS = (
    ("hyper-sd", re.compile(r"hyper[-_ ]?sd", re.I)),
    ("pcm", re.compile(r"(?<![a-z])pcm(?![a-z])", re.I)),
    ("tcd", re.compile(r"(?<![a-z])tcd(?![a-z])", re.I)),
    ("dmd2", re.compile(r"(?<![a-z])dmd2?(?![a-z])", re.I)),
    ("lcm", re.compile(r"(?<![a-z])lcm(?![a-z])", re.I)),
)
_STEPS_WORD = re.compile(r"(?<!\d)(\d{1,2})[-_ ]?steps?(?![a-z])", re.I)
_CFG_WORD = re.compile(r"(?<![a-z])cfg(?![a-z])", re.I)
_DESCRIPTIVE_METADATA = (
    "ss_output_name",
    "ss_training_comment",
    "modelspec.title",
    "modelspec.description",
    "modelspec.usage_hint",
    "name",
    "description",
)


def identify_lora(path: str | Path) -> dict[str, Any] | None:
    """Which few-step adapter a LoRA file looks like: {"family", "steps", "cfg", "evidence"}, or None.

    `family` is "lcm", "tcd", "hyper-sd" ("hyper-sd-cfg" for the CFG-preserving files), "pcm" or "dmd2";
    `steps` the step count named next to it ("Hyper-SD15-4steps-lora" -> 4) or None; `evidence` names the
    metadata key or says "file name" (a weaker hint: a renamed file is not recognised, or wrongly).
    """
    path = Path(path)
    texts: list[tuple[str, str]] = []
    if path.is_file() and path.suffix == ".safetensors":
        from safetensors import safe_open

        try:
            with safe_open(str(path), framework="pt") as f:
                meta = f.metadata() or {}
        except Exception as e:  # SafetensorError: a damaged header
            raise ModelFileError(f"the safetensors metadata cannot be read: {describe(e)}", path) from e
        texts += [(f"metadata {key}", str(meta[key])) for key in _DESCRIPTIVE_METADATA if meta.get(key)]
    # The last few path parts: a hub cache keeps the repo name (models--h1t--TCD-SD15) above the snapshot hash.
    texts.append(("file name", "/".join(path.parts[-4:])))
    for evidence, text in texts:
        for family, word in _FAMILY_WORDS:
            if word.search(text):
                steps = _STEPS_WORD.search(text)
                cfg = bool(_CFG_WORD.search(text)) and "smallcfg" not in text.lower()
                if family == "hyper-sd" and cfg:
                    family = "hyper-sd-cfg"
                return {
                    "family": family,
                    "steps": int(steps.group(1)) if steps else None,
                    "cfg": cfg,
                    "evidence": evidence,
                }
    return None
