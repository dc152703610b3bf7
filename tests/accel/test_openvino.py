"""The OpenVINO fast mode (`lcmkit.accel.openvino`) on the tiny diffusers-saved pipelines of `tests/conftest.py`.

What these tests prove:
- fp32: the compiled UNet computes what our eager UNet computes (max abs diff <= 1e-4 per call, for every timestep
  form and for batches that are multiples of the compiled batch), and a whole `LatentConsistencyModelPipeline` run
  with it swapped in for `pipe.unet` gives the eager image within 1e-3 (LCM guidance embedding, classifier-free
  guidance with a doubled batch, and a UNet without w-embedding);
- int8: each reduced precision runs inside the pipeline and stays near eager. The tolerances are loose and stated
  per precision (relative RMS error of one UNet call on a held-out sampler input); on tiny random weights they say
  only that the graph is the same function, not what image quality real weights keep;
- what the graph cannot do (a LoRA scale, FreeU, other shapes, unknown arguments) raises a clear error, and
  `import lcmkit` never needs openvino; without it, the error says what to install.
"""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest
import torch

from lcmkit import LatentConsistencyModelPipeline
from lcmkit.accel import OpenVINOUNet, UNetInputs, collect_unet_inputs, graphs, openvino_unet
from lcmkit.accel import openvino as ov_module
from lcmkit.tiny import build_tiny_lcm

PROMPT = "a red circle on a blue background"
FP32_CALL_TOL = 1e-4
FP32_IMAGE_TOL = 1e-3
# relative RMS error of one UNet call against eager, on the tiny random UNet (measured: ~0.01, ~0.25, ~0.25)
INT8_REL_RMS = {"int8-weights": 0.05, "int8-hybrid": 0.5, "int8": 0.5}


def _has(module: str) -> bool:
    try:
        __import__(module)
    except ImportError:
        return False
    return True


needs_openvino = pytest.mark.skipif(not _has("openvino"), reason="openvino is not installed")
needs_nncf = pytest.mark.skipif(not _has("nncf"), reason="nncf is not installed")


def _pipe(folder) -> LatentConsistencyModelPipeline:
    pipe = LatentConsistencyModelPipeline.from_pretrained(folder)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _image(pipe: LatentConsistencyModelPipeline, seed: int = 0, **kwargs) -> np.ndarray:
    generator = torch.Generator("cpu").manual_seed(seed)
    return pipe(PROMPT, generator=generator, output_type="np", num_inference_steps=4, **kwargs).images


def _call(unet, item: UNetInputs, **kwargs) -> torch.Tensor:
    return item.run(unet, **kwargs)


def _max_diff(a, b) -> float:
    return float(np.abs(np.asarray(a, dtype=np.float64) - np.asarray(b, dtype=np.float64)).max())


@pytest.fixture(scope="module")
def sd15(tiny_folders):
    return _pipe(tiny_folders["sd15"])


@pytest.fixture(scope="module")
def recorded(sd15) -> list[UNetInputs]:
    """Real UNet inputs of two 4-step runs (8 calls, batch 1): calibration for int8, probes for every test."""
    return collect_unet_inputs(sd15, [PROMPT, "a small green square"], num_inference_steps=4)


@pytest.fixture(scope="module")
def ov_fp32(sd15) -> OpenVINOUNet:
    return openvino_unet(sd15.unet, batch_size=1, vae_scale_factor=sd15.vae_scale_factor, threads=1)


@needs_openvino
def test_fp32_call_matches_eager(sd15, recorded, ov_fp32):
    """Every recorded sampler call: compiled fp32 vs eager, max abs diff <= 1e-4."""
    for item in recorded:
        assert _max_diff(_call(ov_fp32, item), _call(sd15.unet, item)) <= FP32_CALL_TOL


@needs_openvino
def test_fp32_timestep_forms_batches_and_outputs(sd15, recorded, ov_fp32):
    """A number, a 0-d tensor and an int64 (B,) tensor give the same result; batch 3 runs as 3 compiled calls;
    `return_dict` gives the same output object as our UNet; no timestep_cond equals eager without it."""
    item = recorded[1]
    x = item.sample.repeat(3, 1, 1, 1) + torch.linspace(0, 0.5, 3)[:, None, None, None]
    c = item.encoder_hidden_states.repeat(3, 1, 1)
    w = item.timestep_cond.repeat(3, 1)
    t = int(item.timestep[0])
    with torch.no_grad():
        ref = sd15.unet(x, t, c, timestep_cond=w).sample
        outs = [
            ov_fp32(x, t, c, timestep_cond=w).sample,
            ov_fp32(x, torch.tensor(t), c, timestep_cond=w)[0],
            ov_fp32(x, torch.full((3,), t, dtype=torch.int64), c, timestep_cond=w, return_dict=False)[0],
        ]
        no_cond = ov_fp32(x, t, c).sample
        ref_no_cond = sd15.unet(x, t, c).sample
    for out in outs:
        assert out.shape == ref.shape and out.dtype == torch.float32
        assert _max_diff(out, ref) <= FP32_CALL_TOL
    assert _max_diff(no_cond, ref_no_cond) <= FP32_CALL_TOL
    assert ov_fp32.config is sd15.unet.config
    assert ov_fp32.dtype == torch.float32 and ov_fp32.device == torch.device("cpu")


