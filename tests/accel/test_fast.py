"""The fast mode (`enable_fast`, `--fast`): precision choice, whole pipeline on OpenVINO, cache reuse, LoRA keying.

What these tests prove:
- the precision rule follows the CPU's flags (faked flag sets and a faked /proc/cpuinfo): bf16 with avx512_bf16
  or AMX bf16, int8 weights with VNNI (AVX-512 or AVX), else fp32; an explicit precision is taken as asked;
- on the shipped tiny model at 64x64, the fast image is >= 35 dB PSNR against the exact (eager) image, and the
  text encoder, UNet and VAE decoder are all OpenVINO stand-ins;
- a second `enable_fast` on the same weights converts nothing (`graphs.convert` counted), while a LoRA changes the
  cache key (it converts again, to new IR files);
- `--fast` on the CLI and `serve(fast=True)` reach the pipeline through `ModelSpec`; a missing openvino package
  or an impossible combination is a clear error.
"""

from __future__ import annotations

import sys

import numpy as np
import pytest
import torch

from lcmkit import LatentConsistencyModelPipeline, cli
from lcmkit.accel.cpu import choose_precision, cpu_flags, has_int8_dot, resolve_precision
from lcmkit.spec import DEFAULT_MODEL, ModelSpec, SpecError, check_runtime, load_pipeline

SIZE = 64
MIN_PSNR_DB = 35.0
SPR = frozenset(
    {"avx512f", "avx512_bf16", "avx512_vnni", "amx_tile", "amx_bf16", "amx_int8"}
)  # Sapphire Rapids


@pytest.mark.parametrize(
    ("flags", "expected"),
    [
        ({"avx2", "fma"}, "fp32"),  # an AVX2-only EPYC: this machine
        ({"avx2", "avx512f", "avx512bw"}, "fp32"),  # AVX-512 without VNNI or bf16
        ({"avx2", "avx512f", "avx512_vnni"}, "int8-weights"),
        ({"avx2", "avx_vnni"}, "int8-weights"),  # Alder Lake
        ({"avx512f", "avx512_vnni", "avx512_bf16"}, "bf16"),  # Cooper Lake, Zen 4
        ({"avx512f", "amx_tile", "amx_bf16", "amx_int8"}, "bf16"),  # Sapphire Rapids (+ the int8 trial)
        (set(), "fp32"),  # no /proc/cpuinfo
    ],
)
def test_precision_follows_the_cpu_flags(flags, expected):
    assert choose_precision(frozenset(flags)).precision == expected
    assert resolve_precision("auto", frozenset(flags)).precision == expected
    assert resolve_precision("fp32", frozenset(flags)).precision == "fp32"  # explicit: as asked


def test_where_auto_tries_int8():
    assert has_int8_dot(SPR) and has_int8_dot({"avx2", "avx_vnni"}) and has_int8_dot({"avx512_vnni"})
    assert not has_int8_dot({"avx2", "fma", "avx512f", "avx512_bf16"}) and not has_int8_dot(set())


def test_cpu_flags_read_cpuinfo(tmp_path):
    info = tmp_path / "cpuinfo"
    info.write_text("processor\t: 0\nvendor_id\t: AuthenticAMD\nflags\t\t: fpu avx2 fma avx512_bf16\n\n")
    assert cpu_flags(info) == {"fpu", "avx2", "fma", "avx512_bf16"}
    assert choose_precision(cpu_flags(info)).precision == "bf16"
    assert cpu_flags(tmp_path / "missing") == frozenset()
    with pytest.raises(ValueError, match="allowed: auto, fp32, bf16, int8-weights, int8"):
        resolve_precision("int4")


# Whole pipeline ---------------------------------------------------------------------------------------------

pytest.importorskip("openvino", reason="the OpenVINO fast mode is an optional extra (lcmkit[openvino])")

from lcmkit.accel import (  # noqa: E402
    OpenVINOTextEncoder,
    OpenVINOUNetPerShape,
    OpenVINOVAEDecoder,
    enable_fast,
    graphs,  # noqa: E402
)


def _pipe() -> LatentConsistencyModelPipeline:
    return LatentConsistencyModelPipeline.from_pretrained(DEFAULT_MODEL)


