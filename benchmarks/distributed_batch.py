"""images/s of `generate_dataset` with 1 and 2 Ray actors on the shipped tiny model (64x64, 4 steps).

    PYTHONPATH=src python benchmarks/distributed_batch.py [ROWS]

Starts a local Ray with all CPUs; each run writes to a fresh temporary folder. Wall time includes the actors'
start and model load, so more rows weigh those less.
"""

from __future__ import annotations

import os
import sys
import tempfile

import ray

from lcmkit.distributed import generate_dataset


def main() -> None:
    count = int(sys.argv[1]) if len(sys.argv) > 1 else 64
    rows = [{"prompt": f"prompt {i}", "seed": i} for i in range(count)]
    ray.init(include_dashboard=False, log_to_driver=False)
    print(f"loadavg before: {open('/proc/loadavg').read().strip()}; CPUs: {os.cpu_count()}")
    for workers, threads in ((1, None), (1, 1), (2, None)):  # None: the default, CPUs // workers
        with tempfile.TemporaryDirectory() as out:
            summary = generate_dataset(rows, out, workers=workers, threads=threads, progress=False)
        busy = sum(r["seconds"] for r in summary.records)
        print(f"workers={workers} threads={threads or os.cpu_count() // workers}: {summary.line().split('; manifest')[0]}; "
              f"per image in the actor {busy / count * 1000:.0f} ms; loadavg {open('/proc/loadavg').read().strip()}")  # fmt: skip
    ray.shutdown()


if __name__ == "__main__":
    main()
