"""Test doubles for the server tests: a fake pipeline that can block on an event, a live uvicorn on loopback,
and the tiny real model built once per test process."""

from __future__ import annotations

import atexit
import contextlib
import functools
import shutil
import socket
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import PIL.Image


class FakePipe:
    """Stands in for `LatentConsistencyModelPipeline` as `run_request` calls it (text-to-image only).

    Each image is a solid colour whose red channel is its seed mod 256, so tests can see which seed made it.
    With `gate` set, the call runs the first step's callback, sets `started`, then waits for `gate`: the worker
    is then provably busy, mid-job, without any sleeps.
    """

    def __init__(self, gate: threading.Event | None = None) -> None:
        self.gate = gate
        self.started = threading.Event()
        self.calls: list[dict[str, Any]] = []
        self.num_timesteps = 0
        self._progress_bar_config: dict[str, Any] = {}

    def set_progress_bar_config(self, **kwargs: Any) -> None:
        self._progress_bar_config = kwargs

    def __call__(
        self,
        prompt: str,
        width: int | None = None,
        height: int | None = None,
        negative_prompt: str | None = None,
        **kw: Any,
    ) -> Any:
        self.calls.append(
            {"prompt": prompt, "width": width, "height": height, "negative_prompt": negative_prompt, **kw}
        )
        if prompt == "raise value error":
            raise ValueError("the pipeline refused this input")
        if prompt == "raise runtime error":
            raise RuntimeError("out of memory (pretend)")
        steps = kw["num_inference_steps"]
        self.num_timesteps = steps
        callback = kw.get("callback_on_step_end")
        for i in range(steps):
            self.calls[-1]["steps_run"] = i + 1  # steps begun: a stopped job shows how far it got
            if callback is not None:
                callback(self, i, 999 - i, {})
            if i == 0 and self.gate is not None:
                self.started.set()
                assert self.gate.wait(10), "test never released the gate"
        seeds = [g.initial_seed() for g in kw["generator"]]
        size = (width or 32, height or 32)
        return SimpleNamespace(images=[PIL.Image.new("RGB", size, (s % 256, 0, 0)) for s in seeds])


@functools.cache
def tiny_model_dir() -> Path:
    """The tiny random LCM folder, built once per test process (a few seconds) and removed at exit."""
    from lcmkit.tiny import build_tiny_lcm

    folder = Path(tempfile.mkdtemp(prefix="lcmkit-server-test-"))
    atexit.register(shutil.rmtree, folder, True)
    return build_tiny_lcm(folder / "tiny-lcm")


def tiny_pipe() -> Any:
    from lcmkit import LatentConsistencyModelPipeline

    return LatentConsistencyModelPipeline.from_pretrained(tiny_model_dir())


@contextlib.contextmanager
def live_server(app: Any, **options: Any) -> Iterator[str]:
    """Run `app` under uvicorn in a thread on a free loopback port; yields the base URL. `options` go to
    `uvicorn.Config` (e.g. `lcmkit.server.app.uvicorn_options(settings)`)."""
    import uvicorn

    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", 0))  # the OS picks the port and we hold it: no race with other processes
    port = sock.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning", lifespan="on", **options))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + 20
    while not server.started:
        if not thread.is_alive() or time.monotonic() > deadline:
            raise RuntimeError("uvicorn did not start")
        time.sleep(0.02)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(20)
        sock.close()
