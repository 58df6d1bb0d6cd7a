"""Kept-weights objectives for the rest of a decoder layer: the MLP sub-block and the attention output sub-block.

Each fits what a pruned sub-block computes to what the dense one computes, L = 1/2 ||Y - Y0||_F^2 averaged over
tokens, as a function of the values of the kept entries of the optimised weights (the binary patterns held fixed,
pruned entries exactly zero), with closed-form gradients (docs/method.md section 8c):

* :class:`MLPObjective` -- Y = down(act(gate x) * up x) on the sub-block input x (after the post-attention norm).
* :class:`AttentionOutputObjective` -- Y = o_proj(concat_h P_h V_g(h)) with V = v_proj(x) and the attention
  probabilities P fixed (computed from the already pruned q/k), query head h reading KV head h // group.

The targets Y0 default to the dense sub-block on the same inputs; passing them separately lets the inputs come from
the pruned model while the targets come from the dense one. Both are sums over tokens (attention: over query rows,
every key of a chosen sequence kept), so a step can estimate them from a sample (:func:`objective.sample_rows`)
and ``solver.adam`` descends them like the q/k refit. With the other weights fixed, each sub-block's output is
linear in its last weight (down_proj, o_proj): :meth:`_KeptValues.linear_system` gives that least-squares problem's
G and B on every token, which :func:`masked_lstsq.masked_least_squares` solves exactly over the kept entries.
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from .masked_lstsq import masked_least_squares
from .objective import Params, RowSample, as_batches, sample_parts, sample_rows, select_rows
from .solver import AdamConfig, adam

ACTIVATIONS = ("silu", "gelu_tanh", "gelu")
MLP_WEIGHTS = ("gate", "up", "down")
ATTENTION_OUTPUT_WEIGHTS = ("v", "o")


def activation_and_derivative(a: Tensor, name: str) -> tuple[Tensor, Tensor]:
    """act(a) and act'(a), elementwise, for the gated MLP's activations ("gelu_tanh" is GELU's tanh form)."""
    if name == "silu":
        s = torch.sigmoid(a)
        return a * s, s * (1 + a * (1 - s))
    if name == "gelu_tanh":
        c = math.sqrt(2 / math.pi)
        t = torch.tanh(c * (a + 0.044715 * a.pow(3)))
        return 0.5 * a * (1 + t), 0.5 * (1 + t) + 0.5 * a * (1 - t * t) * c * (1 + 3 * 0.044715 * a * a)
    if name == "gelu":
        cdf = 0.5 * (1 + torch.erf(a / math.sqrt(2)))
        return a * cdf, cdf + a * torch.exp(-0.5 * a * a) / math.sqrt(2 * math.pi)
    raise ValueError(f"activation must be one of {', '.join(ACTIVATIONS)}, got {name!r}")


def _aligned(t: Tensor | Sequence[Tensor], batches: list[Tensor], chunk_size: int | None, what: str,
             leading: int) -> list[Tensor]:
    """A per-batch companion of ``batches`` (targets, probabilities), split the same way and checked against it."""
    items = [t] if isinstance(t, Tensor) else list(t)
    items = [item.unsqueeze(0) if item.dim() == leading - 1 else item for item in items]
    out = [piece for item in items for piece in item.split(chunk_size or item.shape[0], dim=0)]
    if len(out) != len(batches) or any(o.shape[0] != b.shape[0] or o.shape[-2] != b.shape[1]
                                       for o, b in zip(out, batches)):
        raise ValueError(f"{what} do not match the inputs: shapes {[tuple(o.shape) for o in out]} against "
                         f"{[tuple(b.shape) for b in batches]}")
    return out


class _KeptValues(ABC):
    """Parameters are the values of the kept entries of the optimised weights; the weights used are B o V, so
    pruned entries stay exactly zero (their gradient is zero, and Adam leaves a zero-gradient entry in place).

    Subclasses give ``batches`` (b, n, d), ``targets``, ``_data_loss_and_grad(weights, sample)``, the name of the
    weight the output is linear in (``linear``) and ``_features(batch, weights)``.
    """

    batches: list[Tensor]
    targets: list[Tensor]
    linear: str

    def __init__(self, dense: Mapping[str, Tensor], keep: Mapping[str, Tensor], start: Mapping[str, Tensor] | None,
                 allowed: tuple[str, ...]) -> None:
        unknown = sorted(set(keep) - set(allowed))
        missing = sorted(set(allowed) - set(dense))
        if unknown or not keep:
            raise ValueError(f"keep must name some of {', '.join(allowed)}, got {sorted(keep)}")
        if missing:
            raise ValueError(f"dense weights missing: {', '.join(missing)}")
        start = dict(start or {})
        self.names = tuple(name for name in allowed if name in keep)
        self.dense = {name: dense[name] for name in allowed}
        self.fixed = {name: start.get(name, self.dense[name]) for name in allowed}
        for name in self.names:
            if keep[name].shape != self.dense[name].shape:
                raise ValueError(f"keep[{name!r}] has shape {tuple(keep[name].shape)}, the weight "
                                 f"{tuple(self.dense[name].shape)}")
        self.keep = {name: keep[name].to(dtype=self.dense[name].dtype) for name in self.names}

    def initial_params(self) -> Params:
        return tuple(self.fixed[name].masked_fill(self.keep[name] == 0, 0.0) for name in self.names)

    def weights(self, params: Params) -> dict[str, Tensor]:
        """Every weight of the sub-block: the optimised ones from ``params`` (B o V), the others fixed."""
        return {**self.fixed, **{name: p * self.keep[name] for name, p in zip(self.names, params)}}

    @property
    def tokens(self) -> int:
        return sum(b.shape[0] * b.shape[1] for b in self.batches)

    def sample(self, row_fraction: float, sequence_fraction: float, generator: torch.Generator) -> RowSample:
        """A share of the sequences and of their tokens (query rows), unbiasedly weighted."""
        return sample_rows(self.batches, row_fraction, sequence_fraction, generator)

    @abstractmethod
    def _data_loss_and_grad(self, weights: dict[str, Tensor], sample: RowSample | None,
                            names: tuple[str, ...]) -> tuple[Tensor, dict[str, Tensor]]:
        """Half the squared error (over ``sample``'s rows, or all) and its gradient w.r.t. ``names``' weights."""

    def squared_error(self, weights: Mapping[str, Tensor], sample: RowSample | None = None) -> float:
        """||Y - Y0||_F^2 over every token with these weights (the numerator of the relative error), or its
        unbiased estimate from a ``sample`` (one fixed sample compares two sets of weights at a fraction of the
        cost)."""
        value, _ = self._data_loss_and_grad({**self.fixed, **weights}, sample, ())
        return 2 * float(value)

    @property
    def target_energy(self) -> float:
        """||Y0||_F^2, the denominator of the relative error."""
        return float(sum(t.pow(2).sum() for t in self.targets))

    @abstractmethod
    def _features(self, batch: int, weights: Mapping[str, Tensor]) -> tuple[Tensor, Tensor]:
        """The ``linear`` weight's input features and its targets (bias removed) on one batch, every token."""

    def linear_system(self, weights: Mapping[str, Tensor]) -> tuple[Tensor, Tensor]:
        """G = F^T F and B = (Y0 - bias)^T F over every token, F the input features of the ``linear`` weight with
        the other ``weights`` as given: ||Y - Y0||^2 = ||F W^T - (Y0 - bias)||^2 is quadratic in that weight, with
        gradient W G - B."""
        weights = {**self.fixed, **weights}
        gram = cross = None
        for batch in range(len(self.batches)):
            features, targets = self._features(batch, weights)
            gram = features.T @ features if gram is None else gram + features.T @ features
            cross = targets.T @ features if cross is None else cross + targets.T @ features
        return gram, cross

    def loss(self, params: Params) -> float:
        value, _ = self._data_loss_and_grad(self.weights(params), None, ())
        return float(value) / self.tokens

    def loss_and_grad(self, params: Params, sample: RowSample | None = None) -> tuple[float, Params]:
        """Exact, or estimated from a ``sample`` (:meth:`sample`): value and gradient per kept value."""
        value, grads = self._data_loss_and_grad(self.weights(params), sample, self.names)
        scale = 1.0 / self.tokens
        return float(value) * scale, tuple(grads[name].mul_(scale).mul_(self.keep[name]) for name in self.names)


class MLPObjective(_KeptValues):
    """L = 1/(2T) sum_t ||down(act(gate x_t) * up x_t) - y0_t||^2 over the kept values of ``keep``'s weights.

    ``dense``: "gate", "up" (f, d) and "down" (d, f) in nn.Linear layout; ``keep``: boolean keep-masks of the
    optimised weights (any non-empty subset); ``start``: the weights to start from (and, for weights not
    optimised, to hold fixed), dense where not given. ``x``: (n, d), (B, n, d) or a list of such.
    ``targets``: Y0 laid out like ``x``; default: the dense sub-block on ``x``.
    Gradients, with R = Y - Y0, A = X W_g^T, U = X W_u^T, H = act(A) o U:
    dW_d = R^T H,  dW_u = (R W_d o act(A))^T X,  dW_g = (R W_d o U o act'(A))^T X.
    """

    linear = "down"

    def __init__(self, x: Tensor | Sequence[Tensor], dense: Mapping[str, Tensor], keep: Mapping[str, Tensor], *,
                 start: Mapping[str, Tensor] | None = None, targets: Tensor | Sequence[Tensor] | None = None,
                 activation: str = "silu", chunk_size: int | None = None) -> None:
        activation_and_derivative(torch.zeros(1), activation)  # a named error before any work
        super().__init__(dense, keep, start, MLP_WEIGHTS)
        self.activation = activation
        self.batches = as_batches(x, chunk_size)
        if targets is None:
            self.targets = [self._forward(b.reshape(-1, b.shape[-1]), self.dense)[0].view(*b.shape[:2], -1)
                            for b in self.batches]
        else:
            self.targets = _aligned(targets, self.batches, chunk_size, "MLP targets", 3)

    def _forward(self, x: Tensor, w: Mapping[str, Tensor]) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
        a = x @ w["gate"].T
        u = x @ w["up"].T
        act, dact = activation_and_derivative(a, self.activation)
        h = act * u
        return h @ w["down"].T, h, u, act, dact

    def _features(self, batch: int, weights: Mapping[str, Tensor]) -> tuple[Tensor, Tensor]:
        x = self.batches[batch].reshape(-1, self.batches[batch].shape[-1])
        return self._forward(x, weights)[1], self.targets[batch].reshape(x.shape[0], -1)

    def _data_loss_and_grad(self, weights: dict[str, Tensor], sample: RowSample | None,
                            names: tuple[str, ...]) -> tuple[Tensor, dict[str, Tensor]]:
        value = torch.zeros((), dtype=weights["down"].dtype)
        grads: dict[str, Tensor] = {}
        for part in sample_parts(sample, len(self.batches)):
            x = select_rows(self.batches[part.batch], part, 1)
            x = x.reshape(-1, x.shape[-1])
            y0 = select_rows(self.targets[part.batch], part, 1).reshape(x.shape[0], -1)
            y, h, u, act, dact = self._forward(x, weights)
            r = y - y0
            value += part.weight * 0.5 * r.pow(2).sum()
            if not names:
                continue
            r = part.weight * r
            if "down" in names:
                _accumulate(grads, "down", r.T @ h)
            dh = r @ weights["down"]
            if "up" in names:
                _accumulate(grads, "up", (dh * act).T @ x)
            if "gate" in names:
                _accumulate(grads, "gate", (dh * u * dact).T @ x)
        return value, {name: grads[name] if name in grads else torch.zeros_like(weights[name]) for name in names}


class AttentionOutputObjective(_KeptValues):
    """L = 1/(2T) sum_t ||o_proj(concat_h P_h V_g(h))_t - y0_t||^2 over the kept values of v_proj / o_proj.

    ``probs``: per-head attention probabilities (b, heads, n, n) per batch of ``x``, held fixed; ``dense``: "v"
    (kv_heads * head_dim, d) and "o" (d, heads * head_dim); query head h reads KV head h // (heads / kv_heads).
    ``v_bias``/``o_bias`` are optional and fixed. ``keep``/``start``/``targets`` as in :class:`MLPObjective`
    (default targets: the dense v/o with these probabilities). Gradients, with Z = concat_h P_h V_g(h) and
    dZ = R W_o: dW_o = R^T Z, dV_g = sum_{h in g} P_h^T dZ_h, dW_v = dV^T X. A sampled step takes query rows of
    P (their V needs every key of the sequence).
    """

    linear = "o"

    def __init__(self, x: Tensor | Sequence[Tensor], probs: Tensor | Sequence[Tensor], dense: Mapping[str, Tensor],
                 keep: Mapping[str, Tensor], *, head_dim: int, start: Mapping[str, Tensor] | None = None,
                 v_bias: Tensor | None = None, o_bias: Tensor | None = None,
                 targets: Tensor | Sequence[Tensor] | None = None, chunk_size: int | None = None) -> None:
        super().__init__(dense, keep, start, ATTENTION_OUTPUT_WEIGHTS)
        self.head_dim = head_dim
        self.kv_heads, rem_v = divmod(self.dense["v"].shape[0], head_dim)
        self.heads, rem_o = divmod(self.dense["o"].shape[1], head_dim)
        if rem_v or rem_o or not self.kv_heads or self.heads % self.kv_heads:
            raise ValueError(f"v_proj rows {self.dense['v'].shape[0]} and o_proj columns {self.dense['o'].shape[1]} "
                             f"do not form whole heads of head_dim={head_dim} grouped over KV heads")
        self.group = self.heads // self.kv_heads
        self.v_bias, self.o_bias = v_bias, o_bias
        self.batches = as_batches(x, chunk_size)
        self.probs = _aligned(probs, self.batches, chunk_size, "attention probabilities", 4)
        if any(p.shape[1] != self.heads for p in self.probs):
            raise ValueError(f"attention probabilities must have {self.heads} heads, got "
                             f"{sorted({p.shape[1] for p in self.probs})}")
        if targets is None:
            self.targets = [self._forward(b, p, self.dense)[0] for b, p in zip(self.batches, self.probs)]
        else:
            self.targets = _aligned(targets, self.batches, chunk_size, "attention output targets", 3)

    def _forward(self, x: Tensor, probs: Tensor, w: Mapping[str, Tensor]) -> tuple[Tensor, Tensor, Tensor]:
        """Outputs (b, m, d) for the query rows of ``probs`` (b, heads, m, n), the heads' outputs Z (b, m,
        heads*head_dim), and the probabilities grouped per KV head (b, kv_heads, group*m, n)."""
        b, n, _ = x.shape
        m = probs.shape[2]
        v = x @ w["v"].T
        if self.v_bias is not None:
            v = v + self.v_bias
        v = v.view(b, n, self.kv_heads, self.head_dim).transpose(1, 2)
        grouped = probs.reshape(b, self.kv_heads, self.group * m, n)
        z = (grouped @ v).view(b, self.heads, m, self.head_dim).transpose(1, 2).reshape(b, m, -1)
        y = z @ w["o"].T
        if self.o_bias is not None:
            y = y + self.o_bias
        return y, z, grouped

    def _features(self, batch: int, weights: Mapping[str, Tensor]) -> tuple[Tensor, Tensor]:
        z = self._forward(self.batches[batch], self.probs[batch], weights)[1]
        targets = self.targets[batch] - (0 if self.o_bias is None else self.o_bias)
        return z.reshape(-1, z.shape[-1]), targets.reshape(z.shape[0] * z.shape[1], -1)

    def _data_loss_and_grad(self, weights: dict[str, Tensor], sample: RowSample | None,
                            names: tuple[str, ...]) -> tuple[Tensor, dict[str, Tensor]]:
        value = torch.zeros((), dtype=weights["o"].dtype)
        grads: dict[str, Tensor] = {}
        for part in sample_parts(sample, len(self.batches)):
            x = select_rows(self.batches[part.batch], part, None)
            probs = select_rows(self.probs[part.batch], part, 2)
            y0 = select_rows(self.targets[part.batch], part, 1)
            y, z, grouped = self._forward(x, probs, weights)
            r = y - y0
            value += part.weight * 0.5 * r.pow(2).sum()
            if not names:
                continue
            b, m, d = r.shape
            r = (part.weight * r).reshape(b * m, d)
            if "o" in names:
                _accumulate(grads, "o", r.T @ z.reshape(b * m, -1))
            if "v" in names:
                dz = (r @ weights["o"]).view(b, m, self.heads, self.head_dim).transpose(1, 2)
                dz = dz.reshape(b, self.kv_heads, self.group * m, self.head_dim)
                dv = (grouped.transpose(-1, -2) @ dz).transpose(1, 2).reshape(b * x.shape[1], -1)
                _accumulate(grads, "v", dv.T @ x.reshape(b * x.shape[1], -1))
        return value, {name: grads[name] if name in grads else torch.zeros_like(weights[name]) for name in names}


@dataclass(frozen=True)
class RefitResult:
    """Fitted weights of the optimised names (pruned entries exactly +0.0), the relative errors before and after
    Adam (on the check sample) and whether its result was kept; with a least-squares solve, the error after it
    (None without) and whether it was kept."""

    weights: dict[str, Tensor]
    error_before: float
    error_after: float
    kept: bool
    error_solved: float | None = None
    solved: bool = False


def refit_kept_weights(objective: MLPObjective | AttentionOutputObjective, config: AdamConfig,
                       check_fraction: float = 0.25, solve_iterations: int = 0,
                       solve_percdamp: float = 0.01) -> RefitResult:
    """Adam on the kept values (each weight's step relative to its RMS), kept only if it lowers the relative error
    ||Y - Y0||^2 / ||Y0||^2, compared on one fixed sample of ``check_fraction`` of every sequence's tokens (exact
    at 1), drawn from ``config.seed``. With ``solve_iterations``, the weight the output is linear in
    (``objective.linear``, which must be optimised) is then solved for by masked least squares on every token, the
    others as Adam left them (at most that many conjugate-gradient steps, damped toward Adam's values by
    ``solve_percdamp`` of mean diag G), kept only if it lowers the error too."""
    if not 0 < check_fraction <= 1:
        raise ValueError(f"check_fraction must be in (0, 1], got {check_fraction}")
    if solve_iterations and objective.linear not in objective.names:
        raise ValueError(f"solve_iterations needs {objective.linear!r} optimised, got {', '.join(objective.names)}")
    start = objective.initial_params()
    check = None if check_fraction == 1 else objective.sample(check_fraction, 1.0,
                                                              torch.Generator().manual_seed(config.seed))
    energy = objective.target_energy

    def error(weights: Mapping[str, Tensor]) -> float:
        return objective.squared_error(weights, check) / energy

    scales = tuple(float(objective.dense[name].pow(2).mean().sqrt()) or 1.0 for name in objective.names)
    fitted = adam(objective, config, scales).masks
    before, after = error(objective.weights(start)), error(objective.weights(fitted))
    chosen = objective.weights(fitted if after < before else start)
    solved_error, solved = None, False
    if solve_iterations:
        name = objective.linear
        gram, cross = objective.linear_system(chosen)
        candidate = {**chosen, name: masked_least_squares(gram, cross, objective.keep[name], chosen[name],
                                                          iterations=solve_iterations, percdamp=solve_percdamp)}
        solved_error = error(candidate)
        solved = solved_error < min(before, after)
        chosen = candidate if solved else chosen
    weights = {name: chosen[name].masked_fill(objective.keep[name] == 0, 0.0) for name in objective.names}
    return RefitResult(weights, before, after, after < before, solved_error, solved)


def _accumulate(grads: dict[str, Tensor], name: str, part: Tensor) -> None:
    """Add one part's gradient; the first is kept as computed (the same values as adding it to zeros, without a
    zeroed copy per weight and step, which at 7B shapes is 180 MB of fresh pages each)."""
    if name in grads:
        grads[name] += part
    else:
        grads[name] = part
