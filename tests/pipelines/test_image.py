"""Image pre/post-processing against diffusers' ``VaeImageProcessor`` (default config, as the LCM pipelines build it).

Every input kind and output type is run through both on the same data. Tolerance: bit-exact, except float64
numpy input, where the reference normalises in float64 and we return float32 (≤ 1e-6).
"""

from __future__ import annotations

import logging
import warnings

import numpy as np
import PIL.Image
import pytest
import torch
from diffusers.image_processor import VaeImageProcessor

from lcmkit.pipelines.image import (
    denormalize,
    numpy_to_pil,
    postprocess,
    preprocess,
    pt_to_numpy,
)

LOGGER = "lcmkit.pipelines.image"


def rng(seed: int = 0) -> np.random.Generator:
    return np.random.default_rng(seed)


def pil_image(height: int, width: int, seed: int = 0) -> PIL.Image.Image:
    return PIL.Image.fromarray(rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8))


def reference(image, vae_scale_factor: int = 8, **kwargs) -> torch.Tensor:
    """diffusers' preprocess; its FutureWarnings (deprecated list-of-4D, [-1, 1] tensors) are expected here."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        return VaeImageProcessor(vae_scale_factor=vae_scale_factor).preprocess(image, **kwargs)


def assert_same(ours: torch.Tensor, theirs: torch.Tensor) -> None:
    assert ours.dtype == torch.float32
    assert ours.shape == theirs.shape
    assert torch.equal(ours, theirs.float())


# ----- preprocess: parity ---------------------------------------------------------------------------------


@pytest.mark.parametrize("size", [(64, 48), (67, 45), (9, 15)])
def test_pil_single(size):
    """One RGB PIL image: floor to a multiple of 8 with Lanczos, [0, 1] → [-1, 1], (1, 3, H, W)."""
    image = pil_image(*size)
    ours = preprocess(image, 8)
    assert ours.shape == (1, 3, size[0] - size[0] % 8, size[1] - size[1] % 8)
    assert_same(ours, reference(image))


def test_pil_list_of_different_sizes_follows_the_first():
    images = [pil_image(70, 50, seed=1), pil_image(40, 90, seed=2)]
    ours = preprocess(images, 8)
    assert ours.shape == (2, 3, 64, 48)
    assert_same(ours, reference(images))


def test_pil_explicit_size_and_scale_factor():
    """height/width override the image size and are floored too; other scale factors work."""
    image = pil_image(64, 64)
    assert_same(preprocess(image, 8, height=37, width=50), reference(image, height=37, width=50))
    assert_same(preprocess(image, 4, height=37, width=50), reference(image, 4, height=37, width=50))


def test_pil_resize_is_lanczos():
    """Proof the resample is Lanczos: the result equals PIL's Lanczos resize, not bilinear/bicubic."""
    image = pil_image(67, 45)
    ours = preprocess(image, 8)
    lanczos = np.asarray(image.resize((40, 64), PIL.Image.Resampling.LANCZOS)).astype(np.float32) / 255.0
    expected = torch.from_numpy(lanczos).permute(2, 0, 1)[None] * 2.0 - 1.0
    assert torch.equal(ours, expected)
    bicubic = np.asarray(image.resize((40, 64), PIL.Image.Resampling.BICUBIC)).astype(np.float32) / 255.0
    assert not torch.equal(ours, torch.from_numpy(bicubic).permute(2, 0, 1)[None] * 2.0 - 1.0)


@pytest.mark.parametrize(
    "shape", [(67, 45, 3), (2, 67, 45, 3), (16, 16, 3)], ids=["HWC-resized", "NHWC-resized", "HWC-same"]
)
def test_numpy_float32(shape):
    """numpy HWC/NHWC in [0, 1]: nearest-neighbour interpolate (as the reference), then normalise."""
    array = rng().random(shape, dtype=np.float32)
    assert_same(preprocess(array, 8), reference(array))


def test_numpy_lists():
    """Lists of HWC arrays are stacked; lists of NHWC arrays are concatenated."""
    hwc = [rng(i).random((33, 41, 3), dtype=np.float32) for i in range(3)]
    assert_same(preprocess(hwc, 8), reference(hwc))
    nhwc = [rng(i).random((2, 33, 41, 3), dtype=np.float32) for i in range(2)]
    ours = preprocess(nhwc, 8)
    assert ours.shape == (4, 3, 32, 40)
    assert_same(ours, reference(nhwc))


def test_numpy_float64_within_1e6():
    array = rng().random((2, 35, 24, 3))
    ours = preprocess(array, 8)
    theirs = reference(array)
    assert ours.dtype == torch.float32 and theirs.dtype == torch.float64
    torch.testing.assert_close(ours, theirs.float(), atol=1e-6, rtol=0)