def _image(pipe) -> np.ndarray:
    pipe.set_progress_bar_config(disable=True)
    generator = torch.Generator().manual_seed(3)
    out = pipe("a red circle on a blue background", num_inference_steps=4, height=SIZE, width=SIZE,
               generator=generator, output_type="np")  # fmt: skip
    return out.images


def _psnr(a: np.ndarray, b: np.ndarray) -> float:
    mse = float(np.mean((a.astype(np.float64) - b) ** 2))
    return float("inf") if mse == 0 else 10 * np.log10(1.0 / mse)


@pytest.fixture
def conversions(monkeypatch):
    """Counts `graphs.convert` calls (each is a torch -> OpenVINO conversion)."""
    calls: list[str] = []
    real = graphs.convert
    monkeypatch.setattr(graphs, "convert", lambda ov, source: calls.append(source.name) or real(ov, source))
    return calls


def test_fast_image_matches_exact_and_the_cache_is_reused(tmp_path, conversions):
    exact = _image(_pipe())
    fast = _pipe()
    mode = enable_fast(fast, precision="auto", cache_dir=tmp_path, height=SIZE, width=SIZE, threads=1,
                       flags=frozenset({"avx2", "fma"}))  # fmt: skip
    assert mode.precision == "fp32"
    assert isinstance(fast.unet, OpenVINOUNetPerShape) and isinstance(fast.text_encoder, OpenVINOTextEncoder)
    assert isinstance(fast.vae.decoder, OpenVINOVAEDecoder)
    assert sorted(conversions) == ["text-encoder", "unet", "vae-decoder"]
    assert _psnr(_image(fast), exact) >= MIN_PSNR_DB

    conversions.clear()
    again = _pipe()
    enable_fast(again, precision="fp32", cache_dir=tmp_path, height=SIZE, width=SIZE, threads=1)
    assert conversions == []  # everything read back from the cache
    assert _psnr(_image(again), exact) >= MIN_PSNR_DB


def _with_lora(seed: int) -> LatentConsistencyModelPipeline:
    pipe = _pipe()
    name, layer = next(
        (n, m) for n, m in pipe.unet.named_modules() if isinstance(m, torch.nn.Linear) and "attn1.to_q" in n
    )
    generator = torch.Generator().manual_seed(seed)
    pipe.load_lora_weights(
        {
            f"unet.{name}.lora_A.weight": torch.randn(2, layer.in_features, generator=generator),
            f"unet.{name}.lora_B.weight": torch.randn(layer.out_features, 2, generator=generator),
        },
        adapter_name="style",
    )
    return pipe


@pytest.mark.parametrize("precision", ["bf16", "int8"])
def test_bf16_and_int8_plans(tmp_path, conversions, monkeypatch, precision):
    """bf16 stores float16 weights in the IR; int8 calibrates the UNet and the VAE decoder on the pipeline's own
    run for the compiled size, only when the graphs are not cached. bf16 stays >= 35 dB from exact mode on the
    shipped model (OpenVINO runs bf16 as float32 on CPUs without bf16 units); forced int8 does not (18 dB
    measured: why "auto" only keeps int8 where its trial passes), so it is only checked for gross errors. The
    cache files' pages are not kept resident."""
    floor = MIN_PSNR_DB if precision == "bf16" else 15.0
    from lcmkit.accel import int8
    from lcmkit.io.paging import mapped_file_ranges, resident_bytes

    recorded = []
    real_record = int8.record_unet_inputs
    monkeypatch.setattr(
        int8, "record_unet_inputs", lambda *a, **k: recorded.append(1) or real_record(*a, **k)
    )
    exact = _image(_pipe())
    pipe = _pipe()
    mode = enable_fast(pipe, precision=precision, cache_dir=tmp_path, height=SIZE, width=SIZE, threads=1,
                       flags=SPR)  # fmt: skip
    want = "int8" if precision == "int8" else "fp16-weights"
    assert mode.precision == precision and mode.unet_precision == want and mode.vae_precision == want
    assert (mode.int8 is not None and mode.int8.forced) == (precision == "int8")
    assert {p.name.split("-")[0] for p in tmp_path.glob("*-fp16-weights-*.xml")} >= {"text", "vae"}
    assert list(tmp_path.glob(f"unet-{mode.unet_precision}-*.xml"))
    assert list(tmp_path.glob(f"vae-decoder-{mode.vae_precision}-*.xml"))
    assert recorded == ([1] if precision == "int8" else [])  # one run calibrates both graphs
    assert resident_bytes(mapped_file_ranges(tmp_path)) == 0  # released after compiling
    assert _psnr(_image(pipe), exact) >= floor

    conversions.clear()
    recorded.clear()
    again = _pipe()
    enable_fast(again, precision=precision, cache_dir=tmp_path, height=SIZE, width=SIZE, threads=1, flags=SPR)
    assert conversions == [] and recorded == []  # a warm cache neither converts nor calibrates
    assert _psnr(_image(again), exact) >= floor


