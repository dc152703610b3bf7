"""The synthetic world and the dataset readers.

They prove: scenes are a pure function of (seed, index); captions say exactly what the record holds; the
rendered image shows each shape in its colour at its centre on the background colour; the word-level CLIP
tokenizer gives one token per caption word; image-folder and JSONL readers yield (image in [-1, 1], caption).
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image

from lcmkit.models.text import load_tokenizer
from lcmkit.train.data import (
    COLOURS,
    POSITIONS,
    SceneRecord,
    ShapeRecord,
    SyntheticShapes,
    WorldConfig,
    image_folder_dataset,
    jsonl_dataset,
    open_dataset,
    render_scene,
    sample_scene,
    world_words,
)
from lcmkit.train.tokenizer import write_word_clip_tokenizer

WORLD = WorldConfig(image_size=64, seed=7)


def test_scenes_are_deterministic_per_seed_and_index():
    a, b = SyntheticShapes(WORLD), SyntheticShapes(WorldConfig(image_size=64, seed=7))
    for i in (0, 5, 123_456):
        assert a.record(i) == b.record(i)
        image_a, caption_a = a[i]
        image_b, caption_b = b[i]
        assert torch.equal(image_a, image_b) and caption_a == caption_b
    other_seed = SyntheticShapes(WorldConfig(image_size=64, seed=8))
    assert [a.record(i) for i in range(20)] != [other_seed.record(i) for i in range(20)]
    # Order independence: scene 5 is the same whether or not scenes 0..4 were drawn first.
    assert sample_scene(WORLD, 5) == SyntheticShapes(WORLD).record(5)


def test_caption_matches_attributes():
    record = SceneRecord(
        shapes=(
            ShapeRecord("circle", "red", "top left", "large", 16.0, 16.0, 11.5),
            ShapeRecord("square", "green", "center", "small", 32.0, 32.0, 6.4),
        ),
        background="blue",
        image_size=64,
    )
    assert record.caption == (
        "a large red circle at the top left and a small green square in the center on a blue background"
    )
    for i in range(200):
        record = sample_scene(WORLD, i)
        words = record.caption.split()
        assert record.caption.endswith(f"on a {record.background} background")
        assert record.caption.count(" and ") == len(record.shapes) - 1
        for phrase, shape in zip(record.caption.split(" and "), record.shapes, strict=True):
            assert phrase.startswith(f"a {shape.size} {shape.colour} {shape.shape} ")
            assert shape.position in phrase
        assert set(words) <= set(world_words(WORLD))
        assert record.to_dict()["caption"] == record.caption


def test_scene_rules_hold():
    """1..max_shapes shapes at distinct positions, each coloured unlike the background, centred near its position."""
    counts = set()
    for i in range(300):
        record = sample_scene(WORLD, i)
        counts.add(len(record.shapes))
        assert len({s.position for s in record.shapes}) == len(record.shapes)
        for s in record.shapes:
            assert s.colour != record.background
            fx, fy = POSITIONS[s.position]
            assert abs(s.cx - fx * 64) <= 0.02 * 64 and abs(s.cy - fy * 64) <= 0.02 * 64
    assert counts == {1, 2}


def test_pixel_at_shape_centre_has_shape_colour():
    """Every shape of 300 scenes shows its own colour at its centre pixel; a corner pixel shows the background."""
    for i in range(300):
        record = sample_scene(WORLD, i)
        pixels = render_scene(record)
        assert pixels.shape == (64, 64, 3) and pixels.dtype == np.uint8
        for s in record.shapes:
            assert tuple(pixels[round(s.cy), round(s.cx)]) == COLOURS[s.colour], (i, s)
        assert tuple(pixels[0, 32]) == COLOURS[record.background]  # top edge centre: never covered
    image, _ = SyntheticShapes(WORLD)[0]
    assert image.shape == (3, 64, 64) and image.dtype == torch.float32
    assert image.min() >= -1.0 and image.max() <= 1.0


def test_world_config_rejects_bad_values():
    with pytest.raises(ValueError, match="colours"):
        WorldConfig(colours=("red", "teal"))
    with pytest.raises(ValueError, match="max_shapes"):
        WorldConfig(max_shapes=9)
    small = WorldConfig(image_size=32, shapes=("circle",), colours=("red", "blue"), max_shapes=1)
    record = sample_scene(small, 3)
    assert record.shapes[0].shape == "circle" and {record.shapes[0].colour, record.background} == {
        "red",
        "blue",
    }


def test_loose_captions_drop_only_size_and_position_words():
    """With caption_omit, captions lose size words and position phrases at about that rate, never anything else,
    and the images (and records) stay exactly those of the same world without omission."""
    full = SyntheticShapes(WorldConfig(image_size=32, seed=3, max_shapes=1))
    loose = SyntheticShapes(WorldConfig(image_size=32, seed=3, max_shapes=1, caption_omit=0.5))
    sizes = positions = 0
    n = 400
    for i in range(n):
        image_full, caption_full = full[i]
        image_loose, caption = loose[i]
        assert torch.equal(image_full, image_loose)
        shape = full.record(i).shapes[0]
        assert caption.startswith("a ") and caption.endswith(f"on a {full.record(i).background} background")
        assert f"{shape.colour} {shape.shape}" in caption
        sizes += shape.size in caption.split()
        positions += shape.position.split()[-1] in caption.split()
        kept = set(caption.split())
        assert kept <= set(caption_full.split())
    assert 0.4 < sizes / n < 0.6 and 0.4 < positions / n < 0.6
    assert [loose[i][1] for i in range(20)] == [loose[i][1] for i in range(20)]  # per index, not per call
    bare = SyntheticShapes(WorldConfig(image_size=32, seed=3, max_shapes=1, caption_omit=1.0))
    s = bare.record(0).shapes[0]
    assert bare[0][1] == f"a {s.colour} {s.shape} on a {bare.record(0).background} background"
    with pytest.raises(ValueError, match="caption_omit"):
        WorldConfig(caption_omit=1.5)


def test_word_tokenizer_gives_one_token_per_word(tmp_path):
    """Every world word is one CLIP token, captions fit the padded length, and unknown words still tokenise."""
    folder = write_word_clip_tokenizer(tmp_path / "tok", world_words(), model_max_length=32)
    tokenizer = load_tokenizer(folder)
    assert tokenizer.model_max_length == 32
    longest = "a large purple triangle at the bottom right and a small orange diamond at the top left on a white background"
    ids = tokenizer(longest).input_ids
    assert len(ids) == len(longest.split()) + 2
    assert tokenizer.convert_ids_to_tokens(ids)[1:-1] == [w + "</w>" for w in longest.split()]
    assert tokenizer.decode(ids, skip_special_tokens=True) == longest
    assert len(tokenizer("a zebra").input_ids) > 4  # out-of-vocabulary words fall back to characters


def _write_png(path, colour):
    Image.new("RGB", (20, 10), colour).save(path)


def test_image_folder_and_jsonl_readers(tmp_path):
    """Both readers resize/crop to the requested size, scale to [-1, 1] and pair each image with its caption."""
    folder = tmp_path / "images"
    folder.mkdir()
    _write_png(folder / "b.png", (255, 0, 0))
    (folder / "b.txt").write_text("a red picture\n")
    _write_png(folder / "a.png", (0, 0, 255))
    (folder / "a.txt").write_text("a blue picture")
    dataset = image_folder_dataset(folder, size=8)
    assert len(dataset) == 2
    image, caption = dataset[0]
    assert caption == "a blue picture" and image.shape == (3, 8, 8)
    torch.testing.assert_close(image[:, 4, 4], torch.tensor([-1.0, -1.0, 1.0]))
    assert open_dataset(folder, 8)[1][1] == "a red picture"

    lines = [
        json.dumps({"image": "images/b.png", "text": "red"}),
        "",
        json.dumps({"image": str(folder / "a.png"), "text": "blue"}),
    ]
    (tmp_path / "data.jsonl").write_text("\n".join(lines))
    dataset = jsonl_dataset(tmp_path / "data.jsonl", size=6)
    assert [dataset[i][1] for i in range(len(dataset))] == ["red", "blue"]
    torch.testing.assert_close(dataset[0][0][:, 3, 3], torch.tensor([1.0, -1.0, -1.0]))
    assert len(open_dataset(tmp_path / "data.jsonl", 6)) == 2


def test_readers_name_what_is_wrong(tmp_path):
    _write_png(tmp_path / "lonely.png", (0, 0, 0))
    with pytest.raises(ValueError, match="lonely.png has no caption"):
        image_folder_dataset(tmp_path)
    (tmp_path / "bad.jsonl").write_text('{"image": "missing.png", "text": "x"}\n')
    with pytest.raises(ValueError, match="does not exist"):
        jsonl_dataset(tmp_path / "bad.jsonl")
    (tmp_path / "bad2.jsonl").write_text('{"img": "x.png"}\n')
    with pytest.raises(ValueError, match='"image" and "text"'):
        jsonl_dataset(tmp_path / "bad2.jsonl")
    with pytest.raises(ValueError, match="must be a folder"):
        open_dataset(tmp_path / "data.csv")
