"""Per-shape probes: whether a fast path pays on this machine, measured the first time a layer meets a shape.

`lcmkit.nn.fast` asks `decide(key, reference, fast)` where `FastPaths.choose` is "probe": the reference op and its
fast variant run a few times each, interleaved, on the real input shape and the real weights (after one warm-up
call each), and the faster one by the minimum of its timings wins; the fast one must beat the reference by
`MARGIN`, so a tie keeps the reference arithmetic; the rounds stop after two when every timing of one side beats
every timing of the other. Maps taller than `FIRST_ROWS` are timed on their first rows, and a reference call
that takes longer than `CALL_BUDGET_S` on fewer rows still (then fewer columns), and where even that call takes longer than `MAX_CALL_S` (small maps with large weights on
a slow or busy machine) nothing is probed and the caller's thresholds decide.

Decisions are kept in memory (one process never changes its choice for a key) and on disk, in
`$LCMKIT_PROBE_CACHE` (default `~/.cache/lcmkit`), one JSON file per machine: `probe-<digest>.json`, where the
digest covers the CPU's model name and flags, torch's version and CPU capability, and the thread count. The file
is written atomically (a temporary file renamed over it); one that cannot be read is ignored with a warning and
rewritten. Each entry holds the winner and the timings it was chosen on, so `benchmarks/probe_paths.py` can show
what this machine picks.

A `Prober` takes a `measure(name, fn, x) -> seconds` function, so tests decide the timings instead of the clock.
"""

from __future__ import annotations

import functools
import hashlib
import json
import logging
import os
import platform
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

logger = logging.getLogger(__name__)

CACHE_ENV = "LCMKIT_PROBE_CACHE"
REPS = 3  # timed calls of each variant, after one warm-up call each
MARGIN = 0.02  # the fast variant must be at least this much faster than the reference
CALL_BUDGET_S = 0.03  # a reference call slower than this is probed on a slice of the map's rows
MIN_ROWS = 16  # the smallest slice probed (Winograd works on 6x6 output tiles)
MIN_COLS = 32  # where the rows alone do not bring a call within budget, columns are cut too, down to this
FIRST_ROWS = 32  # taller maps are timed on their first 32 rows from the start (then fewer if still slow)
MAX_CALL_S = 0.25  # a (sliced) reference call slower than this is not probed: the thresholds decide
FORMAT = 1  # the cache file's layout version

Measure = Callable[[str, Callable[[torch.Tensor], Any], torch.Tensor], float]


def _time_call(name: str, fn: Callable[[torch.Tensor], Any], x: torch.Tensor) -> float:
    start = time.perf_counter()
    fn(x)
    return time.perf_counter() - start


@functools.lru_cache(maxsize=1)
def _cpu() -> tuple[str, str]:
    """The CPU's model name and a digest of its flags (from /proc/cpuinfo where there is one)."""
    model, flags = "", ""
    try:
        for line in Path("/proc/cpuinfo").read_text(encoding="utf-8").splitlines():
            name, _, value = line.partition(":")
            if name.strip() == "model name" and not model:
                model = value.strip()
            elif name.strip() in ("flags", "Features") and not flags:
                flags = value.strip()
    except OSError:
        pass
    digest = hashlib.sha256(" ".join(sorted(flags.split())).encode()).hexdigest()[:16]
    return model or platform.processor() or platform.machine(), digest


def machine_fingerprint() -> dict[str, Any]:
    """What a probe's result depends on besides the shape: CPU model and flags, torch, thread count."""
    model, flags = _cpu()
    return {
        "cpu": model,
        "flags": flags,
        "torch": torch.__version__,
        "capability": torch.backends.cpu.get_cpu_capability(),
        "threads": torch.get_num_threads(),
        "format": FORMAT,
    }


def cache_dir() -> Path:
    """`$LCMKIT_PROBE_CACHE`, else `~/.cache/lcmkit`."""
    configured = os.environ.get(CACHE_ENV)
    return Path(configured).expanduser() if configured else Path.home() / ".cache" / "lcmkit"


def cache_path() -> Path:
    """This machine's cache file (its name digests `machine_fingerprint()`)."""
    return _cache_path(str(cache_dir()), torch.get_num_threads())


@functools.lru_cache(maxsize=16)
def _cache_path(folder: str, threads: int) -> Path:
    digest = hashlib.sha256(json.dumps(machine_fingerprint(), sort_keys=True).encode()).hexdigest()[:20]
    return Path(folder) / f"probe-{digest}.json"


def row_slice(x: torch.Tensor, rows: int, cols: int | None = None) -> torch.Tensor:
    """The top-left `rows` x `cols` (all columns by default) of a (B, C, H, W) map, stored in x's memory layout."""
    part = x[:, :, :rows, : x.shape[3] if cols is None else cols]
    channels_last = x.is_contiguous(memory_format=torch.channels_last) and not x.is_contiguous()
    return part.contiguous(memory_format=torch.channels_last if channels_last else torch.contiguous_format)


def _answer(entry: dict[str, Any]) -> bool | None:
    return None if entry["winner"] == "skipped" else entry["winner"] == "fast"


def _apart(times: dict[str, list[float]]) -> bool:
    """Two samples or more of each side, and every one of one side faster than every one of the other."""
    ref, fast = times["reference"], times["fast"]
    return min(len(ref), len(fast)) >= 2 and (max(ref) < min(fast) or max(fast) < min(ref))


