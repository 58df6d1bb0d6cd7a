"""The adapter interface: everything the pruner knows about one model family, in one object per family.

The rest of the package asks an adapter (found by ``model_type`` in :mod:`.registry`) which matrices of a decoder
layer are prunable, under which role name the recipes address them, and what that layer's attention computes; it
never parses tensor names or touches a family's modules itself. A family is one file in ``models/families/``.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import Tensor, nn

from ..core import AttentionSpec
from ..errors import UnsupportedArchitectureError
from .offload import onloaded, write_parameter

#: The names recipes use for a decoder layer's matrices, whatever a family calls its modules.
ROLES = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
ATTENTION_ROLES = ("q_proj", "k_proj")


@dataclass(frozen=True)
class Prunable:
    """One prunable matrix of a decoder layer: rows ``rows`` (ranges of a fused weight; None: every row) of the
    parameter ``parameter`` of the submodule ``module`` (a path inside the layer), in nn.Linear layout (out, in).
    Several prunables may share one stored tensor (Phi-3's qkv_proj holds q, k and v); ``expert`` indexes the
    first dimension of a stacked (experts, out, in) parameter (mixture-of-experts MLPs)."""

    role: str
    module: str
    rows: tuple[tuple[int, int], ...] | None = None
    parameter: str = "weight"
    expert: int | None = None

    @property
    def tensor(self) -> str:
        """The parameter's name inside the layer."""
        return f"{self.module}.{self.parameter}"

    @property
    def label(self) -> str:
        """How reports and the manifest name this matrix inside its tensor."""
        where = [str(self.expert)] if self.expert is not None else []
        where += [self.role] if self.rows is not None else []
        return f"{self.tensor}[{'.'.join(where)}]" if where else self.tensor

    def row_index(self, device: torch.device | str | None = None) -> Tensor | None:
        if self.rows is None:
            return None
        return torch.cat([torch.arange(start, stop, device=device) for start, stop in self.rows])

    def read(self, weight: Tensor) -> Tensor:
        """This matrix, out of its (possibly fused or stacked) stored tensor."""
        matrix = weight if self.expert is None else weight[self.expert]
        index = self.row_index(weight.device)
        return matrix if index is None else matrix.index_select(0, index)

    def write(self, weight: Tensor, value: Tensor) -> Tensor:
        """The stored tensor with this matrix replaced by ``value`` (a new tensor; ``weight`` is left alone)."""
        value = value.to(weight.dtype)
        index = self.row_index(weight.device)
        if self.expert is None:
            return value if index is None else weight.index_copy(0, index, value)
        matrix = value if index is None else weight[self.expert].index_copy(0, index, value)
        return weight.index_copy(0, torch.tensor([self.expert], device=weight.device), matrix.unsqueeze(0))


class DecoderAdapter:
    """Default behaviour of a decoder-only family; a family overrides what differs.

    Subclasses set ``model_types`` (the transformers ``config.model_type`` values they serve) and ``modules``
    (role -> module path inside a layer, for unfused matrices). Naming and slicing use the model's config only, so
    export and verification work on a saved folder without building the model.
    """

    model_types: ClassVar[tuple[str, ...]] = ()
    layers_path: ClassVar[str] = "model.layers"
    modules: ClassVar[Mapping[str, str]] = {}
    #: o_proj's and down_proj's outputs are added to the residual stream as they are (pre-norm layers); False where
    #: a norm follows each sub-block (post-norm and sandwich-norm families)
    residual_adds_projections: ClassVar[bool] = True

    def __init__(self, config: Any) -> None:
        self.config = config

    # -- naming: config only ------------------------------------------------------------------------------------
    @property
    def num_layers(self) -> int:
        return int(self.config.num_hidden_layers)

    @property
    def num_heads(self) -> int:
        return int(self.config.num_attention_heads)

    @property
    def num_kv_heads(self) -> int:
        return int(getattr(self.config, "num_key_value_heads", None) or self.num_heads)

    @property
    def head_dim(self) -> int:
        return int(getattr(self.config, "head_dim", None) or self.config.hidden_size // self.num_heads)

    def layer_prefix(self, index: int) -> str:
        return f"{self.layers_path}.{index}"

    def prunables(self, index: int) -> tuple[Prunable, ...]:
        """The prunable matrices of layer ``index``, in forward order."""
        return tuple(Prunable(role, path) for role, path in self.modules.items())

    def roles(self) -> tuple[str, ...]:
        return tuple(dict.fromkeys(p.role for p in self.prunables(0)))

    def prunable(self, index: int, role: str) -> Prunable:
        return next(p for p in self.prunables(index) if p.role == role)

    def sliding_window(self, index: int) -> int | None:
        """The attention window of layer ``index`` if it is a sliding-window layer, else None."""
        window = getattr(self.config, "sliding_window", None)
        layer_types = getattr(self.config, "layer_types", None)
        if layer_types is not None:
            return window if layer_types[index] == "sliding_attention" else None
        return window

    def input_key(self, prunable: Prunable) -> str:
        """Names the input ``prunable`` multiplies: matrices with one key share their calibration statistics."""
        return prunable.module

    # -- the model ----------------------------------------------------------------------------------------------
    def layers(self, model: nn.Module) -> nn.ModuleList:
        return model.get_submodule(self.layers_path)

    def matrix_input(self, layer: nn.Module, prunable: Prunable, args: tuple) -> Tensor:
        """The rows ``prunable`` multiplies, from the positional arguments of a call of its module: the module's
        input for a linear; a mixture-of-experts family selects the tokens routed to the matrix's expert."""
        return args[0]

    def attention_spec(self, layer: nn.Module, index: int, layer_kwargs: dict) -> AttentionSpec:
        """What layer ``index``'s attention computes besides the q/k weights, for one captured sequence's
        keyword arguments (its RoPE tables cover that sequence's positions)."""
        cos, sin = self.rope_tables(layer_kwargs)
        return AttentionSpec(head_dim=self.head_dim, scaling=float(self.attention_module(layer).scaling), cos=cos,
                             sin=sin, q_bias=self.bias(layer, self.prunable(index, "q_proj")),
                             k_bias=self.bias(layer, self.prunable(index, "k_proj")),
                             window=self.sliding_window(index))

    def attention_module(self, layer: nn.Module) -> nn.Module:
        return layer.self_attn

    def mlp_activation(self) -> str:
        """The gated MLP's activation, as the core names it (``silu``, ``gelu_tanh``, ``gelu``)."""
        name = getattr(self.config, "hidden_activation", None) or getattr(self.config, "hidden_act", None)
        known = {"silu": "silu", "swish": "silu", "gelu_pytorch_tanh": "gelu_tanh", "gelu_new": "gelu_tanh",
                 "gelu": "gelu"}
        if name not in known:
            raise UnsupportedArchitectureError(f"{self.config.model_type}: MLP activation {name!r} has no gradient in "
                                               f"the core; known: {', '.join(known)}")
        return known[name]

    @staticmethod
    def rope_tables(layer_kwargs: dict) -> tuple[Tensor, Tensor]:
        """(cos, sin) of shape (n, rotary_dim) for one captured sequence, as the model's rotary module made them."""
        cos, sin = layer_kwargs["position_embeddings"]
        return cos[0], sin[0]

    @staticmethod
    def bias(layer: nn.Module, prunable: Prunable) -> Tensor | None:
        module = layer.get_submodule(prunable.module)
        with onloaded(module):
            bias = getattr(module, "bias", None)
            bias = None if bias is None else bias.detach().clone()
        if bias is None:
            return None
        index = prunable.row_index(bias.device)
        return bias if index is None else bias.index_select(0, index)


def read_matrix(layer: nn.Module, prunable: Prunable) -> torch.Tensor:
    """A copy of one prunable matrix, read through accelerate's offload hooks if any."""
    module = layer.get_submodule(prunable.module)
    with onloaded(module):
        return prunable.read(getattr(module, prunable.parameter).detach()).clone()


def write_matrices(layer: nn.Module, values: dict[Prunable, torch.Tensor]) -> None:
    """Write matrices back; the matrices of one fused tensor are assembled and written once."""
    by_tensor: dict[tuple[str, str], list[Prunable]] = {}
    for prunable in values:
        by_tensor.setdefault((prunable.module, prunable.parameter), []).append(prunable)
    for (path, parameter), parts in by_tensor.items():
        module = layer.get_submodule(path)
        with onloaded(module):
            weight = getattr(module, parameter).detach()
            for part in parts:
                weight = part.write(weight, values[part])
        write_parameter(module, parameter, weight)
