"""Textual inversion parity: lcmkit's `load_textual_inversion` against diffusers' on the same tiny pipeline folder.

For each file layout (A1111 `.pt`, A1111/Civitai `.safetensors`, diffusers `learned_embeds.safetensors` and
`learned_embeds.bin`) and for a 1-vector and a 3-vector embedding, both libraries load the same file into freshly
loaded pipelines; then the prompt embeddings must agree to 1e-6 and the generated images to 1e-4 (max abs, `np`
output in [0, 1]). The prompts use the token several times and next to punctuation, so this also proves the
multi-vector prompt rewrite and the token ids match diffusers'. A prompt without the token must be unchanged by
loading, and unloading must bring lcmkit back to the embeddings of a pipeline that never loaded anything.
"""

from __future__ import annotations

import pytest
import torch
from helpers.reference import assert_close_to_reference, max_abs_diff
from safetensors.torch import save_file

EMBED_TOL = 1e-6
IMAGE_TOL = 1e-4
DIM = 32  # the tiny text encoder's hidden size (helpers.tiny_models)


def vectors(n: int, seed: int) -> torch.Tensor:
    return torch.randn(n, DIM, generator=torch.Generator().manual_seed(seed))


def write_a1111_pt(folder, n, seed):
    path = folder / "a1111style.pt"
    torch.save(
        {
            "string_to_token": {"*": 265},
            "string_to_param": {"*": vectors(n, seed)},
            "name": "<a1111>",
            "step": 3000,
            "sd_checkpoint": "0123abcd",
            "sd_checkpoint_name": "v1-5-pruned",
        },
        path,
    )
    return path, {}, "<a1111>"


def write_a1111_safetensors(folder, n, seed):
    path = folder / "civitai_style.safetensors"
    save_file({"emb_params": vectors(n, seed)}, str(path))
    # diffusers would name the token "emb_params" (the dict's only key); both get the token given here
    return path, {"token": "<civitai>"}, "<civitai>"


def write_diffusers_safetensors(folder, n, seed):
    sub = folder / "diffusers_st"
    sub.mkdir()
    v = vectors(n, seed)
    save_file({"<diff-st>": v[0] if n == 1 else v}, str(sub / "learned_embeds.safetensors"))
    return sub, {}, "<diff-st>"


def write_diffusers_bin(folder, n, seed):
    sub = folder / "diffusers_bin"
    sub.mkdir()
    v = vectors(n, seed)
    torch.save({"<diff-bin>": v[0] if n == 1 else v}, sub / "learned_embeds.bin")
    return sub, {}, "<diff-bin>"


LAYOUTS = {
    "a1111_pt": write_a1111_pt,
    "a1111_safetensors": write_a1111_safetensors,
    "diffusers_safetensors": write_diffusers_safetensors,
    "diffusers_bin": write_diffusers_bin,
}


def load_pair(folder):
    import diffusers

    import lcmkit

    ours = lcmkit.LatentConsistencyModelPipeline.from_pretrained(folder)
    ref = diffusers.LatentConsistencyModelPipeline.from_pretrained(folder)
    ours.set_progress_bar_config(disable=True)
    ref.set_progress_bar_config(disable=True)
    return ours, ref


def embeds(pipe, prompt, ours: bool) -> torch.Tensor:
    with torch.no_grad():
        if ours:
            return pipe.encode_prompt(prompt, torch.device("cpu"), 1)
        return pipe.encode_prompt(prompt, torch.device("cpu"), 1, False)[0]


@pytest.mark.parametrize("n_vectors", [1, 3])
@pytest.mark.parametrize("layout", sorted(LAYOUTS))
def test_textual_inversion_matches_diffusers(tiny_folders, tmp_path, layout, n_vectors):
    """Same file, same prompt -> same prompt embeddings (1e-6) and images (1e-4) as diffusers."""
    ours, ref = load_pair(tiny_folders["sd15"])
    plain = "a photo of a cat"
    before = embeds(ours, plain, ours=True)

    source, kwargs, token = LAYOUTS[layout](tmp_path, n_vectors, seed=7)
    ours.load_textual_inversion(str(source), **kwargs)
    ref.load_textual_inversion(str(source), **kwargs)

    assert ours.maybe_convert_prompt(f"a {token}", ours.tokenizer) == ref.maybe_convert_prompt(
        f"a {token}", ref.tokenizer
    )
    prompts = [f"a photo of {token}", f"{token}, a cat in {token} style"]
    for prompt in prompts:
        assert_close_to_reference(
            embeds(ours, prompt, ours=True),
            embeds(ref, prompt, ours=False),
            atol=EMBED_TOL,
            what=repr(prompt),
        )
    # the embedding really is used: the token changes the prompt's encoding
    assert max_abs_diff(embeds(ours, prompts[0], True), embeds(ours, "a photo of", True)) > 1e-3
    assert max_abs_diff(embeds(ours, plain, ours=True), before) == 0.0

    kwargs = dict(num_inference_steps=2, guidance_scale=8.0, output_type="np", height=32, width=32)
    a = ours(prompts, generator=torch.Generator().manual_seed(0), **kwargs).images
    b = ref(prompts, generator=torch.Generator().manual_seed(0), **kwargs).images
    assert_close_to_reference(a, b, atol=IMAGE_TOL, what="image")

    import lcmkit

    ours.unload_textual_inversion()
    never_loaded = lcmkit.LatentConsistencyModelPipeline.from_pretrained(tiny_folders["sd15"])
    assert max_abs_diff(embeds(ours, prompts[1], True), embeds(never_loaded, prompts[1], True)) == 0.0


def test_two_embeddings_then_partial_unload_match_diffusers(tiny_folders):
    """Two embeddings loaded in one call (dicts, a list of tokens), then one unloaded: diffusers after removing
    the same tokens gives the same embeddings for a prompt using the one left."""
    ours, ref = load_pair(tiny_folders["sd2"])
    sources = [{"<x>": vectors(3, 1)}, {"<y>": vectors(2, 2)}]
    ours.load_textual_inversion(sources, token=["<first>", "<second>"])
    ref.load_textual_inversion(sources, token=["<first>", "<second>"])
    prompt = "<first> and <second>, <second>"
    assert_close_to_reference(
        embeds(ours, prompt, True), embeds(ref, prompt, False), atol=EMBED_TOL, what="prompt embeddings"
    )

    ours.unload_textual_inversion("<first>")  # takes <first>_1, <first>_2 with it
    ref.unload_textual_inversion(["<first>", "<first>_1", "<first>_2"])
    prompt = "a <second> cat"
    assert_close_to_reference(
        embeds(ours, prompt, True), embeds(ref, prompt, False), atol=EMBED_TOL, what="prompt embeddings"
    )
