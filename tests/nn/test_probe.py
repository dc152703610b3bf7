"""`lcmkit.nn.probe` and `FastPaths.choose="probe"`: the fast paths chosen per shape by measuring, not by thresholds.

What these tests prove, with timings made up by a fake `measure` (no test depends on the clock): the faster variant
wins by the minimum of interleaved calls after a warm-up, and a tie keeps the reference; a slow reference call is
probed on a row slice in the input's layout; decisions live in memory (one measurement per key) and in one JSON file
per machine under `$LCMKIT_PROBE_CACHE`, named by CPU, torch and thread count, written atomically and ignored with a
warning when corrupt; each path (packing, Winograd, the sub-pixel upsampler, the VAE level layout) follows the probe
where it probes and the thresholds where it cannot (autograd, graph capture, float64, a probe already running); and
models in probe mode stay within 1e-4 of `FastPaths.reference()` whichever way the probes go.
"""

from __future__ import annotations

import dataclasses
import json
import logging

import pytest
import torch
from helpers.reference import assert_close_to_reference
from helpers.tiny_models import SMALL_UNET

from lcmkit.config import VAEConfig
from lcmkit.models.unet import UNet2DConditionModel
from lcmkit.models.vae import AutoencoderKL
from lcmkit.nn import fast, probe
from lcmkit.nn.conv import Conv2d, winograd_available
from lcmkit.nn.layout import is_channels_last, level_layout
from lcmkit.nn.lora import LoraLayer, LoraWeights, inject_adapter, lora_layers, set_active_adapters
from lcmkit.nn.probe import Prober, set_prober
from lcmkit.nn.sampling import Upsample2D
from lcmkit.runtime import FastPaths

TOL = 1e-4


class FakeTimes:
    """A `measure` that runs nothing and answers made-up seconds per variant; records (name, input shape)."""

    def __init__(self, reference: float = 0.002, fast: float = 0.001, run: bool = False) -> None:
        self.seconds = {"reference": reference, "fast": fast}
        self.calls: list[tuple[str, tuple[int, ...]]] = []
        self.inputs: list[torch.Tensor] = []
        self.run = run

    def __call__(self, name, fn, x):
        self.calls.append((name, tuple(x.shape)))
        self.inputs.append(x)
        if self.run:
            fn(x)
        value = self.seconds[name]
        return value(len(self.calls)) if callable(value) else value


@pytest.fixture
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv(probe.CACHE_ENV, str(tmp_path))
    return tmp_path


@pytest.fixture
def use(cache):
    """Install a fresh process prober measuring with the given fake; restored afterwards."""
    previous = []

    def install(times: FakeTimes) -> Prober:
        prober = Prober(measure=times)
        previous.append(set_prober(prober))
        return prober

    yield install
    if previous:
        set_prober(previous[0])


def _decide(prober: Prober, key: str = "k", x: torch.Tensor | None = None) -> bool:
    x = torch.zeros(1, 2, 8, 8) if x is None else x
    return prober.decide(key, (lambda t: t, x), (lambda t: t, x))


def test_the_faster_variant_wins_by_the_minimum_of_interleaved_calls(cache):
    times = FakeTimes()
    assert _decide(Prober(measure=times), "fast wins")
    names = [name for name, _ in times.calls]
    # the cold reference call, its first sample, the fast warm-up, then alternating; two rounds suffice when
    # every fast timing beats every reference timing
    assert names == ["reference", "reference", "fast", "fast", "reference", "fast"]
    # overlapping timings: all REPS rounds; one slow outlier of the fast side does not decide, the minimum does
    outlier = FakeTimes(reference=0.001, fast=lambda n: 0.009 if n == 4 else 0.0005)
    assert _decide(Prober(measure=outlier), "outlier")
    assert [name for name, _ in outlier.calls].count("fast") == 1 + probe.REPS


def test_a_reference_too_slow_to_time_is_left_to_the_thresholds(cache):
    times = FakeTimes(reference=2 * probe.MAX_CALL_S)
    prober = Prober(measure=times)
    assert (
        prober.decide("slow", (lambda t: t, torch.zeros(1, 1, 8, 8)), (lambda t: t, torch.zeros(1))) is None
    )
    assert [name for name, _ in times.calls] == ["reference", "reference"]  # the fast side never ran
    assert prober.decide("slow", (None, None), (None, None)) is None  # the same answer for the whole process
    assert len(times.calls) == 2
    assert not list(cache.glob("probe-*.json"))  # not written: a quieter process may probe it


