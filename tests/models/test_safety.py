"""SafetyChecker against diffusers' ``StableDiffusionSafetyChecker`` on the same tiny random weights.

Both get one state dict (keys must be identical). The concept embeddings and thresholds are then set so that,
in one batch, an image is flagged by a concept directly, an image is flagged only because a special-care hit
adds the 0.01 adjustment, and two images pass. Flags must be equal and images equal exactly (flagged → zeros).
Saving and loading are checked in both directions with diffusers' own ``from_pretrained``/``save_pretrained``.
"""

from __future__ import annotations

import json
import logging
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from diffusers import LatentConsistencyModelPipeline
from diffusers.image_processor import VaeImageProcessor
from diffusers.pipelines.stable_diffusion.safety_checker import StableDiffusionSafetyChecker
from helpers.tiny_models import tiny_safety_clip_config
from safetensors.torch import load_file, save_file
from transformers import CLIPConfig, CLIPImageProcessor

from lcmkit.models.safety import SafetyChecker, load_feature_extractor, run_safety_checker

LOGGER = "lcmkit.models.safety"
IMAGE_SIZE = 32


def tiny_config() -> CLIPConfig:
    return tiny_safety_clip_config(IMAGE_SIZE)


def clip_input(batch: int = 4, seed: int = 0) -> torch.Tensor:
    return torch.randn(batch, 3, IMAGE_SIZE, IMAGE_SIZE, generator=torch.Generator().manual_seed(seed))


def _unit(x: torch.Tensor) -> torch.Tensor:
    return x / x.norm()


@pytest.fixture(scope="module")
def pair() -> tuple[StableDiffusionSafetyChecker, SafetyChecker]:
    """(diffusers, ours) with identical weights; concepts arranged for images 0 and 2 of `clip_input()` to flag."""
    torch.manual_seed(0)
    theirs = StableDiffusionSafetyChecker(tiny_config()).eval()
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        # With the default init every image embeds almost alike (cosine > 0.98); larger encoder weights spread
        # the embeddings (pairwise cosine < 0.9) so that a concept can single out one image.
        for weight in theirs.vision_model.encoder.parameters():
            if weight.ndim == 2:
                weight.copy_(torch.randn(weight.shape, generator=generator) * 0.3)
        embeds = theirs.visual_projection(theirs.vision_model(clip_input()).pooler_output)
        theirs.concept_embeds.copy_(torch.randn(17, 32, generator=generator))
        theirs.special_care_embeds.copy_(torch.randn(3, 32, generator=generator))
        theirs.concept_embeds_weights.fill_(0.99)
        theirs.special_care_embeds_weights.fill_(0.99)
        # Image 0: concept 5 is its own embedding (cosine 1 > 0.99).
        theirs.concept_embeds[5] = embeds[0]
        # Image 2: special-care concept 1 is its embedding, so the 0.01 adjustment applies to it ...
        theirs.special_care_embeds[1] = embeds[2]
        # ... and concept 7 sits at cosine 0.5 with threshold 0.505: flagged only thanks to the adjustment.
        # v is orthogonal to every image embedding but image 2's, so the others see only 0.5·cos(e_j, e_2).
        u = _unit(embeds[2])
        basis = torch.linalg.qr(torch.stack([u, embeds[0], embeds[1], embeds[3]], dim=1)).Q
        v = torch.randn(32, generator=generator)
        v = _unit(v - basis @ (basis.t() @ v))
        theirs.concept_embeds[7] = 0.5 * u + (0.75**0.5) * v
        theirs.concept_embeds_weights[7] = 0.505
    ours = SafetyChecker(tiny_config()).eval()
    assert set(ours.state_dict()) == set(theirs.state_dict())
    ours.load_state_dict(theirs.state_dict(), strict=True)
    return theirs, ours


def test_state_dict_keys_are_diffusers_keys(pair):
    theirs, ours = pair
    assert list(ours.state_dict()) == list(theirs.state_dict())
    for key, value in theirs.state_dict().items():
        assert ours.state_dict()[key].shape == value.shape


def test_flags_and_images_match_on_tensors(pair, caplog):
    """Tensor batch: flags [T, F, T, F] on both; flagged images zeroed, others untouched; warning logged."""
    theirs, ours = pair
    images = torch.rand(4, 3, 16, 16, generator=torch.Generator().manual_seed(2)) * 2 - 1
    with caplog.at_level(logging.WARNING, logger=LOGGER):
        out, flags = ours(clip_input(), images)
    ref_out, ref_flags = theirs(clip_input(), images.clone())
    assert flags == ref_flags == [True, False, True, False]
    assert torch.equal(out, ref_out)
    assert out[0].abs().max() == 0 and torch.equal(out[1], images[1])
    assert images[0].abs().max() > 0  # the caller's tensor is not modified
    assert any("Potential NSFW content" in r.getMessage() for r in caplog.records)


