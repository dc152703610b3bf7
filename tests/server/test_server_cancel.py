"""Abandoned and cancelled work is dropped, and the worker goes on (issue 17, item 2).

Proves, on a fake pipeline held mid-job by an event (never by sleeping): a client that disconnects while its job
waits in the queue makes that job never run; one that disconnects while its job runs stops it at the next step
(real uvicorn, real sockets closed by the test). `POST /sdapi/v1/interrupt` stops the running job at its next
step, returning the images of the batches it finished (409 when there are none); with `id_task` it cancels that
one job, queued or running; `POST /sdapi/v1/skip` drops the current batch and goes on with the next. After each,
the worker serves the next request. `steps_run` in the fake's calls says how many steps a call began.
"""

from __future__ import annotations

import base64
import io
import json
import socket
import threading
import time
from collections.abc import Callable
from typing import Any
from urllib.parse import urlsplit

import httpx
import PIL.Image
import pytest
from fastapi.testclient import TestClient
from server_fakes import FakePipe, live_server

from lcmkit.server.app import create_app
from lcmkit.server.jobs import Settings

SETTINGS = Settings(max_steps=8, queue_size=2)


def wait_until(condition: Callable[[], Any], what: str, timeout: float = 10.0) -> Any:
    """Poll `condition` until it is truthy (state changes made by other threads); fail naming `what`."""
    deadline = time.monotonic() + timeout
    while True:
        value = condition()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for: {what}")
        time.sleep(0.02)


def post_and_hold(base: str, path: str, body: dict) -> socket.socket:
    """Send a whole request on a raw socket and return the socket unread, so the test decides when to close it."""
    url = urlsplit(base)
    sock = socket.create_connection((url.hostname, url.port), timeout=10)
    data = json.dumps(body).encode()
    head = (
        f"POST {path} HTTP/1.1\r\nHost: {url.netloc}\r\nContent-Type: application/json\r\n"
        f"Content-Length: {len(data)}\r\n\r\n"
    )
    sock.sendall(head.encode() + data)
    return sock


def progress(client: Any, id_task: str) -> dict:
    return client.get("/sdapi/v1/progress", params={"id_task": id_task}).json()


def in_thread(fn: Callable[[], Any]) -> tuple[threading.Thread, dict]:
    out: dict = {}
    thread = threading.Thread(target=lambda: out.update(r=fn()), daemon=True)
    thread.start()
    return thread, out


def seeds_of(reply: httpx.Response) -> list[int]:
    return json.loads(reply.json()["info"])["all_seeds"]


def red(b64: str) -> int:
    return PIL.Image.open(io.BytesIO(base64.b64decode(b64))).getpixel((0, 0))[0]


class GatedFrom(FakePipe):
    """A `FakePipe` whose gate holds only calls (batches) from number `first` on (counting from 0)."""

    def __init__(self, gate: threading.Event, first: int) -> None:
        super().__init__()
        self.later_gate, self.first = gate, first

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        self.gate = self.later_gate if len(self.calls) >= self.first else None
        return super().__call__(*args, **kwargs)


# ----------------------------------------------------------------------------------------------------------------------
# Clients that go away (live uvicorn, real sockets)


def test_a_client_that_disconnects_stops_its_running_job_at_the_next_step() -> None:
    gate = threading.Event()
    fake = FakePipe(gate=gate)
    with live_server(create_app(fake, SETTINGS)) as url, httpx.Client(base_url=url, timeout=10) as client:
        sock = post_and_hold(
            url, "/sdapi/v1/txt2img", {"prompt": "abandoned", "steps": 4, "force_task_id": "gone"}
        )
        try:
            assert fake.started.wait(10), "the worker never started the job"
        finally:
            sock.close()  # the client goes away while its job runs
        wait_until(
            lambda: progress(client, "gone")["state"]["interrupted"], "the server to notice the disconnect"
        )
        gate.set()
        wait_until(lambda: progress(client, "gone")["completed"], "the abandoned job to end")
        assert fake.calls[0]["steps_run"] == 2  # step 1 was running when it was told; no step after it began
        ok = client.post("/sdapi/v1/txt2img", json={"prompt": "next", "steps": 3})
        assert (
            ok.status_code == 200 and fake.calls[-1]["prompt"] == "next" and fake.calls[-1]["steps_run"] == 3
        )


def test_a_client_that_disconnects_while_queued_never_runs() -> None:
    gate = threading.Event()
    fake = FakePipe(gate=gate)
    with live_server(create_app(fake, SETTINGS)) as url, httpx.Client(base_url=url, timeout=20) as client:
        first, out = in_thread(lambda: client.post("/sdapi/v1/txt2img", json={"prompt": "first", "steps": 2}))
        try:
            assert fake.started.wait(10), "the worker never started the first job"
            sock = post_and_hold(url, "/sdapi/v1/txt2img", {"prompt": "queued", "force_task_id": "queued"})
            try:
                wait_until(lambda: progress(client, "queued")["queued"], "the second job to be queued")
            finally:
                sock.close()
            wait_until(lambda: client.get("/health").json()["queue"]["waiting"] == 0, "the queue to drop it")
            assert progress(client, "queued")["state"]["interrupted"]
        finally:
            gate.set()
            first.join(20)
        assert out["r"].status_code == 200
        assert client.post("/sdapi/v1/txt2img", json={"prompt": "after"}).status_code == 200
        assert [c["prompt"] for c in fake.calls] == ["first", "after"]  # the abandoned job never ran