@pytest.mark.parametrize("shape", [(3, 67, 45), (2, 3, 67, 45), (3, 32, 32)], ids=["CHW", "NCHW", "CHW-same"])
def test_torch_tensors(shape):
    tensor = torch.rand(shape, generator=torch.Generator().manual_seed(0))
    assert_same(preprocess(tensor, 8), reference(tensor))


def test_torch_lists_and_explicit_size():
    chw = [torch.rand(3, 30, 50, generator=torch.Generator().manual_seed(i)) for i in range(2)]
    assert_same(preprocess(chw, 8), reference(chw))
    nchw = [torch.rand(2, 3, 30, 50, generator=torch.Generator().manual_seed(i)) for i in range(2)]
    assert_same(preprocess(nchw, 8), reference(nchw))
    assert_same(preprocess(chw, 8, height=20, width=44), reference(chw, height=20, width=44))


def test_half_tensor_returns_float32():
    tensor = torch.rand(1, 3, 24, 24, generator=torch.Generator().manual_seed(0)).half()
    assert_same(preprocess(tensor, 8), reference(tensor))


def test_negative_tensor_is_not_normalised_and_warns(caplog):
    """min < 0 means "already in [-1, 1]": left as is, with a logged warning (the reference: FutureWarning)."""
    tensor = torch.rand(1, 3, 16, 16, generator=torch.Generator().manual_seed(0)) * 2 - 1
    with caplog.at_level(logging.WARNING, logger=LOGGER):
        ours = preprocess(tensor, 8)
    assert any("already normalised" in r.getMessage() for r in caplog.records)
    with pytest.warns(FutureWarning):
        theirs = VaeImageProcessor(vae_scale_factor=8).preprocess(tensor)
    assert torch.equal(ours, tensor) and torch.equal(ours, theirs)


def test_latent_tensor_passes_through():
    """A 4-channel tensor is taken as latents: returned unchanged (no resize, no normalise), as the reference."""
    latents = torch.randn(2, 4, 5, 7, generator=torch.Generator().manual_seed(0))
    ours = preprocess(latents, 8)
    assert torch.equal(ours, latents) and torch.equal(ours, reference(latents))
    assert preprocess([latents[0], latents[1]], 8).shape == (2, 4, 5, 7)
    assert preprocess(latents[:, :3], 8, latent_channels=3) is not None  # latent_channels is configurable


def test_no_warning_for_valid_input(caplog):
    with caplog.at_level(logging.WARNING, logger=LOGGER):
        preprocess(pil_image(16, 16), 8)
    assert not caplog.records


# ----- preprocess: errors ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("image", "error", "match"),
    [
        ("cat.png", TypeError, "unsupported type str"),
        (3, TypeError, "unsupported type int"),
        ([], ValueError, "empty list"),
        ([1, 2], TypeError, "list holds a int"),
        ([PIL.Image.new("RGB", (8, 8)), np.zeros((8, 8, 3), np.float32)], TypeError, "mixes kinds"),
        ([torch.zeros(3, 8, 8), np.zeros((8, 8, 3), np.float32)], TypeError, "mixes kinds"),
        (PIL.Image.new("L", (8, 8)), ValueError, "mode 'RGB'.*'L'"),
        (PIL.Image.new("RGBA", (8, 8)), ValueError, r"convert\('RGB'\)"),
        (np.zeros((8, 8, 4), np.float32), ValueError, r"\(\.\.\., H, W, 3\)"),
        (np.zeros((3, 8, 8), np.float32), ValueError, r"\(\.\.\., H, W, 3\)"),
        (np.zeros((8, 8, 3), np.uint8), ValueError, "Divide uint8 pixels by 255"),
        (np.zeros((8, 8), np.float32), ValueError, "all be 3-D or all be 4-D"),
        (torch.zeros(2, 8, 8), ValueError, r"\(N, 3, H, W\) RGB or \(N, 4, h, w\) latents"),
        (torch.zeros(8, 8), ValueError, "all be 3-D or all be 4-D"),
        (torch.zeros(1, 1, 8, 8), ValueError, r"\(N, 3, H, W\)"),
        (torch.zeros(1, 3, 8, 8, dtype=torch.uint8), ValueError, "floats in \\[0, 1\\]"),
        ([torch.zeros(3, 8, 8), torch.zeros(1, 3, 8, 8)], ValueError, "all be 3-D or all be 4-D"),
    ],
)
def test_preprocess_errors(image, error, match):
    with pytest.raises(error, match=match):
        preprocess(image, 8)


