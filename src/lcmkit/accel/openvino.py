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
- "int8-weights": NNCF `compress_weights` INT8_ASYM; weights stored as int8 (4x smaller), activations stay float.
- "int8-hybrid": int8 weights for every MatMul, full int8 (weights and activations) for convolutions: the
  scheme optimum-intel applies to diffusion UNets; the attention and feed-forward activations stay float.
- "int8": NNCF `quantize` (transformer model type, SmoothQuant, no bias correction) on every layer it supports,
  the recipe of OpenVINO's own LCM notebook (LCM-Dreamshaper-v7, 200 calibration calls); fastest.
Both activation-quantizing modes need `calibration`: real UNet inputs, as `collect_unet_inputs` records them.

The conversion, cache (IR files named by a digest of the weights) and quantization helpers take any module as a
`_GraphSource`; `lcmkit.accel.vae_decoder` uses them for the VAE decoder.

`openvino` and `nncf` are imported only here, only when called: `pip install openvino nncf`.
"""

from __future__ import annotations

import hashlib
import logging
import time
import warnings
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from lcmkit.loading.paging import release_weight_pages
from lcmkit.models.unet import UNet2DConditionOutput
from lcmkit.nn.lora import lora_layers

logger = logging.getLogger(__name__)

PRECISIONS = ("fp32", "int8-weights", "int8-hybrid", "int8")
NEEDS_CALIBRATION = ("int8-hybrid", "int8")  # they quantize activations: calibration inputs required
DATA_FREE_PRECISIONS = tuple(p for p in PRECISIONS if p not in NEEDS_CALIBRATION)
INSTALL_HINT = "pip install openvino nncf"


def _import_openvino() -> Any:
    try:
        import openvino
    except ImportError as err:
        raise ImportError(f"the OpenVINO fast mode needs the `openvino` package: {INSTALL_HINT}") from err
    return openvino


def _import_nncf() -> Any:
    try:
        import nncf
    except ImportError as err:
        raise ImportError(f"int8 OpenVINO precisions need the `nncf` package: {INSTALL_HINT}") from err
    return nncf


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


def _timestep_vector(timestep: torch.Tensor | float | int, batch: int) -> torch.Tensor:
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


def _numpy(x: torch.Tensor) -> np.ndarray:
    return x.detach().to("cpu", torch.float32).contiguous().numpy()


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


class OpenVINOStandIn:
    """What every OpenVINO stand-in for `pipe.unet` shares: float32 on the CPU, FreeU refused, calls go to forward."""

    @property
    def dtype(self) -> torch.dtype:
        return torch.float32

    @property
    def device(self) -> torch.device:
        return torch.device("cpu")

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
        t = _timestep_vector(timestep, batch)
        if timestep_cond is None and self.config.time_cond_proj_dim is not None:
            # cond_proj has no bias, so a zero w-embedding adds exactly nothing, as leaving it out does in eager
            timestep_cond = torch.zeros(batch, self.config.time_cond_proj_dim)
        outs = []
        for i in range(0, batch, self.batch_size):
            rows = slice(i, i + self.batch_size)
            feeds = [_numpy(sample[rows]), t[rows].numpy(), _numpy(encoder_hidden_states[rows])]
            if timestep_cond is not None:
                feeds.append(_numpy(timestep_cond[rows]))
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


@dataclass
class _GraphSource:
    """What `_load_or_build` converts, and what its cache entry is named by.

    `traced` is what `convert_model` traces: called with the `example` tensors as positional arguments, it returns
    one tensor. `module` holds the weights (and LoRA layers) the cache key covers, and `description` what the
    weights do not fix (the config, layer switches). `inputs` names each graph input with its shape; -1 leaves a
    dimension free (the graph is then reshaped to static shapes before compiling).
    """

    name: str  # the cache files' prefix: "unet", "vae-decoder"
    module: nn.Module
    traced: nn.Module
    inputs: dict[str, tuple[int, ...]]
    example: tuple[torch.Tensor, ...]
    output: str
    description: str


def _unet_source(unet: nn.Module, shapes: dict[str, tuple[int, ...]]) -> _GraphSource:
    example = [torch.zeros(shape) for shape in shapes.values()]
    example[1] = torch.full(shapes["timestep"], 500.0)
    return _GraphSource(
        name="unet",
        module=unet,
        traced=_Positional(unet),
        inputs=shapes,
        example=tuple(example),
        output="out_sample",
        description=repr(unet.config),
    )


def _input_shapes(config: Any, batch: int, h: int, w: int, text_tokens: int) -> dict[str, tuple[int, ...]]:
    shapes = {
        "sample": (batch, config.in_channels, h, w),
        "timestep": (batch,),
        "encoder_hidden_states": (batch, text_tokens, config.cross_attention_dim),
    }
    if config.time_cond_proj_dim is not None:
        shapes["timestep_cond"] = (batch, config.time_cond_proj_dim)
    return shapes


def _check_unet(unet: nn.Module) -> None:
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
            "timestep": _timestep_vector(item.timestep, n),
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


def _graph_digest(source: _GraphSource) -> str:
    """A digest of everything the fp32 graph depends on: weights, LoRA adapters, config, shapes, OpenVINO version."""
    h = hashlib.blake2b(digest_size=16)
    parts = [source.description, repr(source.inputs), _import_openvino().__version__]
    for name, layer in lora_layers(source.module):
        parts.append(
            repr((name, layer.scales, layer.adapter_weights, layer.active, layer.fused, layer.enabled))
        )
    h.update("\n".join(parts).encode())
    for name, tensor in [*source.module.named_parameters(), *source.module.named_buffers()]:
        h.update(name.encode())
        h.update(tensor.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy())
    return h.hexdigest()


def _precision_digest(graph: str, precision: str, calibration: list[list[np.ndarray]] | None) -> str:
    """The fp32 digest extended by what quantization depends on: the precision, NNCF's version, the data."""
    if precision == "fp32":
        return graph
    h = hashlib.blake2b(f"{graph}\n{precision}\n{_import_nncf().__version__}".encode(), digest_size=16)
    for batch in calibration or []:
        for array in batch:
            h.update(np.ascontiguousarray(array))
    return h.hexdigest()


