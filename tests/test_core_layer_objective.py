"""The MLP and attention output sub-block objectives: values and gradients against autograd (float64), sampled
steps, unbiasedness, exact zeros under Adam, determinism."""

import pytest
import torch
import torch.nn.functional as F

from attnprune_opt.core import layer_objective
from attnprune_opt.core.layer_objective import (
    AttentionOutputObjective,
    MLPObjective,
    activation_and_derivative,
    refit_kept_weights,
)
from attnprune_opt.core.masked_lstsq import masked_least_squares
from attnprune_opt.core.solver import AdamConfig, adam

TOL = 1e-8
F64 = torch.float64
D, FF, HEAD_DIM = 6, 10, 3
TORCH_ACTIVATIONS = {"silu": F.silu, "gelu_tanh": lambda a: F.gelu(a, approximate="tanh"), "gelu": F.gelu}


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm())


def keep_half(w: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    return torch.rand(w.shape, dtype=F64, generator=gen) < 0.5


def mlp_problem(gen, activation="silu", names=("gate", "up", "down"), separate_targets=False):
    x = torch.randn(3, 5, D, dtype=F64, generator=gen)
    dense = {"gate": torch.randn(FF, D, dtype=F64, generator=gen), "up": torch.randn(FF, D, dtype=F64, generator=gen),
             "down": torch.randn(D, FF, dtype=F64, generator=gen) * 0.3}
    keep = {name: keep_half(dense[name], gen) for name in names}
    start = {name: w + 0.1 * torch.randn(w.shape, dtype=F64, generator=gen) for name, w in dense.items()}
    targets = torch.randn(3, 5, D, dtype=F64, generator=gen) if separate_targets else None
    objective = MLPObjective(x, dense, keep, start=start, targets=targets, activation=activation, chunk_size=2)
    return objective, x, dense, targets


def mlp_reference(x, w, activation):
    return (TORCH_ACTIVATIONS[activation](x @ w["gate"].T) * (x @ w["up"].T)) @ w["down"].T


def autograd(objective, params, per_token_loss):
    """Loss and gradient of the kept values from a reference forward over B o V."""
    leaves = [p.clone().requires_grad_() for p in params]
    weights = {**objective.fixed, **{n: p * objective.keep[n] for n, p in zip(objective.names, leaves)}}
    loss = per_token_loss(weights)
    loss.backward()
    return loss.item(), [p.grad for p in leaves]


def check(objective, params, value, grads, per_token_loss):
    ref_value, ref_grads = autograd(objective, params, per_token_loss)
    assert abs(value - ref_value) <= TOL * abs(ref_value)
    for g, r in zip(grads, ref_grads):
        assert rel(g, r) < TOL


@pytest.mark.parametrize("activation", ["silu", "gelu_tanh", "gelu"])
@pytest.mark.parametrize("names", [("gate", "up", "down"), ("down",), ("gate",), ("up", "down")])
@pytest.mark.parametrize("separate_targets", [False, True])
def test_mlp_value_and_gradient_match_autograd(activation, names, separate_targets, gen):
    objective, x, dense, targets = mlp_problem(gen, activation, names, separate_targets)
    y0 = mlp_reference(x, dense, activation) if targets is None else targets
    params = tuple(p + 0.05 * torch.randn(p.shape, dtype=F64, generator=gen) for p in objective.initial_params())
    value, grads = objective.loss_and_grad(params)
    tokens = x.shape[0] * x.shape[1]
    check(objective, params, value, grads,
          lambda w: 0.5 * (mlp_reference(x, w, activation) - y0).pow(2).sum() / tokens)
    assert objective.loss(params) == pytest.approx(value, rel=1e-12)


def test_activation_derivatives_match_autograd(gen):
    a = torch.randn(50, dtype=F64, generator=gen).mul(3).requires_grad_()
    for name, fn in TORCH_ACTIVATIONS.items():
        value, derivative = activation_and_derivative(a.detach(), name)
        (grad,) = torch.autograd.grad(fn(a).sum(), a)
        assert rel(value, fn(a).detach()) < 1e-12 and rel(derivative, grad) < 1e-12
    with pytest.raises(ValueError, match="relu2"):
        activation_and_derivative(a.detach(), "relu2")


def attention_problem(gen, heads=6, kv_heads=2, v_bias=True, separate_targets=False, names=("v", "o")):
    b, n = 3, 7
    x = torch.randn(b, n, D, dtype=F64, generator=gen)
    logits = torch.randn(b, heads, n, n, dtype=F64, generator=gen)
    probs = torch.softmax(logits.masked_fill(torch.ones(n, n).triu(1).bool(), float("-inf")), dim=-1)
    dense = {"v": torch.randn(kv_heads * HEAD_DIM, D, dtype=F64, generator=gen),
             "o": torch.randn(D, heads * HEAD_DIM, dtype=F64, generator=gen)}
    bias = torch.randn(kv_heads * HEAD_DIM, dtype=F64, generator=gen) if v_bias else None
    keep = {name: keep_half(dense[name], gen) for name in names}
    targets = torch.randn(b, n, D, dtype=F64, generator=gen) if separate_targets else None
    objective = AttentionOutputObjective(x, probs, dense, keep, head_dim=HEAD_DIM, v_bias=bias, targets=targets,
                                         chunk_size=2)
    return objective, x, probs, dense, bias, targets


def attention_reference(x, probs, w, bias):
    """Plain multi-head attention output with the KV heads repeated for their query heads."""
    b, heads, n, _ = probs.shape
    v = x @ w["v"].T + (0 if bias is None else bias)
    v = v.view(b, n, -1, HEAD_DIM).transpose(1, 2).repeat_interleave(heads // (v.shape[-1] // HEAD_DIM), dim=1)
    return (probs @ v).transpose(1, 2).reshape(b, n, -1) @ w["o"].T


@pytest.mark.parametrize("heads,kv_heads", [(6, 2), (4, 4), (3, 1)])
@pytest.mark.parametrize("v_bias", [True, False])
@pytest.mark.parametrize("names", [("v", "o"), ("v",), ("o",)])
@pytest.mark.parametrize("separate_targets", [False, True])
def test_attention_output_value_and_gradient_match_autograd(heads, kv_heads, v_bias, names, separate_targets, gen):
    objective, x, probs, dense, bias, targets = attention_problem(gen, heads, kv_heads, v_bias, separate_targets,
                                                                  names)
    y0 = attention_reference(x, probs, dense, bias) if targets is None else targets
    params = tuple(p + 0.05 * torch.randn(p.shape, dtype=F64, generator=gen) for p in objective.initial_params())
    value, grads = objective.loss_and_grad(params)
    tokens = x.shape[0] * x.shape[1]
    check(objective, params, value, grads,
          lambda w: 0.5 * (attention_reference(x, probs, w, bias) - y0).pow(2).sum() / tokens)


def sampled_reference(full_output, y0, sample, tokens):
    """The sampled estimate from the full forward: the chosen tokens' squared errors, weighted."""
    loss = 0
    for part in sample.parts:
        start = part.batch * 2  # chunk_size=2 in both problems
        chosen = range(min(2, full_output.shape[0] - start)) if part.sequences is None else part.sequences.tolist()
        rows = [(start + s, r) for s in chosen for r in part.rows.tolist()]
        seq, pos = torch.tensor(rows).T
        loss = loss + part.weight * 0.5 * (full_output[seq, pos] - y0[seq, pos]).pow(2).sum()
    return loss / tokens


@pytest.mark.parametrize("kind", ["mlp", "attention"])
def test_sampled_value_and_gradient_match_autograd(kind, gen):
    if kind == "mlp":
        objective, x, dense, _ = mlp_problem(gen)
        y0 = mlp_reference(x, dense, "silu")
        forward = lambda w: mlp_reference(x, w, "silu")  # noqa: E731
    else:
        objective, x, probs, dense, bias, _ = attention_problem(gen)
        y0 = attention_reference(x, probs, dense, bias)
        forward = lambda w: attention_reference(x, probs, w, bias)  # noqa: E731
    sample = objective.sample(0.4, 0.6, torch.Generator().manual_seed(5))
    assert all(len(p.rows) < x.shape[1] for p in sample.parts)
    params = objective.initial_params()
    value, grads = objective.loss_and_grad(params, sample)
    check(objective, params, value, grads,
          lambda w: sampled_reference(forward(w), y0, sample, x.shape[0] * x.shape[1]))


@pytest.mark.parametrize("kind", ["mlp", "attention"])
def test_sampled_gradient_is_an_unbiased_estimate(kind, gen):
    objective = mlp_problem(gen)[0] if kind == "mlp" else attention_problem(gen)[0]
    params = objective.initial_params()
    full_value, full_grads = objective.loss_and_grad(params)
    generator = torch.Generator().manual_seed(0)
    draws = [objective.loss_and_grad(params, objective.sample(0.3, 0.5, generator)) for _ in range(2000)]
    assert sum(v for v, _ in draws) / len(draws) == pytest.approx(full_value, rel=0.05)
    for i, full in enumerate(full_grads):
        mean = sum(g[i] for _, g in draws) / len(draws)
        assert rel(mean, full) < 0.08
        assert rel(draws[0][1][i], full) > 0.1  # a single draw is noisy: the test can tell


@pytest.mark.parametrize("kind", ["mlp", "attention"])
def test_adam_keeps_pruned_entries_zero_and_is_deterministic(kind, gen):
    objective = mlp_problem(gen)[0] if kind == "mlp" else attention_problem(gen)[0]
    config = AdamConfig(iterations=30, lr=0.02, row_fraction=0.5, sequence_fraction=0.5, seed=7)
    first, second = adam(objective, config), adam(objective, config)
    start = objective.loss(objective.initial_params())
    assert objective.loss(first.masks) < start
    for name, a, b in zip(objective.names, first.masks, second.masks):
        assert torch.equal(a, b)
        pruned = objective.keep[name] == 0
        assert (objective.weights(first.masks)[name][pruned] == 0).all()
        assert (a[pruned] == 0).all() and (a[~pruned] != 0).all()
    other = adam(objective, AdamConfig(iterations=30, lr=0.02, row_fraction=0.5, sequence_fraction=0.5, seed=8))
    assert not torch.equal(first.masks[0], other.masks[0])


def test_relative_error_parts(gen):
    objective, x, dense, _ = mlp_problem(gen)
    assert objective.squared_error(dense) == pytest.approx(0.0, abs=1e-20)
    pruned = {n: w * objective.keep[n] for n, w in dense.items() if n in objective.keep}
    y0 = mlp_reference(x, dense, "silu")
    expected = (mlp_reference(x, {**dense, **pruned}, "silu") - y0).pow(2).sum()
    assert objective.squared_error({**dense, **pruned}) == pytest.approx(float(expected), rel=1e-12)
    assert objective.target_energy == pytest.approx(float(y0.pow(2).sum()), rel=1e-12)
    sample = objective.sample(0.5, 0.5, torch.Generator().manual_seed(1))
    sampled = sampled_reference(mlp_reference(x, {**dense, **pruned}, "silu"), y0, sample, 1)
    assert objective.squared_error({**dense, **pruned}, sample) == pytest.approx(2 * float(sampled), rel=1e-12)


def test_bad_inputs_are_named(gen):
    objective, x, dense, _ = mlp_problem(gen)
    with pytest.raises(ValueError, match="keep must name"):
        MLPObjective(x, dense, {"q": torch.ones(2, 2, dtype=torch.bool)})
    with pytest.raises(ValueError, match="keep\\['down'\\]"):
        MLPObjective(x, dense, {"down": torch.ones(2, 2, dtype=torch.bool)})
    with pytest.raises(ValueError, match="activation"):
        MLPObjective(x, dense, {"down": torch.ones(D, FF, dtype=torch.bool)}, activation="tanh")
    with pytest.raises(ValueError, match="MLP targets"):
        MLPObjective(x, dense, {"down": torch.ones(D, FF, dtype=torch.bool)}, targets=torch.zeros(2, 5, D))
    _, x, probs, dense, _, _ = attention_problem(gen)
    with pytest.raises(ValueError, match="head_dim=4"):
        AttentionOutputObjective(x, probs, dense, {"v": dense["v"] != 0}, head_dim=4)
    with pytest.raises(ValueError, match="attention probabilities"):
        AttentionOutputObjective(x, probs[:, :, :3], dense, {"v": dense["v"] != 0}, head_dim=HEAD_DIM)


@pytest.mark.parametrize("kind", ["mlp", "attention"])
def test_refit_kept_weights_lowers_the_error_and_keeps_the_pattern(kind, gen):
    objective = mlp_problem(gen)[0] if kind == "mlp" else attention_problem(gen)[0]
    config = AdamConfig(iterations=40, lr=0.02, row_fraction=0.5, sequence_fraction=0.5, seed=3)
    result = refit_kept_weights(objective, config, check_fraction=1.0)
    start = objective.weights(objective.initial_params())
    assert result.kept and result.error_after < result.error_before
    assert result.error_before == pytest.approx(objective.squared_error(start) / objective.target_energy)
    assert result.error_after == pytest.approx(objective.squared_error(result.weights) / objective.target_energy)
    for name, weight in result.weights.items():
        pruned = objective.keep[name] == 0
        assert torch.equal(weight[pruned], torch.zeros_like(weight[pruned]))
        assert not torch.signbit(weight[pruned]).any()  # +0.0, not -0.0
    # a refit that cannot help (a step far too large) is dropped: the start's weights come back
    worse = refit_kept_weights(objective, AdamConfig(iterations=3, lr=50.0, row_fraction=0.5, seed=3),
                               check_fraction=1.0)
    assert not worse.kept and worse.error_after > worse.error_before
    for name, weight in worse.weights.items():
        assert torch.equal(weight, start[name].masked_fill(objective.keep[name] == 0, 0.0))
    with pytest.raises(ValueError, match="check_fraction"):
        refit_kept_weights(objective, config, check_fraction=0.0)


@pytest.mark.parametrize("kind", ["mlp", "attention"])
def test_linear_system_gives_the_gradient_of_the_last_weight(kind, gen):
    """With G, B from ``linear_system``, the objective's gradient in down_proj / o_proj is (W G - B) o M / T."""
    if kind == "mlp":
        objective, x, dense, _ = mlp_problem(gen, names=("down",), separate_targets=True)
    else:
        _, x, probs, dense, bias, _ = attention_problem(gen)
        objective = AttentionOutputObjective(x, probs, dense, {"o": keep_half(dense["o"], gen)}, head_dim=HEAD_DIM,
                                             v_bias=bias, o_bias=torch.randn(D, dtype=F64, generator=gen),
                                             targets=torch.randn(x.shape, dtype=F64, generator=gen), chunk_size=2)
    (params,) = tuple(p + 0.05 * torch.randn(p.shape, dtype=F64, generator=gen) for p in objective.initial_params())
    _, (grad,) = objective.loss_and_grad((params,))
    weights = objective.weights((params,))
    gram, cross = objective.linear_system(weights)
    name = objective.linear
    expected = (weights[name] @ gram - cross) * objective.keep[name] / (x.shape[0] * x.shape[1])
    assert rel(grad, expected) < TOL


@pytest.mark.parametrize("kind", ["mlp", "attention"])
def test_refit_with_a_solve_lowers_the_error_to_the_least_squares_optimum(kind, gen, monkeypatch):
    objective = mlp_problem(gen)[0] if kind == "mlp" else attention_problem(gen)[0]
    config = AdamConfig(iterations=20, lr=0.02, row_fraction=0.5, sequence_fraction=0.5, seed=3)
    plain = refit_kept_weights(objective, config, check_fraction=1.0)
    result = refit_kept_weights(objective, config, check_fraction=1.0, solve_iterations=200)
    assert plain.error_solved is None and not plain.solved
    assert (result.error_before, result.error_after, result.kept) == (plain.error_before, plain.error_after,
                                                                      plain.kept)
    assert result.solved and result.error_solved < result.error_after
    assert result.error_solved == pytest.approx(objective.squared_error(result.weights) / objective.target_energy)
    name = objective.linear
    for other in objective.names:  # the solve moves only the last weight
        if other != name:
            assert torch.equal(result.weights[other], plain.weights[other])
    gram, cross = objective.linear_system(plain.weights)
    expected = masked_least_squares(gram, cross, objective.keep[name], plain.weights[name], iterations=200,
                                    tol=1e-12)
    assert rel(result.weights[name], expected) < 1e-6
    # the damping pulls toward Adam's weights: a very strong one leaves them nearly in place
    held = refit_kept_weights(objective, config, check_fraction=1.0, solve_iterations=200, solve_percdamp=1e6)
    assert 0 < rel(held.weights[name], plain.weights[name]) < 1e-4
    pruned = objective.keep[name] == 0
    assert torch.equal(result.weights[name][pruned], torch.zeros_like(result.weights[name][pruned]))
    assert not torch.signbit(result.weights[name][pruned]).any()
    # a solve that makes it worse (here: a solver returning zeros) is dropped: Adam's weights come back
    monkeypatch.setattr(layer_objective, "masked_least_squares", lambda gram, cross, keep, start, **_: 0 * start)
    worse = refit_kept_weights(objective, config, check_fraction=1.0, solve_iterations=5)
    assert not worse.solved and worse.error_solved > worse.error_after
    assert all(torch.equal(worse.weights[n], plain.weights[n]) for n in objective.names)
    without = mlp_problem(gen, names=("gate",))[0] if kind == "mlp" else attention_problem(gen, names=("v",))[0]
    with pytest.raises(ValueError, match="solve_iterations needs"):
        refit_kept_weights(without, config, solve_iterations=5)
