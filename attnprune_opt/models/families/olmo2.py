"""OLMo-2: Llama's module layout with post-norm layers (the attention and MLP read the raw residual stream; the
norms follow them), and an RMSNorm over all heads' queries (and over all KV heads' keys) of a token at once,
between the projection and RoPE. The all-head norm couples the heads, so the q/k solve is not split by KV group."""

from __future__ import annotations

from ..registry import register
from .llama import LLAMA_MODULES
from .qwen3 import QKNormAdapter


@register
class Olmo2Adapter(QKNormAdapter):
    model_types = ("olmo2",)
    modules = LLAMA_MODULES
    qk_norm_per_head = False
    residual_adds_projections = False  # post-norm: each sub-block's output is normalised before the add
