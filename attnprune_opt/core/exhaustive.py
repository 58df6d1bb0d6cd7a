"""The exact optimum of the binary problem by enumeration, to measure how far the descent lands from it.

Feasible only for tiny instances (d = 4: C(16, 8) = 12,870 masks at 50%).
"""

from __future__ import annotations

from itertools import combinations

import torch
from torch import Tensor

from .attention import relative_error, softmax_attention
from .masks import prune_count


def all_masks(shape: tuple[int, int], sparsity: float) -> Tensor:
    """Every keep-mask of ``shape`` with exactly prune_count(numel, sparsity) zeros, as (count, *shape) bools."""
    numel = shape[0] * shape[1]
    pruned = prune_count(numel, sparsity)
    combos = torch.tensor(list(combinations(range(numel), pruned)), dtype=torch.long).reshape(-1, pruned)
    keep = torch.ones(combos.shape[0], numel, dtype=torch.bool)
    keep.scatter_(1, combos, False)
    return keep.reshape(-1, *shape)


def fused_mask_errors(x: Tensor, weight: Tensor, masks: Tensor, scaling: float = 1.0,
                      causal: bool = True, chunk: int = 4096) -> Tensor:
    """Relative attention error of f(B o W) for every binary mask B in ``masks`` (count, d, d)."""
    target = softmax_attention(x @ weight @ x.T * scaling, causal)
    errors = []
    for block in masks.split(chunk):
        logits = torch.einsum("ni,kij,mj->knm", x, block.to(weight.dtype) * weight, x) * scaling
        errors.append(relative_error(softmax_attention(logits, causal), target.expand_as(logits), dim=(1, 2)))
    return torch.cat(errors)
