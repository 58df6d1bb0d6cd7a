"""Gemma 3 (text; ``Gemma3ForCausalLM``): Gemma 2's layout and logit scale, with a per-head RMSNorm of q and k
before RoPE whose multiplier is Gemma's 1 + w, and sliding-window and global layers that each get their own RoPE
tables (different bases; the decoder passes each layer its own, which the captured layer arguments keep). Its
attention applies no logit soft-cap whatever the config's ``attn_logit_softcapping`` says, so neither does the
spec."""

from __future__ import annotations

from torch import nn

from ...core import RMSNormSpec
from ..registry import register
from .gemma2 import CausalGemmaAdapter
from .qwen3 import QKNormAdapter


@register
class Gemma3TextAdapter(CausalGemmaAdapter, QKNormAdapter):
    model_types = ("gemma3_text",)

    def norm_spec(self, norm: nn.Module) -> RMSNormSpec:
        """Gemma's RMSNorm multiplies by 1 + w, computed in float32."""
        return RMSNormSpec(1.0 + norm.weight.detach().float(), float(norm.eps), per_head=True)
