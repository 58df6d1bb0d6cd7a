"""The closed-form gradients of both loss forms against torch autograd, in float64."""

import pytest
import torch

from attnprune_opt.core import (
    AttentionSpec,
    FactoredAttentionObjective,
    FusedAttentionObjective,
    RMSNormSpec,
    apply_rotary,
    apply_rotary_transpose,
    attention_matrix,
    multihead_attention_probs,
)
from attnprune_opt.core.objective import SequenceCatalog, select_rows

TOL = 1e-8
F64 = torch.float64


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm())


def rope_tables(n: int, head_dim: int, factor: float = 1.0) -> tuple[torch.Tensor, torch.Tensor]:
    inv = 1.0 / 10000 ** (torch.arange(0, head_dim, 2, dtype=F64) / head_dim)
    angles = torch.outer(torch.arange(n, dtype=F64), inv)
    emb = torch.cat([angles, angles], dim=-1)
    return emb.cos() * factor, emb.sin() * factor


@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("lam", [0.0, 0.5])
@pytest.mark.parametrize("normalize", [True, False])
def test_fused_gradient_matches_autograd(causal, lam, normalize, gen):
    d, n, batch, scaling = 7, 9, 3, 0.4
    x = torch.randn(batch, n, d, dtype=F64, generator=gen)
    w = torch.randn(d, d, dtype=F64, generator=gen) * 0.5
    objective = FusedAttentionObjective(x, w, scaling=scaling, causal=causal, lam=lam, normalize=normalize,
                                        chunk_size=2)
    mask = torch.rand(d, d, dtype=F64, generator=gen).requires_grad_()
    value, (grad,) = objective.loss_and_grad((mask.detach(),))

    probs = attention_matrix(x, mask * w, scaling, causal)
    target = attention_matrix(x, w, scaling, causal)
    rows, entries = (batch * n, d * d) if normalize else (1, 1)
    loss = 0.5 * (probs - target).pow(2).sum() / rows + 0.5 * lam * mask.pow(2).sum() / entries
    loss.backward()

    assert abs(value - loss.item()) <= TOL * abs(loss.item())
    assert rel(grad, mask.grad) < TOL


@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("lam", [0.0, 0.3])
@pytest.mark.parametrize("heads,kv_heads", [(4, 4), (6, 2), (3, 1)])
@pytest.mark.parametrize("rope", [True, False])
def test_factored_gradient_matches_autograd(causal, lam, heads, kv_heads, rope, gen):
    head_dim, d, n, batch = 4, 10, 7, 3
    x = torch.randn(batch, n, d, dtype=F64, generator=gen)
    wq = torch.randn(heads * head_dim, d, dtype=F64, generator=gen) * 0.5
    wk = torch.randn(kv_heads * head_dim, d, dtype=F64, generator=gen) * 0.5
    bq = torch.randn(heads * head_dim, dtype=F64, generator=gen)
    bk = torch.randn(kv_heads * head_dim, dtype=F64, generator=gen)
    cos, sin = rope_tables(n + 3, head_dim, factor=1.2) if rope else (None, None)  # a scaled RoPE variant
    common = dict(head_dim=head_dim, cos=cos, sin=sin, q_bias=bq, k_bias=bk, causal=causal)
    objective = FactoredAttentionObjective(x, wq, wk, AttentionSpec(**common), lam=lam, chunk_size=2)
    mq = torch.rand(wq.shape, dtype=F64, generator=gen).requires_grad_()
    mk = torch.rand(wk.shape, dtype=F64, generator=gen).requires_grad_()
    value, (gq, gk) = objective.loss_and_grad((mq.detach(), mk.detach()))

    probs = multihead_attention_probs(x, mq * wq, mk * wk, AttentionSpec(**common))
    target = multihead_attention_probs(x, wq, wk, AttentionSpec(**common))
    penalty = (mq.pow(2).sum() + mk.pow(2).sum()) / (wq.numel() + wk.numel())
    loss = 0.5 * (probs - target).pow(2).sum() / (batch * n * heads) + 0.5 * lam * penalty
    loss.backward()

    assert abs(value - loss.item()) <= TOL * abs(loss.item())
    assert rel(gq, mq.grad) < TOL
    assert rel(gk, mk.grad) < TOL


