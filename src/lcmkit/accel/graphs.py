"""OpenVINO plumbing shared by every converted graph (UNet, VAE decoder, text encoder): importing the packages
with an install hint, converting a torch module, quantizing, the on-disk cache of IR files named by a digest, and
compiling for the CPU.

A graph is described by a `GraphSource` (what to trace, its inputs, what names its cache entry); `load_or_build`
turns it into an OpenVINO model, from the cache when it is there. `openvino` and `nncf` are imported only when a
function here needs them.
"""

from __future__ import annotations

import hashlib
import logging
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from lcmkit.io.paging import release_file_pages
from lcmkit.loading.paging import release_weight_pages
from lcmkit.nn.lora import lora_layers

logger = logging.getLogger(__name__)

PRECISIONS = ("fp32", "fp16-weights", "int8-weights", "int8-hybrid", "int8")
NEEDS_CALIBRATION = ("int8-hybrid", "int8")  # they quantize activations: calibration inputs required
NEEDS_NNCF = ("int8-weights", "int8-hybrid", "int8")  # "fp16-weights" is OpenVINO's own compression on save
DATA_FREE_PRECISIONS = tuple(p for p in PRECISIONS if p not in NEEDS_CALIBRATION)
INSTALL_HINT = "pip install openvino nncf"


def import_openvino() -> Any:
    try:
        import openvino
    except ImportError as err:
        raise ImportError(f"the OpenVINO fast mode needs the `openvino` package: {INSTALL_HINT}") from err
    return openvino


def import_nncf() -> Any:
    try:
        import nncf
    except ImportError as err:
        raise ImportError(f"int8 OpenVINO precisions need the `nncf` package: {INSTALL_HINT}") from err
    return nncf


def to_numpy(x: torch.Tensor) -> np.ndarray:
    return x.detach().to("cpu", torch.float32).contiguous().numpy()


class Float32OnCPU:
    """What every stand-in reports to the pipelines, whatever runs inside: float32 on the CPU."""

    @property
    def dtype(self) -> torch.dtype:
        return torch.float32

    @property
    def device(self) -> torch.device:
        return torch.device("cpu")


@dataclass
class GraphSource:
    """What `load_or_build` converts, and what its cache entry is named by.

    `traced` is what `convert_model` traces: called with the `example` tensors as positional arguments, it returns
    one tensor. `module` holds the weights (and LoRA layers) the cache key covers, and `description` what the
    weights do not fix (the config, layer switches). `inputs` names each graph input with its shape; -1 leaves a
    dimension free (the graph is then reshaped to static shapes before compiling).

    `sampled_key=True` names the cache entry by every tensor's name, shape, dtype and three windows of its data
    (start, middle, end; `SAMPLE_WINDOW` elements each) instead of every byte: reading a few pages per tensor
    instead of all 3.4 GB of an SD1.5 UNet is what lets a warm cache load without a stall. A fine-tune, a fused
    LoRA or another checkpoint changes every window; two weight sets that differ only outside all windows would
    share an entry, so the exact key stays the default where loading time does not matter.
    """

    name: str  # the cache files' prefix: "unet", "vae-decoder"
    module: nn.Module
    traced: nn.Module
    inputs: dict[str, tuple[int, ...]]
    example: tuple[torch.Tensor, ...]
    output: str
    description: str
    sampled_key: bool = False
    # regexes of node names that "int8" (activations quantized) leaves in float: the layers whose rounding the
    # image shows most; part of the quantized graph's cache key
    keep_float: tuple[str, ...] = ()


def graph_digest(source: GraphSource) -> str:
    """A digest of everything the fp32 graph depends on: weights, LoRA adapters, config, shapes, OpenVINO version."""
    h = hashlib.blake2b(digest_size=16)
    parts = [source.description, repr(source.inputs), import_openvino().__version__]
    for name, layer in lora_layers(source.module):
        parts.append(
            repr((name, layer.scales, layer.adapter_weights, layer.active, layer.fused, layer.enabled))
        )
    h.update("\n".join(parts).encode())
    if source.sampled_key:
        h.update(b"sampled")
    for name, tensor in [*source.module.named_parameters(), *source.module.named_buffers()]:
        h.update(f"{name} {tuple(tensor.shape)} {tensor.dtype}".encode())
        flat = tensor.detach().cpu().reshape(-1)
        for window in _windows(flat) if source.sampled_key else [flat]:
            h.update(window.contiguous().view(torch.uint8).numpy())
    return h.hexdigest()


SAMPLE_WINDOW = 1024  # elements per window of a sampled key: one 4 KiB page of float32


def _windows(flat: torch.Tensor) -> list[torch.Tensor]:
    n = flat.numel()
    if n <= 3 * SAMPLE_WINDOW:
        return [flat]
    middle = (n - SAMPLE_WINDOW) // 2
    return [flat[:SAMPLE_WINDOW], flat[middle : middle + SAMPLE_WINDOW], flat[-SAMPLE_WINDOW:]]


@dataclass
class LazyCalibration:
    """Calibration data made only when a quantized graph must be built, named by `key`: the recipe that makes it
    (prompts, seeds, steps, size). Given the weights (which the graph digest covers) the recipe fixes the data, so
    a warm cache is found without running the model to record it."""

    key: str
    make: Callable[[], list[list[np.ndarray]]]


Calibration = list[list[np.ndarray]] | LazyCalibration | None