def test_auto_keeps_int8_only_where_the_trial_passes(tmp_path, monkeypatch, conversions):
    """On a CPU with int8 dot products "auto" tries int8 for the UNet and the decoder. With the speed bar
    lifted (timings are the machine's, not the test's), the shipped model's int8 UNet fails the 35 dB floor
    (18 dB measured), so the installed UNet is the bf16 one and the image holds; the verdict file is read by the
    next process, which records, converts and measures nothing. A floor of 0 takes the fastest combination, and
    an unreachable speed bar tries none."""
    from lcmkit.accel import int8

    monkeypatch.setattr(int8, "MIN_SPEEDUP", 0.0)
    exact = _image(_pipe())
    pipe = _pipe()
    mode = enable_fast(
        pipe, precision="auto", cache_dir=tmp_path, height=SIZE, width=SIZE, threads=1, flags=SPR
    )
    verdict = mode.int8
    assert mode.precision == "bf16" and verdict is not None and not verdict.forced
    assert set(verdict.speedup) == {"unet", "vae decoder"}
    assert verdict.psnr_db["unet+vae decoder int8"] < int8.FLOOR_DB  # tried, and failed
    assert not verdict.unet and mode.unet_precision == "fp16-weights"
    assert (mode.vae_precision == "int8") == verdict.vae
    assert _psnr(_image(pipe), exact) >= MIN_PSNR_DB
    [written] = tmp_path.glob("int8-verdict-*.json")

    conversions.clear()
    monkeypatch.setattr(int8, "record_unet_inputs", lambda *a, **k: pytest.fail("recorded again"))
    monkeypatch.setattr(int8, "timed_speedup", lambda *a, **k: pytest.fail("measured again"))
    again = _pipe()
    mode = enable_fast(
        again, precision="auto", cache_dir=tmp_path, height=SIZE, width=SIZE, threads=1, flags=SPR
    )
    assert mode.int8 == verdict and conversions == []
    assert _psnr(_image(again), exact) >= MIN_PSNR_DB
    monkeypatch.undo()

    monkeypatch.setattr(int8, "MIN_SPEEDUP", 0.0)
    monkeypatch.setattr(int8, "FLOOR_DB", 0.0)  # part of the verdict's key: measured again
    mode = enable_fast(_pipe(), precision="auto", cache_dir=tmp_path, height=SIZE, width=SIZE, threads=1,
                       flags=SPR)  # fmt: skip
    assert len(mode.int8.psnr_db) == 1 and (mode.int8.unet or mode.int8.vae)  # the first combination tried
    assert mode.unet_precision == ("int8" if mode.int8.unet else "fp16-weights")
    assert mode.vae_precision == ("int8" if mode.int8.vae else "fp16-weights")

    monkeypatch.setattr(int8, "MIN_SPEEDUP", 1e9)
    mode = enable_fast(_pipe(), precision="auto", cache_dir=tmp_path, height=SIZE, width=SIZE, threads=1,
                       flags=SPR)  # fmt: skip
    assert mode.int8.psnr_db == {} and not (mode.int8.unet or mode.int8.vae)
    assert written in set(tmp_path.glob("int8-verdict-*.json"))  # each key its own file


def test_a_lora_changes_the_cache_key(tmp_path, conversions):
    """A LoRA, and then another LoRA of the same layout (only its values differ), each get their own entry."""
    enable_fast(_pipe(), precision="fp32", cache_dir=tmp_path, height=SIZE, width=SIZE, threads=1)
    seen = {p.name for p in tmp_path.glob("unet-*.xml")}
    for seed in (0, 1):
        conversions.clear()
        pipe = _with_lora(seed)
        eager = _image(pipe)
        enable_fast(pipe, precision="fp32", cache_dir=tmp_path, height=SIZE, width=SIZE, threads=1)
        assert "unet" in conversions  # a new key: converted, not read from an earlier entry
        assert {p.name for p in tmp_path.glob("unet-*.xml")} - seen
        seen = {p.name for p in tmp_path.glob("unet-*.xml")}
        assert _psnr(_image(pipe), eager) >= MIN_PSNR_DB  # the fused LoRA is in the graph


