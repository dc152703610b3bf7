"""OpenVINO fast mode for the UNet: convert once, then run the compiled graph on the CPU in place of `pipe.unet`.

Why: on x86 CPUs OpenVINO's fused kernels run our fp32 UNet faster than eager PyTorch, and with int8 (NNCF
post-training quantization) it can use VNNI int8 dot products. See `benchmarks/bench_openvino_unet.py` for the
measured ratios and output differences.

What is baked into the graph, and so fixed after conversion:
- the input shapes (batch, latent size, text length): the LCM pipeline's shapes are known ahead of a call, and
  static shapes let OpenVINO pick its fastest kernels. A call whose batch is a multiple of the compiled batch
  (classifier-free guidance doubles it) runs as several compiled calls;
- the weights, including any LoRA adapters at their current weights: a per-call LoRA `scale` cannot apply;
- FreeU: it must be off at conversion (its FFT does not convert), and cannot be turned on afterwards.

Precisions (`precision=`):
- "fp32": the same arithmetic as eager up to rounding (max abs diff ~1e-6 on random weights).
- "fp16-weights": the IR stores the weights as float16 (half the file, half the compiled blob); OpenVINO widens
  them for its arithmetic. What the fast mode's bf16 precision uses: bf16 arithmetic rounds the weights further.
- "int8-weights": NNCF `compress_weights` INT8_ASYM; weights stored as int8 (4x smaller), activations stay float.
- "int8-hybrid": int8 weights for every MatMul, full int8 (weights and activations) for convolutions: the
  scheme optimum-intel applies to diffusion UNets; the attention and feed-forward activations stay float.
- "int8": NNCF `quantize` (transformer model type, SmoothQuant, no bias correction) on every layer it supports,
  the recipe of OpenVINO's own LCM notebook (LCM-Dreamshaper-v7, 200 calibration calls); fastest.
Both activation-quantizing modes need `calibration`: real UNet inputs, as `collect_unet_inputs` records them.

The conversion, cache (IR files named by a digest of the weights) and quantization helpers live in
`lcmkit.accel.graphs`, shared with the VAE decoder and the whole-pipeline fast mode (`lcmkit.accel.fast`).

`openvino` and `nncf` are imported only here, only when called: `pip install openvino nncf`.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from lcmkit.accel.graphs import (  # re-exported
    DATA_FREE_PRECISIONS,
    INSTALL_HINT,
    NEEDS_CALIBRATION,
    NEEDS_NNCF,
    PRECISIONS,
    Float32OnCPU,
    GraphSource,
    LazyCalibration,
    check_threads,
    compile_graph,
    import_nncf,
    import_openvino,
    load_or_build,
    to_numpy,
)
from lcmkit.models.unet import UNet2DConditionOutput

logger = logging.getLogger(__name__)

__all__ = [
    "DATA_FREE_PRECISIONS",
    "INSTALL_HINT",
    "NEEDS_CALIBRATION",
    "PRECISIONS",
    "OpenVINOStandIn",
    "OpenVINOUNet",
    "LazyUNetInputs",
    "UNetInputs",
    "check_unet",
    "collect_unet_inputs",
    "record_unet_inputs",
    "openvino_unet",
    "timestep_vector",
    "unet_input_shapes",
    "unet_source",
]


@dataclass
class UNetInputs:
    """One recorded UNet call: what the pipeline passed, with the timestep as float32 of shape (batch,)."""

    sample: torch.Tensor
    timestep: torch.Tensor
    encoder_hidden_states: torch.Tensor
    timestep_cond: torch.Tensor | None = None

    def run(self, unet: Any, **kwargs: Any) -> torch.Tensor:
        """Call `unet` (eager or OpenVINO) on these inputs, without autograd; returns its output tensor."""
        with torch.inference_mode():
            return unet(
                self.sample,
                self.timestep,
                self.encoder_hidden_states,
                timestep_cond=self.timestep_cond,
                return_dict=False,
                **kwargs,
            )[0]


def timestep_vector(timestep: torch.Tensor | float | int, batch: int) -> torch.Tensor:
    """A number, 0-d, (1,) or (batch,) timestep as float32 (batch,), the form the compiled graph takes.

    Integer timesteps become float32 exactly (they are < 2**24); eager does the same cast in its sinusoid.
    """
    t = torch.as_tensor(timestep).detach().to("cpu", torch.float32)
    if t.ndim > 1 or t.numel() not in (1, batch):
        raise ValueError(
            f"timestep must be a number, a 0-d tensor, or a 1-d tensor of length 1 or batch size {batch}; "
            f"got shape {tuple(t.shape)}"
        )
    return t.reshape(-1).expand(batch).contiguous()


class _Positional(nn.Module):
    """The UNet with plain positional tensor inputs and a tensor output: the form `convert_model` traces."""

    def __init__(self, unet: nn.Module) -> None:
        super().__init__()
        self.unet = unet

    def forward(
        self,
        sample: torch.Tensor,
        timestep: torch.Tensor,
        encoder_hidden_states: torch.Tensor,
        timestep_cond: torch.Tensor | None = None,
    ) -> torch.Tensor:
        out = self.unet(
            sample, timestep, encoder_hidden_states, timestep_cond=timestep_cond, return_dict=False
        )
        return out[0]


class OpenVINOStandIn(Float32OnCPU):
    """What every OpenVINO stand-in for `pipe.unet` shares: float32 on the CPU, FreeU refused, calls go to forward."""

    def enable_freeu(self, s1: float, s2: float, b1: float, b2: float) -> None:
        raise ValueError(
            "FreeU cannot be switched on an OpenVINO UNet: the graph is fixed at conversion and FreeU's FFT does "
            "not convert. Use the eager UNet for FreeU."
        )

    def disable_freeu(self) -> None:
        """FreeU is always off here (conversion refuses a UNet with FreeU on), so there is nothing to do."""

    def __call__(self, *args: Any, **kwargs: Any) -> UNet2DConditionOutput | tuple[torch.Tensor]:
        return self.forward(*args, **kwargs)

    def forward(self, *args: Any, **kwargs: Any) -> UNet2DConditionOutput | tuple[torch.Tensor]:
        raise NotImplementedError


class OpenVINOUNet(OpenVINOStandIn):
    """A compiled OpenVINO UNet that stands in for `pipe.unet`: same call and output as our UNet's forward for
    what the pipelines pass, and the `config`, `dtype`, `device` attributes they read.

    Inputs are moved to CPU float32; the output comes back on the input's device and dtype.
    """

    def __init__(
        self,
        compiled: Any,
        config: Any,
        *,
        batch_size: int,
        latent_size: tuple[int, int],
        text_tokens: int,
        precision: str,
    ) -> None:
        self.config = config
        self.batch_size = batch_size
        self.latent_size = latent_size
        self.text_tokens = text_tokens
        self.precision = precision
        self._compiled = compiled
        self._request = compiled.create_infer_request()

    def __repr__(self) -> str:
        h, w = self.latent_size
        return (
            f"OpenVINOUNet(precision={self.precision!r}, batch_size={self.batch_size}, latent={h}x{w}, "
            f"text_tokens={self.text_tokens})"
        )

    def forward(
        self,
        sample: torch.Tensor,
        timestep: torch.Tensor | float | int,
        encoder_hidden_states: torch.Tensor,
        *,
        timestep_cond: torch.Tensor | None = None,
        cross_attention_kwargs: dict[str, Any] | None = None,
        return_dict: bool = True,
        **unsupported: Any,
    ) -> UNet2DConditionOutput | tuple[torch.Tensor]:
        """Predict the model output for latents `sample`, as `UNet2DConditionModel.forward` does."""
        self._check_call(sample, encoder_hidden_states, timestep_cond, cross_attention_kwargs, unsupported)
        batch = sample.shape[0]
        t = timestep_vector(timestep, batch)
        if timestep_cond is None and self.config.time_cond_proj_dim is not None:
            # cond_proj has no bias, so a zero w-embedding adds exactly nothing, as leaving it out does in eager
            timestep_cond = torch.zeros(batch, self.config.time_cond_proj_dim)
        outs = []
        for i in range(0, batch, self.batch_size):
            rows = slice(i, i + self.batch_size)
            feeds = [to_numpy(sample[rows]), t[rows].numpy(), to_numpy(encoder_hidden_states[rows])]
            if timestep_cond is not None:
                feeds.append(to_numpy(timestep_cond[rows]))
            result = self._request.infer(feeds)
            outs.append(torch.from_numpy(np.array(result[0], copy=True)))
        h = torch.cat(outs).to(device=sample.device, dtype=sample.dtype)
        if not return_dict:
            return (h,)
        return UNet2DConditionOutput(sample=h)

    def _check_call(
        self,
        sample: torch.Tensor,
        encoder_hidden_states: torch.Tensor,
        timestep_cond: torch.Tensor | None,
        cross_attention_kwargs: dict[str, Any] | None,
        unsupported: dict[str, Any],
    ) -> None:
        if unsupported:
            raise ValueError(
                f"the OpenVINO UNet does not take {sorted(unsupported)}; it accepts sample, timestep, "
                "encoder_hidden_states, timestep_cond, cross_attention_kwargs (without a LoRA scale), return_dict"
            )
        extra = dict(cross_attention_kwargs or {})
        scale = extra.pop("scale", 1.0)
        if extra:
            raise ValueError(
                f"the OpenVINO UNet reads no cross_attention_kwargs besides 'scale', got {sorted(extra)}"
            )
        if scale != 1.0:
            raise ValueError(
                f"a LoRA scale ({scale}) cannot apply to an OpenVINO UNet: the adapters are baked in at conversion. "
                "Set the adapter weights before converting (set_adapters / fuse_lora), or use the eager UNet"
            )
        if timestep_cond is not None and self.config.time_cond_proj_dim is None:
            raise ValueError(
                "timestep_cond was given but this UNet has no w-embedding input (config.time_cond_proj_dim is None)"
            )
        c, (h, w) = self.config.in_channels, self.latent_size
        if sample.ndim != 4 or tuple(sample.shape[1:]) != (c, h, w) or sample.shape[0] % self.batch_size:
            raise ValueError(
                f"this OpenVINO UNet was compiled for latents (k*{self.batch_size}, {c}, {h}, {w}), got "
                f"{tuple(sample.shape)}; convert again with openvino_unet(batch_size=..., height=..., width=...) "
                "to match the pipeline call"
            )
        want = (sample.shape[0], self.text_tokens, self.config.cross_attention_dim)
        if tuple(encoder_hidden_states.shape) != want:
            raise ValueError(
                f"encoder_hidden_states must be {want} for this OpenVINO UNet, got "
                f"{tuple(encoder_hidden_states.shape)}"
            )
        if timestep_cond is not None:
            want = (sample.shape[0], self.config.time_cond_proj_dim)
            if tuple(timestep_cond.shape) != want:
                raise ValueError(f"timestep_cond must be {want}, got {tuple(timestep_cond.shape)}")


def unet_source(
    unet: nn.Module, shapes: dict[str, tuple[int, ...]], *, sampled_key: bool = False
) -> GraphSource:
    example = [torch.zeros(shape) for shape in shapes.values()]
    example[1] = torch.full(shapes["timestep"], 500.0)
    return GraphSource(
        name="unet",
        module=unet,
        traced=_Positional(unet),
        inputs=shapes,
        example=tuple(example),
        output="out_sample",
        description=repr(unet.config),
        sampled_key=sampled_key,
    )


def unet_input_shapes(
    config: Any, batch: int, h: int, w: int, text_tokens: int
) -> dict[str, tuple[int, ...]]:
    shapes = {
        "sample": (batch, config.in_channels, h, w),
        "timestep": (batch,),
        "encoder_hidden_states": (batch, text_tokens, config.cross_attention_dim),
    }
    if config.time_cond_proj_dim is not None:
        shapes["timestep_cond"] = (batch, config.time_cond_proj_dim)
    return shapes


def check_unet(unet: nn.Module) -> None:
    if not isinstance(unet, nn.Module):
        raise ValueError(
            f"expected the eager UNet (a torch module), got {type(unet).__name__}: an OpenVINO UNet is already "
            "converted; convert the eager UNet instead"
        )
    dtype = next(unet.parameters()).dtype
    if dtype != torch.float32:
        raise ValueError(
            f"OpenVINO conversion needs a float32 UNet, got {dtype}; load it with torch_dtype=torch.float32"
        )
    if getattr(unet, "image_proj", None) is not None:
        raise ValueError(
            "an IP-Adapter is loaded: IP-Adapter needs exact mode (the OpenVINO graphs have no image branch); "
            "unload_ip_adapter() before the fast mode, or run without --fast / fast=True"
        )
    if any(getattr(block, "s1", None) for block in getattr(unet, "up_blocks", [])):
        raise ValueError(
            "FreeU is on: call unet.disable_freeu() before converting (its FFT does not convert)"
        )


def _calibration_batches(
    calibration: Iterable[UNetInputs], shapes: dict[str, tuple[int, ...]]
) -> list[list[np.ndarray]]:
    """Regroup recorded calls (of any batch) into batches of the compiled shapes, one array per graph input."""
    rows: dict[str, list[torch.Tensor]] = {name: [] for name in shapes}
    for item in calibration:
        n = item.sample.shape[0]
        values = {
            "sample": item.sample,
            "timestep": timestep_vector(item.timestep, n),
            "encoder_hidden_states": item.encoder_hidden_states,
            "timestep_cond": item.timestep_cond,
        }
        for name, shape in shapes.items():
            x = values[name]
            if x is None or tuple(x.shape[1:]) != shape[1:]:
                got = None if x is None else tuple(x.shape)
                raise ValueError(
                    f"calibration {name} must have shape (n, {', '.join(map(str, shape[1:]))}) to match the "
                    f"compiled UNet, got {got}"
                )
            rows[name].extend(x.detach().to("cpu", torch.float32))
    batch = shapes["sample"][0]
    count = len(rows["sample"]) // batch
    if count == 0:
        raise ValueError(
            f"calibration holds {len(rows['sample'])} samples; at least batch_size={batch} needed"
        )
    return [
        [torch.stack(rows[name][i * batch : (i + 1) * batch]).numpy() for name in shapes]
        for i in range(count)
    ]


def openvino_unet(
    unet: nn.Module,
    *,
    batch_size: int = 1,
    height: int | None = None,
    width: int | None = None,
    precision: str = "fp32",
    calibration: Sequence[UNetInputs] | LazyUNetInputs | None = None,
    cache_dir: str | Path | None = None,
    threads: int | None = None,
    text_tokens: int = 77,
    vae_scale_factor: int = 8,
    inference: str = "f32",
    sampled_key: bool = False,
) -> OpenVINOUNet:
    """Convert `unet` to OpenVINO for images of `height` x `width` pixels, `batch_size` per UNet call, compile it
    for the CPU, and return a drop-in replacement for `pipe.unet`.

    `height`/`width` default to `unet.config.sample_size * vae_scale_factor`. `threads` caps OpenVINO's threads
    (default: all cores). With `cache_dir`, the converted graphs (fp32, and the quantized one) are saved there as
    IR named by a digest of the weights, shapes, precision and calibration data, and read back instead of
    converting again (the fp32 IR also serves later precisions); compiled blobs are cached there too.
    `calibration` (for "int8" and "int8-hybrid") are recorded UNet inputs, e.g. from `collect_unet_inputs`, or a
    `LazyUNetInputs` that records them only when the quantized graph is not in the cache yet.
    `inference` is OpenVINO's arithmetic ("f32", or "bf16" on CPUs with bf16 units) and `sampled_key` names the
    cache entry by a sample of the weights (see `GraphSource`): both are what the fast mode (`enable_fast`) sets.
    """
    ov = import_openvino()
    if precision not in PRECISIONS:
        raise ValueError(f"unknown precision {precision!r}; allowed: {list(PRECISIONS)}")
    if precision in NEEDS_NNCF:
        import_nncf()
    check_unet(unet)
    config = unet.config
    height = height or config.sample_size * vae_scale_factor
    width = width or config.sample_size * vae_scale_factor
    if height % vae_scale_factor or width % vae_scale_factor:
        raise ValueError(f"height and width must be multiples of {vae_scale_factor}, got {height}x{width}")
    if not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be a positive int, got {batch_size!r}")
    check_threads(threads)
    latent = (height // vae_scale_factor, width // vae_scale_factor)
    shapes = unet_input_shapes(config, batch_size, *latent, text_tokens)
    batches: Any = None
    if precision in NEEDS_CALIBRATION:
        if not calibration:
            raise ValueError(
                f"precision={precision!r} quantizes activations and needs calibration=[UNetInputs, ...] of real "
                "inputs; record some with collect_unet_inputs(pipe, prompts)"
            )
        if isinstance(calibration, LazyUNetInputs):
            record = calibration.record
            batches = LazyCalibration(calibration.key, lambda: _calibration_batches(record(), shapes))
        else:
            batches = _calibration_batches(calibration, shapes)

    started = time.perf_counter()
    cache = Path(cache_dir) if cache_dir is not None else None
    source = unet_source(unet, shapes, sampled_key=sampled_key)
    model = load_or_build(ov, source, precision, batches, cache, as_path=cache is not None)
    logger.info("OpenVINO UNet (%s) ready to compile after %.1f s", precision, time.perf_counter() - started)
    compiled = compile_graph(ov, model, threads, cache_dir, inference=inference)
    return OpenVINOUNet(
        compiled,
        config,
        batch_size=batch_size,
        latent_size=latent,
        text_tokens=text_tokens,
        precision=precision,
    )


@dataclass
class LazyUNetInputs:
    """Calibration inputs recorded by `record()` only when needed, named by `key` (the recipe: prompts, seeds,
    steps, guidance, size), which names the quantized graph's cache entry instead of the recorded data."""

    key: str
    record: Callable[[], list[UNetInputs]]


