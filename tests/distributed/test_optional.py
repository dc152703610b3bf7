"""Ray stays optional: the CLI and the server import without it, and a missing Ray is one line naming the extra."""

from __future__ import annotations

import subprocess
import sys

import pytest

from lcmkit.cli import main


def test_core_does_not_import_ray() -> None:
    code = (
        "import sys, lcmkit, lcmkit.cli, lcmkit.server.app, lcmkit.distributed; print('ray' in sys.modules)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


def test_missing_ray_is_one_line(
    tmp_path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setitem(sys.modules, "ray", None)  # `import ray` raises ImportError
    (tmp_path / "rows.jsonl").write_text('{"prompt": "a cat"}\n')
    assert main(["batch", str(tmp_path / "rows.jsonl"), "--out", str(tmp_path / "out")]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "pip install 'lcmkit[ray]'" in err[0] and err[0].startswith("lcmkit: error:")
    assert not (tmp_path / "out").exists()


def test_replicas_need_ray(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["serve", "--replicas", "2"]) == 2
    assert "--replicas and --address serve on Ray: add --ray" in capsys.readouterr().err
