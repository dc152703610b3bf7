"""`generate_dataset` / `lcmkit batch`: many prompts through Ray Data, one pipeline per actor.

The rows (JSONL, CSV or Parquet; a prompt column plus optional seed, steps, guidance, size or width/height,
negative_prompt, strength, image, id) become a Ray dataset; `map_batches` runs them on a pool of `workers` actors,
each loading the model once and using its share of the CPU threads, so two actors on two cores do not fight.

Each row's image has a fixed name (`id` when the row has one, else its 0-based row number) and a fixed seed (its
own, else `seed + row number`), so a row gives the same PNG as `lcmkit generate` with that seed whatever the
worker count, and a rerun skips the rows whose image exists: files are created exclusively, never overwritten.
A bad row (no prompt, a bad size or seed, ...) is recorded in the manifest with its error; the others run.
The manifest (`manifest.parquet` or `manifest.jsonl` in the output folder) lists every row: index, id, prompt,
seed, file, status (ok, skipped, error), error, seconds and the Ray node that made it.
"""

from __future__ import annotations

import csv
import json
import os
import re
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from lcmkit.distributed.ray_import import require_ray
from lcmkit.request import OPTION_KEYS, GenerationRequest, apply_options, parse_seed
from lcmkit.spec import ModelSpec

FORMATS = {".jsonl": "jsonl", ".ndjson": "jsonl", ".json": "jsonl", ".csv": "csv", ".parquet": "parquet"}
MANIFEST_FORMATS = ("parquet", "jsonl")
ROW_KEYS = sorted({*OPTION_KEYS, "image", "id"} - {"n"})


@dataclass
class Summary:
    """What a run did: counts, wall time, images per second, and the manifest's rows in input order."""

    done: int
    skipped: int
    failed: int
    seconds: float
    manifest: Path
    records: list[dict[str, Any]] = field(repr=False, default_factory=list)

    @property
    def images_per_s(self) -> float:
        return self.done / self.seconds if self.seconds > 0 else 0.0

    def line(self) -> str:
        return (
            f"{self.done} images in {self.seconds:.1f} s ({self.images_per_s:.2f} images/s), "
            f"{self.skipped} skipped (exist), {self.failed} failed; manifest {self.manifest}"
        )


