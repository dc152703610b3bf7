"""The tiny autoencoder's objective with a pool of LCM sampler latents (train/tiny_autoencoder.py).

What these prove, on seeded random weights:
- `sample_pipeline_latents` returns exactly the pipeline's own `output_type="latent"` result for one caption,
  steps and guidance scale, and those are the *scaled* latents (the pipeline's "pt" image is the VAE decode of
  them over `scaling_factor`, atol 1e-6); it is deterministic for a seed and differs across seeds;
- with a pool, the decoder's inputs are pool latents for the stated share of the batch (at least one row) and the
  images' encoder latents for the rest, with the VAE's decode of each as the target, the pool rows drawn from the
  global torch RNG (which the loop checkpoints); the encoder half's loss is unchanged;
- without a pool the loss is bit-for-bit the old encoder-latents-only formula and draws nothing extra from the RNG;
- bad settings raise ValueErrors that name the setting; a two-step training run with a pool writes a model.
"""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F
from helpers.tiny_models import MINUTE_VAE
from torch import nn

from lcmkit.config import replace
from lcmkit.models.tiny_vae import AutoencoderTiny
from lcmkit.models.vae import AutoencoderKL
from lcmkit.train.data import WorldConfig
from lcmkit.train.loop import LoopConfig
from lcmkit.train.tiny_autoencoder import (
    ImitateVAE,
    TinyAutoencoderTrainConfig,
    _BothHalves,
    sample_pipeline_latents,
    tiny_config_for,
    train_tiny_autoencoder,
)

CAPTIONS = ["a red circle", "a small blue square", "a green triangle on black", "yellow"]


@pytest.fixture(scope="module")
def lcm_dir(tmp_path_factory):
    from lcmkit.tiny import build_tiny_lcm

    return build_tiny_lcm(tmp_path_factory.mktemp("tiny_lcm") / "m")


@pytest.fixture(scope="module")
def vae():
    torch.manual_seed(0)
    return AutoencoderKL(replace(MINUTE_VAE, scaling_factor=0.7)).eval().requires_grad_(False)


def _images(n: int = 4, size: int = 16) -> torch.Tensor:
    return torch.rand(n, 3, size, size, generator=torch.Generator().manual_seed(1)) * 2 - 1


class _Recorder(nn.Module):
    """Stands in for `_BothHalves`: remembers the decoder's inputs, outputs zeros."""

    def forward(self, images: torch.Tensor, latents: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        self.latents = latents
        return torch.zeros_like(latents), torch.zeros_like(images)


# ----------------------------------------------------------------------------------------------------------------------
# sample_pipeline_latents


def test_sample_pipeline_latents_is_the_pipelines_scaled_latent_output(lcm_dir):
    from lcmkit import LatentConsistencyModelPipeline

    ours = sample_pipeline_latents(lcm_dir, CAPTIONS[:1], steps=(2,), guidance_range=(3.5, 3.5), seed=5)
    pipe = LatentConsistencyModelPipeline.from_pretrained(lcm_dir, safety_checker=None)
    pipe.set_progress_bar_config(disable=True)
    kwargs = {"num_inference_steps": 2, "guidance_scale": 3.5}
    theirs = pipe(CAPTIONS[0], generator=torch.Generator().manual_seed(5), output_type="latent", **kwargs)
    assert ours.dtype == torch.float32 and ours.device.type == "cpu"
    assert torch.equal(ours, theirs.images)
    # Scaled: what the pipeline divides by scaling_factor before decoding.
    image = pipe(CAPTIONS[0], generator=torch.Generator().manual_seed(5), output_type="pt", **kwargs).images
    decoded = pipe.vae.decode(ours / pipe.vae.config.scaling_factor).sample
    torch.testing.assert_close(image, (decoded / 2 + 0.5).clamp(0, 1), atol=1e-6, rtol=0)


def test_sample_pipeline_latents_is_deterministic_for_a_seed(lcm_dir):
    a = sample_pipeline_latents(lcm_dir, CAPTIONS, seed=3, batch_size=2)
    b = sample_pipeline_latents(lcm_dir, CAPTIONS, seed=3, batch_size=2)
    c = sample_pipeline_latents(lcm_dir, CAPTIONS, seed=4, batch_size=2)
    assert a.shape == (4, 4, 16, 16)
    assert torch.equal(a, b)
    assert not torch.allclose(a, c)


# ----------------------------------------------------------------------------------------------------------------------
# The objective


@pytest.mark.parametrize(("fraction", "k"), [(0.1, 1), (0.25, 1), (0.5, 2), (1.0, 4)])
def test_pool_latents_replace_the_stated_share_of_decoder_inputs(vae, fraction, k):
    pool = torch.randn(10, 4, 8, 8, generator=torch.Generator().manual_seed(2)) * 3
    tiny_scale = 2.0
    objective = ImitateVAE(vae, tiny_scale, pool, fraction)
    model = _Recorder()
    images = _images()
    torch.manual_seed(0)
    _, metrics = objective(model, (images, CAPTIONS))

    # Replay the RNG: the posterior draw, then the pool indices.
    torch.manual_seed(0)
    s = vae.config.scaling_factor
    posterior = vae.encode(images).latent_dist
    encoder_latents = posterior.sample() * s
    index = torch.randint(len(pool), (k,))
    expected = torch.cat([pool[index], encoder_latents[k:]])
    assert torch.equal(model.latents, expected / tiny_scale)

    target = vae.decode(expected / s).sample.clamp(-1, 1)
    zeros = torch.zeros_like(target)
    torch.testing.assert_close(metrics["decoder"], F.l1_loss(zeros, target) + F.mse_loss(zeros, target))
    torch.testing.assert_close(
        metrics["decoder_sampler"], F.l1_loss(zeros[:k], target[:k]) + F.mse_loss(zeros[:k], target[:k])
    )
    # The encoder half learns on the images only.
    mean = posterior.mean * s / tiny_scale
    torch.testing.assert_close(metrics["encoder"], F.mse_loss(torch.zeros_like(mean), mean))


def test_without_a_pool_the_loss_is_the_old_formula(vae):
    torch.manual_seed(0)
    tiny_scale = 1.5
    model = _BothHalves(AutoencoderTiny(tiny_config_for(vae, 4, tiny_scale)))
    images = _images()

    torch.manual_seed(7)
    loss, metrics = ImitateVAE(vae, tiny_scale)(model, (images, CAPTIONS))
    rng_after = torch.get_rng_state()

    # The formula before sampler pools, written out.
    torch.manual_seed(7)
    s = vae.config.scaling_factor
    with torch.no_grad():
        posterior = vae.encode(images).latent_dist
        latents = posterior.sample().float() * s
        target = vae.decode(latents / s).sample.float().clamp(-1, 1)
        mean = posterior.mean.float() * s
    encoded, decoded = model(images, latents / tiny_scale)
    decoder = F.l1_loss(decoded, target) + F.mse_loss(decoded, target)
    encoder = F.mse_loss(encoded, mean / tiny_scale)

    assert set(metrics) == {"decoder", "encoder"}
    assert torch.equal(metrics["decoder"], decoder) and torch.equal(metrics["encoder"], encoder)
    assert torch.equal(loss, decoder + encoder)
    assert torch.equal(rng_after, torch.get_rng_state())  # nothing extra drawn


# ----------------------------------------------------------------------------------------------------------------------
# Validation and a short run


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"sampler_pool": 0}, "sampler_pool"),
        ({"sampler_fraction": 0.0}, "sampler_fraction"),
        ({"sampler_fraction": 1.5}, "sampler_fraction"),
        ({"sampler_fraction": -0.2}, "sampler_fraction"),
    ],
)
def test_config_rejects_bad_sampler_settings(kwargs, match):
    with pytest.raises(ValueError, match=match):
        TinyAutoencoderTrainConfig(**kwargs)


