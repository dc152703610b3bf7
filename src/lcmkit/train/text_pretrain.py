"""Pretrain a from-scratch CLIP text encoder as a causal language model on the training captions.

Stable Diffusion's text encoder arrives pretrained; ours starts random. Trained only through the UNet's diffusion
loss it learns slowly (at the UNet's full rate it collapses: every caption maps to nearly the same states and the
UNet learns to ignore text), and in our CPU runs it never learned to tell *which* object a colour word belongs to:
"a red circle on a blue background" and "a blue circle on a red background" got nearly the same images.

Next-token prediction targets exactly that: to predict the word after "blue", the state at "blue" must say
whether a shape or "background" follows, so each colour token's state carries its role before the UNet sees it
(tests/train/test_text_pretrain.py checks this). The objective needs only captions (any dataset's), costs seconds
on a CPU, and its prediction head is thrown away afterwards: the encoder keeps the CLIP architecture.

Status: an experiment, off in the shipped recipe. In our one CPU run of the tiny recipe with 300 pretraining steps
the teacher's text conditioning had still not taken hold at step 4,000 (caption fidelity 0.30, where runs without
it reach 0.57 to 0.66 by steps 2,000 to 3,000). Why is not established; one run is not enough to say it hurts.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import Dataset
from transformers import CLIPTextModel, CLIPTokenizer

from lcmkit.train.tokenizer import tokenize

logger = logging.getLogger(__name__)


@dataclass
class TextPretrainConfig:
    """Steps of next-token prediction; 0 turns pretraining off."""

    steps: int = 0
    batch_size: int = 128
    learning_rate: float = 1e-3
    caption_pool: int = 20_000  # distinct captions drawn from the dataset (all of them when it is smaller)
    seed: int = 0

    def __post_init__(self) -> None:
        for name in ("steps", "batch_size", "caption_pool"):
            if getattr(self, name) < (0 if name == "steps" else 1):
                raise ValueError(f"TextPretrainConfig.{name} must be positive, got {getattr(self, name)}")
        if not self.learning_rate > 0:
            raise ValueError(f"TextPretrainConfig.learning_rate must be > 0, got {self.learning_rate}")


def dataset_captions(dataset: Dataset, limit: int) -> list[str]:
    """The captions of the first `limit` items (through `dataset.caption(i)` when it has one: no images drawn)."""
    n = min(len(dataset), limit)
    if hasattr(dataset, "caption"):
        return [dataset.caption(i) for i in range(n)]
    return [dataset[i][1] for i in range(n)]


def next_token_targets(ids: torch.Tensor, eos_token_id: int) -> torch.Tensor:
    """Targets for predicting token i+1 from position i; -100 (ignored) after the first end-of-text token.

    Pipelines pad prompts with end-of-text, so only the caption's words and its first end token are targets.
    """
    targets = ids[:, 1:].clone()
    after_end = (ids[:, :-1] == eos_token_id).cumsum(1) > 0
    targets[after_end] = -100
    return targets


def language_model_loss(
    text_encoder: CLIPTextModel, head: nn.Linear, ids: torch.Tensor, eos_token_id: int
) -> torch.Tensor:
    states = text_encoder(ids)[0][:, :-1]
    logits = head(states)
    return F.cross_entropy(
        logits.reshape(-1, logits.shape[-1]), next_token_targets(ids, eos_token_id).reshape(-1)
    )


def pretrain_text_encoder(
    text_encoder: CLIPTextModel,
    tokenizer: CLIPTokenizer,
    captions: list[str],
    config: TextPretrainConfig,
    device: torch.device | str = "cpu",
) -> list[float]:
    """Train `text_encoder` in place on next-token prediction over `captions`; returns the loss of every step.

    Deterministic for a seed (its own generators), so every process of a multi-GPU launch ends with the same weights.
    """
    if config.steps == 0:
        return []
    if not captions:
        raise ValueError("text pretraining needs at least one caption")
    device = torch.device(device)
    ids = tokenize(tokenizer, captions, torch.device("cpu"))
    gen = torch.Generator().manual_seed(config.seed)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(config.seed)
        head = nn.Linear(text_encoder.config.hidden_size, len(tokenizer)).to(device)
    text_encoder.train()
    params = list(text_encoder.parameters()) + list(head.parameters())
    optimizer = torch.optim.AdamW(params, lr=config.learning_rate, weight_decay=0.0)
    losses = []
    for step in range(config.steps):
        batch = ids[torch.randint(len(ids), (config.batch_size,), generator=gen)].to(device)
        loss = language_model_loss(text_encoder, head, batch, tokenizer.eos_token_id)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        losses.append(loss.item())
        if step % 100 == 0 or step == config.steps - 1:
            logger.info("text pretraining step %d/%d: loss %.4f", step + 1, config.steps, losses[-1])
    return losses
