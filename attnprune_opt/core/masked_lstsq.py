"""Least squares over each row's kept entries, every row of a weight at once (docs/method.md section 8c).

A linear layer's output Y = F W^T on features F (tokens x f) is fitted to targets Y0 row by row of W, pruned entries
held at exactly zero: min over w_r supported on row r's keep-mask of ||F w_r - y0_r||^2 + damp ||w_r - s_r||^2, s the start (the
damping pulls toward it, so directions the features hardly cover keep the start's values rather than shrink). Its
normal equations need only G = F^T F (f x f) and B = Y0^T F (rows x f), so the solve costs rows x f^2 per
iteration whatever the token count; the masked system M o (W (G + damp I) - B - damp S) = 0 is solved by conjugate gradient
with a Jacobi preconditioner, all rows together, each row stopping once it has converged. ``damp`` is
SparseGPT's percdamp: a share of G's mean diagonal, which keeps a rank-deficient G solvable.
"""

from __future__ import annotations

import torch
from torch import Tensor


def masked_least_squares(gram: Tensor, cross: Tensor, keep: Tensor, start: Tensor | None = None, *,
                         iterations: int, percdamp: float = 0.01, tol: float = 1e-6) -> Tensor:
    """W (rows, f) minimising ||F W^T - Y0||_F^2 + damp ||W - S||_F^2 over the kept entries of ``keep`` (rows, f),
    given ``gram`` G = F^T F and ``cross`` B = Y0^T F; damp = ``percdamp`` x mean(diag G), S = ``start``
    restricted to the keep-mask (zeros if None). Conjugate gradient from S for at most ``iterations`` steps; a row
    stops once its residual norm is below ``tol`` times its masked right-hand side's. Pruned entries are exactly
    +0.0."""
    f = gram.shape[0]
    if gram.shape != (f, f) or cross.dim() != 2 or cross.shape[1] != f or keep.shape != cross.shape:
        raise ValueError(f"gram must be (f, f) and cross and keep (rows, f) alike, got {tuple(gram.shape)}, "
                         f"{tuple(cross.shape)} and {tuple(keep.shape)}")
    if start is not None and start.shape != cross.shape:
        raise ValueError(f"start has shape {tuple(start.shape)}, cross {tuple(cross.shape)}")
    if iterations < 0 or percdamp < 0:
        raise ValueError(f"iterations and percdamp must be >= 0, got {iterations} and {percdamp}")
    mask = keep.to(dtype=gram.dtype)
    damp = percdamp * gram.diagonal().mean()
    system = gram + damp * torch.eye(f, dtype=gram.dtype, device=gram.device)
    inverse_diagonal = 1.0 / system.diagonal().clamp_min(torch.finfo(gram.dtype).tiny)
    w = torch.zeros_like(cross) if start is None else start.to(cross.dtype) * mask
    rhs = mask * (cross + damp * w)
    residual = rhs - mask * (w @ system)  # minus the gradient of 1/2 (||F w_r - y0_r||^2 + damp ||w_r - s_r||^2)
    threshold = tol * rhs.norm(dim=1)
    active = residual.norm(dim=1) > threshold
    z = residual * inverse_diagonal
    direction = z
    rz = (residual * z).sum(dim=1)
    for _ in range(iterations):
        if not active.any():
            break
        product = mask * (direction @ system)  # the system is symmetric
        curvature = (direction * product).sum(dim=1)
        alpha = torch.where(active & (curvature > 0), rz / curvature, torch.zeros_like(rz)).unsqueeze(1)
        w = w + alpha * direction
        residual = residual - alpha * product
        active = active & (residual.norm(dim=1) > threshold)
        z = residual * inverse_diagonal
        rz_next = (residual * z).sum(dim=1)
        beta = torch.where(active & (rz > 0), rz_next / rz, torch.zeros_like(rz)).unsqueeze(1)
        direction = z + beta * direction
        rz = rz_next
    return w.masked_fill(keep == 0, 0.0)
