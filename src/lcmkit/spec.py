"""What model to run, as data: one `ModelSpec` that the CLI and the HTTP server fill from the same options, and
`load_pipeline(spec)` that turns it into a ready pipeline plus the model name written into every infotext.

A spec checks itself when it is made, without importing torch: a path that is not there, a value out of range or
a combination that cannot work raises `SpecError` naming the option as the command line spells it (`--lora`,
`--openvino`, ...), before any model loads and before a server starts listening. `check_runtime(spec)` adds the
checks that need the machine (is the requested device there, is OpenVINO installed).

Loading order, and why: a hub id is resolved to its cached snapshot first (`fetch`), before torch is imported,
so a machine without network fails in a second; the pipeline loads in the chosen dtype (a tiny VAE is handed
to `from_pretrained` so the full VAE is never read); LoRAs are injected on the CPU and move with the pipeline to
the device; OpenVINO comes last because it bakes the LoRAs in at their weights.
"""

from __future__ import annotations

import importlib.util
import math
import os
import re
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import torch

DEFAULT_MODEL = Path(__file__).resolve().parent / "assets" / "tiny-lcm"
"""The trained tiny model shipped with lcmkit; what a spec without `model` loads."""
SINGLE_FILE_SUFFIXES = (".safetensors", ".ckpt")
OPENVINO_PRECISIONS = ("fp32", "int8-weights")  # lcmkit.accel.per_shape.DATA_FREE_PRECISIONS, without torch
FAST_PRECISIONS = (
    "auto",
    "fp32",
    "bf16",
    "int8-weights",
    "int8",
)  # lcmkit.accel.cpu.FAST_PRECISIONS, without torch
DTYPES = ("auto", "float32", "float16", "bfloat16")
FREEU_SD15 = (0.9, 0.2, 1.5, 1.6)  # s1, s2, b1, b2 recommended for SD1.5 by the FreeU authors
_DEVICE = re.compile(r"[a-z][a-z0-9_]*(:\d+)?")


class SpecError(ValueError):
    """A model spec that cannot load: the message names the option and says what is allowed."""


def _is_hub_id(name: str) -> bool:
    from lcmkit.loading.hub import is_hub_id  # huggingface_hub is imported lazily there: cheap

    return is_hub_id(name)


def _finite(value: Any, what: str) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        raise SpecError(f"{what} must be a finite number, got {value!r}")
    return float(value)


