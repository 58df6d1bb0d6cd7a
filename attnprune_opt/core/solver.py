"""Algorithm 1 of the paper: gradient descent on the relaxed mask, from M0 = 1, kept in [0, 1]; and Adam for
refitting kept weights (unconstrained, badly scaled: plain gradient steps crawl there).

The gradient scales like ||X||^2 ||W||^2 * scaling, so no single step size suits every layer (docs/method.md
section 4). The step is therefore expressed scale-free: ``step_size`` is the largest change of any mask entry in
the first step, and with ``line_search`` a backtracking (Armijo) test for projected gradient steps halves the
step until the loss decreases enough and lets it grow again after each accepted step. With
``line_search=False`` the first step's size is kept throughout, as in the paper's plain descent.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Protocol

import torch
from torch import Tensor

Params = tuple[Tensor, ...]


class Objective(Protocol):
    def initial_params(self) -> Params: ...

    def loss(self, params: Params) -> float: ...

    def loss_and_grad(self, params: Params) -> tuple[float, Params]: ...


@dataclass(frozen=True)
class SolverConfig:
    """Settings of the descent; ``tol`` stops it once no mask entry moved more than ``tol`` in a step."""

    iterations: int = 100
    step_size: float = 0.05
    tol: float = 1e-6
    line_search: bool = True
    growth: float = 1.25
    max_backtracks: int = 30

    def __post_init__(self) -> None:
        if self.iterations < 0:
            raise ValueError(f"iterations must be >= 0, got {self.iterations}")
        if not self.step_size > 0:
            raise ValueError(f"step_size must be > 0, got {self.step_size}")
        if self.tol < 0:
            raise ValueError(f"tol must be >= 0, got {self.tol}")
        if self.growth < 1:
            raise ValueError(f"growth must be >= 1, got {self.growth}")


@dataclass
class SolverResult:
    """The relaxed masks M_T, the loss after each step (entry 0 is L(M0)), and how the run ended."""

    masks: Params
    loss_history: list[float] = field(default_factory=list)
    iterations: int = 0
    converged: bool = False


def _project(params: Params) -> Params:
    return tuple(p.clamp(0.0, 1.0) for p in params)


def _dot(a: Params, b: Params) -> float:
    return float(sum((x * y).sum() for x, y in zip(a, b)))


def solve(objective: Objective, config: SolverConfig = SolverConfig(), init: Params | None = None) -> SolverResult:
    """Projected gradient descent M <- clip(M - eta * grad L(M), 0, 1). Deterministic for given inputs."""
    params = objective.initial_params() if init is None else tuple(p.clone() for p in init)
    loss, grad = objective.loss_and_grad(params)
    result = SolverResult(masks=params, loss_history=[loss])
    scale = max(float(g.abs().max()) for g in grad)
    if scale == 0.0:  # a stationary start (e.g. M0 = 1 with lambda = 0): the descent never moves
        result.converged = True
        return result
    eta = config.step_size / scale
    for step in range(1, config.iterations + 1):
        for _ in range(config.max_backtracks + 1):
            candidate = _project(tuple(p - eta * g for p, g in zip(params, grad)))
            delta = tuple(c - p for c, p in zip(candidate, params))
            new_loss, new_grad = objective.loss_and_grad(candidate)
            bound = loss + _dot(grad, delta) + _dot(delta, delta) / (2 * eta)
            if not config.line_search or new_loss <= bound:
                break
            eta /= 2
        else:  # no step of any size decreases the loss: a stationary point up to rounding
            result.converged = True
            break
        moved = max(float(d.abs().max()) for d in delta)
        params, loss, grad = candidate, new_loss, new_grad
        result.masks, result.iterations = params, step
        result.loss_history.append(loss)
        if moved <= config.tol:
            result.converged = True
            break
        if config.line_search:
            eta *= config.growth
    return result


class SampledObjective(Objective, Protocol):
    """An objective that is a sum over attention rows, so a step can estimate it from a sample of them."""

    def sample(self, row_fraction: float, sequence_fraction: float, generator: torch.Generator) -> Any: ...

    def loss_and_grad(self, params: Params, sample: Any = None) -> tuple[float, Params]: ...


@dataclass(frozen=True)
class AdamConfig:
    """Adam on unconstrained parameters; ``lr`` is relative: each parameter's step is ``lr * scale``.

    ``row_fraction`` or ``sequence_fraction`` < 1 makes each step stochastic: it sees that share of the calibration
    sequences and, in those, of the query rows (all their keys stay), drawn afresh each step from a generator
    seeded with ``seed``.
    """

    iterations: int = 100
    lr: float = 0.05
    betas: tuple[float, float] = (0.9, 0.999)
    row_fraction: float = 1.0
    sequence_fraction: float = 1.0
    seed: int = 0

    def __post_init__(self) -> None:
        if self.iterations < 0:
            raise ValueError(f"iterations must be >= 0, got {self.iterations}")
        if not self.lr > 0:
            raise ValueError(f"lr must be > 0, got {self.lr}")
        for name in ("row_fraction", "sequence_fraction"):
            if not 0 < getattr(self, name) <= 1:
                raise ValueError(f"{name} must be in (0, 1], got {getattr(self, name)}")

    @property
    def exact(self) -> bool:
        return self.row_fraction == 1.0 and self.sequence_fraction == 1.0


StepCallback = Callable[[int, Params], None]


def adam(objective: SampledObjective, config: AdamConfig, scales: tuple[float, ...] | None = None,
         callback: StepCallback | None = None) -> SolverResult:
    """torch.optim.Adam from ``objective.initial_params()``.

    With exact steps (``row_fraction=1``) the iterate with the lowest loss seen is returned; sampled losses are
    estimates, so there the last iterate is. ``callback(step, params)`` sees the iterate after each step (step 0
    is the start), for monitoring only. Deterministic for a fixed ``seed``.
    """
    params = [p.clone() for p in objective.initial_params()]
    scales = scales or (1.0,) * len(params)
    optimizer = torch.optim.Adam([{"params": [p], "lr": config.lr * s} for p, s in zip(params, scales)],
                                 betas=config.betas, foreach=False, fused=True)
    generator = torch.Generator().manual_seed(config.seed)
    exact = config.exact
    result = SolverResult(masks=tuple(p.clone() for p in params), iterations=config.iterations)
    best = float("inf")
    for step in range(config.iterations + 1):
        if callback is not None:
            callback(step, tuple(params))
        if step == config.iterations and not exact:
            result.masks = tuple(p.clone() for p in params)
            break
        sample = None if exact else objective.sample(config.row_fraction, config.sequence_fraction, generator)
        loss, grads = objective.loss_and_grad(tuple(params), sample)
        result.loss_history.append(loss)
        if exact and loss < best:
            best, result.masks = loss, tuple(p.clone() for p in params)
        if step == config.iterations:
            break
        for p, g in zip(params, grads):
            p.grad = g
        optimizer.step()
    return result
