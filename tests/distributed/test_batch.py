"""`generate_dataset` / `lcmkit batch` on a local two-CPU Ray cluster and the shipped tiny model.

What these tests prove: a row gives the same PNG (pixels and infotext) as `lcmkit generate` with that seed, with
one actor or two; a rerun skips what exists and never overwrites a file; bad rows (no prompt, a bad size, a seed
that is not a number, a line that is not JSON) are in the manifest with their error while the others run; CSV and
Parquet rows read like JSONL ones; the CLI runs it and says what failed.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import PIL.Image
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import ray

from lcmkit.cli import main
from lcmkit.distributed import generate_dataset, read_rows
from lcmkit.distributed.batch import row_request

ROWS = [
    {"prompt": "a red circle", "seed": 11},
    {"prompt": "a blue square", "seed": 12, "steps": 2},
    {"prompt": "a green line"},  # no seed: seed + row number
    {"prompt": "a small one", "seed": 7, "size": "32x48"},
]


@pytest.fixture(scope="module", autouse=True)
def local_ray():
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield
    ray.shutdown()


@pytest.fixture(scope="module")
def two_workers(tmp_path_factory: pytest.TempPathFactory):
    out = tmp_path_factory.mktemp("two")
    # one thread per actor, as `lcmkit generate` in this suite (tests/conftest.py): torch's float sums round
    # differently with other thread counts
    return out, generate_dataset(ROWS, out, workers=2, seed=100, manifest="jsonl", threads=1, progress=False)


def pixels_and_text(path: Path) -> tuple[np.ndarray, str]:
    with PIL.Image.open(path) as im:
        return np.asarray(im.convert("RGB")), im.text["parameters"]


def generate(tmp_path: Path, prompt: str, seed: int, *extra: str) -> Path:
    out = tmp_path / f"gen-{seed}"
    assert main(["generate", prompt, "--seed", str(seed), "--out", str(out), "--quiet", *extra]) == 0
    (path,) = out.glob("*.png")
    return path


def test_rows_give_the_images_of_lcmkit_generate(two_workers, tmp_path: Path) -> None:
    out, summary = two_workers
    assert (summary.done, summary.skipped, summary.failed) == (4, 0, 0)
    seeds = [r["seed"] for r in summary.records]
    assert seeds == [11, 12, 102, 7]
    extra = [[], ["--steps", "2"], [], ["--size", "32x48"]]
    for row, record, options in zip(ROWS, summary.records, extra, strict=True):
        mine, text = pixels_and_text(out / record["file"])
        theirs, their_text = pixels_and_text(generate(tmp_path, row["prompt"], record["seed"], *options))
        assert mine.shape == theirs.shape and np.array_equal(mine, theirs), row
        assert text == their_text
    assert PIL.Image.open(out / "000003.png").size == (32, 48)


def test_one_worker_gives_the_same_files(two_workers, tmp_path: Path) -> None:
    out, _ = two_workers
    summary = generate_dataset(ROWS, tmp_path, workers=1, seed=100, threads=1, progress=False)
    assert summary.done == 4
    for record in summary.records:
        assert (tmp_path / record["file"]).read_bytes() == (out / record["file"]).read_bytes()
    manifest = pq.read_table(tmp_path / "manifest.parquet").to_pylist()
    assert [r["status"] for r in manifest] == ["ok"] * 4 and all(r["seconds"] > 0 for r in manifest)


def test_rerun_skips_existing_images_and_never_overwrites(tmp_path: Path) -> None:
    rows = [
        {"prompt": "one", "seed": 1},
        {"prompt": "two", "seed": 2, "id": "b"},
        {"prompt": "three", "seed": 3},
    ]
    (tmp_path / "b.png").write_bytes(b"the user's own file")
    first = generate_dataset(rows, tmp_path, manifest="jsonl", progress=False)
    assert [r["status"] for r in first.records] == ["ok", "skipped", "ok"]
    assert (tmp_path / "b.png").read_bytes() == b"the user's own file"
    (tmp_path / "000002.png").unlink()
    before = (tmp_path / "000000.png").stat().st_mtime_ns
    second = generate_dataset(rows, tmp_path, manifest="jsonl", progress=False)
    assert [r["status"] for r in second.records] == ["skipped", "skipped", "ok"]
    assert (second.done, second.skipped) == (1, 2)
    assert (tmp_path / "000000.png").stat().st_mtime_ns == before
    lines = (tmp_path / "manifest.jsonl").read_text().splitlines()
    assert [json.loads(line)["file"] for line in lines] == ["000000.png", "b.png", "000002.png"]


def test_bad_rows_are_recorded_and_the_others_run(tmp_path: Path) -> None:
    source = tmp_path / "rows.jsonl"
    lines = ['{"prompt": "fine", "seed": 1}', '{"seed": 2}', '{"prompt": "x", "size": "60x64"}',
             '{"prompt": "x", "seed": "soon"}', "not json", '{"prompt": "x", "colour": "red"}',
             '{"prompt": "also fine", "seed": 3}']  # fmt: skip
    source.write_text("\n".join(lines) + "\n")
    summary = generate_dataset(source, tmp_path / "out", progress=False)
    assert (summary.done, summary.failed) == (2, 5)
    errors = [r["error"] for r in pq.read_table(summary.manifest).to_pylist()]
    assert errors[0] is None and errors[6] is None
    assert errors[1] == "no prompt"
    assert "multiple of 8" in errors[2] and "60" in errors[2]
    assert "seed must be an integer" in errors[3] and "'soon'" in errors[3]
    assert "not valid JSON" in errors[4]
    assert "unknown column(s) ['colour']" in errors[5]
    assert sorted(p.name for p in (tmp_path / "out").glob("*.png")) == ["000000.png", "000006.png"]


def test_csv_and_parquet_rows(tmp_path: Path) -> None:
    (tmp_path / "a.csv").write_text("text,seed,steps\na cat,5,2\na dog,,\n")
    assert read_rows(tmp_path / "a.csv", "text") == [{"prompt": "a cat", "seed": "5", "steps": "2"},
                                                      {"prompt": "a dog"}]  # fmt: skip
    table = pa.Table.from_pylist(
        [{"prompt": "a cat", "seed": 5, "steps": 2}, {"prompt": "a dog", "seed": None}]
    )
    pq.write_table(table, tmp_path / "a.parquet")
    assert read_rows(tmp_path / "a.parquet") == [
        {"prompt": "a cat", "seed": 5, "steps": 2},
        {"prompt": "a dog"},
    ]
    csv_rows, parquet_rows = read_rows(tmp_path / "a.csv", "text"), read_rows(tmp_path / "a.parquet")
    for i, (a, b) in enumerate(zip(csv_rows, parquet_rows, strict=True)):  # text cells parse like typed ones
        assert row_request(a, {}, i, 0) == row_request(b, {}, i, 0)
    summary = generate_dataset(tmp_path / "a.csv", tmp_path / "csv", prompt_column="text", progress=False)
    assert summary.done == 2 and [r["seed"] for r in summary.records] == [5, 1]
    assert "Steps: 2," in pixels_and_text(tmp_path / "csv" / "000000.png")[1]


def test_cli_batch(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    source = tmp_path / "rows.jsonl"
    source.write_text('{"prompt": "a cat", "seed": 4}\n{"prompt": "x", "size": "9x9"}\n')
    code = main(["batch", str(source), "--out", str(tmp_path / "out"), "--workers", "2", "--quiet"])
    err = capsys.readouterr().err
    assert code == 1
    assert "row 1: size width must be a multiple of 8" in err
    assert "1 images in" in err and "images/s" in err and "1 failed" in err
    assert (tmp_path / "out" / "000000.png").is_file() and (tmp_path / "out" / "manifest.parquet").is_file()
    assert main(["batch", str(tmp_path / "rows.txt"), "--out", str(tmp_path / "o")]) != 0
    assert "cannot tell the format" in capsys.readouterr().err