@dataclass(frozen=True)
class ModelSpec:
    """Everything that decides which pipeline runs; the CLI's generate/img2img/demo and `lcmkit serve` share it.

    model: a diffusers folder (with model_index.json), a `.safetensors`/`.ckpt` single file, a hub id owner/name,
        or None for the model shipped with lcmkit.
    loras: (source, weight) pairs, each source a LoRA file, folder or hub id; all active at their weights.
    tiny_vae: an AutoencoderTiny (TAESD layout) folder to encode and decode with instead of the full VAE.
    freeu: FreeU's (s1, s2, b1, b2), or None for off.
    ip_adapter: (source, scale) of an IP-Adapter (a file with `image_encoder/` beside it, or a folder holding
        ip-adapter_sd15.safetensors and `image_encoder/`), or None. Exact mode only (not with `fast`/`openvino`);
        each call then needs `ip_adapter_image=`.
    vae_tiling: decode in tiles (large images, less memory).
    openvino: "fp32" or "int8-weights" to run the UNet and the VAE decoder with OpenVINO on the CPU, or None.
        Superseded by `fast`, kept for scripts that name a precision and want the exact cache key.
    fast: the fast mode (`lcmkit.accel.enable_fast`): text encoder, UNet and VAE decoder on OpenVINO on the CPU,
        at `fast_precision` ("auto": what this CPU runs fastest), compiled first for `fast_size` (width, height;
        None: the model's size) and per other size on first use, cached on disk.
    device: "cpu", "cuda", "cuda:1", "mps", ...; None: CUDA when available, else the CPU (always the CPU with
        OpenVINO).
    dtype: "auto" (float16 on CUDA, float32 elsewhere) or a torch dtype name.
    name: the model name written into infotexts and served by the API; None: derived from `model` (a folder's
        name, a file's stem, the hub id).
    controlnets: (kind, source) pairs, one ControlNet per entry in call order; each source a diffusers folder, an
        original single file or a hub id (`lcmkit.control.CONTROL_MODELS[kind]` by default in the CLI). Exact
        mode only (not with `fast` or `openvino`).
    """

    model: str | None = None
    loras: tuple[tuple[str, float], ...] = ()
    tiny_vae: str | None = None
    freeu: tuple[float, float, float, float] | None = None
    ip_adapter: tuple[str, float] | None = None
    vae_tiling: bool = False
    openvino: str | None = None
    fast: bool = False
    fast_precision: str = "auto"
    fast_size: tuple[int, int] | None = None
    device: str | None = None
    dtype: str = "auto"
    name: str | None = None
    controlnets: tuple[tuple[str, str], ...] = ()

    def __post_init__(self) -> None:
        set_ = object.__setattr__  # frozen: normalise once, here
        if isinstance(self.model, os.PathLike):
            set_(self, "model", os.fspath(self.model))
        if isinstance(self.tiny_vae, os.PathLike):
            set_(self, "tiny_vae", os.fspath(self.tiny_vae))
        set_(self, "loras", self._checked_loras())
        set_(self, "controlnets", self._checked_controlnets())
        if isinstance(self.fast_size, list):
            set_(self, "fast_size", tuple(self.fast_size))
        if self.freeu is not None:
            if not isinstance(self.freeu, list | tuple) or len(self.freeu) != 4:
                raise SpecError(f"--freeu takes 4 numbers s1,s2,b1,b2, got {self.freeu!r}")
            set_(self, "freeu", tuple(_finite(v, "a --freeu value") for v in self.freeu))
        self._check_model()
        self._check_switches()
        self._check_ip_adapter()

    # Checks (no torch) -------------------------------------------------------------------------------------

    def _check_model(self) -> None:
        if self.model is None:
            if not DEFAULT_MODEL.is_dir():
                raise SpecError(
                    "no model: pass --model PATH_OR_HUB_ID (a diffusers folder, a .safetensors/.ckpt file or "
                    "owner/name), or run `lcmkit demo` for an offline smoke test"
                )
            return
        if not isinstance(self.model, str) or not self.model.strip():
            raise SpecError(f"--model must be a folder, a file or a hub id, got {self.model!r}")
        path = Path(self.model).expanduser()
        if path.is_file():
            if path.suffix.lower() not in SINGLE_FILE_SUFFIXES:
                raise SpecError(
                    f"--model {self.model}: a model file must be a .safetensors or .ckpt single-file checkpoint"
                )
        elif path.is_dir():
            if not (path / "model_index.json").is_file():
                raise SpecError(
                    f"--model {self.model}: this folder has no model_index.json, so it is not a diffusers "
                    "pipeline folder; pass such a folder, a .safetensors/.ckpt file or a hub id owner/name"
                )
        elif not _is_hub_id(self.model) or self.model.lower().endswith(SINGLE_FILE_SUFFIXES):
            raise SpecError(f"--model {self.model}: no such folder or file, and not a hub id like owner/name")

    def _checked_loras(self) -> tuple[tuple[str, float], ...]:
        if isinstance(self.loras, str | bytes) or not isinstance(self.loras, list | tuple):
            raise SpecError(f"loras must be a sequence of (source, weight) pairs, got {self.loras!r}")
        out = []
        for entry in self.loras:
            if not isinstance(entry, list | tuple) or len(entry) != 2:
                raise SpecError(f"--lora takes PATH[:WEIGHT]; got the entry {entry!r}")
            source, weight = entry
            source = os.fspath(source) if isinstance(source, os.PathLike) else source
            if not isinstance(source, str) or not source:
                raise SpecError(f"--lora needs a file, folder or hub id, got {source!r}")
            if not Path(source).expanduser().exists() and not _is_hub_id(source):
                raise SpecError(f"--lora {source}: no such file or folder, and not a hub id like owner/name")
            out.append((source, _finite(weight, f"the weight of --lora {source}")))
        return tuple(out)

    def _checked_controlnets(self) -> tuple[tuple[str, str], ...]:
        from lcmkit.control import CONTROL_MODELS

        if isinstance(self.controlnets, str | bytes) or not isinstance(self.controlnets, list | tuple):
            raise SpecError(
                f"controlnets must be a sequence of (kind, source) pairs, got {self.controlnets!r}"
            )
        out = []
        for entry in self.controlnets:
            if not isinstance(entry, list | tuple) or len(entry) != 2:
                raise SpecError(f"--controlnet takes KIND=PATH_OR_HUB_ID; got the entry {entry!r}")
            kind, source = entry[0], os.fspath(entry[1]) if isinstance(entry[1], os.PathLike) else entry[1]
            if kind not in CONTROL_MODELS:
                raise SpecError(f"unknown control kind {kind!r}; known: {', '.join(sorted(CONTROL_MODELS))}")
            if not isinstance(source, str) or not source:
                raise SpecError(f"--controlnet {kind}= needs a folder, file or hub id, got {source!r}")
            if not Path(source).expanduser().exists() and not _is_hub_id(source):
                raise SpecError(
                    f"--controlnet {kind}={source}: no such file or folder, and not a hub id like owner/name"
                )
            out.append((kind, source))
        if out and (self.fast or self.openvino):
            flag = "--fast" if self.fast else "--openvino"
            raise SpecError(
                f"ControlNet needs exact mode: the OpenVINO UNet takes no ControlNet residuals; drop {flag}"
            )
        return tuple(out)

    def _check_switches(self) -> None:
        if self.tiny_vae is not None:
            folder = Path(str(self.tiny_vae)).expanduser()
            if not folder.is_dir() or not (folder / "config.json").is_file():
                raise SpecError(
                    f"--tiny-vae {self.tiny_vae}: not a folder with config.json (pass an AutoencoderTiny / "
                    "TAESD folder)"
                )
        if not isinstance(self.vae_tiling, bool):
            raise SpecError(f"--vae-tiling is on or off (True/False), got {self.vae_tiling!r}")
        if self.openvino is not None and self.openvino not in OPENVINO_PRECISIONS:
            raise SpecError(
                f"--openvino {self.openvino!r} is not a precision lcmkit converts; allowed: "
                f"{', '.join(OPENVINO_PRECISIONS)}"
            )
        self._check_fast()
        if self.device is not None and (
            not isinstance(self.device, str) or not _DEVICE.fullmatch(self.device)
        ):
            raise SpecError(
                f"--device must be a torch device such as cpu, cuda, cuda:1 or mps, got {self.device!r}"
            )
        if self.dtype not in DTYPES:
            raise SpecError(f"--dtype {self.dtype!r} is not supported; allowed: {', '.join(DTYPES)}")
        if self.name is not None and (not isinstance(self.name, str) or not self.name.strip()):
            raise SpecError(f"the model name must be a non-empty string, got {self.name!r}")
        if self.openvino:
            if self.freeu:
                raise SpecError(
                    "--freeu cannot be combined with --openvino (FreeU's FFT does not convert); drop one"
                )
            if self.device is not None and self.device != "cpu":
                raise SpecError(f"--openvino runs on the CPU; drop --device {self.device} or --openvino")
            if self.dtype not in ("auto", "float32"):
                raise SpecError(f"--openvino runs float32; drop --dtype {self.dtype} or --openvino")

    def _check_ip_adapter(self) -> None:
        if self.ip_adapter is None:
            return
        if not isinstance(self.ip_adapter, list | tuple) or len(self.ip_adapter) != 2:
            raise SpecError(f"--ip-adapter takes PATH[:SCALE]; got {self.ip_adapter!r}")
        source, scale = self.ip_adapter
        source = os.fspath(source) if isinstance(source, os.PathLike) else source
        if not isinstance(source, str) or not Path(source).expanduser().exists():
            raise SpecError(f"--ip-adapter {source}: no such file or folder")
        object.__setattr__(
            self, "ip_adapter", (source, _finite(scale, f"the scale of --ip-adapter {source}"))
        )
        for flag, on in (("--fast", self.fast), ("--openvino", self.openvino)):
            if on:
                raise SpecError(
                    f"--ip-adapter cannot be combined with {flag}: IP-Adapter needs exact mode (the OpenVINO "
                    "graphs have no image branch); drop one"
                )

    def _check_fast(self) -> None:
        if not isinstance(self.fast, bool):
            raise SpecError(f"--fast is on or off (True/False), got {self.fast!r}")
        if self.fast_precision not in FAST_PRECISIONS:
            raise SpecError(
                f"--fast-precision {self.fast_precision!r} is not one lcmkit runs; allowed: "
                f"{', '.join(FAST_PRECISIONS)}"
            )
        if self.fast_size is not None:
            size = self.fast_size
            if (
                not isinstance(size, tuple | list)
                or len(size) != 2
                or not all(
                    isinstance(v, int) and not isinstance(v, bool) and v > 0 and v % 8 == 0 for v in size
                )
            ):
                raise SpecError(f"the fast mode's size must be (width, height), multiples of 8, got {size!r}")
        if not self.fast:
            return
        if self.openvino:
            raise SpecError("--fast already runs OpenVINO (at the best precision here); drop --openvino")
        if self.freeu:
            raise SpecError("--freeu cannot be combined with --fast (FreeU's FFT does not convert); drop one")
        if self.device is not None and self.device != "cpu":
            raise SpecError(f"--fast runs on the CPU; drop --device {self.device} or --fast")
        if self.dtype not in ("auto", "float32"):
            raise SpecError(f"--fast runs float32 weights; drop --dtype {self.dtype} or --fast")

    # What it names ------------------------------------------------------------------------------------------

    @property
    def source(self) -> str:
        """The folder, file or hub id to load."""
        return str(DEFAULT_MODEL) if self.model is None else self.model

    @property
    def is_hub(self) -> bool:
        return not Path(self.source).expanduser().exists()

    @property
    def model_name(self) -> str:
        """What the infotext's `Model:` says and the server reports: the folder's name, the file's stem, or the
        hub id."""
        if self.name is not None:
            return self.name
        if self.is_hub:
            return self.source
        path = Path(self.source).expanduser().resolve()
        return path.stem if path.is_file() else path.name

    def describe(self) -> str:
        """One line for logs: the model and the switches that are on."""
        parts = [self.model_name, *(f"lora {s}:{w:g}" for s, w in self.loras)]
        if self.ip_adapter:
            parts.append(f"ip-adapter {self.ip_adapter[0]}:{self.ip_adapter[1]:g}")
        parts += [f"controlnet {kind} {source}" for kind, source in self.controlnets]
        switches = {"tiny vae": self.tiny_vae, "freeu": self.freeu, "openvino": self.openvino,
                    "fast": self.fast and self.fast_precision,
                    "device": self.device, "vae tiling": self.vae_tiling or None}  # fmt: skip
        parts += [
            label if value is True else f"{label} {value}" for label, value in switches.items() if value
        ]
        return ", ".join([*parts, *([self.dtype] if self.dtype != "auto" else [])])