def precision_digest(
    graph: str, precision: str, calibration: Calibration, keep_float: tuple[str, ...] = ()
) -> str:
    """The fp32 digest extended by what quantization depends on: the precision, NNCF's version, the layers "int8"
    keeps in float, the data (or the recipe of lazily made data)."""
    if precision == "fp32":
        return graph
    tool = import_nncf().__version__ if precision in NEEDS_NNCF else "openvino"
    h = hashlib.blake2b(f"{graph}\n{precision}\n{tool}".encode(), digest_size=16)
    if precision == "int8" and keep_float:
        h.update(f"float\n{keep_float!r}".encode())
    if isinstance(calibration, LazyCalibration):
        h.update(f"recipe\n{calibration.key}".encode())
        return h.hexdigest()
    for batch in calibration or []:
        for array in batch:
            h.update(np.ascontiguousarray(array))
    return h.hexdigest()


def load_or_build(
    ov: Any,
    source: GraphSource,
    precision: str,
    calibration: Calibration,
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
        return quantize(convert(ov, source), precision, _data(calibration), source.keep_float)
    graph = graph_digest(source)
    # The digest read every eager weight into memory; OpenVINO works from its own copy from here on, so hand the
    # memory-mapped pages back (they are read again if this module is ever converted or run eagerly).
    release_weight_pages(source.module)
    path = (
        cache_dir
        / f"{source.name}-{precision}-{precision_digest(graph, precision, calibration, source.keep_float)}.xml"
    )
    if path.exists():
        logger.info("reading the converted %s from %s", source.name, path)
        return str(path) if as_path else core.read_model(path)
    fp32_path = cache_dir / f"{source.name}-fp32-{graph}.xml"
    cache_dir.mkdir(parents=True, exist_ok=True)
    if fp32_path.exists():
        model = core.read_model(fp32_path)
    else:
        model = convert(ov, source)
        ov.save_model(model, fp32_path, compress_to_fp16=False)  # fp16 would change the weights
        if detach or as_path or precision != "fp32":  # then what is returned comes from the file, not this
            model = core.read_model(fp32_path)
            release_weight_pages(source.module)
    if precision != "fp32":
        model = quantize(model, precision, _data(calibration), source.keep_float)
        ov.save_model(model, path, compress_to_fp16=precision == "fp16-weights")
    if as_path:
        return str(path)
    return core.read_model(path) if detach else model


def _data(calibration: Calibration) -> list[list[np.ndarray]] | None:
    if isinstance(calibration, LazyCalibration):
        logger.info("recording calibration inputs (%s)", calibration.key)
        return calibration.make()
    return calibration


def convert(ov: Any, source: GraphSource) -> Any:
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
            # layers cache lazily, so both traces see the cached tensors
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


def compile_graph(
    ov: Any, model: Any, threads: int | None, cache_dir: str | Path | None, *, inference: str = "f32"
) -> Any:
    """Compile `model` (an ov.Model, or an IR file's path) for this CPU, for the latency of one call; compiled
    blobs are cached under `cache_dir`/compiled when given.

    `inference` is OpenVINO's inference precision: "f32" by default (no bf16/fp16 arithmetic even on CPUs that
    have it, so the image stays the eager one up to rounding), "bf16" for the fast mode on CPUs with bf16 units."""
    props: dict[str, Any] = {"PERFORMANCE_HINT": "LATENCY", "INFERENCE_PRECISION_HINT": inference}
    if threads is not None:
        props["INFERENCE_NUM_THREADS"] = threads
    if cache_dir is None:
        return _compile(ov, model, props)
    props["CACHE_DIR"] = str(Path(cache_dir) / "compiled")
    compiled = _compile(ov, model, props)
    # The compiled model holds its own packed weights; the pages of the blob (or IR) it was read from only cost
    # memory now, as much again as the weights. Released pages map again from the page cache if ever read.
    released = release_file_pages(cache_dir)
    logger.debug("released %.0f MB of cache file pages after compiling", released / 2**20)
    return compiled


def _compile(ov: Any, model: Any, props: dict[str, Any]) -> Any:
    try:
        return ov.Core().compile_model(model, "CPU", props)
    except RuntimeError as err:
        # OpenVINO 2026.4's CPU plugin can fail to fit a fused int8 subgraph ("snippet") into the registers it has
        # (seen on a small int8 UNet with one thread); the same graph compiles with those fusions off.
        if "snippets" not in str(err):
            raise
        logger.warning(
            "OpenVINO could not compile a fused subgraph (%s); compiling without them", str(err)[-120:]
        )
        return ov.Core().compile_model(model, "CPU", {**props, "SNIPPETS_MODE": "DISABLE"})


def check_threads(threads: int | None) -> None:
    if threads is not None and (not isinstance(threads, int) or threads < 1):
        raise ValueError(f"threads must be a positive int or None, got {threads!r}")


def quantize(
    model: Any, precision: str, calibration: list[list[np.ndarray]] | None, keep_float: tuple[str, ...] = ()
) -> Any:
    """`model` at `precision`. "fp16-weights" is applied when the IR is saved (`ov.save_model(compress_to_fp16=)`),
    so without a cache folder its weights stay float32. "int8" leaves the nodes matching `keep_float` in float."""
    if precision in ("fp32", "fp16-weights"):
        return model
    nncf = import_nncf()
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
    kept = (
        {"ignored_scope": nncf.IgnoredScope(patterns=list(keep_float), validate=False)} if keep_float else {}
    )
    return nncf.quantize(
        model,
        dataset,
        model_type=nncf.ModelType.TRANSFORMER,
        subset_size=len(calibration),
        advanced_parameters=nncf.AdvancedQuantizationParameters(disable_bias_correction=True),
        **kept,
    )
