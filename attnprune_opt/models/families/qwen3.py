"""Qwen3: Llama's module layout, with an RMSNorm on each head's queries and keys (``self_attn.q_norm``/``k_norm``)
between the projection and RoPE; head_dim from the config; sliding-window layers where ``layer_types`` says so.

:class:`QKNormAdapter` is the shared part of every family that normalises q/k before RoPE (OLMo-2 over all heads
at once, Gemma 3 per head with Gemma's 1 + w weight).
"""

from __future__ import annotations

from dataclasses import replace
from typing import ClassVar

from torch import nn

from ...core import AttentionSpec, RMSNormSpec
from ..base import DecoderAdapter
from ..offload import onloaded
from ..registry import register
from .llama import LLAMA_MODULES


class QKNormAdapter(DecoderAdapter):
    """A family whose attention RMS-normalises q and k (modules ``q_norm``/``k_norm``) before RoPE."""

    #: Whether the norm runs over each head's values (Qwen3, Gemma 3) or over all heads' values of a token (OLMo-2).
    qk_norm_per_head: ClassVar[bool] = True

    def attention_spec(self, layer: nn.Module, index: int, layer_kwargs: dict) -> AttentionSpec:
        attention = self.attention_module(layer)
        return replace(super().attention_spec(layer, index, layer_kwargs), q_norm=self.norm_spec(attention.q_norm),
                       k_norm=self.norm_spec(attention.k_norm))

    def norm_spec(self, norm: nn.Module) -> RMSNormSpec:
        """The norm as its module applies it: y = x / rms(x) * weight, with the module's own epsilon (the weight
        read through accelerate's offload hooks)."""
        with onloaded(norm):
            weight = norm.weight.detach().clone()
        return RMSNormSpec(weight, float(norm.variance_epsilon), per_head=self.qk_norm_per_head)


@register
class Qwen3Adapter(QKNormAdapter):
    model_types = ("qwen3",)
    modules = LLAMA_MODULES