# Loading ---------------------------------------------------------------------------------------------------


def check_runtime(spec: ModelSpec) -> None:
    """The checks a spec cannot do on its own: the device asked for exists here, OpenVINO is installed.

    Cheap when nothing explicit was asked (no torch import then), so the CLI can call it before fetching."""
    if spec.openvino and importlib.util.find_spec("openvino") is None:
        raise SpecError(
            f"--openvino {spec.openvino} needs the openvino package: pip install 'lcmkit[openvino]'"
        )
    if spec.fast and importlib.util.find_spec("openvino") is None:
        raise SpecError("--fast needs the openvino package: pip install 'lcmkit[openvino]'")
    if spec.device is not None:
        _device(spec.device)


def _device(name: str) -> torch.device:
    import torch

    try:
        device = torch.device(name)
    except (RuntimeError, ValueError):
        raise SpecError(
            f"--device {name}: not a torch device; use cpu, cuda, cuda:1, mps, xpu, ..."
        ) from None
    if device.type == "cuda":
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if count == 0:
            raise SpecError(
                f"--device {name}: CUDA is not available here (torch {torch.__version__}); use cpu"
            )
        if device.index is not None and device.index >= count:
            raise SpecError(
                f"--device {name}: this machine has {count} CUDA device(s), cuda:0 to cuda:{count - 1}"
            )
    elif device.type != "cpu":
        try:
            torch.empty(0, device=device)
        except Exception as e:  # each backend reports a missing device its own way
            raise SpecError(f"--device {name}: not available here ({' '.join(str(e).split())})") from None
    return device


