"""The descent of Algorithm 1 and the refit's Adam: convergence, determinism, exact zeros, and quality against the
exact optimum on tiny cases."""

import pytest
import torch

from attnprune_opt.core import (
    AttentionSpec,
    FactoredAttentionObjective,
    FusedAttentionObjective,
    SolverConfig,
    binarize,
    solve,
    topk_mask,
)
from attnprune_opt.core.exhaustive import all_masks, fused_mask_errors
from attnprune_opt.core.objective import KeptWeightsObjective
from attnprune_opt.core.solver import AdamConfig, adam

F64 = torch.float64


def tiny_instance(seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(16, 4, dtype=F64, generator=g), torch.randn(4, 4, dtype=F64, generator=g)


def factored_problem(seed: int = 0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(2, 24, 16, dtype=dtype, generator=g)
    wq = torch.randn(8, 16, dtype=dtype, generator=g) / 4
    wk = torch.randn(4, 16, dtype=dtype, generator=g) / 4
    return FactoredAttentionObjective(x, wq, wk, AttentionSpec(4), lam=0.1)


def test_line_search_descent_is_monotone_and_converges():
    result = solve(factored_problem(dtype=F64), SolverConfig(iterations=500, tol=1e-7))
    history = torch.tensor(result.loss_history)
    assert (history[1:] <= history[:-1] + 1e-12).all()
    assert result.converged and result.iterations < 500
    assert all(((m >= 0) & (m <= 1)).all() for m in result.masks)


def test_lambda_zero_never_moves():
    objective = factored_problem()
    objective.lam = 0.0
    result = solve(objective, SolverConfig(iterations=20))
    assert result.converged and result.iterations == 0
    assert all(torch.equal(m, torch.ones_like(m)) for m in result.masks)


def test_same_inputs_give_bit_identical_masks():
    a = solve(factored_problem(), SolverConfig(iterations=30))
    b = solve(factored_problem(), SolverConfig(iterations=30))
    assert all(torch.equal(x, y) for x, y in zip(a.masks, b.masks))
    assert a.loss_history == b.loss_history


def test_fixed_step_without_line_search_runs_every_iteration():
    result = solve(factored_problem(), SolverConfig(iterations=15, step_size=0.01, line_search=False, tol=0))
    assert result.iterations == 15 and len(result.loss_history) == 16


@pytest.mark.parametrize("bad", [dict(iterations=-1), dict(step_size=0), dict(tol=-1), dict(growth=0.5)])
def test_solver_config_validation(bad):
    with pytest.raises(ValueError):
        SolverConfig(**bad)


def test_binarised_descent_is_near_the_exact_optimum_on_tiny_instances():
    """d = 4, all C(16, 8) masks at 50%. Measured on seeds 0-9 (benchmarks/tiny_optimum.py prints the full
    distribution): mean GD/optimum 1.62, 2/10 exactly optimal, worst 2.80; magnitude pruning of W: mean 2.06.
    The bounds below are those measurements with a small margin."""
    masks = all_masks((4, 4), 0.5)
    ratios, magnitude_ratios = [], []
    for seed in range(10):
        x, w = tiny_instance(seed)
        errors = fused_mask_errors(x, w, masks, scaling=0.5)
        relaxed = solve(FusedAttentionObjective(x, w, scaling=0.5, lam=0.1), SolverConfig(iterations=300)).masks[0]
        keep = binarize(relaxed, w, 0.5, group="matrix", score="mask")
        ratios.append(float(fused_mask_errors(x, w, keep[None], scaling=0.5)[0] / errors.min()))
        magnitude = binarize(torch.ones_like(w), w, 0.5, group="matrix")
        magnitude_ratios.append(float(fused_mask_errors(x, w, magnitude[None], scaling=0.5)[0] / errors.min()))
    ratios = torch.tensor(ratios, dtype=F64)
    assert ratios.mean() <= 1.7
    assert ratios.max() <= 3.0
    assert int((ratios < 1 + 1e-9).sum()) >= 2
    assert ratios.mean() < torch.tensor(magnitude_ratios).mean()


def refit_problem(seed: int = 0):
    """Kept-weight refit of a half-pruned q/k pair on a small causal problem with grouped heads."""
    objective = factored_problem(seed)
    objective.lam = 0.0
    keep = {"q": topk_mask(objective.q_weight.abs(), 0.5, "row"), "k": topk_mask(objective.k_weight.abs(), 0.5, "row")}
    start = {"q": objective.q_weight, "k": objective.k_weight}
    return KeptWeightsObjective(objective, keep, start), keep


@pytest.mark.parametrize("fractions", [(1.0, 1.0), (0.25, 1.0), (0.25, 0.5)])
def test_adam_refit_lowers_the_loss_and_keeps_pruned_entries_zero(fractions):
    kept, keep = refit_problem()
    config = AdamConfig(iterations=60, lr=0.02, row_fraction=fractions[0], sequence_fraction=fractions[1])
    result = adam(kept, config)
    q, k = kept.effective(result.masks)
    assert kept.loss(result.masks) < 0.5 * kept.loss(kept.initial_params())
    assert torch.equal(q[~keep["q"]], torch.zeros_like(q[~keep["q"]]))
    assert torch.equal(k[~keep["k"]], torch.zeros_like(k[~keep["k"]]))


def test_sampled_adam_is_deterministic_for_a_seed_and_changes_with_it():
    kept, _ = refit_problem()
    runs = [adam(kept, AdamConfig(iterations=10, lr=0.02, row_fraction=0.25, seed=seed)).masks for seed in (0, 0, 1)]
    assert all(torch.equal(a, b) for a, b in zip(runs[0], runs[1]))
    assert not all(torch.equal(a, b) for a, b in zip(runs[0], runs[2]))


def test_adam_callback_sees_every_iterate_without_changing_the_run():
    kept, _ = refit_problem()
    seen = []
    config = AdamConfig(iterations=6, lr=0.02, row_fraction=0.5)
    watched = adam(kept, config, callback=lambda step, params: seen.append((step, [p.clone() for p in params])))
    plain = adam(kept, config)
    assert [s for s, _ in seen] == list(range(7))
    assert torch.equal(seen[0][1][0], kept.initial_params()[0])
    assert all(torch.equal(a, b) for a, b in zip(seen[-1][1], watched.masks))
    assert all(torch.equal(a, b) for a, b in zip(plain.masks, watched.masks))


@pytest.mark.parametrize("bad", [dict(row_fraction=0.0), dict(sequence_fraction=1.5), dict(iterations=-1),
                                 dict(lr=0.0)])
def test_adam_config_rejects_bad_values(bad):
    with pytest.raises(ValueError, match=next(iter(bad))):
        AdamConfig(**bad)
