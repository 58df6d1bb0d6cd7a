"""What the softmax-attention objective needs to know about one attention block, as plain tensors and numbers.

A model family's adapter (attnprune_opt/models) builds an :class:`AttentionSpec` from a layer; the core never sees
a model. The spec covers the variants of today's decoder families: biases on q/k (Qwen2, GPT-NeoX), RMSNorm of q/k
per head (Qwen3, Gemma 3) or over all heads at once (OLMo-2), RoPE on the whole head or its first part (GPT-NeoX,
Phi), a logit scale other than 1/sqrt(head_dim) (Gemma's query_pre_attn_scalar), logit soft-capping (Gemma 2) and
sliding-window layers (Mistral, Gemma 2/3).
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch
from torch import Tensor


@dataclass(frozen=True)
class RMSNormSpec:
    """y = x / sqrt(mean(x^2) + eps) * weight, over each head's ``head_dim`` values (``per_head``) or over all
    heads' values of a token at once. ``weight`` is the multiplier actually applied (Gemma stores 1 + w)."""

    weight: Tensor
    eps: float
    per_head: bool = True


@dataclass(frozen=True)
class AttentionSpec:
    """Everything but the q/k weights that the attention probabilities depend on.

    ``cos``/``sin`` (n_max, rotary_dim) are RoPE tables in the rotate-half layout for positions 0..n_max-1; a
    ``rotary_dim`` below ``head_dim`` rotates only the first ``rotary_dim`` values of each head. ``scaling``
    multiplies the logits (1/sqrt(head_dim) when None); ``softcap`` c replaces the scaled logits s by c tanh(s / c);
    ``window`` w lets query i see keys j with i - w < j <= i.
    """

    head_dim: int
    scaling: float | None = None
    cos: Tensor | None = None
    sin: Tensor | None = None
    q_bias: Tensor | None = None
    k_bias: Tensor | None = None
    q_norm: RMSNormSpec | None = None
    k_norm: RMSNormSpec | None = None
    softcap: float | None = None
    window: int | None = None
    causal: bool = True

    def __post_init__(self) -> None:
        if (self.cos is None) != (self.sin is None):
            raise ValueError("give both cos and sin for RoPE, or neither")
        if self.cos is not None and (self.cos.shape[-1] > self.head_dim or self.cos.shape[-1] % 2):
            raise ValueError(f"RoPE tables of width {self.cos.shape[-1]} do not fit head_dim={self.head_dim}")
        if self.window is not None and self.window < 1:
            raise ValueError(f"window must be >= 1, got {self.window}")

    @property
    def logit_scale(self) -> float:
        return self.head_dim**-0.5 if self.scaling is None else self.scaling

    @property
    def heads_separate(self) -> bool:
        """Whether the loss separates over KV groups (no norm mixes the heads of a token)."""
        return all(norm is None or norm.per_head for norm in (self.q_norm, self.k_norm))

    def to(self, dtype: torch.dtype, device: torch.device | str | None = None) -> AttentionSpec:
        """The same spec with its tensors in ``dtype`` on ``device``."""
        def move(t: Tensor | None) -> Tensor | None:
            return None if t is None else t.to(device=device, dtype=dtype)

        def move_norm(norm: RMSNormSpec | None) -> RMSNormSpec | None:
            return None if norm is None else replace(norm, weight=move(norm.weight))

        return replace(self, cos=move(self.cos), sin=move(self.sin), q_bias=move(self.q_bias),
                       k_bias=move(self.k_bias), q_norm=move_norm(self.q_norm), k_norm=move_norm(self.k_norm))

    def group_rows(self, q_rows: slice, k_rows: slice) -> AttentionSpec:
        """The spec of the heads whose q rows are ``q_rows`` and k rows ``k_rows`` (requires heads_separate)."""
        if not self.heads_separate:
            raise ValueError("a norm over all heads couples them: the attention cannot be split by heads")

        def rows(t: Tensor | None, selected: slice) -> Tensor | None:
            return None if t is None else t[selected]

        return replace(self, q_bias=rows(self.q_bias, q_rows), k_bias=rows(self.k_bias, k_rows))


def rms_norm(x: Tensor, norm: RMSNormSpec, head_dim: int) -> tuple[Tensor, Tensor]:
    """(normalised x, 1/rms) for x (..., heads*head_dim); the second is what the backward needs."""
    grouped = x.unflatten(-1, (-1, head_dim)) if norm.per_head else x.unsqueeze(-2)
    inv = torch.rsqrt(grouped.pow(2).mean(dim=-1, keepdim=True) + norm.eps)
    weight = norm.weight if norm.per_head else norm.weight.unflatten(-1, (1, -1))
    return (grouped * inv * weight).flatten(-2), inv


def rms_norm_backward(grad: Tensor, x: Tensor, inv: Tensor, norm: RMSNormSpec, head_dim: int) -> Tensor:
    """d loss / d x from d loss / d y: (w g) / r - x * mean(w g x) / r^3, per normalised group."""
    def grouped(t: Tensor) -> Tensor:
        return t.unflatten(-1, (-1, head_dim)) if norm.per_head else t.unsqueeze(-2)

    weight = norm.weight if norm.per_head else norm.weight.unflatten(-1, (1, -1))
    wg, xs = grouped(grad) * weight, grouped(x)
    return (wg * inv - xs * inv.pow(3) * (wg * xs).mean(dim=-1, keepdim=True)).flatten(-2)
