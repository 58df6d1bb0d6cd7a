"""The paper's method on q_proj/k_proj: choose the pattern, then refit the kept q/k values to the softmax-attention
objective (docs/method.md sections 4, 7 and 7b).

Pure tensor code over weights and captured inputs (no model objects), so it can be tested on its own.
"""

from __future__ import annotations

import time
from collections import defaultdict
from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal

import torch
from pydantic import Field, model_validator
from torch import Tensor

from ..core import (
    AttentionSpec,
    FactoredAttentionObjective,
    InputStatistics,
    SolverConfig,
    n_m_mask,
    solve,
    sparsegpt,
    topk_mask,
)
from ..core.objective import KeptWeightsObjective, SequenceCatalog
from ..core.solver import AdamConfig, StepCallback, adam
from ..distributed import SINGLE, World
from ..errors import NonFiniteWeightsError
from .base import JointResult, LayerContext, MethodSettings, PruningMethod, register_method
from .magnitude import apply_mask
from .sparsegpt import SparseGPTSettings

if TYPE_CHECKING:
    from ..config import PruneRule

SOLVE_DTYPE = torch.float32


class AttentionSettings(MethodSettings):
    """How the binary pattern is chosen (``mask``), the paper's descent (used when ``mask`` is ``descent``), and the
    refit of the kept weights to the attention loss.

    The refit's steps are stochastic by default: each sees a share of the calibration sequences and of their query
    rows (benchmarks/speed.py; docs/method.md section 7b). ``refit_row_fraction: 1`` with ``refit_sequence_fraction:
    1`` and 50 iterations is the exact solver of version 0.1."""

    mask: Literal["descent", "wanda", "magnitude", "sparsegpt"] = "wanda"
    lam: float = Field(default=0.01, ge=0.0, allow_inf_nan=False)
    iterations: int = Field(default=100, ge=0)
    step_size: float = Field(default=0.05, gt=0.0, allow_inf_nan=False)
    tol: float = Field(default=1e-6, ge=0.0)
    line_search: bool = True
    group: Literal["row", "head", "matrix"] = "row"
    score: Literal["mask", "mask_weight"] = "mask_weight"
    refit_iterations: int = Field(default=100, ge=0)
    refit_lr: float = Field(default=0.01, gt=0.0, allow_inf_nan=False)
    refit_row_fraction: float = Field(default=0.125, gt=0.0, le=1.0, allow_inf_nan=False)
    refit_sequence_fraction: float = Field(default=0.5, gt=0.0, le=1.0, allow_inf_nan=False)

    @model_validator(mode="after")
    def _sparsegpt_groups(self) -> AttentionSettings:
        if self.mask == "sparsegpt" and self.group == "head":
            raise ValueError("mask 'sparsegpt' selects per row or per matrix, not per head")
        return self

    def unused(self) -> dict[str, str]:
        unused = {}
        if self.mask != "descent":
            unused.update(dict.fromkeys(("lam", "iterations", "step_size", "tol", "line_search", "score"),
                                        f"read only with mask 'descent', not {self.mask!r}"))
        if self.refit_iterations == 0:
            unused.update(dict.fromkeys(("refit_lr", "refit_row_fraction", "refit_sequence_fraction"),
                                        "read only when refit_iterations > 0"))
        return unused

    def reads_settings_of(self) -> tuple[str, ...]:
        return ("sparsegpt",) if self.mask == "sparsegpt" else ()


@register_method
class Attention(PruningMethod):
    """Joint: q_proj and k_proj of a layer are fitted together against the layer's attention probabilities."""

    name = "attention"
    settings = AttentionSettings
    roles = ("q_proj", "k_proj")
    joint = True

    def captures(self, rules: dict[str, PruneRule]) -> tuple[str, ...]:
        return ("q_proj",)

    def prune_layer(self, context: LayerContext, rules: dict[str, PruneRule]) -> JointResult:
        xs = context.recorded["q_proj"]
        if not all(bool(torch.isfinite(x).all()) for x in xs):
            raise NonFiniteWeightsError("attention inputs contain NaN or infinity")
        weights = {role: context.matrix(role) for role in self.roles}
        config = context.config
        result = prune_attention(weights, AttentionInputs(xs, context.attention_spec(), context.catalog), rules,
                                 config.attention, config.sparsegpt, seed=context.seed, world=context.world)
        return JointResult(result.weights, attention=result)



@dataclass
class AttentionInputs:
    """What the method needs from one layer: the attention inputs X (one (1, n, d) tensor per calibration
    sequence, positions 0..n-1) and the attention's spec (RoPE tables for the longest of them)."""

    xs: list[Tensor]
    spec: AttentionSpec
    catalog: SequenceCatalog | None = None  # where xs sit among every rank's sequences (data-parallel runs)

    def sequences(self) -> list[Tensor]:
        """One (1, n, d) batch per sequence, shortest first (ties in their given order: the catalog's), in the
        solver's dtype. Sequences are never stacked: a stacked batch's matrix products sum over its sequences in
        float32, in an order that would depend on which sequences share a rank (attnprune_opt/distributed.py)."""
        return [x.reshape(1, *x.shape[-2:]).to(SOLVE_DTYPE) for x in sorted(self.xs, key=lambda x: x.shape[-2])]