@pytest.mark.parametrize("fast_seconds", [0.01, 0.01 * (1.0 - probe.MARGIN / 2), 0.015])
def test_ties_and_losses_keep_the_reference(cache, fast_seconds):
    assert not _decide(Prober(measure=FakeTimes(reference=0.01, fast=fast_seconds)))


@pytest.mark.parametrize("channels_last", [False, True])
def test_a_slow_reference_is_probed_on_a_row_slice_in_its_layout(cache, channels_last):
    x = torch.randn(1, 3, 200, 10)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    times = FakeTimes(reference=lambda n: 10 * probe.CALL_BUDGET_S if n == 1 else 0.01, fast=0.005)
    prober = Prober(measure=times)
    assert _decide(prober, "sliced", x)
    rows = max(probe.MIN_ROWS, probe.FIRST_ROWS // 10)
    assert times.calls[0] == (
        "reference",
        (1, 3, probe.FIRST_ROWS, 10),
    )  # tall maps start on their first rows
    assert all(shape == (1, 3, rows, 10) for _, shape in times.calls[1:])
    assert all(is_channels_last(t) == channels_last for t in times.inputs[1:])
    assert prober.entries()["sliced"]["rows"] == rows


def test_a_wide_map_still_too_slow_on_few_rows_is_cut_in_columns_too(cache):
    x = torch.randn(1, 3, 64, 512)
    times = FakeTimes(reference=lambda n: 40 * probe.CALL_BUDGET_S if n == 1 else 0.01, fast=0.005)
    prober = Prober(measure=times)
    assert _decide(prober, "cropped", x)
    # 32 rows took 40 budgets: 16 rows would take 20, so the columns are cut by 20 too (not below MIN_COLS)
    cols = max(probe.MIN_COLS, int(512 / 20))
    assert all(shape == (1, 3, probe.MIN_ROWS, cols) for _, shape in times.calls[1:])
    assert prober.entries()["cropped"]["cols"] == cols


def test_decisions_are_measured_once_and_kept_in_memory_and_on_disk(cache):
    times = FakeTimes()
    prober = Prober(measure=times)
    assert _decide(prober, "once")
    count = len(times.calls)
    times.seconds = {"reference": 0.001, "fast": 0.005}  # the machine changed its mind: the process does not
    assert _decide(prober, "once") and len(times.calls) == count
    (path,) = cache.glob("probe-*.json")
    assert path == probe.cache_path()
    data = json.loads(path.read_text())
    assert data["decisions"]["once"]["winner"] == "fast"
    assert data["decisions"]["once"]["seconds"] == {"reference": 0.002, "fast": 0.001}
    assert {"cpu", "flags", "torch", "threads", "capability"} <= set(data["machine"])
    assert not list(cache.glob("*.tmp"))  # written through a renamed temporary file

    def never(*_):
        raise AssertionError("a later process reads the file instead of measuring")

    assert _decide(Prober(measure=never), "once")


def test_the_cache_file_depends_on_threads_and_the_machine(cache, monkeypatch):
    threads = torch.get_num_threads()
    first = probe.cache_path()
    try:
        torch.set_num_threads(threads + 1)
        assert probe.cache_path() != first
        assert probe.machine_fingerprint()["threads"] == threads + 1
    finally:
        torch.set_num_threads(threads)
    assert probe.cache_path() == first
    monkeypatch.setattr(probe, "_cpu", lambda: ("Another CPU", "0" * 16))
    probe._cache_path.cache_clear()
    try:
        assert probe.cache_path() != first
    finally:
        probe._cache_path.cache_clear()


@pytest.mark.parametrize("content", ["{not json", '{"decisions": {"k": {"winner": "maybe"}}}', "[]"])
def test_a_corrupt_cache_file_is_ignored_with_a_warning_and_rewritten(cache, caplog, content):
    path = probe.cache_path()
    path.write_text(content)
    times = FakeTimes()
    with caplog.at_level(logging.WARNING, logger="lcmkit.nn.probe"):
        assert _decide(Prober(measure=times), "k")
    assert times.calls  # measured, not read
    assert any("unreadable probe cache" in r.message and str(path) in r.message for r in caplog.records)
    assert json.loads(path.read_text())["decisions"]["k"]["winner"] == "fast"


def test_an_unwritable_cache_keeps_decisions_in_memory(tmp_path, monkeypatch, caplog):
    blocker = tmp_path / "file"
    blocker.write_text("")
    monkeypatch.setenv(probe.CACHE_ENV, str(blocker / "sub"))  # a folder under a file cannot be made
    prober = Prober(measure=FakeTimes())
    with caplog.at_level(logging.WARNING, logger="lcmkit.nn.probe"):
        assert _decide(prober, "k")
    assert "could not write the probe cache" in caplog.text
    assert prober.entries()["k"]["winner"] == "fast"


# ----------------------------------------------------------------------------------------------------------------------
# The paths follow the probe


def _conv(cin: int, cout: int, **kwargs) -> Conv2d:
    torch.manual_seed(0)
    return Conv2d(cin, cout, 3, padding=1, choose="probe", **kwargs).eval()


@pytest.mark.parametrize("wins", [True, False])
def test_packing_follows_the_probe_beyond_its_threshold(use, wins):
    """48x48 is above the 32x32 threshold but inside the probe's region: packed where the probe says it pays."""
    times = FakeTimes(fast=0.001 if wins else 0.003, run=True)
    use(times)
    conv = _conv(16, 16, prepack="always")
    x = torch.randn(1, 16, 48, 48)
    with torch.no_grad():
        y = conv(x)
    assert times.calls and times.calls[0] == ("reference", (1, 16, probe.FIRST_ROWS, 48))
    assert conv._packed.value is not None  # the packed copy was made to be timed
    torch.testing.assert_close(y, torch.nn.Conv2d.forward(conv, x), atol=1e-5, rtol=1e-5)
    calls = len(times.calls)
    with torch.no_grad():
        conv(x)
        conv(torch.randn(1, 16, 72, 72))  # outside the region: the plain path, nothing probed
    assert len(times.calls) == calls
    assert list(fast.default_prober().entries().values())[0]["winner"] == ("fast" if wins else "reference")


def test_packing_too_slow_to_probe_follows_the_threshold(use, monkeypatch):
    use(FakeTimes(reference=2 * probe.MAX_CALL_S))
    used = []
    real = fast._packed_conv
    monkeypatch.setattr(
        fast, "_packed_conv", lambda conv, x, w: used.append(tuple(x.shape)) or real(conv, x, w)
    )
    conv = _conv(16, 16, prepack="always")
    with torch.no_grad():
        conv(torch.randn(1, 16, 48, 48))  # above the 32x32 threshold: plain
        conv(torch.randn(1, 16, 16, 16))  # at most 32x32: packed
    assert used == [(1, 16, 16, 16)]


@pytest.mark.skipif(not winograd_available(), reason="NNPACK is not available on this CPU")
@pytest.mark.parametrize("wins", [True, False])
def test_winograd_follows_the_probe_below_its_threshold(use, monkeypatch, wins):
    """128 channels at 32x32 is below the thresholds (256 channels, 96x96) but inside the probe's region."""
    use(FakeTimes(fast=0.001 if wins else 0.003))
    calls = []
    real = torch._nnpack_spatial_convolution
    monkeypatch.setattr(
        torch, "_nnpack_spatial_convolution", lambda x, *a: calls.append(x.shape) or real(x, *a)
    )
    conv = _conv(128, 128)
    x = torch.randn(1, 128, 32, 32)
    assert not conv.takes_winograd(x.shape, x.dtype, x.device)  # autograd on: the thresholds, no probe
    with torch.no_grad():
        assert conv.takes_winograd(x.shape, x.dtype, x.device) == wins
        y = conv(x)
        assert bool(calls) == wins
        assert_close_to_reference(y, torch.nn.Conv2d.forward(conv, x), atol=1e-4, what="probed conv")
        assert not conv.takes_winograd((1, 128, 31, 32), x.dtype, x.device)  # below the region: no path
        conv.choose = "thresholds"
        assert not conv.takes_winograd(x.shape, x.dtype, x.device)


@pytest.mark.parametrize("wins", [True, False])
def test_the_subpixel_upsampler_follows_the_probe_below_its_threshold(use, monkeypatch, wins):
    use(FakeTimes(fast=0.001 if wins else 0.003))
    ran = []
    real = fast.nearest2x_conv3x3
    monkeypatch.setattr(fast, "nearest2x_conv3x3", lambda *a, **k: ran.append(1) or real(*a, **k))
    torch.manual_seed(0)
    up = Upsample2D(8, subpixel="auto").eval()
    up.conv.choose = "probe"
    x = torch.randn(1, 8, 6, 6)  # below SUBPIXEL_MIN_PIXELS
    with torch.no_grad():
        y = up(x)
        up.subpixel = False
        plain = up(x)
    assert bool(ran) == wins
    assert (up._kernels.value is not None) == wins  # the phase kernels are dropped where they do not pay
    torch.testing.assert_close(y, plain, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("channels_last_wins", [True, False])
def test_the_vae_level_layout_follows_the_probe(use, channels_last_wins):
    use(FakeTimes(fast=0.001 if channels_last_wins else 0.003))
    conv = _conv(16, 16)
    x = torch.randn(1, 16, 8, 8)
    with torch.no_grad():
        out = level_layout("auto", x, conv)
        assert is_channels_last(out) == channels_last_wins
        assert torch.equal(out, x)
        assert not is_channels_last(level_layout("contiguous", x, conv))
    assert is_channels_last(level_layout("auto", x, conv))  # autograd on: the fixed rule (channels-last)


def test_where_nothing_can_be_timed_the_thresholds_decide(use):
    def never(*_):
        raise AssertionError("probed where it must not")

    prober = Prober(measure=never)
    previous = set_prober(prober)
    try:
        conv = _conv(16, 16, prepack="always")
        x = torch.randn(1, 16, 16, 16)
        assert conv(x).requires_grad  # autograd: the plain convolution
        with torch.no_grad():
            traced = torch.jit.trace(conv, x, check_trace=False)  # graphs: the reference layers
            torch.testing.assert_close(traced(x), torch.nn.Conv2d.forward(conv, x))
            conv64 = _conv(16, 16, prepack="always").double()
            conv64(x.double())
            prober.busy = True  # inside another probe: the thresholds (16x16 <= 32x32: packed, no probe)
            conv(x)
            assert conv._packed.value is not None
            prober.busy = False
            assert not fast.probing(conv, x.double())
        up = Upsample2D(16, subpixel="auto")
        up.conv.choose = "probe"
        assert up(torch.randn(1, 16, 4, 4)).requires_grad
    finally:
        set_prober(previous)
    assert prober.entries() == {}


def _tiny_models() -> tuple[UNet2DConditionModel, AutoencoderKL]:
    torch.manual_seed(0)
    # the model tests' small UNet, twice as wide so that its convolutions reach the packing probe's 16 channels
    unet = UNet2DConditionModel(dataclasses.replace(SMALL_UNET, block_out_channels=(16, 32))).eval()
    vae = AutoencoderKL(
        VAEConfig(block_out_channels=(16, 32), latent_channels=4, norm_num_groups=4, sample_size=32)
    ).eval()
    return unet, vae


def _outputs(unet, vae, paths: FastPaths) -> tuple[torch.Tensor, torch.Tensor]:
    unet.set_fast_paths(paths)
    vae.set_fast_paths(paths)
    for module in (*unet.modules(), *vae.modules()):  # in-memory weights: let "auto" packing apply too
        module = module.base if isinstance(module, LoraLayer) else module  # the conv a LoRA wrapper runs
        if isinstance(module, Conv2d) and paths.conv_prepack != "off":
            module.prepack = "always"
    gen = torch.Generator().manual_seed(0)
    sample = torch.randn(1, 4, 16, 16, generator=gen)
    with torch.no_grad():
        eps = unet(
            sample,
            timestep=500,
            encoder_hidden_states=torch.randn(1, 5, 12, generator=gen),
            timestep_cond=torch.randn(1, 6, generator=gen),
        ).sample
        image = vae.decode(sample).sample
    return eps, image


@pytest.mark.parametrize("times", ["fast", "reference", "real"])
def test_probe_mode_stays_within_tolerance_of_the_reference(use, times):
    """Whichever way every probe goes (fast always, reference always, or this machine's real timings), the UNet's
    prediction and the decoded image stay within 1e-4 of `FastPaths.reference()`."""
    if times == "real":
        use(Prober().measure)  # the clock, in a fresh prober with its own memory
    else:
        use(FakeTimes(fast=0.001 if times == "fast" else 0.003, run=True))
    unet, vae = _tiny_models()
    eps_ref, image_ref = _outputs(unet, vae, FastPaths.reference())
    assert fast.default_prober().entries() == {}
    probing = FastPaths(choose="probe")
    eps, image = _outputs(unet, vae, probing)
    entries = fast.default_prober().entries()
    assert any(key.startswith("prepack") for key in entries)
    assert any(key.startswith("subpixel") for key in entries)
    assert any(key.startswith("channels_last") for key in entries)
    assert_close_to_reference(eps, eps_ref, atol=TOL, what="UNet prediction, probe mode")
    assert_close_to_reference(image, image_ref, atol=TOL, what="VAE decode, probe mode")
    again = _outputs(unet, vae, probing)  # the same choice on every call of one process
    assert torch.equal(again[0], eps) and torch.equal(again[1], image)


def test_probe_mode_keeps_lora_adapters_on_every_conv(use):
    """LoRA adapters on every conv of the UNet (upsamplers included, as kohya and LCM-LoRA files have them): with
    every probe won by the fast path, the prediction stays within 1e-4 of the reference arithmetic with the same
    adapters, unfused and fused. The sub-pixel upsampler, which the probe takes on small maps, used to drop an
    unfused adapter's product (0.01-0.03 off diffusers in the LoRA parity tests)."""
    use(FakeTimes(fast=0.001, run=True))
    unet, vae = _tiny_models()
    gen = torch.Generator().manual_seed(1)
    layers = {
        name: LoraWeights(
            torch.randn(2, m.in_channels, *m.kernel_size, generator=gen) * 0.3,
            torch.randn(m.out_channels, 2, 1, 1, generator=gen) * 0.3,
            alpha=2.0,
        )
        for name, m in unet.named_modules()
        if isinstance(m, Conv2d)
    }
    assert any("upsamplers" in name for name in layers)
    unet.set_fast_paths(FastPaths(choose="thresholds"))
    inject_adapter(unet, "a", layers)
    set_active_adapters(unet, ["a"], [0.8])
    eps_ref, _ = _outputs(unet, vae, FastPaths.reference())
    eps, _ = _outputs(unet, vae, FastPaths(choose="probe"))
    # FastPaths reaches the convs inside the LoRA wrappers (outside the module tree)
    assert all(layer.base.choose == "probe" for _, layer in lora_layers(unet))
    entries = fast.default_prober().entries()
    assert any(key.startswith("subpixel") for key in entries) and any(
        k.startswith("prepack") for k in entries
    )
    assert_close_to_reference(eps, eps_ref, atol=TOL, what="UNet prediction with LoRA, probe mode")
    for _, layer in lora_layers(unet):
        layer.fuse(["a"], 1.0)
    eps_fused, _ = _outputs(unet, vae, FastPaths(choose="probe"))
    assert_close_to_reference(
        eps_fused, eps_ref, atol=TOL, what="UNet prediction with fused LoRA, probe mode"
    )


def test_the_cache_folder_defaults_to_the_user_cache(monkeypatch, tmp_path):
    monkeypatch.delenv(probe.CACHE_ENV, raising=False)
    monkeypatch.setenv("HOME", str(tmp_path))
    assert probe.cache_dir() == tmp_path / ".cache" / "lcmkit"
    monkeypatch.setenv(probe.CACHE_ENV, str(tmp_path / "elsewhere"))
    assert probe.cache_path().parent == tmp_path / "elsewhere"
    assert probe.cache_path().name.startswith("probe-") and probe.cache_path().suffix == ".json"


def test_fast_paths_choose_reaches_every_conv():
    unet, vae = _tiny_models()
    for model in (unet, vae):
        convs = [m for m in model.modules() if isinstance(m, Conv2d)]
        assert convs and all(m.choose == "probe" for m in convs)  # FastPaths.default()
        model.set_fast_paths(FastPaths(choose="thresholds"))
        assert all(m.choose == "thresholds" for m in convs)
        model.set_fast_paths(FastPaths(choose="probe"))
        assert all(m.choose == "probe" for m in convs)
