"""Baselines on plain matrices: masks exact, SparseGPT updates kept weights, and the expected ordering."""

import pytest
import torch

from attnprune_opt.core import InputStatistics, magnitude_mask, sparsegpt, wanda_mask

F64 = torch.float64


def linear_problem(seed: int, rows: int = 32, cols: int = 64, tokens: int = 512):
    """A layer with correlated inputs whose scales spread over a decade."""
    g = torch.Generator().manual_seed(seed)
    scales = torch.logspace(-0.5, 0.5, cols, dtype=F64)[torch.randperm(cols, generator=g)]
    mixing = torch.eye(cols, dtype=F64) + 0.3 * torch.randn(cols, cols, dtype=F64, generator=g) / cols**0.5
    x = torch.randn(tokens, cols, dtype=F64, generator=g) @ mixing * scales
    w = torch.randn(rows, cols, dtype=F64, generator=g)
    stats = InputStatistics(cols)
    stats.update(x)
    return x, w, stats


def output_error(x, w, w_pruned) -> float:
    return float((x @ w.T - x @ w_pruned.T).pow(2).sum())


@pytest.mark.parametrize("seed", range(5))
def test_sparsegpt_beats_wanda_beats_magnitude(seed):
    x, w, stats = linear_problem(seed)
    w_sgpt, _ = sparsegpt(w, stats.hessian, 0.5)
    err_sgpt = output_error(x, w, w_sgpt)
    err_wanda = output_error(x, w, w * wanda_mask(w, stats.column_norms, 0.5))
    err_mag = output_error(x, w, w * magnitude_mask(w, 0.5))
    assert err_sgpt <= err_wanda <= err_mag


def test_input_statistics_streaming_equals_batch(gen):
    x = torch.randn(3, 10, 6, generator=gen)
    streamed = InputStatistics(6)
    for chunk in x:
        streamed.update(chunk)
    flat = x.reshape(-1, 6).double()
    # each update's terms are float32 products of float32 inputs
    assert torch.allclose(streamed.hessian, flat.T @ flat, rtol=1e-6, atol=1e-6)
    assert torch.allclose(streamed.column_norms, flat.norm(dim=0), rtol=1e-6)
    assert streamed.hessian.dtype == F64 and streamed.tokens == 30
    cheap = InputStatistics(6, hessian=False)
    cheap.update(x)
    assert cheap.hessian is None
    assert torch.allclose(cheap.column_norms, flat.norm(dim=0), rtol=1e-6)


@pytest.mark.parametrize("ranks", [2, 3])
def test_input_statistics_of_a_partition_add_up_to_the_whole(ranks, gen):
    """Sequences shared out every N-th as in a data-parallel run: the ranks' statistics, added, are one process's
    bit for bit (float32 terms of each sequence, exact float64 sums), so SparseGPT and Wanda see the same H."""
    sequences = [torch.randn(40, 24, generator=gen) * scale for scale in (1.0, 3.0, 0.5, 2.0, 1.0, 4.0, 0.2, 1.5)]
    whole = InputStatistics(24)
    for x in sequences:
        whole.update(x)
    shares = [InputStatistics(24) for _ in range(ranks)]
    for i, x in enumerate(sequences):
        shares[i % ranks].update(x)
    assert torch.equal(sum(share.hessian for share in shares), whole.hessian)
    assert torch.equal(sum(share.squared_norms for share in shares), whole.squared_norms)


@pytest.mark.parametrize("group", ["row", "matrix"])
@pytest.mark.parametrize("sparsity", [0.5, 0.7])
def test_sparsegpt_exact_sparsity_and_updates(group, sparsity):
    _, w, stats = linear_problem(0, rows=20, cols=100)
    w_new, keep = sparsegpt(w, stats.hessian, sparsity, group=group, blocksize=32)
    zeros = (w_new == 0)
    assert torch.equal(zeros, ~keep)
    if group == "row":
        assert ((~keep).sum(dim=1) == int(sparsity * 100 + 1e-9)).all()
    else:
        assert int((~keep).sum()) == int(sparsity * 2000 + 1e-9)
    assert not torch.equal(w_new[keep], w[keep])  # kept weights were updated to compensate


def test_sparsegpt_n_m(gen):
    _, w, stats = linear_problem(1, rows=8, cols=64)
    w_new, keep = sparsegpt(w, stats.hessian, 0.0, n_m=(2, 4), blocksize=32)
    assert (keep.reshape(8, -1, 4).sum(dim=-1) == 2).all()
    assert torch.equal(w_new == 0, ~keep)
    with pytest.raises(ValueError, match="multiple of M"):
        sparsegpt(w, stats.hessian, 0.0, n_m=(2, 4), blocksize=30)


def test_sparsegpt_zero_sparsity_keeps_weights():
    _, w, stats = linear_problem(2, rows=6, cols=16)
    w_new, keep = sparsegpt(w, stats.hessian, 0.0)
    assert keep.all()
    assert torch.allclose(w_new, w, atol=1e-12)


def test_wanda_and_magnitude_are_per_row(gen):
    w = torch.randn(5, 12, generator=gen)
    norms = torch.rand(12, generator=gen)
    assert ((~wanda_mask(w, norms, 0.5)).sum(dim=1) == 6).all()
    assert ((~magnitude_mask(w, 0.25)).sum(dim=1) == 3).all()
    assert (magnitude_mask(w, 0.0, n_m=(2, 4)).reshape(5, 3, 4).sum(-1) == 2).all()