def read_rows(path: str | Path, prompt_column: str = "prompt") -> list[dict[str, Any]]:
    """The rows of a JSONL, CSV or Parquet file as dicts, `prompt_column` renamed to `prompt`; empty cells and
    nulls are left out (the defaults apply). A JSONL line that is not an object becomes `{"_error": ...}`, so it
    is reported in the manifest like any other bad row."""
    path = Path(path)
    kind = FORMATS.get(path.suffix.lower())
    if kind is None:
        raise ValueError(f"{path}: cannot tell the format from {path.suffix!r}; use one of {sorted(FORMATS)}")
    if not path.is_file():
        raise ValueError(f"{path}: no such file")
    if kind == "parquet":
        import pyarrow.parquet as pq

        rows = pq.read_table(path).to_pylist()
    elif kind == "csv":
        with open(path, newline="", encoding="utf-8") as f:
            rows = [{k: v for k, v in row.items() if k is not None} for row in csv.DictReader(f)]
    else:
        rows = [_json_row(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    out = []
    for row in rows:
        row = {k: v for k, v in row.items() if v is not None and v != ""}
        if prompt_column != "prompt" and prompt_column in row:
            row["prompt"] = row.pop(prompt_column)
        out.append(row)
    if not out:
        raise ValueError(f"{path}: no rows")
    return out


def _json_row(line: str) -> dict[str, Any]:
    try:
        obj = json.loads(line)
    except json.JSONDecodeError as e:
        return {"_error": f"not valid JSON ({e.msg} at column {e.colno})"}
    return (
        obj
        if isinstance(obj, dict)
        else {"_error": 'each line must be a JSON object such as {"prompt": "a cat"}'}
    )


def row_name(index: int, row: dict[str, Any]) -> str:
    """The image's file name: the row's `id` (made safe for a file name) or its row number."""
    if "id" in row:
        text = re.sub(r"[^A-Za-z0-9._-]+", "-", str(row["id"])).strip(".-")
        if text:
            return f"{text}.png"
    return f"{index:06d}.png"


def row_request(row: dict[str, Any], defaults: dict[str, Any], index: int, seed: int) -> GenerationRequest:
    """The row as a request over the run's defaults; its seed is the row's own or `seed + index`. Raises a
    ValueError naming what is wrong with the row."""
    if "_error" in row:
        raise ValueError(row["_error"])
    unknown = sorted(set(row) - set(ROW_KEYS))
    if unknown:
        raise ValueError(f"unknown column(s) {unknown}; allowed: {ROW_KEYS}")
    if "prompt" not in row:
        raise ValueError("no prompt")
    options = {k: v for k, v in row.items() if k not in ("image", "id")}
    if isinstance(options.get("seed"), str):  # CSV cells are text
        options["seed"] = options["seed"].strip()
    for key in ("steps", "width", "height"):
        if isinstance(options.get(key), float) and options[key].is_integer():  # Parquet/pandas widen to float
            options[key] = int(options[key])
    req = apply_options(GenerationRequest(prompt="", **defaults), options)
    if "seed" not in row:
        req.seed = seed + index
    elif req.seed is None:  # -1: random, as `lcmkit generate`; recorded in the manifest
        req.seed = parse_seed(int.from_bytes(os.urandom(4), "little"))
    return req


class _Worker:
    """One Ray Data actor: loads the pipeline once, then turns rows into PNGs and manifest records."""

    def __init__(
        self, spec: ModelSpec, threads: int, out: str, folder: str, defaults: dict, seed: int
    ) -> None:
        import ray
        import torch

        from lcmkit.spec import load_pipeline

        torch.set_num_threads(max(1, min(threads, os.cpu_count() or 1)))
        self.pipe, self.model_name = load_pipeline(spec)
        self.pipe.set_progress_bar_config(disable=True)
        self.out, self.folder, self.defaults, self.seed = Path(out), Path(folder), defaults, seed
        self.node = ray.get_runtime_context().get_node_id()

    def __call__(self, batch: dict[str, Any]) -> dict[str, Any]:
        records = [self.run(int(i), json.loads(r)) for i, r in zip(batch["index"], batch["row"], strict=True)]
        return {"record": [json.dumps(r) for r in records]}

    def run(self, index: int, row: dict[str, Any]) -> dict[str, Any]:
        from lcmkit.io.png import read_image, write_png
        from lcmkit.request import run_request

        start = time.perf_counter()
        record = _record(index, row, node=self.node)
        try:
            req = row_request(row, self.defaults, index, self.seed)
            record["seed"] = req.seed
            if "image" in row:
                image = self.folder / Path(str(row["image"])).expanduser()
                req.init_image = read_image(image, (req.width, req.height))
            (result,) = run_request(self.pipe, req, model_name=self.model_name)
            path = self.out / record["file"]
            record["status"] = "ok" if write_png(result.image, path, result.infotext) else "skipped"
        except Exception as e:  # recorded with the row; the other rows run
            record.update(status="error", error=" ".join(str(e).split()) or type(e).__name__)
        record["seconds"] = round(time.perf_counter() - start, 4)
        return record


def _record(index: int, row: dict[str, Any], **extra: Any) -> dict[str, Any]:
    prompt = row.get("prompt")
    return {
        "index": index,
        "id": None if "id" not in row else str(row["id"]),
        "prompt": prompt if isinstance(prompt, str) else None,
        "seed": None,
        "file": row_name(index, row),
        "status": "skipped",
        "error": None,
        "seconds": None,
        "node": None,
        **extra,
    }


def generate_dataset(
    source: str | Path | list[dict[str, Any]],
    out: str | Path,
    spec: ModelSpec | None = None,
    workers: int = 1,
    *,
    seed: int = 0,
    steps: int = 4,
    guidance: float = 8.5,
    size: tuple[int, int] | None = None,
    negative_prompt: str = "",
    strength: float = 0.8,
    prompt_column: str = "prompt",
    manifest: str = "parquet",
    threads: int | None = None,
    progress: bool = True,
    address: str | None = None,
) -> Summary:
    """Generate one image per row of `source` (a JSONL/CSV/Parquet file, or a list of row dicts) into `out`.

    Runs on the Ray cluster this process is connected to, or joins `address` / $RAY_ADDRESS, or starts a local
    one (shut down again at the end). `workers` actors each load `spec` once and use `threads` CPU threads
    (default: the cluster's CPUs // workers, so actors do not oversubscribe cores). Images are the same bit for
    bit whatever the worker count at a given thread count; torch's float sums round differently with another
    thread count (a pixel level here and there), as for `lcmkit generate`. The keyword options are the
    defaults a row's own columns override. Returns a `Summary`; the manifest is written to `out` in `manifest`
    format (parquet or jsonl).
    """
    ray = require_ray()
    if manifest not in MANIFEST_FORMATS:
        raise ValueError(f"manifest must be one of {list(MANIFEST_FORMATS)}, got {manifest!r}")
    for name, value in (("workers", workers), ("threads", threads or 1)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{name} must be a positive integer, got {value!r}")
    if isinstance(source, list):
        rows, folder = source, Path.cwd()
    else:
        rows, folder = read_rows(source, prompt_column), Path(source).parent
    width, height = size or (None, None)
    defaults = dict(steps=steps, guidance_scale=guidance, width=width, height=height,
                    negative_prompt=negative_prompt, strength=strength)  # fmt: skip
    GenerationRequest(prompt="x", **defaults)
    out = Path(out).expanduser()
    out.mkdir(parents=True, exist_ok=True)
    manifest_path = out / f"manifest.{manifest}"

    records: dict[int, dict[str, Any]] = {}
    pending = []
    names: dict[str, int] = {}
    for index, row in enumerate(rows):
        name = row_name(index, row)
        if name in names:
            records[index] = _record(index, row, status="error", error=f"id repeats row {names[name]}'s")
        elif (out / name).exists():
            records[index] = _record(index, row)
        else:
            pending.append({"index": index, "row": json.dumps(row, default=str)})
        names.setdefault(name, index)

    start = time.perf_counter()
    started_ray = False
    if pending:
        if not ray.is_initialized():
            ray.init(address=address, include_dashboard=False, log_to_driver=False, logging_level="ERROR")
            started_ray = True
        try:
            options = dict(
                spec=spec or ModelSpec(), out=str(out), folder=str(folder), defaults=defaults, seed=seed
            )
            for record in _run(ray, pending, options, workers, threads, progress):
                records[record["index"]] = record
        finally:
            if started_ray:
                ray.shutdown()
    seconds = time.perf_counter() - start
    ordered = [records[i] for i in sorted(records)]
    _write_manifest(ordered, manifest_path)
    count = {s: sum(r["status"] == s for r in ordered) for s in ("ok", "skipped", "error")}
    return Summary(count["ok"], count["skipped"], count["error"], seconds, manifest_path, ordered)


def _run(
    ray: Any, pending: list[dict], options: dict, workers: int, threads: int | None, progress: bool
) -> Any:
    """Yield each pending row's record as an actor finishes it."""
    from tqdm import tqdm

    ctx = ray.data.DataContext.get_current()
    ctx.enable_progress_bars = False
    cpus = int(ray.cluster_resources().get("CPU", 1))
    ds = ray.data.from_items(pending, override_num_blocks=min(len(pending), 10 * workers))
    results = ds.map_batches(
        _Worker,
        fn_constructor_kwargs=dict(threads=threads or max(1, cpus // workers), **options),
        batch_size=1,
        compute=ray.data.ActorPoolStrategy(size=workers),
        num_cpus=max(0.01, min(1.0, cpus / workers)),
    )
    with tqdm(total=len(pending), unit="image", desc="batch", disable=not progress) as bar:
        for row in results.iter_rows():
            bar.update()
            yield json.loads(row["record"])


def _write_manifest(records: list[dict[str, Any]], path: Path) -> None:
    """Written to a temporary file, then moved over the previous run's manifest (our own file)."""
    tmp = path.with_name(f".{path.name}.tmp")
    if path.suffix == ".parquet":
        import pyarrow as pa
        import pyarrow.parquet as pq

        schema = pa.schema([("index", pa.int64()), ("id", pa.string()), ("prompt", pa.string()),
                            ("seed", pa.int64()), ("file", pa.string()), ("status", pa.string()),
                            ("error", pa.string()), ("seconds", pa.float64()), ("node", pa.string())])  # fmt: skip
        pq.write_table(pa.Table.from_pylist(records, schema=schema), tmp)
    else:
        tmp.write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")
    os.replace(tmp, path)
