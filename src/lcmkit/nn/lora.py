"""LoRA layers: a low-rank update on a frozen Linear or Conv2d, several named adapters per layer.

For a linear layer `y = W x + b + w * (alpha / r) * B (A x)`, with `A` (`down`, r x in) and `B` (`up`, out x r).
For a convolution, `A` is a conv with the base conv's kernel, stride and padding and r output channels, and `B` a
1x1 conv. `w` is the per-adapter weight chosen with `set_adapters`; a call-time factor multiplies all of them.
Adapter tensors are parameters (optimisers and `.to()` see them) but stay out of `state_dict()`, so a model with
adapters still saves and loads its original keys. Reading LoRA files lives in `lcmkit.loading.lora`.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

# ----------------------------------------------------------------------------------------------------------------------
# The wrapped layer


class _NotSaved(nn.Module):
    """Adapter tensors by adapter name: moved by `.to()` and seen by `parameters()` (optimizers, DDP), but absent from
    the model's state dict, so `save_pretrained` writes exactly the original checkpoint keys and strict loading of
    those keys still works. Stored in `_parameters` directly so that any adapter name (even "train") is allowed."""

    def __getitem__(self, name: str) -> nn.Parameter:
        return self._parameters[name]

    def __setitem__(self, name: str, value: nn.Parameter) -> None:
        self._parameters[name] = value

    def __delitem__(self, name: str) -> None:
        del self._parameters[name]

    def __contains__(self, name: object) -> bool:
        return name in self._parameters

    def _save_to_state_dict(self, destination: dict, prefix: str, keep_vars: bool) -> None:
        pass

    def _load_from_state_dict(self, *args: Any, **kwargs: Any) -> None:
        pass


@dataclass
class LoraWeights:
    """One adapter's tensors for one layer: `down` (A), `up` (B) and `alpha` (scale = alpha / rank)."""

    down: torch.Tensor
    up: torch.Tensor
    alpha: float

    @property
    def rank(self) -> int:
        return self.down.shape[0]


