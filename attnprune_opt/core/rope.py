"""Rotary position embedding in the rotate-half layout of Hugging Face Llama-family models.

``cos`` and ``sin`` come from the model's own rotary module (so scaled variants, e.g. Llama-3 or YaRN, which
fold an attention factor into them, are honoured). RoPE is linear in its input; the gradient needs its
transpose, which is the inverse rotation only when cos^2 + sin^2 = 1, so the transpose is computed exactly.
"""

from __future__ import annotations

from torch import Tensor
import torch


def _rotate_half(x: Tensor) -> Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def apply_rotary(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """RoPE(x) = x * cos + rotate_half(x) * sin, with cos/sin broadcast against x (..., n, head_dim)."""
    return x * cos + _rotate_half(x) * sin


def apply_rotary_transpose(y: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """The adjoint of :func:`apply_rotary` (rotate_half^T = -rotate_half)."""
    return y * cos - _rotate_half(y * sin)
