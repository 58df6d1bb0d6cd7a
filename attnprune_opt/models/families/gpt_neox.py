"""GPT-NeoX and Pythia: layers at ``gpt_neox.layers``; ``attention.query_key_value`` fused and interleaved per head
(GPTNeoXAttention views its output as (heads, 3 * head_dim) and chunks each head into q | k | v, so head h's q rows
are [3hd, 3hd + d), its k rows the next d, its v rows the d after), with biases; rotate-half RoPE on the first
``partial_rotary_factor`` (``rotary_pct``) of each head; ``attention.dense`` is o_proj, ``mlp.dense_h_to_4h`` up_proj
and ``mlp.dense_4h_to_h`` down_proj (no gate). No sliding windows."""

from __future__ import annotations

from torch import nn

from ..base import DecoderAdapter, Prunable
from ..registry import register


@register
class GPTNeoXAdapter(DecoderAdapter):
    model_types = ("gpt_neox",)
    layers_path = "gpt_neox.layers"

    def prunables(self, index: int) -> tuple[Prunable, ...]:
        d = self.head_dim

        def rows(part: int) -> tuple[tuple[int, int], ...]:
            return tuple((3 * d * head + part * d, 3 * d * head + (part + 1) * d) for head in range(self.num_heads))

        return (
            Prunable("q_proj", "attention.query_key_value", rows=rows(0)),
            Prunable("k_proj", "attention.query_key_value", rows=rows(1)),
            Prunable("v_proj", "attention.query_key_value", rows=rows(2)),
            Prunable("o_proj", "attention.dense"),
            Prunable("up_proj", "mlp.dense_h_to_4h"),
            Prunable("down_proj", "mlp.dense_4h_to_h"),
        )

    @property
    def num_kv_heads(self) -> int:
        return self.num_heads  # no grouped-query attention

    def sliding_window(self, index: int) -> int | None:
        return None

    def attention_module(self, layer: nn.Module) -> nn.Module:
        return layer.attention
