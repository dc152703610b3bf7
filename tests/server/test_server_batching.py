"""Compatible queued text-to-image jobs share one pipeline call (issue 20, item 2: request batching).

The worker is held in its model-loading step (a factory waiting on an event) while the test queues jobs, so what
it takes together is decided by the queue alone, never by timing. The real tiny pipeline runs, wrapped to count
its calls: compatible jobs (same size, steps, guidance, options) run as ONE call and each image matches the image
its request gets alone; incompatible jobs, `max_batch=1`, cancelled jobs and a failing batch are checked too.
"""

from __future__ import annotations

import threading
from dataclasses import replace
from typing import Any

import numpy as np
import pytest
from server_fakes import tiny_pipe

from lcmkit.request import GenerationRequest, run_request
from lcmkit.server.jobs import JobCancelled, JobQueue, Settings

TOLERANCE = 1e-5  # batched matrix products round differently from single ones (float output); measured below
LEVEL = 1 / 255  # the same, in 8-bit images: a pixel may land one level apart


class Counting:
    """The real pipeline, recording the prompts of each call; with `fail_batches`, a call of more than one
    image raises (a stand-in for any error a batch might hit)."""

    def __init__(self, pipe: Any, fail_batches: bool = False) -> None:
        self.pipe, self.fail_batches = pipe, fail_batches
        self.calls: list[list[str]] = []

    def set_progress_bar_config(self, **kwargs: Any) -> None:
        self.pipe.set_progress_bar_config(**kwargs)

    def __call__(self, prompt: Any, negative_prompt: Any = None, **kwargs: Any) -> Any:
        prompts = [prompt] * kwargs["num_images_per_prompt"] if isinstance(prompt, str) else list(prompt)
        self.calls.append(prompts)
        if self.fail_batches and len(prompts) > 1:
            raise RuntimeError("this batch fails")
        return self.pipe(prompt, negative_prompt=negative_prompt, **kwargs)


@pytest.fixture(scope="module")
def pipe() -> Any:
    p = tiny_pipe()
    p.set_progress_bar_config(disable=True)
    return p


def request(prompt: str, seed: int, **kw: Any) -> GenerationRequest:
    return GenerationRequest(prompt, steps=2, seed=seed, width=64, height=64, **kw)


def run_queued(
    counting: Counting, reqs: list[GenerationRequest], settings: Settings, cancel: int | None = None
) -> list[Any]:
    """Queue every request before the worker may start, then let it run; each job's images or exception."""
    gate = threading.Event()

    def load() -> Counting:
        assert gate.wait(30), "test never released the worker"
        return counting

    queue = JobQueue(load, settings)
    try:
        jobs = [queue.submit(r) for r in reqs]
        if cancel is not None:
            assert queue.cancel(jobs[cancel]) == "queued"
        gate.set()
        out = []
        for job in jobs:
            try:
                out.append(job.future.result(timeout=300))
            except Exception as e:
                out.append(e)
        return out
    finally:
        queue.stop()


def pixels(image: Any) -> np.ndarray:
    return np.asarray(image, dtype=np.float64) / 255.0


SETTINGS = Settings(queue_size=8, max_batch=4, batch_requests=4)


def test_compatible_jobs_run_as_one_call_with_their_own_images(pipe: Any) -> None:
    reqs = [request("a red fox", 11), request("a blue house", 500, num_images=2), request("a cat", 7)]
    counting = Counting(pipe)
    results = run_queued(counting, reqs, SETTINGS)
    assert counting.calls == [["a red fox", "a blue house", "a blue house", "a cat"]]
    worst = 0.0
    for req, got in zip(reqs, results, strict=True):
        alone = run_request(pipe, req, "lcm")
        assert (
            [g.seed for g in got]
            == [a.seed for a in alone]
            == list(range(req.seed, req.seed + req.num_images))
        )
        assert [g.infotext for g in got] == [a.infotext for a in alone]
        for g, a in zip(got, alone, strict=True):
            worst = max(worst, float(np.abs(pixels(g.image) - pixels(a.image)).max()))
    print(f"max |batched - alone| over all pixels: {worst:.3g}")
    assert worst <= LEVEL + 1e-9


def test_batched_call_matches_single_calls_in_floats(pipe: Any) -> None:
    """The check above compares 8-bit images; this one the pipeline's float output, per-image generators in one
    call of two prompts against each prompt alone."""
    import torch

    def gens(*seeds: int) -> list:
        return [torch.Generator().manual_seed(s) for s in seeds]

    common = dict(num_inference_steps=2, width=64, height=64, output_type="np")
    both = pipe(["a red fox", "a cat"], generator=gens(11, 7), **common).images
    fox = pipe("a red fox", generator=gens(11), **common).images[0]
    cat = pipe("a cat", generator=gens(7), **common).images[0]
    worst = max(float(np.abs(both[0] - fox).max()), float(np.abs(both[1] - cat).max()))
    print(f"max |batched - alone| in float output: {worst:.3g}")
    assert worst <= TOLERANCE


def test_distinct_seeds_give_distinct_images_in_one_call(pipe: Any) -> None:
    """Guards the check above: per-image generators really differ (same prompt, two seeds)."""
    results = run_queued(Counting(pipe), [request("same", 1), request("same", 2)], SETTINGS)
    assert np.abs(pixels(results[0][0].image) - pixels(results[1][0].image)).max() > 0.01


@pytest.mark.parametrize(
    "other",
    [
        {"steps": 3},
        {"width": 72},
        {"guidance_scale": 3.0},
        {"negative_prompt": "blurry"},
        {"extra": {"clip_skip": 1}},
        {"num_images": 4},  # does not fit in max_batch beside the first
    ],
    ids=["steps", "size", "guidance", "negative-presence", "options", "too-many-images"],
)
def test_incompatible_jobs_are_not_merged(pipe: Any, other: dict) -> None:
    counting = Counting(pipe)
    first = request("one", 1)
    results = run_queued(counting, [first, replace(first, prompt="two", **other)], SETTINGS)
    assert len(counting.calls) == 2
    assert all(isinstance(r, list) for r in results)


@pytest.mark.parametrize(
    "settings",
    [Settings(queue_size=8), replace(SETTINGS, batch_requests=1), replace(SETTINGS, max_batch=1)],
    ids=["default", "batch_requests=1", "max_batch=1"],
)
def test_batching_is_off_by_default_and_with_a_limit_of_1(pipe: Any, settings: Settings) -> None:
    counting = Counting(pipe)
    run_queued(counting, [request("one", 1), request("two", 2)], settings)
    assert counting.calls == [["one"], ["two"]]


def test_cancelled_job_is_not_run(pipe: Any) -> None:
    counting = Counting(pipe)
    results = run_queued(counting, [request("one", 1), request("two", 2), request("three", 3)], SETTINGS, 1)
    assert counting.calls == [["one", "three"]]
    assert isinstance(results[1], JobCancelled)
    assert [len(r) for r in (results[0], results[2])] == [1, 1]


def test_failed_batch_reruns_each_job_alone(pipe: Any) -> None:
    counting = Counting(pipe, fail_batches=True)
    results = run_queued(counting, [request("one", 1), request("two", 2)], SETTINGS)
    assert counting.calls == [["one", "two"], ["one"], ["two"]]
    assert [r[0].seed for r in results] == [1, 2]