# ----------------------------------------------------------------------------------------------------------------------
# /sdapi/v1/interrupt and /sdapi/v1/skip


def test_interrupt_with_id_task_removes_a_queued_job_which_answers_409() -> None:
    gate = threading.Event()
    fake = FakePipe(gate=gate)
    with TestClient(create_app(fake, SETTINGS)) as client:
        first, out1 = in_thread(
            lambda: client.post("/sdapi/v1/txt2img", json={"prompt": "first", "force_task_id": "one"})
        )
        try:
            assert fake.started.wait(10)
            second, out2 = in_thread(
                lambda: client.post("/sdapi/v1/txt2img", json={"prompt": "second", "force_task_id": "two"})
            )
            wait_until(lambda: progress(client, "two")["queued"], "the second job to be queued")
            r = client.post("/sdapi/v1/interrupt", params={"id_task": "two"})
            assert r.status_code == 200 and r.json() == {"id_task": "two", "state": "queued"}
            second.join(10)
            assert out2["r"].status_code == 409 and "'two' was cancelled" in out2["r"].json()["detail"]
            assert (
                progress(client, "two")["completed"] and client.get("/health").json()["queue"]["waiting"] == 0
            )
        finally:
            gate.set()
            first.join(10)
        assert (
            out1["r"].status_code == 200 and len(out1["r"].json()["images"]) == 1
        )  # the other job is untouched
        assert [c["prompt"] for c in fake.calls] == ["first"]
        done = client.post("/sdapi/v1/interrupt", params={"id_task": "one"})
        assert done.json() == {"id_task": "one", "state": "finished"}  # nothing left to stop
        unknown = client.post("/sdapi/v1/interrupt", params={"id_task": "nope"})
        assert unknown.status_code == 404 and "nope" in unknown.json()["detail"]


@pytest.mark.parametrize("by_id", [False, True], ids=["interrupt", "interrupt-id_task"])
def test_interrupt_stops_the_running_job_at_its_next_step(by_id: bool) -> None:
    gate = threading.Event()
    fake = FakePipe(gate=gate)
    with TestClient(create_app(fake, SETTINGS)) as client:
        body = {"prompt": "long", "steps": 4, "n_iter": 2, "force_task_id": "run"}
        job, out = in_thread(lambda: client.post("/sdapi/v1/txt2img", json=body))
        try:
            assert fake.started.wait(10)
            r = client.post("/sdapi/v1/interrupt", params={"id_task": "run"} if by_id else None)
            assert r.json() == {"id_task": "run", "state": "running"}
            assert progress(client, "run")["state"]["interrupted"]
        finally:
            gate.set()
            job.join(10)
        assert out["r"].status_code == 409 and "interrupted before any image" in out["r"].json()["detail"]
        assert (
            len(fake.calls) == 1 and fake.calls[0]["steps_run"] == 2
        )  # no second batch, no step after the next
        assert client.post("/sdapi/v1/txt2img", json={"prompt": "next"}).status_code == 200
        assert client.post("/sdapi/v1/interrupt").json() == {"id_task": None, "state": "idle"}


def test_interrupt_returns_the_batches_finished_before_it() -> None:
    gate = threading.Event()
    fake = GatedFrom(gate, first=1)  # the second batch is held
    with TestClient(create_app(fake, SETTINGS)) as client:
        body = {"prompt": "p", "steps": 4, "n_iter": 3, "seed": 40}
        job, out = in_thread(lambda: client.post("/sdapi/v1/txt2img", json=body))
        try:
            assert fake.started.wait(10)
            assert client.post("/sdapi/v1/interrupt").json()["state"] == "running"
        finally:
            gate.set()
            job.join(10)
        reply = out["r"]
        assert reply.status_code == 200 and seeds_of(reply) == [40]  # A1111: the images done so far
        assert [red(b) for b in reply.json()["images"]] == [40]
        assert [c["steps_run"] for c in fake.calls] == [4, 2]  # the third batch never began


def test_skip_drops_the_current_batch_and_goes_on_with_the_next() -> None:
    gate = threading.Event()
    fake = GatedFrom(gate, first=0)  # the first batch is held
    with TestClient(create_app(fake, SETTINGS)) as client:
        body = {"prompt": "p", "steps": 4, "n_iter": 2, "seed": 7, "force_task_id": "sk"}
        job, out = in_thread(lambda: client.post("/sdapi/v1/txt2img", json=body))
        try:
            assert fake.started.wait(10)
            assert client.post("/sdapi/v1/skip").json() == {"id_task": "sk", "state": "running"}
        finally:
            gate.set()
            job.join(10)
        reply = out["r"]
        assert reply.status_code == 200 and seeds_of(reply) == [8]  # the second batch keeps its own seed
        assert [c["steps_run"] for c in fake.calls] == [2, 4]
        assert not progress(client, "sk")["state"]["skipped"]
        assert client.post("/sdapi/v1/skip").json() == {
            "id_task": None,
            "state": "idle",
        }  # idle: nothing to skip
        assert client.post("/sdapi/v1/txt2img", json={"prompt": "next", "steps": 2}).status_code == 200
        assert fake.calls[-1]["steps_run"] == 2


def test_interrupt_and_skip_need_the_api_key() -> None:
    with TestClient(create_app(FakePipe(), Settings(api_key="k"))) as client:
        for path in ("/sdapi/v1/interrupt", "/sdapi/v1/skip"):
            assert client.post(path).status_code == 401
            assert client.post(path, headers={"X-API-Key": "k"}).status_code == 200
