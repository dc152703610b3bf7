"""Seeds are decided in one place, `lcmkit.request.resolve_seeds`, which the CLI, `run_request` and the server's
worker all call: image i uses seed + i (A1111's convention), -1/None picks a random start, and no seed ever leaves
0..MAX_SEED (a seed written into an infotext must be one that A1111 and lcmkit accept back)."""

from __future__ import annotations

import random
from types import SimpleNamespace

import PIL.Image
import pytest

from lcmkit.request import MAX_SEED, GenerationRequest, resolve_seed, resolve_seeds, run_request


class SeedPipe:
    """Returns one image per generator and remembers the generators' seeds."""

    _progress_bar_config: dict = {}

    def __call__(self, prompt, num_images_per_prompt=1, generator=(), **kwargs):
        self.seeds = [g.initial_seed() for g in generator]
        return SimpleNamespace(images=[PIL.Image.new("RGB", (8, 8))] * num_images_per_prompt)


def test_given_seed_counts_up():
    assert resolve_seeds(7, 3) == [7, 8, 9]
    assert resolve_seeds(0) == [0] and resolve_seed(5) == 5
    assert resolve_seeds(MAX_SEED - 1, 2) == [MAX_SEED - 1, MAX_SEED]


@pytest.mark.parametrize("seed", [None, -1])
def test_random_start_leaves_room_for_every_image(seed, monkeypatch):
    """Even the largest random start keeps the last image's seed at MAX_SEED."""
    monkeypatch.setattr(random, "randint", lambda low, high: high)
    assert resolve_seeds(seed, 4) == [MAX_SEED - 3, MAX_SEED - 2, MAX_SEED - 1, MAX_SEED]
    monkeypatch.setattr(random, "randint", lambda low, high: low)
    assert resolve_seeds(seed, 4) == [0, 1, 2, 3]


@pytest.mark.parametrize(
    ("seed", "count", "message"),
    [
        (MAX_SEED, 2, f"seed must be an integer between -1 \\(random\\) and {MAX_SEED - 1} for 2 images"),
        (MAX_SEED + 1, 1, f"between -1 \\(random\\) and {MAX_SEED}, got {MAX_SEED + 1}"),
        (1.5, 1, "seed must be an integer"),
        (True, 1, "seed must be an integer"),
        (1, 0, "the number of images must be a positive integer"),
    ],
)
def test_out_of_range_is_refused(seed, count, message):
    with pytest.raises(ValueError, match=message):
        resolve_seeds(seed, count)


def test_run_request_uses_them(monkeypatch):
    """run_request seeds each image's generator from resolve_seeds and writes that seed into its infotext; a
    start that would push the last image past MAX_SEED is refused instead of written."""
    monkeypatch.setattr(random, "randint", lambda low, high: high)
    pipe = SeedPipe()
    results = run_request(pipe, GenerationRequest("a cat", num_images=2))
    assert pipe.seeds == [r.seed for r in results] == [MAX_SEED - 1, MAX_SEED]
    assert f"Seed: {MAX_SEED}," in results[1].infotext
    with pytest.raises(ValueError, match="for 2 images"):
        run_request(SeedPipe(), GenerationRequest("a cat", seed=MAX_SEED, num_images=2))
