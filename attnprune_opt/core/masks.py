"""Binarisation of scores into keep-masks at an exact pruning ratio.

Weights are in nn.Linear layout (out, in). A comparison group is a set of entries that compete for the kept
slots: ``"row"`` (one output row, Wanda's choice), ``"head"`` (the ``rows_per_group`` rows of one attention
head), or ``"matrix"`` (the whole weight). In each group of g entries exactly ``prune_count(g, sparsity)`` =
floor(sparsity * g) entries are pruned (a 1e-9 slack absorbs binary rounding, so 0.7 * 10 prunes 7). N:M
structure keeps N of every M consecutive inputs of each row. Ties go to the lower flat index, so equal
inputs give the same mask bit for bit.
"""

from __future__ import annotations

import math
from typing import Literal

import torch
from torch import Tensor

Group = Literal["row", "head", "matrix"]
Score = Literal["mask", "mask_weight"]


def check_sparsity(sparsity: float) -> None:
    if not (isinstance(sparsity, (int, float)) and 0.0 <= sparsity < 1.0):
        raise ValueError(f"sparsity must be in [0, 1), got {sparsity!r}")


def prune_count(group_size: int, sparsity: float) -> int:
    """Entries pruned in a group of ``group_size``: floor(sparsity * group_size)."""
    check_sparsity(sparsity)
    return math.floor(sparsity * group_size + 1e-9)


def check_n_m(n: int, m: int, in_features: int) -> None:
    if not (0 < n < m):
        raise ValueError(f"N:M structure needs 0 < N < M, got {n}:{m}")
    if in_features % m:
        raise ValueError(f"N:M structure {n}:{m} does not divide the input size {in_features}")


def keep_top(scores: Tensor, keep: int) -> Tensor:
    """Boolean mask of the ``keep`` largest entries of each row of a 2-D tensor (ties: lower index)."""
    mask = torch.zeros_like(scores, dtype=torch.bool)
    if keep > 0:
        order = torch.sort(scores, dim=1, descending=True, stable=True).indices[:, :keep]
        mask.scatter_(1, order, True)
    return mask


def topk_mask(scores: Tensor, sparsity: float, group: Group = "row", rows_per_group: int | None = None) -> Tensor:
    """Keep-mask with exactly ``prune_count`` zeros per comparison group of a 2-D score tensor."""
    if scores.dim() != 2:
        raise ValueError(f"scores must be 2-D (out, in), got shape {tuple(scores.shape)}")
    if not torch.isfinite(scores).all():
        raise ValueError("scores contain NaN or infinity")
    out, inp = scores.shape
    if group == "row":
        grouped = scores
    elif group == "matrix":
        grouped = scores.reshape(1, -1)
    elif group == "head":
        if not rows_per_group or out % rows_per_group:
            raise ValueError(f"group='head' needs rows_per_group dividing {out}, got {rows_per_group}")
        grouped = scores.reshape(out // rows_per_group, rows_per_group * inp)
    else:
        raise ValueError(f"unknown comparison group {group!r}; expected 'row', 'head' or 'matrix'")
    size = grouped.shape[1]
    return keep_top(grouped, size - prune_count(size, sparsity)).reshape(out, inp)


def n_m_mask(scores: Tensor, n: int, m: int) -> Tensor:
    """Keep-mask keeping the ``n`` largest of every ``m`` consecutive inputs in each row."""
    out, inp = scores.shape
    check_n_m(n, m, inp)
    return keep_top(scores.reshape(-1, m), n).reshape(out, inp)


def binarize(
    relaxed: Tensor,
    weight: Tensor,
    sparsity: float = 0.5,
    *,
    group: Group = "row",
    score: Score = "mask_weight",
    rows_per_group: int | None = None,
    n_m: tuple[int, int] | None = None,
) -> Tensor:
    """Step 3 of Algorithm 1: the keep-mask from the relaxed mask M_T, scored by M_T or M_T * |W|."""
    if score == "mask":
        scores = relaxed
    elif score == "mask_weight":
        scores = relaxed * weight.abs()
    else:
        raise ValueError(f"unknown score {score!r}; expected 'mask' or 'mask_weight'")
    if n_m is not None:
        return n_m_mask(scores, *n_m)
    return topk_mask(scores, sparsity, group, rows_per_group)
