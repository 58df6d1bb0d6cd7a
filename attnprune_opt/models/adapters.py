"""The only code that knows model internals: where the decoder layers and their linears live, head geometry,
RoPE tables, and which layers use sliding-window attention.

Supported: the Llama family (Llama and SmolLM2, Mistral, Qwen2), which share the layout
``model.layers[i].self_attn.{q,k,v,o}_proj`` / ``model.layers[i].mlp.{gate,up,down}_proj``, rotate-half RoPE
computed by the model's own ``rotary_emb`` (so scaled variants are honoured), and grouped-query heads.
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import Tensor, nn

from ..errors import UnsupportedArchitectureError

SUPPORTED_MODEL_TYPES = ("llama", "mistral", "qwen2")
MODULE_PATHS = {
    "q_proj": "self_attn.q_proj",
    "k_proj": "self_attn.k_proj",
    "v_proj": "self_attn.v_proj",
    "o_proj": "self_attn.o_proj",
    "gate_proj": "mlp.gate_proj",
    "up_proj": "mlp.up_proj",
    "down_proj": "mlp.down_proj",
}


@dataclass(frozen=True)
class AttentionGeometry:
    """Head layout of one attention block; ``scaling`` multiplies the logits (1/sqrt(head_dim) for Llama)."""

    num_heads: int
    num_kv_heads: int
    head_dim: int
    scaling: float

    @property
    def group_size(self) -> int:
        return self.num_heads // self.num_kv_heads


class LlamaFamilyAdapter:
    """Model-specific knowledge for Llama-family causal LMs."""

    def __init__(self, model: nn.Module) -> None:
        model_type = getattr(getattr(model, "config", None), "model_type", None)
        if model_type not in SUPPORTED_MODEL_TYPES:
            raise UnsupportedArchitectureError(
                f"model_type {model_type!r} is not supported; supported: {', '.join(SUPPORTED_MODEL_TYPES)}")
        self.model = model
        self.config = model.config

    @property
    def layers(self) -> nn.ModuleList:
        return self.model.model.layers

    def layer_name(self, index: int) -> str:
        return f"model.layers.{index}"

    def module_name(self, index: int, module: str) -> str:
        return f"{self.layer_name(index)}.{MODULE_PATHS[module]}"

    def linear(self, layer: nn.Module, module: str) -> nn.Linear:
        return layer.get_submodule(MODULE_PATHS[module])

    def geometry(self, layer: nn.Module) -> AttentionGeometry:
        attn = layer.self_attn
        heads = self.config.num_attention_heads
        kv_heads = getattr(self.config, "num_key_value_heads", None) or heads
        return AttentionGeometry(heads, kv_heads, attn.head_dim, float(attn.scaling))

    def sliding_window(self, index: int) -> int | None:
        """The attention window of layer ``index`` if it is a sliding-window layer, else None."""
        window = getattr(self.config, "sliding_window", None)
        layer_types = getattr(self.config, "layer_types", None)
        if layer_types is not None:
            return window if layer_types[index] == "sliding_attention" else None
        if self.config.model_type == "qwen2" and not getattr(self.config, "use_sliding_window", False):
            return None
        return window

    @staticmethod
    def attention_input(layer: nn.Module, hidden: Tensor) -> Tensor:
        """What q_proj and k_proj read: the layer input after the pre-attention norm."""
        return layer.input_layernorm(hidden)

    @staticmethod
    def rope_tables(layer_kwargs: dict) -> tuple[Tensor, Tensor]:
        """(cos, sin) of shape (n, head_dim) for one captured sequence, as the model's rotary module made them."""
        cos, sin = layer_kwargs["position_embeddings"]
        return cos[0], sin[0]


def get_adapter(model: nn.Module) -> LlamaFamilyAdapter:
    """The adapter for ``model``, or UnsupportedArchitectureError naming its model_type."""
    return LlamaFamilyAdapter(model)
