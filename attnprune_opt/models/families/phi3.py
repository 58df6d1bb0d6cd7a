"""Phi-3: fused ``self_attn.qkv_proj`` (rows [q | k | v]) and ``mlp.gate_up_proj`` (rows [gate | up], the order in
which Phi3MLP's ``chunk(2)`` reads them), rotate-half RoPE on the first ``partial_rotary_factor`` of each head (the
model's rotary module makes tables that narrow), grouped-query heads, and one sliding window for every layer when the
config sets ``sliding_window``."""

from __future__ import annotations

from ..base import DecoderAdapter, Prunable
from ..registry import register


@register
class Phi3Adapter(DecoderAdapter):
    model_types = ("phi3",)

    def prunables(self, index: int) -> tuple[Prunable, ...]:
        q, kv = self.num_heads * self.head_dim, self.num_kv_heads * self.head_dim
        inner = int(self.config.intermediate_size)
        return (
            Prunable("q_proj", "self_attn.qkv_proj", rows=((0, q),)),
            Prunable("k_proj", "self_attn.qkv_proj", rows=((q, q + kv),)),
            Prunable("v_proj", "self_attn.qkv_proj", rows=((q + kv, q + 2 * kv),)),
            Prunable("o_proj", "self_attn.o_proj"),
            Prunable("gate_proj", "mlp.gate_up_proj", rows=((0, inner),)),
            Prunable("up_proj", "mlp.gate_up_proj", rows=((inner, 2 * inner),)),
            Prunable("down_proj", "mlp.down_proj"),
        )