def test_config_accepts_the_edges():
    config = TinyAutoencoderTrainConfig(sampler_pool=1, sampler_fraction=1.0)
    assert config.sampler_dir is None


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"captions": []}, "captions"),
        ({"steps": ()}, "steps"),
        ({"steps": (0, 2)}, "steps"),
        ({"guidance_range": (9.0, 2.0)}, "guidance_range"),
        ({"batch_size": 0}, "batch_size"),
    ],
)
def test_sample_pipeline_latents_rejects_bad_arguments(tmp_path, kwargs, match):
    arguments = {"lcm_dir": tmp_path / "none", "captions": CAPTIONS, **kwargs}
    with pytest.raises(ValueError, match=match):
        sample_pipeline_latents(**arguments)


def test_objective_rejects_bad_fraction(vae):
    with pytest.raises(ValueError, match="fraction"):
        ImitateVAE(vae, 1.0, torch.zeros(1, 4, 8, 8), 0.0)


def _run_config(lcm_dir, tmp_path, **kwargs) -> TinyAutoencoderTrainConfig:
    base = {
        "vae_dir": lcm_dir / "vae",
        "save_dir": tmp_path / "tiny-vae",
        "image_size": 32,
        "world": WorldConfig(image_size=32),
        "channels": 4,
        "latent_scale": 1.5,
        "sampler_dir": lcm_dir,
        "sampler_pool": 3,
        "loop": LoopConfig(
            output_dir=tmp_path / "work", max_steps=2, batch_size=2, learning_rate=1e-3, progress=False
        ),
    }
    return TinyAutoencoderTrainConfig(**{**base, **kwargs})


def test_training_with_a_pool_logs_the_sampler_loss_and_saves(lcm_dir, tmp_path):
    train_tiny_autoencoder(_run_config(lcm_dir, tmp_path))
    assert (tmp_path / "tiny-vae" / "config.json").is_file()
    header = (tmp_path / "work" / "tiny_vae_loss.csv").read_text().splitlines()[0].split(",")
    assert {"decoder", "encoder", "decoder_sampler"} <= set(header)
    saved = json.loads((tmp_path / "work" / "tiny_vae_config.json").read_text())
    assert saved["sampler_pool"] == 3 and saved["sampler_fraction"] == 0.5


def test_training_rejects_an_lcm_of_another_latent_shape(lcm_dir, tmp_path):
    with pytest.raises(ValueError, match="latents of shape"):
        train_tiny_autoencoder(
            _run_config(lcm_dir, tmp_path, image_size=16, world=WorldConfig(image_size=16))
        )


def test_training_rejects_an_lcm_built_on_another_vae(lcm_dir, vae, tmp_path):
    vae.save_pretrained(tmp_path / "other-vae")  # scaling_factor 0.7, the LCM's VAE has 0.18215
    with pytest.raises(ValueError, match="scales latents"):
        train_tiny_autoencoder(_run_config(lcm_dir, tmp_path, vae_dir=tmp_path / "other-vae"))
