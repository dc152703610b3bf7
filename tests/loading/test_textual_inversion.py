"""Textual inversion loading on its own terms: where the vectors go, the errors, unloading, file safety.

The reference here is computed by hand: the expected token ids come from the tokenizer, the expected rows are the
file's vectors, and the expected prompt embedding is the text encoder run on ids built without lcmkit's rewrite.
Unloading is checked bit for bit against the text encoder as loaded from disk.
"""

from __future__ import annotations

import logging
import pickle

import pytest
import torch
from safetensors.torch import save_file

import lcmkit
from lcmkit.loading.textual_inversion import convert_prompt

DIM = 32


@pytest.fixture
def pipe(tiny_folders):
    p = lcmkit.LatentConsistencyModelPipeline.from_pretrained(tiny_folders["sd15"])
    p.set_progress_bar_config(disable=True)
    return p


def vecs(n: int, seed: int = 0, dim: int = DIM) -> torch.Tensor:
    return torch.randn(n, dim, generator=torch.Generator().manual_seed(seed))


def matrix(p) -> torch.Tensor:
    return p.text_encoder.get_input_embeddings().weight.detach()


def encode(p, prompt: str) -> torch.Tensor:
    with torch.no_grad():
        return p.encode_prompt(prompt, torch.device("cpu"), 1)


def test_rows_ids_and_prompt_by_hand(pipe):
    """A 3-vector embedding becomes tokens <t>, <t>_1, <t>_2 whose rows are the vectors; "a <t>" encodes as the
    text encoder run on [bos, a, id(<t>), id(<t>_1), id(<t>_2), eos, pad...] computed by hand."""
    v = vecs(3)
    n_before = len(pipe.tokenizer)
    pipe.load_textual_inversion({"<t>": v})
    ids = pipe.tokenizer.convert_tokens_to_ids(["<t>", "<t>_1", "<t>_2"])
    assert ids == [n_before, n_before + 1, n_before + 2]
    assert torch.equal(matrix(pipe)[ids], v)
    assert pipe.maybe_convert_prompt("a <t>", pipe.tokenizer) == "a <t> <t>_1 <t>_2"
    assert pipe.maybe_convert_prompt(["<t>", "b"], pipe.tokenizer) == ["<t> <t>_1 <t>_2", "b"]

    tok = pipe.tokenizer
    a_ids = tok("a", add_special_tokens=False).input_ids
    seq = [tok.bos_token_id, *a_ids, *ids, tok.eos_token_id]
    seq += [tok.pad_token_id] * (tok.model_max_length - len(seq))
    with torch.no_grad():
        expected = pipe.text_encoder(torch.tensor([seq]))[0]
    assert torch.allclose(encode(pipe, "a <t>"), expected, atol=1e-6, rtol=0)


def test_convert_prompt_matches_added_tokens_longest_first(pipe):
    """An explicit `<t>_1` in a prompt is not expanded again; single-vector tokens stay as they are."""
    pipe.load_textual_inversion([{"<t>": vecs(3)}, {"<s>": vecs(1, 1)[0]}])
    assert convert_prompt("<t>_1 <s> <t>", pipe.tokenizer) == "<t>_1 <s> <t> <t>_1 <t>_2"
    assert pipe._prompt_transform() is not None


def test_no_multi_vector_no_transform(pipe):
    assert pipe._prompt_transform() is None
    pipe.load_textual_inversion({"<s>": vecs(1)})
    assert pipe._prompt_transform() is None


def test_file_layouts_and_token_names(pipe, tmp_path):
    """A1111 .pt takes its `name`, A1111 .safetensors its file name, diffusers files their key; token= overrides."""
    torch.save({"string_to_param": {"*": vecs(2, 1)}, "name": "pt-name", "step": 1}, tmp_path / "a.pt")
    save_file({"emb_params": vecs(1, 2)}, str(tmp_path / "my-style.safetensors"))
    save_file({"<k>": vecs(1, 3)[0]}, str(tmp_path / "learned_embeds.safetensors"))
    (tmp_path / "bin").mkdir()
    torch.save({"<b>": vecs(4, 4)}, tmp_path / "bin" / "learned_embeds.bin")
    pipe.load_textual_inversion(tmp_path / "a.pt")
    pipe.load_textual_inversion(str(tmp_path / "my-style.safetensors"))
    pipe.load_textual_inversion(str(tmp_path))  # folder -> learned_embeds.safetensors
    pipe.load_textual_inversion(tmp_path / "bin", token="<renamed>")
    added = {t.content for t in pipe.tokenizer.added_tokens_decoder.values() if not t.special}
    assert added == {
        "pt-name",
        "pt-name_1",
        "my-style",
        "<k>",
        *[f"<renamed>{s}" for s in ("", "_1", "_2", "_3")],
    }
    tok = pipe.tokenizer
    assert torch.equal(matrix(pipe)[tok.convert_tokens_to_ids("<renamed>_3")], vecs(4, 4)[3])


def test_tensor_inputs(pipe):
    """A bare (n, dim) tensor with n tokens gives one row each; a bare tensor needs a token."""
    v = vecs(2)
    pipe.load_textual_inversion(v, token=["<p>", "<q>"])
    ids = pipe.tokenizer.convert_tokens_to_ids(["<p>", "<q>"])
    assert torch.equal(matrix(pipe)[ids], v)
    assert pipe._prompt_transform() is None  # two single-vector tokens, not one 2-vector token
    with pytest.raises(ValueError, match="token="):
        pipe.load_textual_inversion(vecs(1)[0])