@needs_openvino
@pytest.mark.parametrize("negative_prompt", [None, "blurry"], ids=["lcm", "lcm+cfg"])
def test_fp32_pipeline_matches_eager(sd15, ov_fp32, negative_prompt):
    """The whole pipeline with the OpenVINO UNet swapped in: image within 1e-3 of eager. With a negative prompt
    classifier-free guidance runs, so each UNet call has batch 2 on a graph compiled for batch 1."""
    fast = LatentConsistencyModelPipeline.from_pipe(sd15, unet=ov_fp32)
    kwargs = {"negative_prompt": negative_prompt, "guidance_scale": 6.0, "negative_guidance_scale": 2.0}
    assert _max_diff(_image(fast, **kwargs), _image(sd15, **kwargs)) <= FP32_IMAGE_TOL


@needs_openvino
def test_fp32_pipeline_without_w_embedding(tiny_folders):
    """An SD UNet without `time_cond_proj_dim` (real CFG at guidance 6, batch 2 per call) converts too."""
    plain = _pipe(tiny_folders["sd15_plain"])
    fast = LatentConsistencyModelPipeline.from_pipe(
        plain,
        unet=openvino_unet(plain.unet, batch_size=2, vae_scale_factor=plain.vae_scale_factor, threads=1),
    )
    assert _max_diff(_image(fast, guidance_scale=6.0), _image(plain, guidance_scale=6.0)) <= FP32_IMAGE_TOL


def _no_conversion(*args, **kwargs):
    raise AssertionError("converted again instead of reading the cache")


@pytest.fixture(scope="module")
def tiny_lcm(tmp_path_factory) -> LatentConsistencyModelPipeline:
    """lcmkit's own smallest LCM (one resnet per level): quantizing it costs the least time."""
    return _pipe(build_tiny_lcm(tmp_path_factory.mktemp("tiny_lcm")))


@pytest.fixture(scope="module")
def ov_cache(tmp_path_factory):
    """One cache for all int8 tests: the fp32 IR is traced once and quantized per precision."""
    return tmp_path_factory.mktemp("ov_cache")


@needs_openvino
@needs_nncf
@pytest.mark.parametrize("precision", list(INT8_REL_RMS))
def test_int8_precisions_stay_near_eager(tiny_lcm, ov_cache, precision, monkeypatch):
    """Calibrated on one sampler run, probed on the other run's calls: relative RMS error within the stated
    tolerance, and the pipeline runs with it. A second conversion reads the cached IR instead of converting.

    (Compiling the same int8 graph twice need not give bit-equal outputs: OpenVINO's int8 kernels may round
    differently per compilation, and a flipped quantization level propagates; hence no exact comparison.)"""
    recorded = collect_unet_inputs(tiny_lcm, [PROMPT, "a small green square"], num_inference_steps=4)
    calibration, probes = recorded[:4], recorded[4:]
    kwargs = dict(
        batch_size=1,
        vae_scale_factor=tiny_lcm.vae_scale_factor,
        threads=1,
        precision=precision,
        calibration=calibration,
        cache_dir=ov_cache,
    )
    fast = openvino_unet(tiny_lcm.unet, **kwargs)
    for item in probes:
        ref = _call(tiny_lcm.unet, item)
        rel = float((_call(fast, item) - ref).pow(2).mean().sqrt() / ref.pow(2).mean().sqrt())
        print(f"{precision}: relative RMS error {rel:.3f}")
        assert rel <= INT8_REL_RMS[precision], f"{precision}: relative RMS error {rel:.3f}"
    image = _image(LatentConsistencyModelPipeline.from_pipe(tiny_lcm, unet=fast))
    assert image.shape == (1, 32, 32, 3) and np.isfinite(image).all()
    assert len(list(ov_cache.glob(f"unet-{precision}-{'?' * 32}.xml"))) == 1
    assert len(list(ov_cache.glob(f"unet-fp32-{'?' * 32}.xml"))) == 1
    # the second call must come from the cache: converting or quantizing again would raise here
    monkeypatch.setattr(graphs, "convert", _no_conversion)
    monkeypatch.setattr(graphs, "quantize", _no_conversion)
    again = openvino_unet(tiny_lcm.unet, **kwargs)
    ref = _call(tiny_lcm.unet, probes[0])
    rel = float((_call(again, probes[0]) - ref).pow(2).mean().sqrt() / ref.pow(2).mean().sqrt())
    assert rel <= INT8_REL_RMS[precision]


