"""Gemma 2: Llama's module names; logits scaled by query_pre_attn_scalar^-0.5 (the attention module's own
``scaling``, which the default spec reads), soft-capped as c tanh(s / c), and alternating sliding-window / global
layers (``layer_types``). Its RMSNorms apply 1 + w, but none sits between q/k_proj and the logits."""

from __future__ import annotations

from dataclasses import replace
from typing import Any

from torch import nn

from ...core import AttentionSpec
from ...errors import UnsupportedArchitectureError
from ..base import DecoderAdapter
from ..registry import register
from .llama import LLAMA_MODULES


class CausalGemmaAdapter(DecoderAdapter):
    """Gemma 2 and 3 with Llama's module names; their configs can make attention bidirectional (embedding models),
    which is refused by name: the objective here is causal."""

    modules = LLAMA_MODULES
    residual_adds_projections = False  # sandwich norms: each sub-block's output is normalised before the add

    def __init__(self, config: Any) -> None:
        if getattr(config, "use_bidirectional_attention", False):
            raise UnsupportedArchitectureError(
                f"model_type {config.model_type!r} with use_bidirectional_attention is not supported (causal "
                "attention only)")
        super().__init__(config)


@register
class Gemma2Adapter(CausalGemmaAdapter):
    model_types = ("gemma2",)

    def attention_spec(self, layer: nn.Module, index: int, layer_kwargs: dict) -> AttentionSpec:
        softcap = self.attention_module(layer).attn_logit_softcapping
        return replace(super().attention_spec(layer, index, layer_kwargs),
                       softcap=None if softcap is None else float(softcap))
