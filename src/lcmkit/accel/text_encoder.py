"""OpenVINO for the CLIP text encoder: the prompt's hidden states from a compiled graph, for the fast mode.

The text encoder is the smallest of the three models (123M parameters for SD1.5's CLIP ViT-L/14), but run eagerly it
is one more PyTorch stage per image; on OpenVINO the whole pipeline's arithmetic runs in one runtime, as in
optimum-intel's pipelines. The graph takes token ids of one fixed shape (batch 1 x the tokenizer's length, 77) and
returns the last hidden state, which is what the pipelines read for a plain prompt. Calls the graph does not cover
(an attention mask, `output_hidden_states` for `clip_skip`, another length) run on the eager encoder, which is
kept: same weights, same result up to rounding.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from lcmkit.accel.graphs import Float32OnCPU, GraphSource, compile_graph, import_openvino, load_or_build

logger = logging.getLogger(__name__)


class _LastHiddenState(nn.Module):
    """The encoder as `convert_model` traces it: token ids in, last hidden state out."""

    def __init__(self, text_encoder: nn.Module) -> None:
        super().__init__()
        self.text_encoder = text_encoder

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.text_encoder(input_ids)[0]


def text_encoder_source(text_encoder: nn.Module, tokens: int, *, sampled_key: bool = False) -> GraphSource:
    return GraphSource(
        name="text-encoder",
        module=text_encoder,
        traced=_LastHiddenState(text_encoder),
        inputs={"input_ids": (1, tokens)},
        example=(torch.zeros(1, tokens, dtype=torch.long),),
        output="last_hidden_state",
        description=repr(text_encoder.config.to_dict()),
        sampled_key=sampled_key,
    )


class OpenVINOTextEncoder(Float32OnCPU, nn.Module):
    """Stands in for `pipe.text_encoder`: (B, tokens) ids -> (last hidden state,) through a compiled graph, one
    row per call; anything else goes to the eager encoder.

    The eager encoder is held outside the module tree (`eager`), so `named_modules()` and `.to()` see only this
    stand-in: LoRA scaling (`scale_lora`) finds no adapters to scale, as the graph has them fused in.
    """

    def __init__(
        self,
        text_encoder: nn.Module,
        *,
        tokens: int = 77,
        precision: str = "fp32",
        inference: str = "f32",
        cache_dir: str | Path | None = None,
        threads: int | None = None,
        sampled_key: bool = False,
    ) -> None:
        super().__init__()
        ov = import_openvino()
        self.config = text_encoder.config
        self.tokens = tokens
        self.precision = precision
        self._eager = (text_encoder.eval(),)  # a tuple: not a registered submodule
        cache = Path(cache_dir) if cache_dir is not None else None
        source = text_encoder_source(text_encoder, tokens, sampled_key=sampled_key)
        model = load_or_build(ov, source, precision, None, cache, as_path=cache is not None)
        compiled = compile_graph(ov, model, threads, cache, inference=inference)
        self._request = compiled.create_infer_request()

    @property
    def eager(self) -> nn.Module:
        """The eager encoder, for the calls the graph does not cover."""
        return self._eager[0]

    def extra_repr(self) -> str:
        return f"precision={self.precision!r}, tokens={self.tokens}"

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        output_hidden_states: bool | None = None,
        **kwargs: Any,
    ) -> Any:
        """(last hidden state,) for plain calls on (B, tokens) ids; the eager encoder's output otherwise."""
        if attention_mask is not None or output_hidden_states or kwargs or input_ids.shape[-1] != self.tokens:
            return self.eager(
                input_ids, attention_mask=attention_mask, output_hidden_states=output_hidden_states, **kwargs
            )
        ids = input_ids.detach().to("cpu", torch.long).numpy()
        rows = [np.array(self._request.infer([ids[i : i + 1]])[0], copy=True) for i in range(ids.shape[0])]
        return (torch.from_numpy(np.concatenate(rows)).to(input_ids.device),)
