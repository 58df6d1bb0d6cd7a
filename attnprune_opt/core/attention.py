"""Softmax attention as the paper defines it, and its relative-error metric.

Logits are multiplied by ``scaling`` (= 1/s in the paper's notation; 1/sqrt(head_dim) in real models).
"""

from __future__ import annotations

import torch
from torch import Tensor


def causal_mask(n: int, device: torch.device | str | None = None) -> Tensor:
    """Boolean (n, n) mask C with C[i, j] = j <= i (Definition 3.1)."""
    return torch.ones(n, n, dtype=torch.bool, device=device).tril()


def softmax_attention(logits: Tensor, causal: bool = True) -> Tensor:
    """Row-wise softmax over the last dimension of (..., n, n) logits, optionally causally masked."""
    if causal:
        n = logits.shape[-1]
        logits = logits.masked_fill(~causal_mask(n, logits.device), float("-inf"))
    return torch.softmax(logits, dim=-1)


def attention_matrix(x: Tensor, w: Tensor, scaling: float = 1.0, causal: bool = True) -> Tensor:
    """f(W) = D^-1 (C o exp(X W X^T * scaling)) for X of shape (..., n, d) and a fused W of shape (d, d)."""
    return softmax_attention((x @ w @ x.transpose(-1, -2)) * scaling, causal)


def relative_error(approx: Tensor, reference: Tensor, dim: int | tuple[int, ...] | None = None) -> Tensor:
    """The paper's metric ||approx - reference||_F^2 / ||reference||_F^2.

    ``dim`` selects the dimensions summed over (all by default); e.g. a per-head error of (B, H, n, n)
    attention is ``relative_error(a, r, dim=(0, 2, 3))``.
    """
    diff = (approx - reference).pow(2)
    ref = reference.pow(2)
    if dim is None:
        return diff.sum() / ref.sum()
    return diff.sum(dim=dim) / ref.sum(dim=dim)
