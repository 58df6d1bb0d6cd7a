"""Mixture-of-experts decoders whose experts are stacked 3-D parameters (transformers 5): Qwen3-MoE, Qwen2-MoE
and Mixtral.

A sparse layer's ``mlp.experts`` holds ``gate_up_proj`` (experts, 2 * I, hidden; gate rows first, then up rows)
and ``down_proj`` (experts, hidden, I); its router ``mlp.gate`` is left dense. Each expert's gate, up and down
matrices are prunable on their own, calibrated on the tokens the router sends to that expert: the experts module is
called with (hidden states, top-k expert indices, top-k weights), so the routing is read from the call, not
recomputed, and the down matrix's input is act(gate x) * up x on those tokens, as the expert computes it.
Attention is Llama's (Mixtral as Mistral, Qwen2-MoE as Qwen2) plus, in Qwen3-MoE, RMSNorm of each head's q and k
before RoPE. Qwen2-MoE's shared expert, which every token passes through, is pruned as plain linears.
"""

from __future__ import annotations

from typing import ClassVar

from torch import Tensor, nn
from torch.nn import functional as F

from ..base import DecoderAdapter, Prunable
from ..offload import onloaded
from ..registry import register
from .llama import LLAMA_MODULES
from .qwen3 import QKNormAdapter

EXPERTS = "mlp.experts"
ATTENTION = ("q_proj", "k_proj", "v_proj", "o_proj")
DENSE_MLP = ("gate_proj", "up_proj", "down_proj")


class StackedExpertsAdapter(DecoderAdapter):
    """Llama-named attention and a sparse MLP of stacked experts; a family says how many experts of which size and
    which layers are sparse."""

    modules = LLAMA_MODULES
    num_experts_key: ClassVar[str] = "num_experts"  # config keys: how many experts, and I, one expert's width
    expert_size_key: ClassVar[str] = "moe_intermediate_size"

    @property
    def num_experts(self) -> int:
        return int(getattr(self.config, self.num_experts_key))

    @property
    def expert_size(self) -> int:
        return int(getattr(self.config, self.expert_size_key))

    def is_sparse(self, index: int) -> bool:
        return True

    def prunables(self, index: int) -> tuple[Prunable, ...]:
        attention = tuple(Prunable(role, self.modules[role]) for role in ATTENTION)
        if not self.is_sparse(index):
            return attention + tuple(Prunable(role, self.modules[role]) for role in DENSE_MLP)
        return attention + self.shared_prunables() + self.expert_prunables()

    def shared_prunables(self) -> tuple[Prunable, ...]:
        """Linears of a sparse MLP that every token passes through (none by default)."""
        return ()

    def expert_prunables(self) -> tuple[Prunable, ...]:
        size = self.expert_size
        experts = []
        for e in range(self.num_experts):
            experts += [Prunable("gate_proj", EXPERTS, rows=((0, size),), parameter="gate_up_proj", expert=e),
                        Prunable("up_proj", EXPERTS, rows=((size, 2 * size),), parameter="gate_up_proj", expert=e),
                        Prunable("down_proj", EXPERTS, parameter="down_proj", expert=e)]
        return tuple(experts)

    def input_key(self, prunable: Prunable) -> str:
        """An expert's gate and up matrices read its routed tokens; its down matrix reads their activations."""
        if prunable.expert is None:
            return super().input_key(prunable)
        return f"{prunable.tensor}[{prunable.expert}]"

    def matrix_input(self, layer: nn.Module, prunable: Prunable, args: tuple) -> Tensor:
        if prunable.expert is None:
            return super().matrix_input(layer, prunable, args)
        hidden, top_k_index = args[0], args[1]
        # The tokens in the order the experts' loop gathers them: by top-k position, then by token.
        _, tokens = (top_k_index == prunable.expert).T.nonzero(as_tuple=True)
        x = hidden[tokens]
        if prunable.parameter == "gate_up_proj":
            return x
        experts = layer.get_submodule(EXPERTS)
        with onloaded(experts):
            gate, up = F.linear(x, experts.gate_up_proj[prunable.expert]).chunk(2, dim=-1)
            return experts.act_fn(gate) * up


class QwenMoeAdapter(StackedExpertsAdapter):
    """Qwen-MoE layouts: layers in ``mlp_only_layers`` and off the ``decoder_sparse_step`` have a dense MLP."""

    def is_sparse(self, index: int) -> bool:
        config = self.config
        return (index not in (config.mlp_only_layers or []) and config.num_experts > 0
                and (index + 1) % config.decoder_sparse_step == 0)


@register
class Qwen3MoeAdapter(QKNormAdapter, QwenMoeAdapter):
    model_types = ("qwen3_moe",)


@register
class Qwen2MoeAdapter(QwenMoeAdapter):
    """Qwen2's attention (q/k/v biases); a sparse MLP's shared expert is plain linears under the usual roles (its
    sigmoid gate, like the router, stays dense)."""

    model_types = ("qwen2_moe",)

    def shared_prunables(self) -> tuple[Prunable, ...]:
        return tuple(Prunable(role, f"mlp.shared_expert.{role}") for role in DENSE_MLP)


@register
class MixtralAdapter(StackedExpertsAdapter):
    model_types = ("mixtral",)
    num_experts_key = "num_local_experts"
    expert_size_key = "intermediate_size"