def test_preprocess_error_lists_what_is_allowed():
    with pytest.raises(TypeError) as info:
        preprocess({"image": 1}, 8)
    message = str(info.value)
    assert "PIL RGB image" in message and "numpy array" in message and "torch tensor" in message
    with pytest.raises(ValueError, match="vae_scale_factor"):
        preprocess(pil_image(8, 8), 0)
    with pytest.raises(ValueError, match="must be >= 8"):
        preprocess(pil_image(5, 40), 8)
    with pytest.raises(ValueError, match="must be >= 8"):
        preprocess(torch.rand(1, 3, 32, 32), 8, height=7)


# ----- postprocess ----------------------------------------------------------------------------------------


@pytest.fixture
def decoded() -> torch.Tensor:
    """A decoded batch with some overshoot past [-1, 1], as VAEs produce."""
    return torch.randn(3, 3, 16, 24, generator=torch.Generator().manual_seed(0)) * 0.8


@pytest.mark.parametrize("output_type", ["pt", "np", "latent"])
def test_postprocess_arrays(decoded, output_type):
    ours = postprocess(decoded, output_type)
    theirs = VaeImageProcessor(vae_scale_factor=8).postprocess(decoded, output_type)
    assert type(ours) is type(theirs)
    if output_type == "np":
        assert ours.shape == (3, 16, 24, 3) and ours.dtype == np.float32
        np.testing.assert_array_equal(ours, theirs)
    else:
        assert torch.equal(ours, theirs)
    if output_type == "latent":
        assert ours is decoded


def test_postprocess_pil(decoded):
    ours = postprocess(decoded, "pil")
    theirs = VaeImageProcessor(vae_scale_factor=8).postprocess(decoded, "pil")
    assert len(ours) == 3
    for a, b in zip(ours, theirs, strict=True):
        assert a.mode == b.mode == "RGB" and a.size == b.size == (24, 16)
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


@pytest.mark.parametrize("output_type", ["pil", "np", "pt"])
def test_postprocess_per_image_denormalize(decoded, output_type):
    """do_denormalize=[True, False, True]: the middle image (a safety-checker zero) is not shifted; others are."""
    decoded = decoded.clone()
    decoded[1] = 0
    flags = [True, False, True]
    ours = postprocess(decoded, output_type, do_denormalize=flags)
    theirs = VaeImageProcessor(vae_scale_factor=8).postprocess(decoded, output_type, do_denormalize=flags)
    if output_type == "pil":
        for a, b in zip(ours, theirs, strict=True):
            np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
        assert np.asarray(ours[1]).max() == 0  # black, not grey
    elif output_type == "np":
        np.testing.assert_array_equal(ours, theirs)
    else:
        assert torch.equal(ours, theirs)


def test_postprocess_unknown_type_warns_and_gives_numpy(decoded, caplog):
    with caplog.at_level(logging.WARNING, logger=LOGGER):
        ours = postprocess(decoded, "numpy")
    assert any("'numpy' is not supported" in r.getMessage() for r in caplog.records)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        theirs = VaeImageProcessor(vae_scale_factor=8).postprocess(decoded, "numpy")
    np.testing.assert_array_equal(ours, theirs)


def test_postprocess_errors(decoded):
    with pytest.raises(TypeError, match="torch.Tensor"):
        postprocess(decoded.numpy(), "pil")
    with pytest.raises(ValueError, match="2 entries but the batch has 3"):
        postprocess(decoded, "pt", do_denormalize=[True, False])


def test_helpers_match_reference(decoded):
    """denormalize, pt_to_numpy and numpy_to_pil (RGB and one-channel "L") equal the reference's static methods."""
    assert torch.equal(denormalize(decoded), VaeImageProcessor.denormalize(decoded))
    np.testing.assert_array_equal(
        denormalize(decoded.numpy()), VaeImageProcessor.denormalize(decoded).numpy()
    )
    array = pt_to_numpy(denormalize(decoded))
    np.testing.assert_array_equal(
        array, VaeImageProcessor.pt_to_numpy(VaeImageProcessor.denormalize(decoded))
    )
    for batch in (array, array[0], array[..., :1]):
        ours, theirs = numpy_to_pil(batch), VaeImageProcessor.numpy_to_pil(batch)
        assert len(ours) == len(theirs)
        for a, b in zip(ours, theirs, strict=True):
            assert a.mode == b.mode
            np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_round_trip_pil_preprocess_postprocess():
    """preprocess then postprocess returns the original pixels of a size that needs no resize."""
    image = pil_image(32, 40)
    back = postprocess(preprocess(image, 8), "pil")[0]
    np.testing.assert_array_equal(np.asarray(back), np.asarray(image))
