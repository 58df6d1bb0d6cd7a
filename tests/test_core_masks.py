"""Binarisation: exact zero counts per comparison group, exact N:M patterns, deterministic ties."""

import pytest
import torch

from attnprune_opt.core import binarize, n_m_mask, prune_count, topk_mask


@pytest.mark.parametrize("sparsity", [0.0, 0.3, 0.5, 0.7, 0.99])
@pytest.mark.parametrize("shape", [(8, 10), (6, 33), (830, 545)])
def test_row_groups_prune_exact_count(sparsity, shape, gen):
    scores = torch.randn(shape, generator=gen)
    keep = topk_mask(scores, sparsity, "row")
    expected = int(sparsity * shape[1] + 1e-9)
    assert ((~keep).sum(dim=1) == expected).all()
    # the pruned entries are the lowest-scored ones of each row
    lowest_kept = scores.masked_fill(~keep, float("inf")).min(dim=1).values
    highest_pruned = scores.masked_fill(keep, float("-inf")).max(dim=1).values
    assert (highest_pruned <= lowest_kept).all()


def test_head_and_matrix_groups(gen):
    scores = torch.randn(12, 10, generator=gen)
    head = topk_mask(scores, 0.5, "head", rows_per_group=4)
    assert ((~head).reshape(3, 40).sum(dim=1) == 20).all()
    matrix = topk_mask(scores, 0.7, "matrix")
    assert int((~matrix).sum()) == 84
    with pytest.raises(ValueError, match="rows_per_group"):
        topk_mask(scores, 0.5, "head", rows_per_group=5)
    with pytest.raises(ValueError, match="unknown comparison group"):
        topk_mask(scores, 0.5, "column")


def test_prune_count_is_floor_with_rounding_slack():
    assert prune_count(10, 0.7) == 7
    assert prune_count(100, 0.29) == 29
    assert prune_count(7, 0.5) == 3
    assert prune_count(576, 0.5) == 288


@pytest.mark.parametrize("bad", [-0.1, 1.0, 1.5, float("nan")])
def test_sparsity_outside_range_is_rejected(bad, gen):
    with pytest.raises(ValueError, match="sparsity"):
        topk_mask(torch.randn(4, 4, generator=gen), bad)


@pytest.mark.parametrize("n,m", [(2, 4), (1, 4), (4, 8)])
def test_n_m_pattern_is_exact(n, m, gen):
    scores = torch.randn(16, 64, generator=gen)
    keep = n_m_mask(scores, n, m)
    assert (keep.reshape(16, -1, m).sum(dim=-1) == n).all()


def test_n_m_must_divide_inputs(gen):
    with pytest.raises(ValueError, match="does not divide the input size 30"):
        n_m_mask(torch.randn(4, 30, generator=gen), 2, 4)
    with pytest.raises(ValueError, match="0 < N < M"):
        n_m_mask(torch.randn(4, 8, generator=gen), 4, 4)


def test_ties_are_broken_by_index_deterministically():
    keep = topk_mask(torch.zeros(3, 8), 0.5, "row")
    assert keep[:, :4].all() and not keep[:, 4:].any()
    assert torch.equal(keep, topk_mask(torch.zeros(3, 8), 0.5, "row"))


def test_binarize_scores(gen):
    relaxed = torch.rand(4, 8, generator=gen)
    weight = torch.randn(4, 8, generator=gen)
    assert torch.equal(binarize(relaxed, weight, 0.5, score="mask"), topk_mask(relaxed, 0.5))
    assert torch.equal(binarize(relaxed, weight, 0.5), topk_mask(relaxed * weight.abs(), 0.5))
    assert torch.equal(binarize(relaxed, weight, n_m=(2, 4)), n_m_mask(relaxed * weight.abs(), 2, 4))
    with pytest.raises(ValueError, match="unknown score"):
        binarize(relaxed, weight, 0.5, score="weight")
    with pytest.raises(ValueError, match="NaN"):
        topk_mask(torch.full((2, 2), float("nan")), 0.5)
