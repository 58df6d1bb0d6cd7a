"""Llama, SmolLM2, Mistral and Qwen2: ``model.layers[i].self_attn.{q,k,v,o}_proj`` and
``mlp.{gate,up,down}_proj``, rotate-half RoPE from the model's own rotary module (scaled variants honoured),
grouped-query heads, q/k/v biases in Qwen2, sliding windows in Mistral (and Qwen2 when enabled)."""

from __future__ import annotations

from ..base import DecoderAdapter
from ..registry import register

LLAMA_MODULES = {
    "q_proj": "self_attn.q_proj",
    "k_proj": "self_attn.k_proj",
    "v_proj": "self_attn.v_proj",
    "o_proj": "self_attn.o_proj",
    "gate_proj": "mlp.gate_proj",
    "up_proj": "mlp.up_proj",
    "down_proj": "mlp.down_proj",
}


@register
class LlamaAdapter(DecoderAdapter):
    model_types = ("llama", "mistral", "qwen2")
    modules = LLAMA_MODULES

    def sliding_window(self, index: int) -> int | None:
        if self.config.model_type == "qwen2" and not getattr(self.config, "use_sliding_window", False):
            return None
        return super().sliding_window(index)
