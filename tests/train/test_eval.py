"""The evaluation side of the tiny-LCM recipe: FID arithmetic, the scene classifier, caption fidelity, the table.

What is proven here:
- `frechet_distance` equals the closed form on small Gaussians (1-D: (m1 - m2)^2 + (s1 - s2)^2; 2-D:
  Tr (S1 S2)^(1/2) = sqrt(Tr S1 S2 + 2 sqrt(det S1 S2))) to 1e-9, and is 0 for identical sets;
- the classifier, trained in seconds on a reduced world, reads held-out clean renders (> 90% exact match, > 97%
  per attribute), and caches: a second `load_or_train_scorer` loads the same weights instead of training;
- caption fidelity is high on the real renders of the records, about 4/5 when one attribute of one-shape scenes
  is wrong, and low against shuffled records;
- `evaluate_pipelines` runs end to end on tiny random folders (the teacher path through `sample_ddim`, the LCM
  path through `LatentConsistencyModelPipeline`) and gives a table of the right shape with finite numbers.
"""

from __future__ import annotations

import dataclasses
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from lcmkit.tiny import build_tiny_lcm
from lcmkit.train.data import WorldConfig, render_scene, sample_scene
from lcmkit.train.eval import (
    SceneScorer,
    ScorerConfig,
    as_image_batch,
    caption_fidelity,
    evaluate_pipelines,
    fidelity_scores,
    frechet_distance,
    load_or_train_scorer,
    markdown_table,
    render_batch,
    train_scorer,
)

REDUCED = WorldConfig(
    seed=3, shapes=("circle", "square"), colours=("red", "blue", "white", "black"), max_shapes=2
)
# Clean renders only (augmentation doubles the time): about 8 s on one CPU thread.
SMALL = ScorerConfig(
    world=REDUCED,
    train_scenes=2000,
    heldout_scenes=300,
    epochs=8,
    learning_rate=4e-3,
    width=16,
    feature_dim=64,
    augment=False,
    seed=0,
)


@pytest.fixture(scope="module")
def scorer() -> SceneScorer:
    return train_scorer(SMALL)


# ----------------------------------------------------------------------------------------------------------------------
# FID


def test_frechet_distance_is_zero_for_identical_sets() -> None:
    feats = np.random.default_rng(0).normal(size=(50, 6))
    assert frechet_distance(feats, feats) == pytest.approx(0.0, abs=1e-9)
    assert frechet_distance(feats, feats[::-1]) == pytest.approx(0.0, abs=1e-9)


def test_frechet_distance_1d_closed_form() -> None:
    rng = np.random.default_rng(1)
    a, b = rng.normal(1.0, 2.0, size=(40, 1)), rng.normal(-0.5, 0.5, size=(30, 1))
    m1, m2, s1, s2 = a.mean(), b.mean(), a.std(ddof=1), b.std(ddof=1)
    assert frechet_distance(a, b) == pytest.approx((m1 - m2) ** 2 + (s1 - s2) ** 2, abs=1e-9)


def test_frechet_distance_2d_closed_form() -> None:
    rng = np.random.default_rng(2)
    a = rng.multivariate_normal([0, 1], [[2.0, 0.6], [0.6, 1.0]], size=60)
    b = rng.multivariate_normal([1, -1], [[0.5, -0.2], [-0.2, 1.5]], size=80)
    s1, s2 = np.cov(a, rowvar=False), np.cov(b, rowvar=False)
    product = s1 @ s2  # 2x2 with non-negative eigenvalues: tr sqrt(M) = sqrt(tr M + 2 sqrt(det M))
    trace_root = math.sqrt(np.trace(product) + 2 * math.sqrt(np.linalg.det(product)))
    mean_term = float(((a.mean(0) - b.mean(0)) ** 2).sum())
    expected = mean_term + np.trace(s1) + np.trace(s2) - 2 * trace_root
    assert frechet_distance(a, b) == pytest.approx(expected, abs=1e-9)


def test_frechet_distance_rejects_bad_shapes() -> None:
    with pytest.raises(ValueError, match="feature sets"):
        frechet_distance(np.zeros((5, 3)), np.zeros((5, 4)))
    with pytest.raises(ValueError, match="feature sets"):
        frechet_distance(np.zeros((1, 3)), np.zeros((5, 3)))


# ----------------------------------------------------------------------------------------------------------------------
# The classifier and caption fidelity


def test_classifier_reads_heldout_renders(scorer: SceneScorer) -> None:
    heldout = scorer.report["heldout"]
    assert heldout["exact_match"] > 0.9, heldout
    assert min(heldout.values()) > 0.9, heldout
    assert heldout["background"] > 0.97 and heldout["colour"] > 0.97, heldout


