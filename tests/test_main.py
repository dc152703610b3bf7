"""`python -m lcmkit`: the offline demo and `generate` write PNGs and never overwrite existing files."""

from __future__ import annotations

import PIL.Image

from lcmkit.__main__ import main


def test_demo_then_generate_never_overwrites(tmp_path, capsys):
    assert main(["demo", "--out", str(tmp_path), "--steps", "2"]) == 0
    first = tmp_path / "lcm-0000.png"
    assert first.is_file()
    before = first.read_bytes()
    assert main(["generate", "a red circle", "--model", str(tmp_path / "tiny-lcm"), "--out", str(tmp_path),
                 "--size", "48x32", "-n", "2"]) == 0  # fmt: skip
    assert first.read_bytes() == before
    with PIL.Image.open(tmp_path / "lcm-0002.png") as im:
        assert im.size == (48, 32)
    printed = capsys.readouterr().out.split()
    assert printed[-2:] == [str(tmp_path / "lcm-0001.png"), str(tmp_path / "lcm-0002.png")]


def test_bad_model_is_one_line_error(tmp_path, capsys):
    assert main(["generate", "x", "--model", str(tmp_path / "missing")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("lcmkit: error:") and "is not a folder" in err and "\n" not in err