@needs_openvino
def test_unsupported_calls_raise(sd15, recorded, ov_fp32):
    """What the fixed graph cannot honour is refused with a message that says why."""
    item = recorded[0]
    with pytest.raises(ValueError, match="LoRA scale"):
        _call(ov_fp32, item, cross_attention_kwargs={"scale": 0.5})
    _call(ov_fp32, item, cross_attention_kwargs={"scale": 1.0})  # the neutral scale is fine
    with pytest.raises(ValueError, match="cross_attention_kwargs"):
        _call(ov_fp32, item, cross_attention_kwargs={"ip_adapter_masks": None})
    with pytest.raises(ValueError, match="does not take"):
        _call(ov_fp32, item, added_cond_kwargs={})
    with pytest.raises(ValueError, match="FreeU"):
        ov_fp32.enable_freeu(0.9, 0.2, 1.5, 1.6)
    with pytest.raises(ValueError, match="compiled for latents"):
        ov_fp32(torch.zeros(1, 4, 8, 8), 10, item.encoder_hidden_states)
    with pytest.raises(ValueError, match="encoder_hidden_states"):
        ov_fp32(item.sample, 10, item.encoder_hidden_states[:, :10])
    with pytest.raises(ValueError, match="timestep must be"):
        ov_fp32(item.sample, torch.zeros(2, 2), item.encoder_hidden_states)
    with pytest.raises(ValueError, match="timestep_cond must be"):
        ov_fp32(item.sample, 10, item.encoder_hidden_states, timestep_cond=item.timestep_cond[:, :3])


@needs_openvino
def test_bad_conversions_raise(sd15, recorded):
    """Refused before any conversion work: unknown precision, int8 without calibration, FreeU on,
    calibration of the wrong shape, a size that is not a multiple of the VAE factor."""
    unet, vsf = sd15.unet, sd15.vae_scale_factor
    with pytest.raises(ValueError, match="unknown precision"):
        openvino_unet(unet, precision="int4", vae_scale_factor=vsf)
    with pytest.raises(ValueError, match="needs calibration"):
        openvino_unet(unet, precision="int8", vae_scale_factor=vsf)
    with pytest.raises(ValueError, match="calibration sample"):
        openvino_unet(unet, precision="int8", vae_scale_factor=vsf, height=64, width=64, calibration=recorded)
    with pytest.raises(ValueError, match="multiples"):
        openvino_unet(unet, vae_scale_factor=vsf, height=33)
    unet.enable_freeu(0.9, 0.2, 1.5, 1.6)
    try:
        with pytest.raises(ValueError, match="FreeU"):
            openvino_unet(unet, vae_scale_factor=vsf)
    finally:
        unet.disable_freeu()


def test_missing_openvino_says_what_to_install(sd15, monkeypatch):
    """With openvino not importable, the error names the pip command."""
    monkeypatch.setitem(sys.modules, "openvino", None)
    with pytest.raises(ImportError, match="pip install openvino nncf"):
        openvino_unet(sd15.unet)


@needs_openvino
def test_missing_nncf_says_what_to_install(sd15, monkeypatch):
    """int8 needs nncf; without it the error names the pip command (before any conversion work)."""
    monkeypatch.setitem(sys.modules, "nncf", None)
    with pytest.raises(ImportError, match="pip install openvino nncf"):
        openvino_unet(sd15.unet, precision="int8-weights")


def test_import_lcmkit_does_not_import_openvino():
    """`import lcmkit` and even `import lcmkit.accel.openvino` leave openvino and nncf unloaded."""
    code = (
        "import sys, lcmkit, lcmkit.accel, lcmkit.accel.openvino; "
        "bad = [m for m in ('openvino', 'nncf') if m in sys.modules]; assert not bad, bad"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


@needs_openvino
@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="weight paging uses /proc/self/pagemap")
def test_cached_fp32_conversion_releases_the_eager_weights(sd15, recorded, tmp_path, monkeypatch):
    """With a cache, the eager UNet's memory-mapped pages are handed back once its digest is taken (OpenVINO works
    from its own copy), and a cached graph is compiled from its file; the eager UNet still computes the same."""
    from lcmkit.loading.paging import resident_weight_bytes, weight_ranges

    unet = sd15.unet
    ref = _call(unet, recorded[0])
    size = sum(end - start for start, end in weight_ranges([unet]))
    with torch.no_grad():  # read every page (the eager call skips the plain copies of packed conv weights)
        for p in unet.parameters():
            p.sum()
    assert resident_weight_bytes(unet) == size
    kwargs = dict(batch_size=1, vae_scale_factor=sd15.vae_scale_factor, threads=1, cache_dir=tmp_path)
    fast = openvino_unet(unet, **kwargs)
    assert resident_weight_bytes(unet) < 0.1 * size
    assert _max_diff(_call(fast, recorded[0]), ref) <= FP32_CALL_TOL
    monkeypatch.setattr(graphs, "convert", _no_conversion)
    compiled_from = []
    real_compile = ov_module.compile_graph
    monkeypatch.setattr(
        ov_module,
        "compile_graph",
        lambda ov, model, *a, **k: compiled_from.append(model) or real_compile(ov, model, *a, **k),
    )
    again = openvino_unet(unet, **kwargs)
    assert compiled_from == [str(next(tmp_path.glob("unet-fp32-*.xml")))]
    assert _max_diff(_call(again, recorded[0]), ref) <= FP32_CALL_TOL
    assert torch.equal(_call(unet, recorded[0]), ref)
