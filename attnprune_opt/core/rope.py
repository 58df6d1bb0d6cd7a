"""Rotary position embedding in the rotate-half layout of Hugging Face Llama-family models.

``cos`` and ``sin`` come from the model's own rotary module (so scaled variants, e.g. Llama-3 or YaRN, which
fold an attention factor into them, are honoured). RoPE is linear in its input; the gradient needs its
transpose, which is the inverse rotation only when cos^2 + sin^2 = 1, so the transpose is computed exactly.
Tables narrower than the head (GPT-NeoX, Phi: partial rotary) rotate its first values and pass the rest through.
"""

from __future__ import annotations

from torch import Tensor
import torch


def _rotate_half(x: Tensor) -> Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def apply_rotary(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """RoPE(x) = x * cos + rotate_half(x) * sin on the first cos.shape[-1] values of x (..., n, head_dim)."""
    return _on_rotated(x, cos.shape[-1], lambda part: part * cos + _rotate_half(part) * sin)


def apply_rotary_transpose(y: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """The adjoint of :func:`apply_rotary` (rotate_half^T = -rotate_half)."""
    return _on_rotated(y, cos.shape[-1], lambda part: part * cos - _rotate_half(part * sin))


def _on_rotated(x: Tensor, width: int, rotate) -> Tensor:
    if width == x.shape[-1]:
        return rotate(x)
    return torch.cat((rotate(x[..., :width]), x[..., width:]), dim=-1)