def device_and_dtype(spec: ModelSpec) -> tuple[torch.device, torch.dtype]:
    """The device (the spec's, else CUDA when available, else the CPU) and the dtype its policy picks there."""
    import torch

    if spec.device is not None:
        device = _device(spec.device)
    else:
        on_cpu = spec.openvino or spec.fast
        device = torch.device("cuda" if not on_cpu and torch.cuda.is_available() else "cpu")
    if spec.dtype == "auto":
        return device, torch.float16 if device.type == "cuda" else torch.float32
    return device, getattr(torch, spec.dtype)


def fetch(spec: ModelSpec) -> ModelSpec:
    """The spec with a hub id replaced by its local snapshot folder (downloaded, or found in the cache), keeping
    the hub id as the model name. Local models come back as they are. No torch is imported here."""
    if not spec.is_hub:
        return spec
    from lcmkit.loading.hub import resolve_pretrained

    # a tiny VAE replaces the full one, so its weights need not be downloaded
    skip = ("vae",) if spec.tiny_vae else ()
    folder = resolve_pretrained(spec.source, skip_components=skip)
    return replace(spec, model=str(folder), name=spec.model_name)


def load_pipeline(spec: ModelSpec) -> tuple[Any, str]:
    """The text-to-image pipeline `spec` describes, on its device with every switch applied, and its model name.

    img2img runs reuse it through `LatentConsistencyModelImg2ImgPipeline.from_pipe` (see `run_request`)."""
    check_runtime(spec)
    name = spec.model_name
    spec = fetch(spec)
    device, dtype = device_and_dtype(spec)
    from lcmkit.pipelines.text2img import LatentConsistencyModelPipeline

    tiny_vae = None
    if spec.tiny_vae:
        from lcmkit.models.tiny_vae import AutoencoderTiny

        tiny_vae = AutoencoderTiny.from_pretrained(spec.tiny_vae, torch_dtype=dtype)
    source = Path(spec.source).expanduser()
    if source.is_file():
        pipe = LatentConsistencyModelPipeline.from_single_file(str(source), torch_dtype=dtype)
        if tiny_vae is not None:
            pipe.vae = tiny_vae
    else:
        components = {} if tiny_vae is None else {"vae": tiny_vae}  # the full VAE is then never read
        pipe = LatentConsistencyModelPipeline.from_pretrained(str(source), torch_dtype=dtype, **components)
    if spec.loras:
        adapters = [f"lora{i}" for i in range(len(spec.loras))]
        for adapter, (lora, _) in zip(adapters, spec.loras, strict=True):
            pipe.load_lora_weights(lora, adapter_name=adapter)
        pipe.set_adapters(adapters, [weight for _, weight in spec.loras])
    if spec.ip_adapter:
        pipe.load_ip_adapter(spec.ip_adapter[0])
        pipe.set_ip_adapter_scale(spec.ip_adapter[1])
    if spec.controlnets:
        _set_controlnets(pipe, spec, dtype)
    if device.type != "cpu":
        pipe.to(device)
    if spec.vae_tiling:
        pipe.enable_vae_tiling()
    if spec.freeu:
        pipe.enable_freeu(*spec.freeu)
    if spec.openvino:
        from lcmkit.accel import use_openvino

        try:
            use_openvino(pipe, spec.openvino)
        except (ImportError, ValueError) as e:
            raise SpecError(f"--openvino {spec.openvino}: {e}") from None
    if spec.fast:
        _enable_fast(pipe, spec)
    return pipe, name


def _set_controlnets(pipe: Any, spec: ModelSpec, dtype: torch.dtype) -> None:
    """Load each (kind, source) ControlNet once (a source named twice is one model) and set them on the pipeline;
    a file that is not a ControlNet, or one for another base model, fails naming the file."""
    from lcmkit.loading.controlnet import load_controlnet

    loaded: dict[str, Any] = {}
    for _, source in spec.controlnets:
        if source not in loaded:
            loaded[source] = load_controlnet(source, torch_dtype=dtype)
    nets = [loaded[source] for _, source in spec.controlnets]
    pipe.controlnet = nets if len(nets) > 1 else nets[0]


def _enable_fast(pipe: Any, spec: ModelSpec) -> None:
    from lcmkit.accel import enable_fast

    width, height = spec.fast_size or (None, None)
    try:
        enable_fast(pipe, precision=spec.fast_precision, height=height, width=width)
    except (ImportError, ValueError) as e:
        raise SpecError(f"--fast: {e}") from None