def batches_by_length(xs: list[Tensor]) -> list[Tensor]:
    """Sequences (1, n, d) of equal length stacked into one (b, n, d) batch each, shortest first (attention never
    crosses sequences), in the solver's dtype."""
    by_length: dict[int, list[Tensor]] = defaultdict(list)
    for x in xs:
        by_length[x.shape[-2]].append(x.reshape(x.shape[-2], x.shape[-1]))
    return [torch.stack(group).to(SOLVE_DTYPE) for _, group in sorted(by_length.items())]


@dataclass
class AttentionResult:
    """Pruned q/k weights and the figures of the run. Errors are relative attention errors on the calibration
    inputs: ``error_mask`` of the chosen pattern with the original weights, ``error_final`` of the weights returned.
    ``refit_kept`` says whether the refit lowered the error (else the pattern's weights are returned);
    ``refit_loss`` is the refit's loss per step (estimates from the step's sample when steps are sampled)."""

    weights: dict[str, Tensor]
    error_mask: float
    error_final: float
    descent_iterations: int
    refit_kept: bool
    refit_loss: list[float]
    seconds: float


class _Layer:
    """The method's view of one layer's attention: dense q/k weights, calibration inputs, and the objective.

    The loss separates over KV groups. The descent (projected GD with a line search) therefore runs per group, so
    each gets its own step size; Adam is elementwise, so the refit runs on all heads at once, which is the same
    descent with fewer, larger matrix products.
    """

    def __init__(self, weights: dict[str, Tensor], inputs: AttentionInputs, targets: tuple[str, ...],
                 lam: float, world: World = SINGLE) -> None:
        self.targets = targets  # "q_proj" and/or "k_proj"
        self.dense = {name: weights[name].to(SOLVE_DTYPE) for name in ("q_proj", "k_proj")}
        self.batches = inputs.sequences()
        self.catalog = inputs.catalog
        self.spec = inputs.spec.to(SOLVE_DTYPE)
        self.head_dim = self.spec.head_dim
        self.kv_heads = self.dense["k_proj"].shape[0] // self.head_dim
        self.lam = lam
        self.world = world
        self.objective = self._objective(slice(None), slice(None))

    def _objective(self, q_rows: slice, k_rows: slice) -> FactoredAttentionObjective:
        spec = self.spec if q_rows == slice(None) else self.spec.group_rows(q_rows, k_rows)
        return FactoredAttentionObjective(
            self.batches, self.dense["q_proj"][q_rows], self.dense["k_proj"][k_rows], spec, lam=self.lam,
            optimize=tuple(name[0] for name in self.targets), catalog=self.catalog, reduce=self.world.sum)

    def error(self, weights: dict[str, Tensor]) -> float:
        """Relative attention error of the layer with these q/k weights (dense where not given), over every rank's
        sequences."""
        full = {**self.dense, **{name: w.to(SOLVE_DTYPE) for name, w in weights.items()}}
        return self.objective.squared_error(full["q_proj"], full["k_proj"]) / self.objective.target_energy

    def descent(self, solver: SolverConfig) -> tuple[dict[str, Tensor], int]:
        """Algorithm 1 per KV group (all heads at once when a norm couples them): the relaxed masks M_T assembled
        over the whole matrices."""
        if not self.spec.heads_separate:
            result = solve(self.objective, solver)
            return dict(zip(self.targets, result.masks)), result.iterations
        relaxed = {name: torch.ones_like(self.dense[name]) for name in self.targets}
        head_dim = self.head_dim
        iterations, q_rows = 0, self.dense["q_proj"].shape[0] // self.kv_heads
        for g in range(self.kv_heads):
            rows = {"q_proj": slice(g * q_rows, (g + 1) * q_rows), "k_proj": slice(g * head_dim, (g + 1) * head_dim)}
            result = solve(self._objective(rows["q_proj"], rows["k_proj"]), solver)
            for name, mask in zip(self.targets, result.masks):
                relaxed[name][rows[name]] = mask
            iterations = max(iterations, result.iterations)
        return relaxed, iterations

    def refit(self, start: dict[str, Tensor], keep: dict[str, Tensor], config: AdamConfig,
              callback: StepCallback | None = None) -> tuple[dict[str, Tensor], list[float]]:
        """Adam on the kept entries against the attention loss; pruned entries stay exactly zero."""
        kept = self.kept_objective(start, keep)
        result = adam(kept, config, tuple(_rms(self.dense[name]) for name in self.targets), callback)
        return self.fitted(kept, result.masks, keep), result.loss_history

    def input_statistics(self, inputs: AttentionInputs, hessian: bool) -> InputStatistics:
        """Statistics of the attention inputs of every rank."""
        stats = InputStatistics(inputs.xs[0].shape[-1], hessian=hessian)
        for x in inputs.xs:
            stats.update(x)
        for tensor in (stats.hessian, stats.squared_norms):
            if tensor is not None:
                self.world.sum(tensor)
        return stats

    def kept_objective(self, start: dict[str, Tensor], keep: dict[str, Tensor]) -> KeptWeightsObjective:
        return KeptWeightsObjective(self.objective, keep={name[0]: keep[name] for name in self.targets},
                                    start={name[0]: start[name].to(SOLVE_DTYPE) for name in self.targets})

    def fitted(self, kept: KeptWeightsObjective, values: tuple[Tensor, ...],
               keep: dict[str, Tensor]) -> dict[str, Tensor]:
        """The refit's parameters as q/k weights, pruned entries exactly +0.0."""
        weights = dict(zip(("q_proj", "k_proj"), kept.effective(values)))
        return {name: apply_mask(weights[name], keep[name]) for name in self.targets}