def _load_or_build(
    ov: Any,
    source: _GraphSource,
    precision: str,
    calibration: list[list[np.ndarray]] | None,
    cache_dir: Path | None,
    *,
    detach: bool = False,
    as_path: bool = False,
) -> Any:
    """The OpenVINO model for `precision`: read from `cache_dir` when there, else converted (from the cached fp32
    IR when there: tracing is the slow part of converting) and quantized, and saved there.

    A freshly converted model shares its constants with the torch weights. `detach=True` returns it read back
    from the saved IR instead (memory-mapped), so the caller may release the torch module; without `cache_dir`
    there is no file to read back, and the model keeps those weights alive (one copy, shared). `as_path=True`
    (with a `cache_dir`) returns the IR file's path instead, for `_compile`: OpenVINO then finds its compiled blob
    for that file without reading the graph's weights into memory."""
    core = ov.Core()
    if cache_dir is None:
        return _quantize(_convert(ov, source), precision, calibration)
    graph = _graph_digest(source)
    # The digest read every eager weight into memory; OpenVINO works from its own copy from here on, so hand the
    # memory-mapped pages back (they are read again if this module is ever converted or run eagerly).
    release_weight_pages(source.module)
    path = cache_dir / f"{source.name}-{precision}-{_precision_digest(graph, precision, calibration)}.xml"
    if path.exists():
        logger.info("reading the converted %s from %s", source.name, path)
        return str(path) if as_path else core.read_model(path)
    fp32_path = cache_dir / f"{source.name}-fp32-{graph}.xml"
    cache_dir.mkdir(parents=True, exist_ok=True)
    if fp32_path.exists():
        model = core.read_model(fp32_path)
    else:
        model = _convert(ov, source)
        ov.save_model(model, fp32_path, compress_to_fp16=False)  # fp16 would change the weights
        if detach or as_path or precision != "fp32":  # then what is returned comes from the file, not this
            model = core.read_model(fp32_path)
            release_weight_pages(source.module)
    if precision != "fp32":
        model = _quantize(model, precision, calibration)
        ov.save_model(model, path, compress_to_fp16=False)
    if as_path:
        return str(path)
    return core.read_model(path) if detach else model


def _convert(ov: Any, source: _GraphSource) -> Any:
    was_training = source.module.training
    source.traced.eval()
    try:
        with torch.no_grad(), warnings.catch_warnings():
            # the tracer warns that shape checks become constants: intended, the shapes are static
            warnings.filterwarnings("ignore", category=torch.jit.TracerWarning)
            # OpenVINO's PyTorch frontend traces with TorchScript, which torch now marks deprecated; the
            # torch.export route converts too (same outputs), but to dynamic shapes and slower, so it is not used
            warnings.filterwarnings("ignore", message=r".*torch\.jit\.", category=DeprecationWarning)
            # the tracer runs the model twice and wants the same graph both times: a first call builds what
            # layers cache lazily (the VAE decoder's sub-pixel kernels), so both traces see the cached tensor
            source.traced(*source.example)
            model = ov.convert_model(
                source.traced,
                example_input=source.example,
                input=[ov.PartialShape(list(shape)) for shape in source.inputs.values()],
            )
    finally:
        source.module.train(was_training)
    for port, name in zip(model.inputs, source.inputs, strict=True):
        port.get_tensor().set_names({name})
    model.outputs[0].get_tensor().set_names({source.output})
    return model


def _compile(ov: Any, model: Any, threads: int | None, cache_dir: str | Path | None) -> Any:
    """Compile `model` (an ov.Model, or an IR file's path) for this CPU in float32 (no bf16/fp16 inference on CPUs
    that have it), for the latency of one call; compiled blobs are cached under `cache_dir`/compiled when given."""
    props: dict[str, Any] = {"PERFORMANCE_HINT": "LATENCY", "INFERENCE_PRECISION_HINT": "f32"}
    if threads is not None:
        props["INFERENCE_NUM_THREADS"] = threads
    if cache_dir is not None:
        props["CACHE_DIR"] = str(Path(cache_dir) / "compiled")
    return ov.Core().compile_model(model, "CPU", props)


