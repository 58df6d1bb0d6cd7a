"""Masked least squares by conjugate gradient: every row's solution against torch.linalg.lstsq on that row's kept
columns (with the ridge as extra rows), pruned entries exactly +0.0, early stopping, named errors."""

from itertools import pairwise

import pytest
import torch

from attnprune_opt.core.masked_lstsq import masked_least_squares

F64 = torch.float64
TOKENS, FEATURES, ROWS = 40, 12, 7


def problem(gen, tokens=TOKENS):
    features = torch.randn(tokens, FEATURES, dtype=F64, generator=gen) * torch.linspace(0.1, 3, FEATURES,
                                                                                         dtype=F64)
    targets = torch.randn(tokens, ROWS, dtype=F64, generator=gen)
    keep = torch.rand(ROWS, FEATURES, generator=gen) < 0.5
    keep[0] = True  # a dense row
    keep[1] = False  # a row with nothing kept
    return features, targets, keep


def reference(features, targets, keep, percdamp, start=None):
    """Row by row: min ||F_S w - y_r||^2 + damp ||w - s_r||^2 over the kept columns S, as an augmented lstsq."""
    start = torch.zeros(keep.shape, dtype=F64) if start is None else start
    gram = features.T @ features
    damp = percdamp * gram.diagonal().mean()
    out = torch.zeros(keep.shape, dtype=F64)
    for r in range(keep.shape[0]):
        kept = keep[r].nonzero().squeeze(1)
        if not len(kept):
            continue
        a = torch.cat([features[:, kept], damp.sqrt() * torch.eye(len(kept), dtype=F64)])
        b = torch.cat([targets[:, r], damp.sqrt() * start[r, kept]])
        out[r, kept] = torch.linalg.lstsq(a, b.unsqueeze(1), driver="gelsd").solution.squeeze(1)
    return out


@pytest.mark.parametrize("percdamp", [0.0, 0.01, 0.5])
@pytest.mark.parametrize("warm", [False, True])
def test_solution_matches_lstsq_row_by_row(percdamp, warm, gen):
    features, targets, keep = problem(gen)
    start = torch.randn(ROWS, FEATURES, dtype=F64, generator=gen) if warm else None
    solved = masked_least_squares(features.T @ features, targets.T @ features, keep, start,
                                  iterations=3 * FEATURES, percdamp=percdamp, tol=1e-12)
    expected = reference(features, targets, keep, percdamp, start)
    assert torch.allclose(solved, expected, rtol=1e-8, atol=1e-10)
    if warm and percdamp:  # the damping pulls toward the start, not toward zero
        assert not torch.allclose(solved, reference(features, targets, keep, percdamp), rtol=1e-4)
    assert torch.equal(solved[~keep], torch.zeros_like(solved[~keep]))
    assert not torch.signbit(solved[~keep]).any()  # +0.0, also where the start was negative


def test_each_step_lowers_the_damped_error_and_a_solved_start_stays(gen):
    features, targets, keep = problem(gen)
    gram, cross = features.T @ features, targets.T @ features
    damp = 0.01 * gram.diagonal().mean()

    def damped_error(w):
        return float((features @ w.T - targets).pow(2).sum() + damp * w.pow(2).sum())

    errors = [damped_error(masked_least_squares(gram, cross, keep, iterations=k)) for k in range(6)]
    assert all(b < a for a, b in pairwise(errors)), errors
    solution = masked_least_squares(gram, cross, keep, iterations=50, percdamp=0.0, tol=1e-12)
    # converged rows stop: from the (undamped) solution no row is active, so no step changes it
    assert torch.equal(masked_least_squares(gram, cross, keep, solution, iterations=5, percdamp=0.0, tol=1e-6),
                       solution)


def test_rank_deficient_gram_is_solved_with_damping(gen):
    """Fewer tokens than features: G is singular, the damped system still has one solution."""
    features, targets, keep = problem(gen, tokens=5)
    solved = masked_least_squares(features.T @ features, targets.T @ features, keep, iterations=60, tol=1e-13)
    assert torch.allclose(solved, reference(features, targets, keep, 0.01), rtol=1e-7, atol=1e-9)


def test_bad_inputs_are_named(gen):
    features, targets, keep = problem(gen)
    gram, cross = features.T @ features, targets.T @ features
    with pytest.raises(ValueError, match="gram must be"):
        masked_least_squares(gram[:-1], cross, keep, iterations=3)
    with pytest.raises(ValueError, match="gram must be"):
        masked_least_squares(gram, cross, keep[:, :-1], iterations=3)
    with pytest.raises(ValueError, match="start has shape"):
        masked_least_squares(gram, cross, keep, cross[:-1], iterations=3)
    with pytest.raises(ValueError, match="iterations and percdamp"):
        masked_least_squares(gram, cross, keep, iterations=-1)