def test_adjustment_is_what_flags_image_2(pair):
    """Raise the special-care thresholds: no adjustment, and image 2 passes on both implementations."""
    theirs, ours = pair
    saved = theirs.special_care_embeds_weights.clone()
    try:
        with torch.no_grad():
            theirs.special_care_embeds_weights.fill_(1.5)
            ours.special_care_embeds_weights.fill_(1.5)
        images = np.zeros((4, 8, 8, 3), dtype=np.float32) + 0.5
        assert (
            ours(clip_input(), images)[1]
            == theirs(clip_input(), images.copy())[1]
            == [True, False, False, False]
        )
    finally:
        with torch.no_grad():
            theirs.special_care_embeds_weights.copy_(saved)
            ours.special_care_embeds_weights.copy_(saved)


def test_numpy_and_list_images(pair, caplog):
    """NHWC numpy arrays and lists of tensors are blacked out the same way as the reference."""
    theirs, ours = pair
    array = np.random.default_rng(0).random((4, 8, 8, 3)).astype(np.float32)
    out, flags = ours(clip_input(), array)
    ref_out, ref_flags = theirs(clip_input(), array.copy())
    assert flags == ref_flags
    np.testing.assert_array_equal(out, ref_out)
    assert out.dtype == np.float32 and array[0].max() > 0

    tensors = [torch.rand(3, 8, 8, generator=torch.Generator().manual_seed(i)) for i in range(4)]
    out, flags = ours(clip_input(), tensors)
    ref_out, _ = theirs(clip_input(), [t.clone() for t in tensors])
    assert all(torch.equal(a, b) for a, b in zip(out, ref_out, strict=True))

    caplog.clear()
    with caplog.at_level(logging.WARNING, logger=LOGGER):
        clean = clip_input()[[1, 3]]
        out, flags = ours(clean, array[[1, 3]])
    assert flags == [False, False] and not caplog.records


def test_borderline_scores_round_like_the_reference(pair):
    """Thresholds within ±0.0006 of the true cosines (near round(·, 3)'s sign change), with and without the
    special-care adjustment, give the reference's flags on 8 images (4 threshold sets)."""
    theirs, ours = pair
    inputs = clip_input(8, seed=3)
    with torch.no_grad():
        embeds = theirs.visual_projection(theirs.vision_model(inputs).pooler_output)
        cos = torch.nn.functional.normalize(embeds) @ torch.nn.functional.normalize(theirs.concept_embeds).t()
    offsets = torch.tensor([-6e-4, -5e-4, -4e-4, 4e-4, 5e-4, 6e-4, 0.0])
    saved = [p.clone() for p in (theirs.concept_embeds_weights, theirs.special_care_embeds_weights)]
    try:
        for row in range(4):
            thresholds = cos[row] + offsets[torch.arange(17) % len(offsets)]
            special = torch.full((3,), 1.5) if row % 2 else torch.full((3,), -1.0)  # alternate the adjustment
            with torch.no_grad():
                for model in (theirs, ours):
                    model.concept_embeds_weights.copy_(thresholds)
                    model.special_care_embeds_weights.copy_(special)
            images = np.zeros((8, 2, 2, 3), dtype=np.float32)
            assert ours(inputs, images)[1] == theirs(inputs, images.copy())[1]
    finally:
        with torch.no_grad():
            for model in (theirs, ours):
                model.concept_embeds_weights.copy_(saved[0])
                model.special_care_embeds_weights.copy_(saved[1])


def _float32_float64_disagreement(cos: np.float32) -> np.float32:
    """A float32 threshold t where round(cos − t, 3) > 0 differs between float32 and float64 arithmetic."""
    start = np.float32(cos - np.float32(0.0005))
    for direction in (1.0, -1.0):
        t = start
        for _ in range(5000):
            in32 = np.round(np.float32(cos) - np.float32(t), 3) > 0
            in64 = np.round(np.float64(cos) - np.float64(t), 3) > 0
            if in32 != in64:
                return t
            t = np.nextafter(t, np.float32(direction), dtype=np.float32)
    raise AssertionError("no threshold found where float32 and float64 rounding disagree")