class Prober:
    """Measures and remembers which variant wins per key (see the module docstring)."""

    def __init__(self, measure: Measure = _time_call) -> None:
        self.measure = measure
        self._lock = threading.Lock()
        self._decisions: dict[tuple[str, str], dict[str, Any]] = {}  # (cache file, key) -> entry
        self._loaded: set[str] = set()
        self._local = threading.local()  # per thread: whether this thread is timing a probe

    def decide(
        self,
        key: str,
        reference: tuple[Callable[[torch.Tensor], Any], torch.Tensor],
        fast: tuple[Callable[[torch.Tensor], Any], torch.Tensor],
    ) -> bool | None:
        """Whether the fast variant wins for `key` on this machine: each side is (fn, its input); both inputs are
        4-d maps with the same rows (sliced together when a reference call is slow). None where a reference call
        was too slow to probe (`MAX_CALL_S`): the caller's thresholds decide; that is kept in memory only, so a
        later, quieter process probes again."""
        path = cache_path()
        entry = self._decisions.get((str(path), key))
        if entry is not None:
            return _answer(entry)
        with self._lock:
            self._load(path)
            entry = self._decisions.get((str(path), key))
            if entry is None:
                entry = self._probe(reference, fast)
                self._decisions[(str(path), key)] = entry
                if entry["winner"] != "skipped":
                    self._save(path, key, entry)
                logger.info("probe %s: %s (%s)", key, entry["winner"], entry["seconds"])
        return _answer(entry)

    def entries(self) -> dict[str, dict[str, Any]]:
        """This process's decisions for this machine's fingerprint, by key."""
        path = str(cache_path())
        return {key: entry for (file, key), entry in self._decisions.items() if file == path}

    def forget(self) -> None:
        """Drop the in-memory decisions (the disk cache is read again on the next decision)."""
        with self._lock:
            self._decisions.clear()
            self._loaded.clear()

    @property
    def busy(self) -> bool:
        """This thread is timing a probe's variants: the layers inside them stay on their thresholds."""
        return getattr(self._local, "busy", False)

    @busy.setter
    def busy(self, value: bool) -> None:
        self._local.busy = value

    def _probe(self, reference: tuple, fast: tuple) -> dict[str, Any]:
        self.busy = True
        try:
            return self._measure_both(reference, fast)
        finally:
            self.busy = False

    def _measure_both(self, reference: tuple, fast: tuple) -> dict[str, Any]:
        (ref_fn, x_ref), (fast_fn, x_fast) = reference, fast
        rows, cols = x_ref.shape[2], x_ref.shape[3]
        if rows > FIRST_ROWS:
            rows = FIRST_ROWS
            x_ref, x_fast = row_slice(x_ref, rows), row_slice(x_fast, rows)
        with torch.no_grad():
            first = self.measure("reference", ref_fn, x_ref)  # also the cold call (primitive creation)
            if first > CALL_BUDGET_S and rows > MIN_ROWS:
                sliced = max(MIN_ROWS, int(rows * CALL_BUDGET_S / first))
                first, rows = first * sliced / rows, sliced
                x_ref, x_fast = row_slice(x_ref, rows), row_slice(x_fast, rows)
            if first > CALL_BUDGET_S and cols > MIN_COLS:
                cols = max(MIN_COLS, int(cols * CALL_BUDGET_S / first))
                x_ref, x_fast = row_slice(x_ref, rows, cols), row_slice(x_fast, rows, cols)
            times: dict[str, list[float]] = {
                "reference": [self.measure("reference", ref_fn, x_ref)],
                "fast": [],
            }
            if times["reference"][0] > MAX_CALL_S:  # too slow to time here: the thresholds decide
                return {
                    "winner": "skipped",
                    "seconds": {"reference": times["reference"][0]},
                    "rows": rows,
                    "cols": cols,
                }
            self.measure("fast", fast_fn, x_fast)  # its warm-up
            for done in range(1, REPS + 1):
                times["fast"].append(self.measure("fast", fast_fn, x_fast))
                if done == REPS or _apart(times):
                    break
                times["reference"].append(self.measure("reference", ref_fn, x_ref))
        best = {name: min(values) for name, values in times.items()}
        winner = "fast" if best["fast"] < best["reference"] * (1.0 - MARGIN) else "reference"
        return {"winner": winner, "seconds": best, "rows": rows, "cols": cols}

    def _load(self, path: Path) -> None:
        if str(path) in self._loaded:
            return
        self._loaded.add(str(path))
        for key, entry in self._read(path).items():
            self._decisions.setdefault((str(path), key), entry)

    @staticmethod
    def _read(path: Path) -> dict[str, dict[str, Any]]:
        if not path.exists():
            return {}
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
            decisions = data["decisions"]
            if not all(
                isinstance(e, dict) and e.get("winner") in ("fast", "reference") for e in decisions.values()
            ):
                raise ValueError("an entry without a winner")
            return decisions
        except (OSError, ValueError, KeyError, TypeError, AttributeError) as error:
            logger.warning("ignoring the unreadable probe cache %s (%s); it will be rewritten", path, error)
            return {}

    def _save(self, path: Path, key: str, entry: dict[str, Any]) -> None:
        """Merge `entry` into the file (another process may have added keys) and replace it atomically."""
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            decisions = self._read(path)
            decisions[key] = entry
            data = {"machine": machine_fingerprint(), "decisions": decisions}
            handle, temporary = tempfile.mkstemp(dir=path.parent, prefix=path.name, suffix=".tmp")
            with os.fdopen(handle, "w", encoding="utf-8") as file:
                json.dump(data, file, indent=1, sort_keys=True)
            os.replace(temporary, path)
        except OSError as error:
            logger.warning("could not write the probe cache %s (%s); decisions stay in memory", path, error)


_PROBER = Prober()


def default_prober() -> Prober:
    """The process's prober: what the layers ask."""
    return _PROBER


def set_prober(prober: Prober) -> Prober:
    """Make `prober` the process's prober (tests inject one with a fake `measure`); returns the previous one."""
    global _PROBER
    previous, _PROBER = _PROBER, prober
    return previous
