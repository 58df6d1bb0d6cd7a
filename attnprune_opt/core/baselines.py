"""Linear pruning baselines on plain matrices, written from the published algorithms.

All act on a weight in nn.Linear layout (out, in) whose layer computes X W^T, with calibration statistics of
the layer input X gathered by :class:`InputStatistics`.

* magnitude: keep the largest |W|.
* Wanda (Sun et al., 2023): keep the largest |W_ij| * ||X_j||_2 in each output row.
* SparseGPT (Frantar & Alistarh, 2023): the OBS solver on H = X^T X with dampening, processed in column blocks
  with lazy updates; pruned entries' error is compensated by updating the kept weights. Mask selection inside
  each block prunes an exact count (so every row, or the whole matrix, ends at exactly floor(sparsity * size)
  zeros) instead of the reference code's approximate threshold.
"""

from __future__ import annotations

import torch
from torch import Tensor

from .masks import Group, check_n_m, keep_top, n_m_mask, prune_count, topk_mask


class InputStatistics:
    """Streams calibration inputs of a linear layer into float64 statistics: H = sum X^T X (SparseGPT) when
    ``hessian`` is true, else only the squared column norms (all Wanda needs, at O(d) instead of O(d^2)).

    Each :meth:`update` (one calibration sequence in the layer loop) forms its own term in its input's precision,
    at least float32, and adds it to the float64 sums. Float32 terms of similar magnitude add up exactly in
    float64, so the sums, like the statistics of a partition of the sequences added together (data-parallel
    runs, attnprune_opt/distributed.py), do not depend on the order or grouping of the updates."""

    def __init__(self, in_features: int, hessian: bool = True, device: torch.device | str | None = None) -> None:
        self.hessian = torch.zeros(in_features, in_features, dtype=torch.float64, device=device) if hessian else None
        self.squared_norms = torch.zeros(in_features, dtype=torch.float64, device=device)
        self.tokens = 0

    def update(self, x: Tensor) -> None:
        flat = x.reshape(-1, x.shape[-1]).to(self.squared_norms.device)
        flat = flat.to(torch.promote_types(flat.dtype, torch.float32))
        if self.hessian is not None:
            self.hessian += flat.T @ flat
        self.squared_norms += flat.pow(2).sum(dim=0)
        self.tokens += flat.shape[0]

    @property
    def column_norms(self) -> Tensor:
        """||X_j||_2 per input feature, Wanda's activation norm."""
        return self.squared_norms.sqrt()


def _structured(scores: Tensor, sparsity: float, group: Group, n_m: tuple[int, int] | None) -> Tensor:
    return n_m_mask(scores, *n_m) if n_m is not None else topk_mask(scores, sparsity, group)


def magnitude_mask(weight: Tensor, sparsity: float, group: Group = "row",
                   n_m: tuple[int, int] | None = None) -> Tensor:
    """Keep-mask of the largest |W| per comparison group (or per N:M block)."""
    return _structured(weight.abs(), sparsity, group, n_m)


def wanda_mask(weight: Tensor, column_norms: Tensor, sparsity: float,
               n_m: tuple[int, int] | None = None) -> Tensor:
    """Wanda: keep the largest |W_ij| * ||X_j||_2 per output row (or per N:M block)."""
    return _structured(weight.abs() * column_norms.to(weight.dtype), sparsity, "row", n_m)


def sparsegpt(
    weight: Tensor,
    hessian: Tensor,
    sparsity: float,
    *,
    n_m: tuple[int, int] | None = None,
    group: Group = "row",
    blocksize: int = 128,
    percdamp: float = 0.01,
) -> tuple[Tensor, Tensor]:
    """SparseGPT: returns (updated weight, keep-mask); the weight's pruned entries are exactly 0.

    ``hessian`` is X^T X of the layer input (any positive scale). ``group`` is ``"row"`` or ``"matrix"``.
    """
    if group not in ("row", "matrix"):
        raise ValueError(f"SparseGPT supports group 'row' or 'matrix', got {group!r}")
    rows, cols = weight.shape
    if n_m is not None:
        check_n_m(*n_m, cols)
        if blocksize % n_m[1]:
            raise ValueError(f"blocksize {blocksize} must be a multiple of M={n_m[1]}")
    else:
        prune_count(cols, sparsity)  # validates the ratio
    w = weight.detach().to(torch.float64).clone()
    h = hessian.detach().to(torch.float64).clone()
    dead = h.diagonal() == 0
    h[dead, dead] = 1.0
    w[:, dead] = 0.0
    h += percdamp * h.diagonal().mean() * torch.eye(cols, dtype=h.dtype, device=h.device)
    hinv = torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(h)), upper=True)

    keep = torch.ones_like(w, dtype=torch.bool)
    for i1 in range(0, cols, blocksize):
        i2 = min(i1 + blocksize, cols)
        w1 = w[:, i1:i2].clone()
        err1 = torch.zeros_like(w1)
        hinv1 = hinv[i1:i2, i1:i2]
        d = hinv1.diagonal()
        if n_m is None:
            saliency = w1.pow(2) / d.pow(2)
            keep1 = _block_keep(saliency, sparsity, group, i1, i2, rows)
        else:
            keep1 = torch.ones_like(w1, dtype=torch.bool)
        for i in range(i2 - i1):
            if n_m is not None and i % n_m[1] == 0:
                saliency = w1[:, i:i + n_m[1]].pow(2) / d[i:i + n_m[1]].pow(2)
                keep1[:, i:i + n_m[1]] = n_m_mask(saliency, *n_m)
            col = w1[:, i]
            pruned = torch.where(keep1[:, i], col, torch.zeros_like(col))
            err = (col - pruned) / d[i]
            w1[:, i:] -= err.unsqueeze(1) @ hinv1[i, i:].unsqueeze(0)
            w1[:, i] = pruned
            err1[:, i] = err
        w[:, i1:i2] = w1
        keep[:, i1:i2] = keep1
        w[:, i2:] -= err1 @ hinv[i1:i2, i2:]
    w[~keep] = 0.0
    return w.to(weight.dtype), keep


def _block_keep(saliency: Tensor, sparsity: float, group: Group, i1: int, i2: int, rows: int) -> Tensor:
    """Keep-mask of columns i1:i2 pruning their exact share, so blocks add up to floor(sparsity * size)."""
    per_column = rows if group == "matrix" else 1
    count = prune_count(per_column * i2, sparsity) - prune_count(per_column * i1, sparsity)
    view = saliency.reshape(1, -1) if group == "matrix" else saliency
    return keep_top(view, view.shape[1] - count).reshape(saliency.shape)