def _check_threads(threads: int | None) -> None:
    if threads is not None and (not isinstance(threads, int) or threads < 1):
        raise ValueError(f"threads must be a positive int or None, got {threads!r}")


def _quantize(model: Any, precision: str, calibration: list[list[np.ndarray]] | None) -> Any:
    if precision == "fp32":
        return model
    nncf = _import_nncf()
    if precision == "int8-weights":
        return nncf.compress_weights(model, mode=nncf.CompressWeightsMode.INT8_ASYM)
    dataset = nncf.Dataset(calibration)
    if precision == "int8-hybrid":
        model = nncf.compress_weights(
            model,
            mode=nncf.CompressWeightsMode.INT8_SYM,
            ignored_scope=nncf.IgnoredScope(types=["Convolution"]),
        )
        return nncf.quantize(
            model,
            dataset,
            model_type=nncf.ModelType.TRANSFORMER,
            subset_size=len(calibration),
            ignored_scope=nncf.IgnoredScope(types=["MatMul"]),
            advanced_parameters=nncf.AdvancedQuantizationParameters(
                smooth_quant_alphas=nncf.AdvancedSmoothQuantParameters(matmul=-1)
            ),
        )
    return nncf.quantize(
        model,
        dataset,
        model_type=nncf.ModelType.TRANSFORMER,
        subset_size=len(calibration),
        advanced_parameters=nncf.AdvancedQuantizationParameters(disable_bias_correction=True),
    )


def openvino_unet(
    unet: nn.Module,
    *,
    batch_size: int = 1,
    height: int | None = None,
    width: int | None = None,
    precision: str = "fp32",
    calibration: Sequence[UNetInputs] | None = None,
    cache_dir: str | Path | None = None,
    threads: int | None = None,
    text_tokens: int = 77,
    vae_scale_factor: int = 8,
) -> OpenVINOUNet:
    """Convert `unet` to OpenVINO for images of `height` x `width` pixels, `batch_size` per UNet call, compile it
    for the CPU, and return a drop-in replacement for `pipe.unet`.

    `height`/`width` default to `unet.config.sample_size * vae_scale_factor`. `threads` caps OpenVINO's threads
    (default: all cores). With `cache_dir`, the converted graphs (fp32, and the quantized one) are saved there as
    IR named by a digest of the weights, shapes, precision and calibration data, and read back instead of
    converting again (the fp32 IR also serves later precisions); compiled blobs are cached there too.
    `calibration` (for "int8" and "int8-hybrid") are recorded UNet inputs, e.g. from `collect_unet_inputs`.
    """
    ov = _import_openvino()
    if precision not in PRECISIONS:
        raise ValueError(f"unknown precision {precision!r}; allowed: {list(PRECISIONS)}")
    if precision != "fp32":
        _import_nncf()
    _check_unet(unet)
    config = unet.config
    height = height or config.sample_size * vae_scale_factor
    width = width or config.sample_size * vae_scale_factor
    if height % vae_scale_factor or width % vae_scale_factor:
        raise ValueError(f"height and width must be multiples of {vae_scale_factor}, got {height}x{width}")
    if not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be a positive int, got {batch_size!r}")
    _check_threads(threads)
    latent = (height // vae_scale_factor, width // vae_scale_factor)
    shapes = _input_shapes(config, batch_size, *latent, text_tokens)
    batches = None
    if precision in NEEDS_CALIBRATION:
        if not calibration:
            raise ValueError(
                f"precision={precision!r} quantizes activations and needs calibration=[UNetInputs, ...] of real "
                "inputs; record some with collect_unet_inputs(pipe, prompts)"
            )
        batches = _calibration_batches(calibration, shapes)

    started = time.perf_counter()
    cache = Path(cache_dir) if cache_dir is not None else None
    model = _load_or_build(
        ov, _unet_source(unet, shapes), precision, batches, cache, as_path=cache is not None
    )
    logger.info("OpenVINO UNet (%s) ready to compile after %.1f s", precision, time.perf_counter() - started)
    compiled = _compile(ov, model, threads, cache_dir)
    return OpenVINOUNet(
        compiled,
        config,
        batch_size=batch_size,
        latent_size=latent,
        text_tokens=text_tokens,
        precision=precision,
    )


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
                timestep=_timestep_vector(timestep, sample.shape[0]),
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
    recorder = _Recorder(pipe.unet)
    pipe.unet = recorder
    try:
        for i, prompt in enumerate(prompts):
            generator = torch.Generator("cpu").manual_seed(seed + i)
            pipe(prompt, generator=generator, output_type="latent", **call_kwargs)
    finally:
        pipe.unet = recorder.unet
    return recorder.inputs
