"""Control images made without downloaded models (`lcmkit.control`): Canny edges and the kind -> model table."""

from __future__ import annotations

import numpy as np
import PIL.Image
import pytest

from lcmkit.control import CONTROL_MODELS, canny, control_image_for


def square(size: int = 64, lo: int = 16, hi: int = 48) -> PIL.Image.Image:
    pixels = np.zeros((size, size, 3), dtype=np.uint8)
    pixels[lo:hi, lo:hi] = 255
    return PIL.Image.fromarray(pixels)


def test_canny_finds_the_border_of_a_square_and_nothing_inside():
    edges = np.asarray(canny(square()))
    assert edges.shape == (64, 64, 3) and set(np.unique(edges)) == {0, 255}
    assert (edges[..., 0] == edges[..., 1]).all() and (edges[..., 0] == edges[..., 2]).all()
    on = edges[..., 0] > 0
    # every edge pixel lies within one pixel of the square's border
    ys, xs = np.nonzero(on)
    near_border = (np.minimum(abs(ys - 15.5), abs(ys - 47.5)) <= 1.5) | (
        np.minimum(abs(xs - 15.5), abs(xs - 47.5)) <= 1.5
    )
    assert near_border.all()
    assert not on[20:44, 20:44].any()  # nothing inside
    assert not on[:12].any() and not on[52:].any()  # nothing far outside
    # each side is traced along its length, thin (non-maximum suppression: at most 2 pixels across)
    for row in range(20, 44):
        assert 1 <= on[row, 10:22].sum() <= 2 and 1 <= on[row, 42:54].sum() <= 2


def test_canny_thresholds_and_inputs():
    faint = (
        np.asarray(square()).astype(np.float32) / 255.0 * 0.1
    )  # a 25-level step: below the default thresholds
    assert not np.asarray(canny(faint)).any()
    assert np.asarray(canny(faint, low=10, high=20)).any()
    flat = PIL.Image.new("RGB", (32, 32), (120, 30, 200))
    assert not np.asarray(canny(flat)).any()
    with pytest.raises(ValueError, match="low <= high"):
        canny(flat, low=200, high=100)


def test_pass_through_kinds_and_the_model_table():
    image = PIL.Image.new("L", (16, 16), 7)
    depth = control_image_for("depth", image)
    assert depth.mode == "RGB" and np.asarray(depth)[0, 0].tolist() == [7, 7, 7]
    assert control_image_for("canny", square()).mode == "RGB"
    assert CONTROL_MODELS["canny"] == "lllyasviel/control_v11p_sd15_canny"
    assert all(v.startswith("lllyasviel/control_v11") and "sd15" in v for v in CONTROL_MODELS.values())
    with pytest.raises(ValueError, match="unknown control kind 'xray'.*canny"):
        control_image_for("xray", image)


def test_control_units_build_the_call_arguments():
    from lcmkit.control import ControlUnit, control_call_kwargs

    picture = square()
    units = [
        ControlUnit("canny", picture, scale=0.5, end=0.5),
        ControlUnit("depth", picture, start=0.25, model="m/d"),
    ]
    assert [u.source for u in units] == ["lllyasviel/control_v11p_sd15_canny", "m/d"]
    kwargs = control_call_kwargs(units)
    assert kwargs["controlnet_conditioning_scale"] == [0.5, 1.0]
    assert kwargs["control_guidance_start"] == [0.0, 0.25] and kwargs["control_guidance_end"] == [0.5, 1.0]
    edges, depth = kwargs["control_image"]
    assert np.asarray(edges).max() == 255 and not np.asarray(edges)[20:44, 20:44].any()
    assert np.array_equal(np.asarray(depth), np.asarray(picture))
    assert control_call_kwargs([]) == {}
    one = control_call_kwargs(units[:1])
    assert isinstance(one["control_image"], PIL.Image.Image)
    for bad, message in (
        (dict(start=0.5, end=0.5), "need 0 <= start < end <= 1"),
        (dict(scale=float("nan")), "scale must be a finite number"),
    ):
        with pytest.raises(ValueError, match=message):
            ControlUnit("depth", picture, **bad)