@pytest.mark.parametrize("variant", ["qk_norm_per_head", "qk_norm_all_heads", "partial_rotary", "softcap",
                                     "window", "all"])
def test_factored_gradient_with_family_features(variant, gen):
    """The attention variants of model families (docs/method.md section 6) keep the closed-form gradient exact."""
    heads, kv_heads, head_dim, d, n, batch = 4, 2, 8, 10, 9, 2
    x = torch.randn(batch, n, d, dtype=F64, generator=gen)
    wq = torch.randn(heads * head_dim, d, dtype=F64, generator=gen) * 0.5
    wk = torch.randn(kv_heads * head_dim, d, dtype=F64, generator=gen) * 0.5
    every = variant == "all"
    spec = {"head_dim": head_dim, "scaling": 0.3}
    if variant in ("qk_norm_per_head", "all"):
        spec["q_norm"] = RMSNormSpec(1 + torch.rand(head_dim, dtype=F64, generator=gen), 1e-6)
        spec["k_norm"] = RMSNormSpec(1 + torch.rand(head_dim, dtype=F64, generator=gen), 1e-6)
    if variant == "qk_norm_all_heads":
        spec["q_norm"] = RMSNormSpec(1 + torch.rand(heads * head_dim, dtype=F64, generator=gen), 1e-5, False)
        spec["k_norm"] = RMSNormSpec(1 + torch.rand(kv_heads * head_dim, dtype=F64, generator=gen), 1e-5, False)
    cos, sin = rope_tables(n, 4 if variant in ("partial_rotary", "all") else head_dim)
    spec.update(cos=cos, sin=sin, softcap=2.0 if variant in ("softcap", "all") else None,
                window=3 if variant in ("window", "all") else None)
    spec = AttentionSpec(**spec)
    objective = FactoredAttentionObjective(x, wq, wk, spec)
    mq = torch.rand(wq.shape, dtype=F64, generator=gen).requires_grad_()
    mk = torch.rand(wk.shape, dtype=F64, generator=gen).requires_grad_()
    value, (gq, gk) = objective.loss_and_grad((mq.detach(), mk.detach()))
    probs = multihead_attention_probs(x, mq * wq, mk * wk, spec)
    target = multihead_attention_probs(x, wq, wk, spec)
    loss = 0.5 * (probs - target).pow(2).sum() / (batch * n * heads)
    loss.backward()
    assert abs(value - loss.item()) <= TOL * abs(loss.item())
    assert rel(gq, mq.grad) < TOL and rel(gk, mk.grad) < TOL
    if spec.window is not None:  # query 5 sees keys 3, 4, 5 only
        assert (probs[:, :, 5, :3] == 0).all() and (probs[:, :, 5, 3:6] > 0).all()
    if every:
        assert not torch.allclose(probs, multihead_attention_probs(x, mq * wq, mk * wk, AttentionSpec(head_dim)))


def test_factored_gradient_with_one_side_optimised(gen):
    head_dim, d, n = 4, 8, 6
    x = torch.randn(2, n, d, dtype=F64, generator=gen)
    wq = torch.randn(2 * head_dim, d, dtype=F64, generator=gen)
    wk = torch.randn(head_dim, d, dtype=F64, generator=gen)
    objective = FactoredAttentionObjective(x, wq, wk, AttentionSpec(head_dim), lam=0.2, optimize=("k",), normalize=False)
    mk = torch.rand(wk.shape, dtype=F64, generator=gen).requires_grad_()
    value, (gk,) = objective.loss_and_grad((mk.detach(),))
    probs = multihead_attention_probs(x, wq, mk * wk, AttentionSpec(head_dim))
    target = multihead_attention_probs(x, wq, wk, AttentionSpec(head_dim))
    loss = 0.5 * (probs - target).pow(2).sum() + 0.1 * mk.pow(2).sum()
    loss.backward()
    assert rel(gk, mk.grad) < TOL