class _Recorder:
    """Stands in for `pipe.unet` during calibration runs: records every call's inputs, then runs the real UNet."""

    def __init__(self, unet: Any) -> None:
        self.unet = unet
        self.inputs: list[UNetInputs] = []

    def __getattr__(self, name: str) -> Any:
        return getattr(self.unet, name)

    def __call__(
        self, sample: torch.Tensor, timestep: Any, encoder_hidden_states: torch.Tensor, **kwargs: Any
    ):
        cond = kwargs.get("timestep_cond")
        self.inputs.append(
            UNetInputs(
                sample=sample.detach().to("cpu", torch.float32).clone(),
                timestep=timestep_vector(timestep, sample.shape[0]),
                encoder_hidden_states=encoder_hidden_states.detach().to("cpu", torch.float32).clone(),
                timestep_cond=None if cond is None else cond.detach().to("cpu", torch.float32).clone(),
            )
        )
        return self.unet(sample, timestep, encoder_hidden_states, **kwargs)


def collect_unet_inputs(
    pipe: Any, prompts: Sequence[str], *, seed: int = 0, **call_kwargs: Any
) -> list[UNetInputs]:
    """Run `pipe` once per prompt (latent output, no decode) and return every UNet input it made: calibration
    data for the int8 precisions. `call_kwargs` go to the pipeline (num_inference_steps, guidance_scale, ...);
    use the steps and guidance you will sample with, so the activation ranges match.
    """
    return record_unet_inputs(pipe, prompts, seed=seed, **call_kwargs)[0]


def record_unet_inputs(
    pipe: Any, prompts: Sequence[str | list[str]], *, seed: int = 0, **call_kwargs: Any
) -> tuple[list[UNetInputs], list[torch.Tensor]]:
    """`collect_unet_inputs`, and also the final latents of each call (a prompt, or a list of prompts made as one
    batch; seed `seed + i`), as the pipeline's `output_type="latent"` returns them (not yet divided by the VAE's
    scaling factor)."""
    recorder = _Recorder(pipe.unet)
    pipe.unet = recorder
    latents = []
    try:
        for i, prompt in enumerate(prompts):
            generator = torch.Generator("cpu").manual_seed(seed + i)
            latents.append(pipe(prompt, generator=generator, output_type="latent", **call_kwargs).images)
    finally:
        pipe.unet = recorder.unet
    return recorder.inputs, latents
