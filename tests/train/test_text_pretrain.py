"""Next-token pretraining of the teacher's text encoder (lcmkit.train.text_pretrain)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from lcmkit.models.text import load_tokenizer
from lcmkit.train.data import SyntheticShapes, WorldConfig, jsonl_dataset, world_words
from lcmkit.train.teacher import TextEncoderSpec, build_text_encoder, tokenize
from lcmkit.train.text_pretrain import (
    TextPretrainConfig,
    dataset_captions,
    next_token_targets,
    pretrain_text_encoder,
)
from lcmkit.train.tokenizer import write_word_clip_tokenizer

WORLD = WorldConfig(image_size=16, seed=0, max_shapes=1, caption_omit=0.25)


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    return load_tokenizer(write_word_clip_tokenizer(tmp_path_factory.mktemp("tok"), world_words(WORLD), 16))


def test_targets_are_the_next_tokens_up_to_the_first_end_token():
    eos = 9
    ids = torch.tensor([[1, 5, 6, 9, 9, 9], [1, 7, 7, 7, 7, 9]])
    expected = torch.tensor([[5, 6, 9, -100, -100], [7, 7, 7, 7, 9]])
    assert torch.equal(next_token_targets(ids, eos), expected)


def test_captions_come_without_drawing_images(tmp_path):
    world = SyntheticShapes(WORLD)
    assert dataset_captions(world, 5) == [world[i][1] for i in range(5)]
    (tmp_path / "a.png").write_bytes(b"")  # never opened: captions only
    (tmp_path / "data.jsonl").write_text('{"image": "a.png", "text": "a red picture"}\n')
    assert dataset_captions(jsonl_dataset(tmp_path / "data.jsonl"), 10) == ["a red picture"]


def _colour_states(encoder, tokenizer):
    """The states of 'red' as a shape's colour and as the background's, and of 'blue' likewise."""
    ids = tokenize(
        tokenizer, ["a red circle on a blue background", "a blue circle on a red background"], "cpu"
    )
    with torch.no_grad():
        h = encoder(ids)[0]
    # position 0 is the start token: "a"=1, colour=2, ..., "a"=5, background colour=6
    return h[0, 2], h[1, 6], h[1, 2], h[0, 6]


def test_pretraining_teaches_the_role_of_a_colour_word(tokenizer):
    """After pretraining the loss has dropped and a colour word's state says which object it colours."""
    torch.manual_seed(0)
    encoder = build_text_encoder(
        TextEncoderSpec(hidden_size=32, num_layers=2, num_heads=2, intermediate_size=64, max_length=16),
        tokenizer,
    )
    red_shape, red_bg, blue_shape, blue_bg = _colour_states(encoder, tokenizer)
    before = F.cosine_similarity(red_shape, red_bg, dim=0), F.cosine_similarity(blue_shape, blue_bg, dim=0)
    captions = dataset_captions(SyntheticShapes(WORLD), 2000)
    losses = pretrain_text_encoder(encoder, tokenizer, captions, TextPretrainConfig(steps=150, batch_size=64))
    assert len(losses) == 150 and losses[-1] < 0.5 * losses[0]
    red_shape, red_bg, blue_shape, blue_bg = _colour_states(encoder.eval(), tokenizer)
    after = F.cosine_similarity(red_shape, red_bg, dim=0), F.cosine_similarity(blue_shape, blue_bg, dim=0)
    assert before[0] > 0.6 and before[1] > 0.6  # a random encoder: mostly the word itself
    assert after[0] < before[0] - 0.3 and after[1] < before[1] - 0.3


def test_pretraining_is_deterministic_and_off_at_zero_steps(tokenizer):
    spec = TextEncoderSpec(hidden_size=16, num_layers=1, num_heads=2, intermediate_size=32, max_length=16)
    captions = dataset_captions(SyntheticShapes(WORLD), 50)
    runs = []
    for _ in range(2):
        torch.manual_seed(0)
        encoder = build_text_encoder(spec, tokenizer)
        pretrain_text_encoder(encoder, tokenizer, captions, TextPretrainConfig(steps=3, batch_size=8))
        runs.append(encoder.state_dict())
    assert all(torch.equal(runs[0][k], runs[1][k]) for k in runs[0])
    torch.manual_seed(0)
    untouched = build_text_encoder(spec, tokenizer)
    initial = {k: v.clone() for k, v in untouched.state_dict().items()}
    assert pretrain_text_encoder(untouched, tokenizer, captions, TextPretrainConfig(steps=0)) == []
    assert all(torch.equal(untouched.state_dict()[k], v) for k, v in initial.items())
    assert not all(torch.equal(runs[0][k], v) for k, v in initial.items())  # three steps did change it


@pytest.mark.parametrize("field,value", [("steps", -1), ("batch_size", 0), ("learning_rate", 0.0)])
def test_config_rejects_bad_values(field, value):
    with pytest.raises(ValueError, match=field):
        TextPretrainConfig(**{field: value})
