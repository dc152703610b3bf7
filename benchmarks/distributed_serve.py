"""Requests/s of `lcmkit serve --ray` (serve_app) with 1 and 2 replicas on the shipped tiny model (64x64, 4 steps).

    PYTHONPATH=src python benchmarks/distributed_serve.py [REQUESTS]

Starts a local Ray with all CPUs and sends REQUESTS txt2img requests, 8 at a time, after a warm-up request.
"""

from __future__ import annotations

import socket
import sys
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import ray
from ray import serve

from lcmkit.distributed import serve_app


def main() -> None:
    count = int(sys.argv[1]) if len(sys.argv) > 1 else 32
    ray.init(include_dashboard=False, log_to_driver=False)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    url = f"http://127.0.0.1:{port}/sdapi/v1/txt2img"

    def post(seed: int) -> int:
        return httpx.post(url, json={"prompt": "a cat", "seed": seed}, timeout=300).status_code

    for replicas in (1, 2):
        serve.run(serve_app(replicas=replicas, queue_size=count), name="lcmkit")
        while httpx.get(url.replace("/sdapi/v1/txt2img", "/health"), timeout=30).status_code != 200:
            time.sleep(1)
        list(ThreadPoolExecutor(replicas).map(post, range(2 * replicas)))  # warm every replica
        start = time.perf_counter()
        with ThreadPoolExecutor(8) as pool:
            codes = list(pool.map(post, range(count)))
        seconds = time.perf_counter() - start
        print(f"replicas={replicas}: {count} requests in {seconds:.1f} s ({count / seconds:.2f} images/s), "
              f"status codes {sorted(set(codes))}; loadavg {open('/proc/loadavg').read().strip()}")  # fmt: skip
        serve.delete("lcmkit")
    serve.shutdown()
    ray.shutdown()


if __name__ == "__main__":
    main()