def test_cli_and_server_flag_reach_the_pipeline(tmp_path, monkeypatch):
    monkeypatch.setenv("LCMKIT_OPENVINO_CACHE", str(tmp_path))
    argv = ["generate", "a red circle", "--fast", "--size", f"{SIZE}x{SIZE}"]
    spec = cli.model_spec(cli.build_parser().parse_args(argv))
    assert spec.fast and spec.fast_precision == "auto" and spec.fast_size == (SIZE, SIZE)
    pipe, _ = load_pipeline(spec)
    assert isinstance(pipe.unet, OpenVINOUNetPerShape) and isinstance(pipe.text_encoder, OpenVINOTextEncoder)
    f, tokens = pipe.vae_scale_factor, pipe.tokenizer.model_max_length
    assert pipe.unet.compiled_shapes == [(SIZE // f, SIZE // f, tokens)]  # compiled for --size at load

    from lcmkit.server.run import spec_and_limits

    served, _ = spec_and_limits(None, {"fast": True, "fast_precision": "fp32"})
    assert served.fast and served.fast_precision == "fp32"
    args = cli.build_parser().parse_args(["serve", "--fast", "--fast-precision", "fp32"])
    assert cli.model_spec(args) == served


def test_refusals_say_why(monkeypatch):
    with pytest.raises(SpecError, match="drop --openvino"):
        ModelSpec(fast=True, openvino="fp32")
    with pytest.raises(SpecError, match="--freeu cannot be combined with --fast"):
        ModelSpec(fast=True, freeu=(0.9, 0.2, 1.5, 1.6))
    with pytest.raises(SpecError, match="allowed: auto, fp32, bf16, int8-weights, int8"):
        ModelSpec(fast=True, fast_precision="int4")
    with pytest.raises(SpecError, match="multiples of 8"):
        ModelSpec(fast=True, fast_size=(60, 64))
    pipe = _pipe()
    pipe.enable_freeu(0.9, 0.2, 1.5, 1.6)
    with pytest.raises(ValueError, match="FreeU is on"):
        enable_fast(pipe, precision="fp32")

    monkeypatch.setitem(sys.modules, "openvino", None)
    with pytest.raises(ImportError, match="pip install openvino"):
        enable_fast(_pipe(), precision="fp32")
    monkeypatch.setattr("importlib.util.find_spec", lambda name, *a: None)
    with pytest.raises(
        SpecError, match=r"--fast needs the openvino package: pip install 'lcmkit\[openvino\]'"
    ):
        check_runtime(ModelSpec(fast=True))


def test_fast_paths_fast_and_from_pretrained_fast(tmp_path, monkeypatch):
    """`from_pretrained(fast=True)` is `FastPaths.fast()`: the OpenVINO stand-ins, and an image close to exact
    mode; the backend cannot silently go back to torch, and `fast=True` with a torch `fast_paths` is refused."""
    from lcmkit.runtime import FastPaths

    monkeypatch.setenv("LCMKIT_OPENVINO_CACHE", str(tmp_path))
    exact = _image(_pipe())
    pipe = LatentConsistencyModelPipeline.from_pretrained(DEFAULT_MODEL, fast=True)
    assert pipe.fast_paths == FastPaths.fast() and pipe.fast_mode is not None
    assert isinstance(pipe.unet, OpenVINOUNetPerShape) and isinstance(pipe.text_encoder, OpenVINOTextEncoder)
    assert _psnr(_image(pipe), exact) >= MIN_PSNR_DB
    with pytest.raises(ValueError, match="load the pipeline again"):
        pipe.set_fast_paths(FastPaths.default())
    with pytest.raises(ValueError, match="fast=True asks for the OpenVINO backend"):
        LatentConsistencyModelPipeline.from_pretrained(
            DEFAULT_MODEL, fast=True, fast_paths=FastPaths.reference()
        )