def test_rounding_dtype_matches_the_reference(pair):
    """At a threshold where float32 and float64 rounding of the score disagree, we agree with the reference.

    The reference rounds NumPy scalars (float32 under NumPy 2, float64 under NumPy 1); an implementation that
    picked the other precision flips image 3 here. A concept with cosine ≈ 1e-4 to image 3 makes the score's
    float32 grid fine enough for such a threshold to exist.
    """
    theirs, ours = pair
    inputs = clip_input()
    saved = (theirs.concept_embeds[9].clone(), theirs.concept_embeds_weights[9].clone())
    try:
        with torch.no_grad():
            embeds = theirs.visual_projection(theirs.vision_model(inputs).pooler_output)
            u = _unit(embeds[3])
            v = torch.randn(32, generator=torch.Generator().manual_seed(4))
            v = _unit(v - (v @ u) * u)
            for model in (theirs, ours):
                model.concept_embeds[9] = v + 1e-4 * u
            cos = torch.mm(
                torch.nn.functional.normalize(embeds),
                torch.nn.functional.normalize(theirs.concept_embeds).t(),
            )
            threshold = _float32_float64_disagreement(cos.cpu().float().numpy()[3, 9])
            for model in (theirs, ours):
                model.concept_embeds_weights[9] = float(threshold)
        images = np.zeros((4, 2, 2, 3), dtype=np.float32)
        assert ours(inputs, images)[1] == theirs(inputs, images.copy())[1]
    finally:
        with torch.no_grad():
            for model in (theirs, ours):
                model.concept_embeds[9] = saved[0]
                model.concept_embeds_weights[9] = saved[1]


# ----- saving and loading ---------------------------------------------------------------------------------


def _same_state(a: torch.nn.Module, b: torch.nn.Module) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