def refit_config(settings: AttentionSettings, seed: int) -> AdamConfig:
    """The refit's solver settings, from the recipe's ``attention`` block."""
    return AdamConfig(iterations=settings.refit_iterations, lr=settings.refit_lr,
                      row_fraction=settings.refit_row_fraction,
                      sequence_fraction=settings.refit_sequence_fraction, seed=seed)


def prune_attention(
    weights: dict[str, Tensor],
    inputs: AttentionInputs,
    rules: dict[str, PruneRule],
    settings: AttentionSettings,
    sparsegpt_settings: SparseGPTSettings = SparseGPTSettings(),
    seed: int = 0,
    world: World = SINGLE,
) -> AttentionResult:
    """The method on one layer's q_proj/k_proj: choose the pattern (``settings.mask``), then refit the kept
    weights to the non-linear attention objective (``settings.refit_*``; ``seed`` draws the sampled rows).

    The refit is kept only if it lowers the exact calibration error: a sampled run can in principle end above
    its start, and the pattern's weights are then the better answer.
    """
    start_time = time.perf_counter()
    targets = tuple(name for name in ("q_proj", "k_proj") if name in rules)
    layer = _Layer(weights, inputs, targets, settings.lam, world)
    descent_iterations = 0

    def keep_top(scores: dict[str, Tensor]) -> dict[str, Tensor]:
        return {name: _keep(scores[name], rules[name], settings, layer.head_dim) for name in targets}

    start = layer.dense
    if settings.mask == "magnitude":
        keep = keep_top({name: layer.dense[name].abs() for name in targets})
    elif settings.mask == "wanda":
        norms = layer.input_statistics(inputs, hessian=False).column_norms.to(SOLVE_DTYPE)
        keep = keep_top({name: layer.dense[name].abs() * norms for name in targets})
    elif settings.mask == "sparsegpt":  # its pattern, and its updated weights as the refit's start
        hessian = layer.input_statistics(inputs, hessian=True).hessian
        solved = {name: sparsegpt(layer.dense[name], hessian, rules[name].sparsity, n_m=rules[name].n_m,
                                  group="row" if settings.group == "row" else "matrix",
                                  blocksize=sparsegpt_settings.blocksize, percdamp=sparsegpt_settings.percdamp)
                  for name in targets}
        start = {name: solved[name][0] for name in targets}
        keep = {name: solved[name][1] for name in targets}
    else:
        relaxed, descent_iterations = layer.descent(SolverConfig(
            iterations=settings.iterations, step_size=settings.step_size, tol=settings.tol,
            line_search=settings.line_search))
        keep = keep_top({name: relaxed[name] * (layer.dense[name].abs() if settings.score == "mask_weight" else 1)
                         for name in targets})
    pattern = {name: apply_mask(start[name], keep[name]) for name in targets}
    error_mask = layer.error(pattern)
    final, error_final, history = pattern, error_mask, []
    if settings.refit_iterations:
        refit, history = layer.refit(pattern, keep, refit_config(settings, seed))
        error_refit = layer.error(refit)
        if error_refit < error_mask:
            final, error_final = refit, error_refit
    return AttentionResult(
        weights={name: final[name].to(weights[name].dtype) for name in targets},
        error_mask=error_mask, error_final=error_final,
        descent_iterations=descent_iterations, refit_kept=final is not pattern, refit_loss=history,
        seconds=time.perf_counter() - start_time)


def _keep(scores: Tensor, rule: PruneRule, settings: AttentionSettings, head_dim: int) -> Tensor:
    if rule.n_m is not None:
        return n_m_mask(scores, *rule.n_m)
    return topk_mask(scores, rule.sparsity, settings.group, rows_per_group=head_dim)


def _rms(t: Tensor) -> float:
    return float(t.pow(2).mean().sqrt()) or 1.0