def test_errors_leave_pipeline_unchanged(pipe):
    """Each bad input raises a ValueError that names the problem, and nothing is added."""
    pipe.load_textual_inversion({"<t>": vecs(1)})
    n_tokens, weight = len(pipe.tokenizer), matrix(pipe).clone()
    with pytest.raises(ValueError, match="<t>"):
        pipe.load_textual_inversion({"<t>": vecs(1, 1)})
    with pytest.raises(ValueError, match="cat</w>"):
        pipe.load_textual_inversion({"cat</w>": vecs(1, 1)})
    with pytest.raises(ValueError, match=r"16.*32"):
        pipe.load_textual_inversion({"<u>": vecs(2, dim=16)})
    with pytest.raises(ValueError, match=r"\['clip_g', 'clip_l'\]"):
        pipe.load_textual_inversion({"clip_l": vecs(1), "clip_g": vecs(1)})
    with pytest.raises(ValueError, match=r"\['a', 'b'\]"):
        pipe.load_textual_inversion({"a": vecs(1), "b": vecs(1)})
    with pytest.raises(ValueError, match="more than once"):
        pipe.load_textual_inversion([{"<v>": vecs(1)}, {"<v>": vecs(1)}])
    with pytest.raises(ValueError, match="2 embeddings but 1 tokens"):
        pipe.load_textual_inversion([{"<v>": vecs(1)}, {"<w>": vecs(1)}], token=["<v>"])
    with pytest.raises(ValueError, match="neither an existing file"):
        pipe.load_textual_inversion("no/such/thing.pt")
    # a good embedding listed with a bad one is not half-loaded
    with pytest.raises(ValueError, match="dim 16"):
        pipe.load_textual_inversion([{"<ok>": vecs(1)}, {"<bad>": vecs(1, dim=16)}])
    assert len(pipe.tokenizer) == n_tokens
    assert torch.equal(matrix(pipe), weight)


class _Payload:
    def __reduce__(self):
        return (print, ("pickle code ran",))


def test_pickle_with_code_is_refused(pipe, tmp_path, capsys):
    """A .pt whose pickle would call a function is refused by weights_only loading; the function never runs."""
    path = tmp_path / "evil.pt"
    with open(path, "wb") as f:
        pickle.dump({"string_to_param": {"*": _Payload()}, "name": "evil"}, f, protocol=2)
    with pytest.raises(ValueError, match="weights_only"):
        pipe.load_textual_inversion(path)
    assert "pickle code ran" not in capsys.readouterr().out


def test_unload_restores_original_matrix(pipe, tiny_folders):
    """Load 1-, 3- and 340-vector embeddings (the last grows the matrix past its 1000 rows), unload one by its base
    token (its companions go too, the others keep their vectors), then the rest: the matrix, vocab size and
    config are bit for bit those of a freshly loaded text encoder."""
    original = matrix(pipe).clone()
    n_tokens = len(pipe.tokenizer)
    one, three, big = vecs(1, 1), vecs(3, 2), vecs(340, 3)
    pipe.load_textual_inversion([{"<one>": one}, {"<three>": three}, {"<big>": big}])
    assert matrix(pipe).shape[0] == n_tokens + 344 > original.shape[0]
    assert pipe.text_encoder.config.vocab_size == n_tokens + 344
    prompt = "a <one> <three>"
    with_all = encode(pipe, prompt)

    pipe.unload_textual_inversion("<big>")
    assert matrix(pipe).shape == original.shape
    assert "<big>_339" not in pipe.tokenizer.get_vocab()
    assert torch.equal(encode(pipe, prompt), with_all)

    pipe.unload_textual_inversion("<one>")
    tok = pipe.tokenizer
    assert tok.convert_tokens_to_ids("<three>_2") == n_tokens + 2  # moved down, vector moved with it
    assert torch.equal(matrix(pipe)[n_tokens + 2], three[2])

    pipe.unload_textual_inversion()
    assert len(pipe.tokenizer) == n_tokens
    assert torch.equal(matrix(pipe), original)
    assert pipe.text_encoder.config.vocab_size == original.shape[0]
    fresh = lcmkit.LatentConsistencyModelPipeline.from_pretrained(tiny_folders["sd15"])
    assert torch.equal(encode(pipe, "a photo of a cat"), encode(fresh, "a photo of a cat"))
    with pytest.raises(ValueError, match="<nope>"):
        pipe.unload_textual_inversion("<nope>")


def test_grown_pipeline_saves_and_loads_back(pipe, tmp_path):
    """After the matrix grows, save_pretrained writes a text encoder whose config matches its weights, and the
    reloaded pipeline (tokenizer with the added tokens) encodes the prompt identically."""
    pipe.load_textual_inversion({"<big>": vecs(340, 5)})
    prompt = "a <big> cat"
    expected = encode(pipe, prompt)
    pipe.save_pretrained(tmp_path / "saved")
    again = lcmkit.LatentConsistencyModelPipeline.from_pretrained(tmp_path / "saved")
    assert torch.allclose(encode(again, prompt), expected, atol=1e-6, rtol=0)


def test_logs_what_was_loaded(pipe, caplog):
    with caplog.at_level(logging.INFO, logger="lcmkit.loading.textual_inversion"):
        pipe.load_textual_inversion({"<t>": vecs(3)})
    assert "'<t>' (3 vectors)" in caplog.text