def test_ours_saved_loads_in_diffusers(pair, tmp_path):
    """save_pretrained writes the nested (published) key layout and a config diffusers loads as its checker."""
    theirs, ours = pair
    ours.save_pretrained(tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    assert config["architectures"] == ["StableDiffusionSafetyChecker"]
    keys = load_file(tmp_path / "model.safetensors").keys()
    assert all(k.startswith("vision_model.vision_model.") for k in keys if k.startswith("vision_model."))
    loaded = StableDiffusionSafetyChecker.from_pretrained(tmp_path, local_files_only=True).eval()
    assert _same_state(loaded, theirs)
    images = torch.rand(4, 3, 8, 8, generator=torch.Generator().manual_seed(0))
    assert loaded(clip_input(), images.clone())[1] == ours(clip_input(), images)[1]


def test_diffusers_saved_loads_in_ours(pair, tmp_path):
    """A folder written by diffusers (this transformers' layout) loads in ours with equal weights and outputs."""
    theirs, ours = pair
    theirs.save_pretrained(tmp_path)
    loaded = SafetyChecker.from_pretrained(tmp_path)
    assert _same_state(loaded, ours)
    assert loaded.dtype == torch.float32 and not loaded.training
    images = torch.rand(4, 3, 8, 8, generator=torch.Generator().manual_seed(0))
    assert loaded(clip_input(), images)[1] == [True, False, True, False]
    # The rebuilt non-persistent buffer equals the real one.
    buffers = dict(loaded.named_buffers())
    for name, buffer in ours.named_buffers():
        assert torch.equal(buffers[name], buffer)


def test_round_trip_ours(pair, tmp_path):
    _, ours = pair
    ours.save_pretrained(tmp_path)
    assert _same_state(SafetyChecker.from_pretrained(tmp_path), ours)


def test_dtype_variant_and_bin(pair, tmp_path):
    """dtype casts; variant="fp16" reads model.fp16.safetensors; pytorch_model.bin loads (weights_only)."""
    _, ours = pair
    ours.save_pretrained(tmp_path)
    assert SafetyChecker.from_pretrained(tmp_path, dtype=torch.float16).dtype == torch.float16
    state = load_file(tmp_path / "model.safetensors")
    (tmp_path / "model.safetensors").rename(tmp_path / "model.fp16.safetensors")
    save_file({k: v.half() for k, v in state.items()}, tmp_path / "model.fp16.safetensors")
    loaded = SafetyChecker.from_pretrained(tmp_path, variant="fp16")
    assert loaded.dtype == torch.float32
    assert torch.equal(loaded.visual_projection.weight, ours.visual_projection.weight.half().float())
    with pytest.raises(FileNotFoundError, match="model.safetensors"):
        SafetyChecker.from_pretrained(tmp_path)
    torch.save(state, tmp_path / "pytorch_model.bin")
    assert _same_state(SafetyChecker.from_pretrained(tmp_path), ours)


def test_missing_and_unexpected_keys(pair, tmp_path, caplog):
    """Missing keys raise naming them; unexpected keys are logged; old `position_ids` buffers are ignored."""
    _, ours = pair
    ours.save_pretrained(tmp_path)
    state = load_file(tmp_path / "model.safetensors")
    state["vision_model.vision_model.embeddings.position_ids"] = torch.arange(65)[None]
    state["extra.weight"] = torch.zeros(1)
    save_file(state, tmp_path / "model.safetensors")
    with caplog.at_level(logging.WARNING, logger=LOGGER):
        SafetyChecker.from_pretrained(tmp_path)
    messages = " ".join(r.getMessage() for r in caplog.records)
    assert "extra.weight" in messages and "position_ids" not in messages

    del state["concept_embeds"]
    save_file(state, tmp_path / "model.safetensors")
    with pytest.raises(ValueError, match="missing 1 keys: \\['concept_embeds'\\]"):
        SafetyChecker.from_pretrained(tmp_path)
    with pytest.raises(FileNotFoundError, match="config.json"):
        SafetyChecker.from_pretrained(tmp_path / "nowhere")


def test_shape_mismatch_is_reported(pair, tmp_path):
    _, ours = pair
    ours.save_pretrained(tmp_path)
    state = load_file(tmp_path / "model.safetensors")
    state["visual_projection.weight"] = torch.zeros(16, 32)
    save_file(state, tmp_path / "model.safetensors")
    with pytest.raises(ValueError, match="visual_projection.weight: file \\(16, 32\\) vs model \\(32, 32\\)"):
        SafetyChecker.from_pretrained(tmp_path)


# ----- run_safety_checker ---------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def feature_extractor(tmp_path_factory) -> CLIPImageProcessor:
    """A CLIP preprocessor for 32-pixel inputs, saved and loaded back through load_feature_extractor."""
    folder = tmp_path_factory.mktemp("feature_extractor")
    CLIPImageProcessor(
        size={"shortest_edge": IMAGE_SIZE}, crop_size={"height": IMAGE_SIZE, "width": IMAGE_SIZE}
    ).save_pretrained(folder)
    return load_feature_extractor(folder)


def test_load_feature_extractor(feature_extractor, tmp_path):
    assert feature_extractor.crop_size == {"height": IMAGE_SIZE, "width": IMAGE_SIZE}
    with pytest.raises(FileNotFoundError, match="preprocessor_config.json"):
        load_feature_extractor(tmp_path)


@pytest.mark.parametrize("kind", ["tensor", "numpy"])
def test_run_safety_checker_matches_pipeline(pair, feature_extractor, kind):
    """Same images and flags as diffusers' pipeline method (tensor in [-1, 1] NCHW, or NHWC array in [0, 1])."""
    theirs, ours = pair
    decoded = torch.rand(3, 3, 40, 40, generator=torch.Generator().manual_seed(5)) * 2 - 1
    image = decoded if kind == "tensor" else (decoded.permute(0, 2, 3, 1).numpy() + 1) / 2
    copy = image.clone() if kind == "tensor" else image.copy()
    host = SimpleNamespace(
        safety_checker=theirs, feature_extractor=feature_extractor, image_processor=VaeImageProcessor(8)
    )
    ref_image, ref_flags = LatentConsistencyModelPipeline.run_safety_checker(host, copy, "cpu", torch.float32)
    out, flags = run_safety_checker(ours, feature_extractor, image, "cpu", torch.float32)
    assert flags == ref_flags
    if kind == "tensor":
        assert torch.equal(out, ref_image)
    else:
        np.testing.assert_array_equal(out, ref_image)


def test_run_safety_checker_flags_a_matching_image(pair, feature_extractor):
    """An image whose CLIP embedding is a concept embedding is flagged and blacked out."""
    _, ours = pair
    decoded = torch.rand(2, 3, 40, 40, generator=torch.Generator().manual_seed(6)) * 2 - 1
    pil = VaeImageProcessor(8).postprocess(decoded, "pil")
    pixels = feature_extractor(pil, return_tensors="pt").pixel_values
    with torch.no_grad():
        embed = ours.visual_projection(ours.vision_model(pixels).pooler_output)[1]
    saved = ours.concept_embeds[0].clone()
    try:
        with torch.no_grad():
            ours.concept_embeds[0] = embed
        out, flags = run_safety_checker(ours, feature_extractor, decoded, "cpu", torch.float32)
    finally:
        with torch.no_grad():
            ours.concept_embeds[0] = saved
    assert flags[1] is True
    assert out[1].abs().max() == 0


def test_run_safety_checker_without_checker():
    image = torch.zeros(1, 3, 8, 8)
    out, flags = run_safety_checker(None, None, image, "cpu", torch.float32)
    assert out is image and flags is None
    with pytest.raises(ValueError, match="feature extractor"):
        run_safety_checker(SafetyChecker.__new__(SafetyChecker), None, image, "cpu", torch.float32)