class LoraLayer(nn.Module):
    """An `nn.Linear` or `nn.Conv2d` plus named low-rank adapters.

    The base layer's `weight` and `bias` are registered on the wrapper under the same names, so the model's state
    dict keys do not change; the base module itself is kept outside the module tree (`self.base`) so that unloading
    can put it back.
    """

    def __init__(self, base: nn.Linear | nn.Conv2d) -> None:
        super().__init__()
        if isinstance(base, nn.Conv2d) and (base.groups != 1 or base.padding_mode != "zeros"):
            raise ValueError(
                f"LoRA on a Conv2d needs groups=1 and zero padding; got groups={base.groups}, "
                f"padding_mode={base.padding_mode!r}"
            )
        self.weight = base.weight
        self.register_parameter("bias", base.bias)
        self.lora_down = _NotSaved()
        self.lora_up = _NotSaved()
        self.register_buffer("original_weight", None, persistent=False)  # set while any adapter is fused
        self.scales: dict[str, float] = {}  # alpha / r per adapter
        self.adapter_weights: dict[str, float] = {}  # w per adapter, from set_adapters
        self.active: list[str] = []
        self.fused: dict[str, float] = {}  # adapter -> coefficient merged into `weight`
        self.enabled = True
        self.call_scale = 1.0  # cross_attention_kwargs["scale"], only during a call
        object.__setattr__(
            self, "base", base
        )  # not a child module: its parameters are registered above instead

    def __getattr__(self, name: str) -> Any:
        try:
            return super().__getattr__(name)
        except AttributeError:
            base = self.__dict__.get("base")
            if base is None:
                raise
            return getattr(base, name)  # in_features, kernel_size, stride, ...

    @property
    def is_conv(self) -> bool:
        return isinstance(self.base, nn.Conv2d)

    def add_adapter(self, name: str, lora: LoraWeights, trainable: bool = False) -> None:
        ref = self.weight
        for store, tensor in ((self.lora_down, lora.down), (self.lora_up, lora.up)):
            # a copy: the caller's tensors must not change when the adapter is trained or the model is cast
            copied = tensor.detach().to(ref.device, ref.dtype, copy=True).contiguous()
            store[name] = nn.Parameter(copied, requires_grad=trainable)
        self.scales[name] = lora.alpha / lora.rank
        self.adapter_weights[name] = 1.0

    def remove_adapter(self, name: str) -> None:
        for store in (self.lora_down, self.lora_up, self.scales, self.adapter_weights):
            del store[name]
        self.active = [n for n in self.active if n != name]

    def alpha(self, name: str) -> float:
        return self.scales[name] * self.lora_down[name].shape[0]

    def delta_weight(self, name: str) -> torch.Tensor:
        """`B @ A` in float32 with the base weight's shape (for a conv: kernel[o, i] = sum_r B[o, r] A[r, i])."""
        down, up = self.lora_down[name].float(), self.lora_up[name].float()
        if down.ndim == 2:
            return up @ down
        return torch.einsum("or,rikl->oikl", up.flatten(1), down)

    def lora_path(self, x: torch.Tensor, name: str) -> torch.Tensor:
        """Adapter `name`'s low-rank product on `x` (unscaled): down, then up."""
        down, up = self.lora_down[name], self.lora_up[name]
        if self.is_conv:
            b = self.base
            h = F.conv2d(x, down, None, b.stride, b.padding, b.dilation)
            return F.conv2d(h, up)
        return F.linear(F.linear(x, down), up)

    def coefficients(self) -> dict[str, float]:
        """The unfused adapters a call adds now, each with its coefficient (none while disabled): the layer's
        output is the base product plus `lora_path(x, name) * coefficient` for each."""
        if not self.enabled:
            return {}
        coeffs = {}
        for name in self.active:
            if name in self.fused or name not in self.scales:
                continue
            coeff = self.adapter_weights[name] * self.scales[name] * self.call_scale
            if coeff != 0.0:
                coeffs[name] = coeff
        return coeffs

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.is_conv and self.base.weight is self.weight and self.base.bias is self.bias:
            out = self.base(x)  # the base layer's own forward: lcmkit's Conv2d packs its weight for inference
        elif self.is_conv:
            out = self.base._conv_forward(x, self.weight, self.bias)
        else:
            out = F.linear(x, self.weight, self.bias)
        for name, coeff in self.coefficients().items():
            out = out + self.lora_path(x, name) * coeff
        return out

    def fuse(self, names: Sequence[str], lora_scale: float, safe: bool = False) -> None:
        """W <- W + lora_scale * sum_i w_i * (alpha_i / r_i) * B_i @ A_i, keeping a copy of W for `unfuse`."""
        names = [n for n in names if n in self.scales and n not in self.fused]
        if not names:
            return
        coeffs = {n: lora_scale * self.adapter_weights[n] * self.scales[n] for n in names}
        delta = sum(c * self.delta_weight(n) for n, c in coeffs.items())
        fused = self.weight.detach().float() + delta
        if safe and not torch.isfinite(fused).all():
            raise ValueError(f"fusing LoRA adapters {names} gives non-finite weights; the adapter is broken")
        if self.original_weight is None:
            self.original_weight = self.weight.detach().clone()
        with torch.no_grad():
            self.weight.copy_(fused.to(self.weight.dtype))
        self.fused.update(coeffs)

    def unfuse(self) -> None:
        """Put back the weight saved before the first fuse (exact, not a subtraction)."""
        if self.original_weight is None:
            return
        with torch.no_grad():
            self.weight.copy_(self.original_weight)
        self.original_weight = None
        self.fused = {}

    def unwrap(self) -> nn.Module:
        """The plain base module, carrying the current weight (fused adapters stay fused, as in diffusers)."""
        base = self.base
        base.weight = self.weight
        base.bias = self.bias
        return base

    def extra_repr(self) -> str:
        kind = "Conv2d" if self.is_conv else "Linear"
        return f"{kind}{tuple(self.weight.shape)}, adapters={list(self.scales)}, active={self.active}"


# ----------------------------------------------------------------------------------------------------------------------
# Model-level operations (a UNet or a text encoder)


def lora_layers(model: nn.Module | None) -> Iterator[tuple[str, LoraLayer]]:
    if model is None:
        return
    for name, module in model.named_modules():
        if isinstance(module, LoraLayer):
            yield name, module


def _set_submodule(model: nn.Module, name: str, module: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent_name) if parent_name else model, child, module)


def check_adapter_name(name: str) -> None:
    if not isinstance(name, str) or not name or "." in name:
        raise ValueError(f"adapter name must be a non-empty str without '.', got {name!r}")


