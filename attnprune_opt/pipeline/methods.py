"""Applying a recipe rule to weights: the method on q_proj/k_proj, a linear baseline on any other linear.

Pure tensor code over weights and captured inputs (no model objects), so it can be tested on its own.
"""

from __future__ import annotations

import time
from collections import defaultdict
from dataclasses import dataclass, field

import torch
from torch import Tensor

from ..config import AttentionSettings, PruneRule, SparseGPTSettings
from ..core import (
    FactoredAttentionObjective,
    InputStatistics,
    SolverConfig,
    binarize,
    magnitude_mask,
    solve,
    sparsegpt,
    wanda_mask,
)
from ..models.adapters import AttentionGeometry

SOLVE_DTYPE = torch.float32


@dataclass
class AttentionInputs:
    """What the method needs from one layer: the attention inputs X (one (1, n, d) tensor per calibration
    sequence, positions 0..n-1) and RoPE tables (n_max, head_dim) for the longest of them."""

    xs: list[Tensor]
    cos: Tensor | None
    sin: Tensor | None

    def batches(self) -> list[Tensor]:
        """Sequences of equal length stacked into one batch each (attention never crosses sequences)."""
        by_length: dict[int, list[Tensor]] = defaultdict(list)
        for x in self.xs:
            by_length[x.shape[-2]].append(x.reshape(x.shape[-2], x.shape[-1]))
        return [torch.stack(group).to(SOLVE_DTYPE) for _, group in sorted(by_length.items())]


@dataclass
class AttentionResult:
    """Pruned q/k weights and the figures of the descent; errors are relative attention errors on the
    calibration inputs, ``error_before`` for the binarised M0 = 1 (magnitude pruning), ``error_after`` for M_T."""

    weights: dict[str, Tensor]
    error_before: float
    error_after: float
    final_loss: float
    iterations: int
    converged: bool
    seconds: float
    loss_histories: list[list[float]] = field(default_factory=list)


def prune_attention(
    weights: dict[str, Tensor],
    biases: dict[str, Tensor | None],
    inputs: AttentionInputs,
    geometry: AttentionGeometry,
    rules: dict[str, PruneRule],
    settings: AttentionSettings,
) -> AttentionResult:
    """Solve the q/k masks of one layer, one KV group at a time (the loss separates over groups), then binarise
    each module with its rule over whole matrices so 'row', 'head' and 'matrix' groups mean what they say."""
    start = time.perf_counter()
    optimize = tuple(name for name in ("q_proj", "k_proj") if name in rules)
    solver = SolverConfig(iterations=settings.iterations, step_size=settings.step_size, tol=settings.tol,
                          line_search=settings.line_search)
    full = {name: weights[name].to(SOLVE_DTYPE) for name in ("q_proj", "k_proj")}
    batches = inputs.batches()
    relaxed = {name: torch.ones_like(w) for name, w in full.items()}
    groups, histories = [], []
    for g in range(geometry.num_kv_heads):
        q_rows = geometry.group_size * geometry.head_dim
        rows = {"q_proj": slice(g * q_rows, (g + 1) * q_rows),
                "k_proj": slice(g * geometry.head_dim, (g + 1) * geometry.head_dim)}
        objective = FactoredAttentionObjective(
            batches, full["q_proj"][rows["q_proj"]], full["k_proj"][rows["k_proj"]], head_dim=geometry.head_dim,
            cos=_as_solve(inputs.cos), sin=_as_solve(inputs.sin),
            q_bias=_as_solve(biases.get("q_proj"), rows["q_proj"]),
            k_bias=_as_solve(biases.get("k_proj"), rows["k_proj"]),
            scaling=geometry.scaling, lam=settings.lam, optimize=tuple(name[0] for name in optimize))
        result = solve(objective, solver)
        for name, mask in zip(optimize, result.masks):
            relaxed[name][rows[name]] = mask
        groups.append((objective, rows, result))
        histories.append(result.loss_history)

    def binarise(masks: dict[str, Tensor]) -> dict[str, Tensor]:
        return {name: binarize(masks[name], full[name], rule.sparsity, group=settings.group, score=settings.score,
                               rows_per_group=geometry.head_dim, n_m=rule.n_m)
                for name, rule in rules.items()}

    def error(keep: dict[str, Tensor]) -> float:
        numerator = sum(objective.squared_error(tuple(keep[name][rows[name]].to(SOLVE_DTYPE) for name in optimize))
                        for objective, rows, _ in groups)
        return numerator / sum(objective.target_energy for objective, _, _ in groups)

    keep = binarise(relaxed)
    results = [result for _, _, result in groups]
    return AttentionResult(
        weights={name: weights[name] * keep[name].to(weights[name].dtype) for name in rules},
        error_before=error(binarise({name: torch.ones_like(m) for name, m in relaxed.items()})),
        error_after=error(keep),
        final_loss=sum(r.loss_history[-1] for r in results) / len(results),
        iterations=max(r.iterations for r in results),
        converged=all(r.converged for r in results),
        seconds=time.perf_counter() - start,
        loss_histories=histories,
    )


def prune_linear(weight: Tensor, rule: PruneRule, stats: InputStatistics | None,
                 settings: SparseGPTSettings) -> Tensor:
    """A linear baseline on one weight; magnitude and Wanda keep the surviving values bit for bit, SparseGPT
    updates them to compensate for the pruned ones."""
    if rule.method == "magnitude":
        return weight * magnitude_mask(weight, rule.sparsity, n_m=rule.n_m).to(weight.dtype)
    if stats is None:
        raise ValueError(f"{rule.method} needs calibration statistics of the layer input")
    if rule.method == "wanda":
        return weight * wanda_mask(weight.float(), stats.column_norms, rule.sparsity, n_m=rule.n_m).to(weight.dtype)
    if rule.method == "sparsegpt":
        updated, _ = sparsegpt(weight, stats.hessian, rule.sparsity, n_m=rule.n_m, blocksize=settings.blocksize,
                               percdamp=settings.percdamp)
        return updated
    raise ValueError(f"{rule.method!r} is not a linear pruning method")


def _as_solve(t: Tensor | None, rows: slice = slice(None)) -> Tensor | None:
    return None if t is None else t[rows].to(SOLVE_DTYPE)