def test_image_inputs_agree(scorer: SceneScorer) -> None:
    records = [sample_scene(REDUCED, 10_000 + i) for i in range(4)]
    pixels = np.stack([render_scene(r) for r in records])
    expected = render_batch(records)
    torch.testing.assert_close(as_image_batch(pixels), expected)
    torch.testing.assert_close(as_image_batch([Image.fromarray(p) for p in pixels]), expected)
    with pytest.raises(ValueError, match="uint8"):
        as_image_batch(pixels.astype(np.float32))
    with pytest.raises(ValueError, match="float"):
        as_image_batch(torch.from_numpy(pixels))


def test_caption_fidelity_high_on_real_low_on_mismatched(scorer: SceneScorer) -> None:
    records = [sample_scene(REDUCED, 20_000 + i) for i in range(200)]
    images = render_batch(records)
    assert caption_fidelity(images, records, scorer) > 0.95
    shuffled = records[1:] + records[:1]
    assert caption_fidelity(images, shuffled, scorer) < 0.6
    # Images smaller than the classifier's input are resized, not refused.
    small = torch.nn.functional.interpolate(images[:50], size=32, mode="area")
    assert caption_fidelity(small, records[:50], scorer) > 0.8


def test_one_wrong_attribute_costs_one_fifth(scorer: SceneScorer) -> None:
    """One shape: 5 attributes (background, type, colour, size, no extras); a recoloured shape scores 4/5."""
    world = dataclasses.replace(REDUCED, max_shapes=1)
    records = [sample_scene(world, 30_000 + i) for i in range(40)]
    recoloured = []
    for r in records:
        shape = r.shapes[0]
        colour = next(c for c in world.colours if c not in (r.background, shape.colour))
        recoloured.append(dataclasses.replace(r, shapes=(dataclasses.replace(shape, colour=colour),)))
    scores = fidelity_scores(scorer, render_batch(recoloured), records)
    assert np.mean(scores) == pytest.approx(0.8, abs=0.05)
    assert np.median(scores) == pytest.approx(0.8)
    with pytest.raises(ValueError, match="images for"):
        fidelity_scores(scorer, render_batch(records[:3]), records)


def test_scorer_cache_is_reused(tmp_path: Path) -> None:
    config = dataclasses.replace(SMALL, train_scenes=64, heldout_scenes=16, epochs=1)
    first = load_or_train_scorer(tmp_path, config)
    assert len(list(tmp_path.glob("scorer-*.safetensors"))) == 1
    second = load_or_train_scorer(tmp_path, config)
    assert second.report == first.report
    images = render_batch([sample_scene(REDUCED, i) for i in range(8)])
    np.testing.assert_array_equal(second.features(images), first.features(images))
    other = load_or_train_scorer(tmp_path, dataclasses.replace(config, seed=1))
    assert len(list(tmp_path.glob("scorer-*.safetensors"))) == 2
    assert other.config.key() != first.config.key()


# ----------------------------------------------------------------------------------------------------------------------
# The table


def test_evaluate_pipelines_smoke(tmp_path: Path, scorer: SceneScorer) -> None:
    """The tiny random LCM folder serves as both: its UNet's w-embedding input is simply unused by DDIM."""
    folder = build_tiny_lcm(tmp_path / "tiny")
    results = evaluate_pipelines(
        folder,
        folder,
        n_images=4,
        seed=0,
        scorer=scorer,
        teacher_steps=(3, 1),
        lcm_steps=(1, 2),
        batch_size=3,
        device="cpu",
        world=REDUCED,
    )
    rows = results["rows"]
    assert [(r["model"], r["steps"]) for r in rows] == [
        ("teacher DDIM", 3),
        ("teacher DDIM", 1),
        ("LCM", 1),
        ("LCM", 2),
    ]
    for row in rows:
        assert 0.0 <= row["caption_fidelity"] <= 1.0
        assert math.isfinite(row["fid"]) and row["fid"] >= 0
        assert set(row["attribute_accuracy"]) == {"background", "slot_shape", "colour", "size", "exact_match"}
    assert [r["unet_evals_per_image"] for r in rows] == [6, 2, 1, 2]
    assert results["reference"]["real_caption_fidelity"] > 0.9
    table = markdown_table(results).splitlines()
    assert table[0].count("|") == 1 + 2 * 3 + 1  # model + FID and fidelity at steps 1, 2, 3
    assert table[2].startswith("| teacher DDIM |") and table[3].startswith("| LCM |")
    assert "–" in table[2] or "–" in table[3]  # the teacher has no 2-step row, the LCM no 3-step row
    assert table[5].startswith("| model | steps | background |") and table[7].startswith(
        "| teacher DDIM | 3 |"
    )
    assert (
        len([line for line in table if line.startswith("| LCM | ")]) == 1 + 2
    )  # the main row, two attribute rows
    with pytest.raises(ValueError, match="n_images"):
        evaluate_pipelines(folder, folder, n_images=1, scorer=scorer)