def test_factored_single_head_equals_fused_form(gen):
    """Without RoPE, one head of the factored form is the paper's fused form with W = W_Q^T W_K."""
    d, k, n = 6, 3, 8
    x = torch.randn(n, d, dtype=F64, generator=gen)
    wq = torch.randn(k, d, dtype=F64, generator=gen)
    wk = torch.randn(k, d, dtype=F64, generator=gen)
    fused = attention_matrix(x, wq.T @ wk, scaling=k**-0.5)
    factored = multihead_attention_probs(x.unsqueeze(0), wq, wk, AttentionSpec(k))[0, 0]
    assert torch.allclose(fused, factored, rtol=0, atol=1e-12)


def test_rope_transpose_is_the_adjoint(gen):
    cos, sin = rope_tables(5, 6, factor=0.7)
    a = torch.randn(2, 5, 6, dtype=F64, generator=gen)
    b = torch.randn(2, 5, 6, dtype=F64, generator=gen)
    lhs = (apply_rotary(a, cos, sin) * b).sum()
    rhs = (a * apply_rotary_transpose(b, cos, sin)).sum()
    assert abs(float(lhs - rhs)) < 1e-12


def test_objective_rejects_bad_shapes(gen):
    x = torch.randn(4, 6, dtype=F64, generator=gen)
    with pytest.raises(ValueError, match="square"):
        FusedAttentionObjective(x, torch.randn(6, 5, dtype=F64))
    with pytest.raises(ValueError, match="head_dim"):
        FactoredAttentionObjective(x, torch.randn(10, 6, dtype=F64), torch.randn(8, 6, dtype=F64), AttentionSpec(4))
    with pytest.raises(ValueError, match="grouped"):
        FactoredAttentionObjective(x, torch.randn(12, 6, dtype=F64), torch.randn(8, 6, dtype=F64), AttentionSpec(4))
    with pytest.raises(ValueError, match="no calibration"):
        FusedAttentionObjective([], torch.randn(6, 6, dtype=F64))


def sampled_problem(gen, causal=True):
    head_dim, d = 4, 10
    xs = [torch.randn(2, 9, d, dtype=F64, generator=gen), torch.randn(1, 6, d, dtype=F64, generator=gen)]
    wq = torch.randn(4 * head_dim, d, dtype=F64, generator=gen) * 0.5
    wk = torch.randn(2 * head_dim, d, dtype=F64, generator=gen) * 0.5
    cos, sin = rope_tables(9, head_dim)
    common = dict(head_dim=head_dim, cos=cos, sin=sin, causal=causal)
    return FactoredAttentionObjective(xs, wq, wk, AttentionSpec(**common)), common


@pytest.mark.parametrize("causal", [True, False])
def test_sampled_rows_value_and_gradient_match_autograd(causal, gen):
    """A sampled step computes exactly the chosen attention rows' loss (weighted n/m, times the sequence share)."""
    objective, common = sampled_problem(gen, causal)
    sample = objective.sample(0.4, 0.7, torch.Generator().manual_seed(3))
    wq = (objective.q_weight + 0.1).requires_grad_()
    wk = (objective.k_weight - 0.1).requires_grad_()
    value, gq, gk = objective.weight_loss_and_grad(wq.detach(), wk.detach(), sample)

    loss = 0.0
    for part in sample.parts:
        x = select_rows(objective.batches[part.batch], part, None)
        probs = multihead_attention_probs(x, wq, wk, AttentionSpec(**common))[:, :, part.rows]
        target = multihead_attention_probs(x, objective.q_weight, objective.k_weight, AttentionSpec(**common))[:, :, part.rows]
        loss = loss + part.weight * 0.5 * (probs - target).pow(2).sum()
    loss = loss * objective.weights.data
    loss.backward()
    assert len(sample.parts) >= 1 and all(len(p.rows) < objective.batches[p.batch].shape[1] for p in sample.parts)
    assert abs(value - loss.item()) <= TOL * abs(loss.item())
    assert rel(gq, wq.grad) < TOL and rel(gk, wk.grad) < TOL