def inject_adapter(
    model: nn.Module, adapter_name: str, layers: Mapping[str, LoraWeights], trainable: bool = False
) -> None:
    """Add adapter `adapter_name` to the named `nn.Linear`/`nn.Conv2d` modules of `model`, wrapping them in place.

    Shapes are checked first, so a bad entry leaves the model untouched. `trainable=True` makes the adapter's
    tensors require grad (the distillation trainer uses this); `lora_parameters` returns them.
    """
    check_adapter_name(adapter_name)
    targets = {}
    for name, lora in layers.items():
        module = model.get_submodule(name)
        if not isinstance(module, (nn.Linear, nn.Conv2d, LoraLayer)):
            raise ValueError(f"LoRA target {name!r} is a {type(module).__name__}, not a Linear or Conv2d")
        if isinstance(module, LoraLayer) and adapter_name in module.scales:
            raise ValueError(f"{name!r} already has an adapter named {adapter_name!r}")
        _check_shapes(name, module, lora)
        targets[name] = module
    current = next(
        (layer for _, layer in lora_layers(model)), None
    )  # new layers join the model's current state
    for name, module in targets.items():
        if not isinstance(module, LoraLayer):
            module = LoraLayer(module)
            if current is not None:
                module.enabled, module.active = current.enabled, list(current.active)
            _set_submodule(model, name, module)
        module.add_adapter(adapter_name, layers[name], trainable=trainable)


def _expected_shapes(module: nn.Module, rank: int) -> tuple[tuple[int, ...], tuple[int, ...]]:
    weight = module.weight
    if weight.ndim == 4:
        return (rank, weight.shape[1], *weight.shape[2:]), (weight.shape[0], rank, 1, 1)
    return (rank, weight.shape[1]), (weight.shape[0], rank)


def _check_shapes(name: str, module: nn.Module, lora: LoraWeights) -> None:
    down_shape, up_shape = _expected_shapes(module, lora.rank)
    if tuple(lora.down.shape) != down_shape or tuple(lora.up.shape) != up_shape:
        raise ValueError(
            f"LoRA for {name!r} has down {tuple(lora.down.shape)} / up {tuple(lora.up.shape)}, but the layer "
            f"{tuple(module.weight.shape)} needs down {down_shape} / up {up_shape}"
        )


def lora_parameters(model: nn.Module, adapter_name: str) -> list[nn.Parameter]:
    """The down and up tensors of one adapter, e.g. for an optimizer."""
    params = []
    for _, layer in lora_layers(model):
        if adapter_name in layer.scales:
            params += [layer.lora_down[adapter_name], layer.lora_up[adapter_name]]
    return params


def set_active_adapters(model: nn.Module, names: Sequence[str], weights: Sequence[float]) -> None:
    """Make `names` (with per-adapter weights w) the adapters every layer of `model` applies."""
    for _, layer in lora_layers(model):
        layer.active = list(names)
        for name, w in zip(names, weights, strict=True):
            if name in layer.adapter_weights:
                layer.adapter_weights[name] = float(w)


def remove_adapter(model: nn.Module, adapter_name: str) -> None:
    """Delete one adapter; layers left without adapters become their plain base modules again."""
    for name, layer in list(lora_layers(model)):
        if adapter_name not in layer.scales:
            continue
        if adapter_name in layer.fused:
            raise ValueError(f"adapter {adapter_name!r} is fused into {name!r}; call unfuse_lora() first")
        layer.remove_adapter(adapter_name)
        if not layer.scales:
            layer.unfuse()
            _set_submodule(model, name, layer.unwrap())


def unload_adapters(model: nn.Module) -> None:
    """Every LoRA layer back to its plain module. Fused adapters stay in the weights (diffusers does the same)."""
    for name, layer in list(lora_layers(model)):
        _set_submodule(model, name, layer.unwrap())


@contextmanager
def scale_lora(model: nn.Module | None, scale: float | None) -> Iterator[None]:
    """Multiply every adapter of `model` by `scale` inside the block (`cross_attention_kwargs={"scale": s}`)."""
    layers = [layer for _, layer in lora_layers(model)] if scale is not None and scale != 1.0 else []
    saved = [layer.call_scale for layer in layers]
    for layer in layers:
        layer.call_scale = layer.call_scale * scale
    try:
        yield
    finally:
        for layer, value in zip(layers, saved, strict=True):
            layer.call_scale = value
