"""Images/s of the server's job queue with request batching off (batch_requests=1) and on (batch_requests=4).

    PYTHONPATH=src python benchmarks/serve_batching.py [REQUESTS] [SIZE]

REQUESTS one-image txt2img requests (SIZE x SIZE, default 64, 4 steps, distinct prompts and seeds) on the shipped tiny model are
queued at once, as from that many concurrent clients, after one warm-up request; the same `JobQueue` serves
`lcmkit serve` and every `lcmkit serve --ray` replica.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

import lcmkit
from lcmkit import LatentConsistencyModelPipeline
from lcmkit.request import GenerationRequest
from lcmkit.server.jobs import JobQueue, Settings


def main() -> None:
    count = int(sys.argv[1]) if len(sys.argv) > 1 else 16
    size = int(sys.argv[2]) if len(sys.argv) > 2 else 64
    pipe = LatentConsistencyModelPipeline.from_pretrained(
        Path(lcmkit.__file__).parent / "assets" / "tiny-lcm"
    )
    for merge in (1, 4, 1, 4):
        queue = JobQueue(pipe, Settings(batch_requests=merge, queue_size=count))
        queue.submit(GenerationRequest("warm up", seed=0, width=size, height=size)).future.result()
        start = time.perf_counter()
        jobs = [
            queue.submit(GenerationRequest(f"prompt {i}", seed=i, width=size, height=size))
            for i in range(count)
        ]
        for job in jobs:
            job.future.result()
        seconds = time.perf_counter() - start
        queue.stop()
        print(f"{size}x{size} batch_requests={merge}: {count} requests in {seconds:.2f} s ({count / seconds:.2f} images/s); "
              f"loadavg {open('/proc/loadavg').read().strip()}")  # fmt: skip


if __name__ == "__main__":
    main()