def test_sampled_gradient_is_an_unbiased_estimate(gen):
    objective, _ = sampled_problem(gen)
    wq, wk = objective.q_weight * 0.8, objective.k_weight * 1.2
    full_value, full_q, full_k = objective.weight_loss_and_grad(wq, wk)
    generator = torch.Generator().manual_seed(0)
    draws = [objective.weight_loss_and_grad(wq, wk, objective.sample(0.3, 0.5, generator)) for _ in range(1000)]
    mean_q = torch.stack([d[1] for d in draws]).mean(0)
    mean_k = torch.stack([d[2] for d in draws]).mean(0)
    # with all rows and all sequences a sample is the exact computation
    whole = objective.weight_loss_and_grad(wq, wk, objective.sample(1.0, 1.0, generator))
    assert abs(whole[0] - full_value) <= 1e-12 * full_value and rel(whole[1], full_q) < 1e-12
    assert abs(sum(d[0] for d in draws) / len(draws) - full_value) < 0.05 * full_value
    assert rel(mean_q, full_q) < 0.1 and rel(mean_k, full_k) < 0.1


class _RecordedSums:
    """A stand-in for the all-reduce: records one process's local sums and returns them unchanged."""

    def __init__(self) -> None:
        self.sums: list[torch.Tensor] = []

    def __call__(self, sums: torch.Tensor) -> torch.Tensor:
        self.sums.append(sums.clone())
        return sums


class _AddRecorded:
    """The all-reduce of the other process: adds the sums it recorded, call by call."""

    def __init__(self, recorded: _RecordedSums) -> None:
        self.sums = iter(recorded.sums)

    def __call__(self, sums: torch.Tensor) -> torch.Tensor:
        return sums.add_(next(self.sums))


def test_two_processes_sum_to_the_one_process_objective_bit_for_bit(gen):
    """Sequences split every other one between two processes (one per batch, float32 as in the pipeline): loss,
    gradient (exact and sampled) and error, summed over the processes, are the single process's exactly."""
    head_dim, d, lengths = 4, 12, (9, 6, 9, 7, 9, 6)
    xs = [torch.randn(1, n, d, generator=gen) * (1 + i) for i, n in enumerate(lengths)]
    wq, wk = torch.randn(4 * head_dim, d, generator=gen), torch.randn(2 * head_dim, d, generator=gen)
    cos, sin = (t.float() for t in rope_tables(9, head_dim))
    spec = AttentionSpec(head_dim=head_dim, cos=cos, sin=sin)

    def objective(mine, reduce=None):
        batches = [xs[i] for i in sorted(mine, key=lambda i: (lengths[i], i))]
        extra = {} if reduce is None else {"reduce": reduce}
        return FactoredAttentionObjective(batches, wq, wk, spec, lam=0.1,
                                          catalog=SequenceCatalog.of(lengths, mine), **extra)

    def figures(objective):
        q, k = wq * 0.9, wk * 1.1
        sampled = objective.sample(0.5, 0.5, torch.Generator().manual_seed(1))
        return (objective.weight_loss_and_grad(q, k), objective.weight_loss_and_grad(q, k, sampled),
                objective.squared_error(q, k), objective.target_energy,
                objective.loss_and_grad(objective.initial_params()))

    recorded = _RecordedSums()
    figures(objective(range(1, 6, 2), recorded))
    two = figures(objective(range(0, 6, 2), _AddRecorded(recorded)))
    one = figures(objective(range(6)))
    flat = [torch.as_tensor(t) for item in (one, two) for t in _leaves(item)]
    assert all(torch.equal(a, b) for a, b in zip(flat[:len(flat) // 2], flat[len(flat) // 2:]))
    assert one[1][0] != one[0][0]  # the sample is a real subset


def _leaves(item):
    if isinstance(item, (tuple, list)):
        return [leaf for sub in item for leaf in _leaves(sub)]
    return [item]
