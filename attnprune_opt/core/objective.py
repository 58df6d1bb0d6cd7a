"""The paper's loss L(M) = 1/2 ||f(M o W) - f(W)||_F^2 + lambda/2 ||M||_F^2 and its closed-form gradient.

Two forms share one softmax backward:

* :class:`FusedAttentionObjective` -- the mask lives on the fused W = W_Q W_K^T (paper, Def. 1.2 / 3.2).
* :class:`FactoredAttentionObjective` -- masks live on q_proj / k_proj weights (layout (out, in), as stored by
  torch.nn.Linear), per head, with RoPE and grouped KV heads (docs/method.md section 6).

Both are batched over calibration sequences (attention never crosses sequences) and processed chunk by chunk.
The factored form sums its terms per batch in float64 and passes the sums through ``reduce`` (the sum over
processes in a data-parallel run): given one sequence per batch, its loss, gradient and error do not depend on how
the sequences are split across processes (attnprune_opt/distributed.py). With ``normalize=True`` the data term is
averaged over attention rows and the penalty over mask entries, so one lambda and one solver setting mean the same
thing for every sequence length and matrix size; with ``normalize=False`` the loss is exactly the paper's.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from .attention import attention_matrix
from .attention_spec import AttentionSpec, RMSNormSpec, rms_norm, rms_norm_backward
from .rope import apply_rotary, apply_rotary_transpose

Params = tuple[Tensor, ...]
#: Sums a float64 tensor over the processes of a data-parallel run, in place, and returns it.
Reduce = Callable[[Tensor], Tensor]


def local_sum(sums: Tensor) -> Tensor:
    """The sum over processes in a single process: the sums themselves."""
    return sums


def softmax_loss_and_logit_grad(probs: Tensor, target: Tensor) -> tuple[Tensor, Tensor]:
    """Data loss 1/2 ||P - P0||^2 and its gradient w.r.t. the logits, G = P o (R - rowsum(P o R)).

    Masked (causal) entries have P = 0, so G is 0 there without a mask.
    """
    residual = probs - target
    weighted = probs * residual
    grad = weighted - probs * weighted.sum(dim=-1, keepdim=True)
    return 0.5 * residual.pow(2).sum(), grad


def as_batches(x: Tensor | Sequence[Tensor], chunk_size: int | None = None) -> list[Tensor]:
    """Normalise inputs to a list of (b, n, d) batches: one (n, d) sequence, a (B, n, d) tensor split into
    chunks of ``chunk_size`` sequences, or a list of such tensors (sequences of different lengths)."""
    items = [x] if isinstance(x, Tensor) else list(x)
    if not items:
        raise ValueError("no calibration sequences were given")
    batches: list[Tensor] = []
    for item in items:
        if item.dim() == 2:
            item = item.unsqueeze(0)
        if item.dim() != 3 or item.shape[1] == 0 or item.shape[0] == 0:
            raise ValueError(f"expected inputs of shape (n, d) or (B, n, d) with n > 0, got {tuple(item.shape)}")
        step = chunk_size or item.shape[0]
        batches.extend(item.split(step, dim=0))
    return batches


@dataclass(frozen=True)
class _Weights:
    """How the two loss terms are weighted: 1 for the paper's loss, means when normalised."""

    data: float
    penalty: float


class FusedAttentionObjective:
    """L(M) for a mask on the fused d x d weight W = W_Q W_K^T, f(W) = softmax(X W X^T * scaling)."""

    def __init__(
        self,
        x: Tensor | Sequence[Tensor],
        weight: Tensor,
        *,
        scaling: float = 1.0,
        causal: bool = True,
        lam: float = 0.0,
        normalize: bool = True,
        chunk_size: int | None = None,
    ) -> None:
        if weight.dim() != 2 or weight.shape[0] != weight.shape[1]:
            raise ValueError(f"the fused weight must be square (d, d), got {tuple(weight.shape)}")
        self.batches = as_batches(x, chunk_size)
        self.weight = weight
        self.scaling = scaling
        self.causal = causal
        self.lam = lam
        self.targets = [attention_matrix(b, weight, scaling, causal) for b in self.batches]
        rows = sum(b.shape[0] * b.shape[1] for b in self.batches)
        self.weights = _Weights(1.0 / rows, 1.0 / weight.numel()) if normalize else _Weights(1.0, 1.0)

    def initial_params(self) -> Params:
        return (torch.ones_like(self.weight),)

    def attention(self, params: Params) -> list[Tensor]:
        """f(M o W) per batch, for evaluating a (binary or relaxed) mask."""
        (mask,) = params
        return [attention_matrix(b, mask * self.weight, self.scaling, self.causal) for b in self.batches]

    def loss(self, params: Params) -> float:
        (mask,) = params
        data = sum(0.5 * (p - t).pow(2).sum() for p, t in zip(self.attention(params), self.targets))
        return float(self.weights.data * data + 0.5 * self.lam * self.weights.penalty * mask.pow(2).sum())

    def loss_and_grad(self, params: Params) -> tuple[float, Params]:
        """Closed form: grad = scaling * W o sum_b X_b^T G_b X_b + lambda * M (each term weighted)."""
        (mask,) = params
        masked = mask * self.weight
        data = torch.zeros((), dtype=self.weight.dtype, device=self.weight.device)
        xgx = torch.zeros_like(self.weight)
        for batch, target in zip(self.batches, self.targets):
            probs = attention_matrix(batch, masked, self.scaling, self.causal)
            loss, grad_logits = softmax_loss_and_logit_grad(probs, target)
            data = data + loss
            xgx += (batch.transpose(-1, -2) @ grad_logits @ batch).sum(dim=0)
        w = self.weights
        value = w.data * data + 0.5 * self.lam * w.penalty * mask.pow(2).sum()
        grad = w.data * self.scaling * self.weight * xgx + self.lam * w.penalty * mask
        return float(value), (grad,)


@dataclass(frozen=True)
class SampledBatch:
    """The part of one calibration batch a stochastic step sees: some of its sequences (None: all) and some of
    its query rows (None: all), with the weight that makes the sampled sum an unbiased estimate of the full one."""

    batch: int
    sequences: Tensor | None
    rows: Tensor | None
    weight: float


@dataclass(frozen=True)
class SequenceCatalog:
    """Where the sequences of this objective sit among all calibration sequences, so that a sampled step draws the
    same sample however the sequences are split across processes (attnprune_opt/distributed.py).

    ``lengths``: every sequence's length in the canonical order (by length, then original position); ``local``: the
    canonical index of each of this objective's sequences, in the order of its batches.
    """

    lengths: tuple[int, ...]
    local: tuple[int, ...]

    @classmethod
    def of_batches(cls, batches: Sequence[Tensor]) -> SequenceCatalog:
        """The catalog of one process holding every sequence: these batches, in order."""
        lengths = tuple(b.shape[1] for b in batches for _ in range(b.shape[0]))
        return cls(lengths, tuple(range(len(lengths))))

    @classmethod
    def of(cls, lengths: Sequence[int], mine: Sequence[int]) -> SequenceCatalog:
        """From every sequence's length in original order and the original positions of this process's ones."""
        canonical = sorted(range(len(lengths)), key=lambda i: (lengths[i], i))
        position = {original: c for c, original in enumerate(canonical)}
        local = sorted((position[i] for i in mine))
        return cls(tuple(lengths[i] for i in canonical), tuple(local))


@dataclass(frozen=True)
class RowSample:
    """The attention rows one stochastic step computes (every key of a chosen sequence stays)."""

    parts: tuple[SampledBatch, ...]


def sample_rows(batches: Sequence[Tensor], row_fraction: float, sequence_fraction: float,
                generator: torch.Generator, catalog: SequenceCatalog | None = None) -> RowSample:
    """A random share of all sequences of the ``catalog`` (default: those of ``batches``; at least one), and for
    each length among the chosen a random share of the rows (positions, at least one), drawn without replacement;
    the parts that are ``batches``' sequences, each weighted by (sequences / chosen) x (n / m) so that sums over
    the sample are unbiased estimates of sums over every row."""
    catalog = catalog or SequenceCatalog.of_batches(batches)
    lengths = catalog.lengths
    count = max(1, round(sequence_fraction * len(lengths)))
    chosen = set(torch.randperm(len(lengths), generator=generator)[:count].tolist())
    rows = {}
    for n in sorted({lengths[c] for c in chosen}):
        m = max(1, round(row_fraction * n))
        rows[n] = torch.randperm(n, generator=generator)[:m].sort().values
    parts, local = [], iter(catalog.local)
    for i, batch in enumerate(batches):
        seqs = [j for j in range(batch.shape[0]) if next(local) in chosen]
        if seqs:
            n = batch.shape[1]
            parts.append(SampledBatch(i, None if len(seqs) == batch.shape[0] else torch.tensor(seqs), rows[n],
                                      len(lengths) / count * n / len(rows[n])))
    return RowSample(tuple(parts))


def sample_parts(sample: RowSample | None, batch_count: int) -> tuple[SampledBatch, ...]:
    """The parts a step computes: the sample's, or every row of every batch at weight 1."""
    if sample is not None:
        return sample.parts
    return tuple(SampledBatch(i, None, None, 1.0) for i in range(batch_count))


def select_rows(t: Tensor, part: SampledBatch, row_dim: int | None) -> Tensor:
    """The part's sequences (dim 0) of ``t`` and, along ``row_dim`` (None: keep all, e.g. keys), its rows; rows
    are taken first so the unsampled rows of a large tensor are never copied."""
    if part.rows is not None and row_dim is not None:
        t = t.index_select(row_dim, part.rows)
    return t if part.sequences is None else t[part.sequences]


def multihead_attention_probs(x: Tensor, q_weight: Tensor, k_weight: Tensor, spec: AttentionSpec) -> Tensor:
    """Per-head attention probabilities (b, heads, n, n) from q/k projection weights and the block's spec."""
    return _MultiheadForward(x, q_weight, k_weight, spec).probs


class _MultiheadForward:
    """Forward pass of factored attention, keeping what the backward needs.

    ``rows`` (sorted query positions) restricts the queries to a sample: every key stays, so each sampled row of
    the attention matrix is exact, and the cost of the query side and of the logits falls with the sample.
    Query heads are laid out as (kv_heads, group * rows) so one matrix product serves a whole KV group, with no
    repeated copy of the keys.
    """

    def __init__(self, x: Tensor, q_weight: Tensor, k_weight: Tensor, spec: AttentionSpec,
                 rows: Tensor | None = None) -> None:
        b, n, _ = x.shape
        head_dim = spec.head_dim
        self.spec = spec
        self.q_heads = q_weight.shape[0] // head_dim
        self.kv_heads = k_weight.shape[0] // head_dim
        if self.q_heads * head_dim != q_weight.shape[0] or self.kv_heads * head_dim != k_weight.shape[0]:
            raise ValueError(f"q/k output sizes {q_weight.shape[0]}, {k_weight.shape[0]} are not multiples of "
                             f"head_dim={head_dim}")
        if self.q_heads % self.kv_heads:
            raise ValueError(f"{self.q_heads} query heads cannot be grouped over {self.kv_heads} KV heads")
        self.group = self.q_heads // self.kv_heads
        self.x_q = x if rows is None else x[:, rows]
        cos, sin = spec.cos, spec.sin
        self.rope_k = None if cos is None else (cos[:n], sin[:n])
        self.rope_q = self.rope_k if cos is None or rows is None else (cos[rows], sin[rows])
        self.q_side = _Projection(self.x_q, q_weight, spec.q_bias, spec.q_norm, head_dim, self.rope_q)
        self.k_side = _Projection(x, k_weight, spec.k_bias, spec.k_norm, head_dim, self.rope_k)
        # the scale is applied to the queries, which are smaller than the logits
        self.q = spec.logit_scale * self.q_side.heads
        self.k = self.k_side.heads
        logits = (self._grouped(self.q) @ self.k.transpose(-1, -2)).view(b, self.q_heads, self.q.shape[2], n)
        self.capped = None
        if spec.softcap is not None:
            self.capped = torch.tanh(logits / spec.softcap)
            logits = spec.softcap * self.capped
        if spec.causal or spec.window is not None:
            keys = torch.arange(n, device=x.device)
            queries = (keys if rows is None else rows)[:, None]
            hidden = keys > queries if spec.causal else torch.zeros_like(keys > queries)
            if spec.window is not None:
                hidden = hidden | (keys <= queries - spec.window)
            logits = logits.masked_fill(hidden, float("-inf"))
        self.probs = torch.softmax(logits, dim=-1)

    def _grouped(self, t: Tensor) -> Tensor:
        """(b, heads, m, e) -> (b, kv_heads, group * m, e): the query heads of one KV group stacked."""
        b, _, m, e = t.shape
        return t.reshape(b, self.kv_heads, self.group * m, e)

    def backward(self, grad_logits: Tensor) -> tuple[Tensor, Tensor]:
        """Gradients of the loss w.r.t. the effective q/k weights, in (out, in) layout."""
        if self.capped is not None:
            grad_logits = grad_logits * (1 - self.capped.pow(2))
        b, heads, m, head_dim = self.q.shape
        grouped = self._grouped(grad_logits)
        dq = (self.spec.logit_scale * grouped @ self.k).view(b, heads, m, head_dim)
        dk = grouped.transpose(-1, -2) @ self._grouped(self.q)
        return self.q_side.weight_grad(dq), self.k_side.weight_grad(dk)


class _Projection:
    """One side of the logits: x W^T + b, optionally RMS-normalised, split into heads, rotated; and its backward."""

    def __init__(self, x: Tensor, weight: Tensor, bias: Tensor | None, norm: RMSNormSpec | None, head_dim: int,
                 rope: tuple[Tensor, Tensor] | None) -> None:
        self.x, self.norm, self.head_dim, self.rope = x, norm, head_dim, rope
        out = x @ weight.T
        if bias is not None:
            out = out + bias
        self.projected, self.inv_rms = out, None
        if norm is not None:
            out, self.inv_rms = rms_norm(out, norm, head_dim)
        b, n, _ = x.shape
        heads = out.view(b, n, -1, head_dim).transpose(1, 2)
        self.heads = heads if rope is None else apply_rotary(heads, *rope)

    def weight_grad(self, grad_heads: Tensor) -> Tensor:
        """d loss / d W from d loss / d (rotated heads) of shape (b, heads, n, head_dim)."""
        if self.rope is not None:
            grad_heads = apply_rotary_transpose(grad_heads, *self.rope)
        b, n, d = self.x.shape
        grad = grad_heads.transpose(1, 2).reshape(b, n, -1)
        if self.norm is not None:
            grad = rms_norm_backward(grad, self.projected, self.inv_rms, self.norm, self.head_dim)
        return grad.reshape(b * n, -1).T @ self.x.reshape(b * n, d)


class FactoredAttentionObjective:
    """L(M_Q, M_K) = sum_h 1/2 ||P_h(M) - P_h(1)||^2 + lambda/2 (||M_Q||^2 + ||M_K||^2).

    ``q_weight`` (heads*head_dim, d) and ``k_weight`` (kv_heads*head_dim, d) are in nn.Linear layout;
    query head h reads KV head h // (heads / kv_heads); ``spec`` says what else the attention computes (RoPE,
    biases, q/k norms, soft-cap, window). ``optimize`` names which masks are parameters; the other weight stays
    dense.

    In a data-parallel run ``x`` holds this process's sequences, ``catalog`` places them among all, and ``reduce``
    sums over processes: the loss is then normalised over every process's rows. Each batch's float32 terms
    (weighted by the sample) are added in float64 and summed over processes before the result is cast back,
    so with one sequence per batch the figures are those of one process holding every sequence, up to float64
    rounding (float32 terms of similar magnitude add exactly in float64).
    """

    def __init__(
        self,
        x: Tensor | Sequence[Tensor],
        q_weight: Tensor,
        k_weight: Tensor,
        spec: AttentionSpec,
        *,
        lam: float = 0.0,
        normalize: bool = True,
        chunk_size: int | None = None,
        optimize: Sequence[str] = ("q", "k"),
        catalog: SequenceCatalog | None = None,
        reduce: Reduce = local_sum,
    ) -> None:
        if not optimize or set(optimize) - {"q", "k"} or len(set(optimize)) != len(optimize):
            raise ValueError(f"optimize must name 'q' and/or 'k' once each, got {list(optimize)}")
        self.batches = as_batches(x, chunk_size)
        self.q_weight, self.k_weight = q_weight, k_weight
        self.spec = spec
        self.catalog = catalog or SequenceCatalog.of_batches(self.batches)
        lengths = [b.shape[1] for b in self.batches for _ in range(b.shape[0])]
        if [self.catalog.lengths[c] for c in self.catalog.local] != lengths:
            raise ValueError("the sequence catalog does not describe these batches")
        self.optimize = tuple(optimize)
        self.lam = lam
        self.reduce = reduce
        self.targets = [self._forward(b, q_weight, k_weight).probs for b in self.batches]
        heads = q_weight.shape[0] // spec.head_dim
        rows = sum(self.catalog.lengths) * heads  # every process's
        entries = sum(self._weight(name).numel() for name in self.optimize)
        self.weights = _Weights(1.0 / rows, 1.0 / entries) if normalize else _Weights(1.0, 1.0)

    def _weight(self, name: str) -> Tensor:
        return self.q_weight if name == "q" else self.k_weight

    def _forward(self, batch: Tensor, q_weight: Tensor, k_weight: Tensor,
                 rows: Tensor | None = None) -> _MultiheadForward:
        return _MultiheadForward(batch, q_weight, k_weight, self.spec, rows)

    def sample(self, row_fraction: float, sequence_fraction: float, generator: torch.Generator) -> RowSample:
        """A random share of all calibration sequences (at least one), and for each length among the chosen a
        random share of the query rows (at least one), drawn without replacement (see :func:`sample_rows`); the
        draws depend on the catalog only, not on how the sequences are split across processes."""
        return sample_rows(self.batches, row_fraction, sequence_fraction, generator, self.catalog)

    def initial_params(self) -> Params:
        return tuple(torch.ones_like(self._weight(name)) for name in self.optimize)

    def masked_weights(self, params: Params) -> tuple[Tensor, Tensor]:
        masks = dict(zip(self.optimize, params))
        q = self.q_weight * masks["q"] if "q" in masks else self.q_weight
        k = self.k_weight * masks["k"] if "k" in masks else self.k_weight
        return q, k

    def attention(self, params: Params) -> list[Tensor]:
        """Per-batch (b, heads, n, n) attention under the given masks."""
        q, k = self.masked_weights(params)
        return [self._forward(b, q, k).probs for b in self.batches]

    def squared_error(self, q_weight: Tensor, k_weight: Tensor) -> float:
        """||P - P(1)||_F^2 with these effective q/k weights, summed over heads and sequences (the numerator of
        the relative error)."""
        return self._sum((self._forward(b, q_weight, k_weight).probs - t).pow(2).sum()
                         for b, t in zip(self.batches, self.targets))

    @property
    def target_energy(self) -> float:
        """||P(1)||_F^2, the denominator of the relative error."""
        return self._sum(t.pow(2).sum() for t in self.targets)

    def _sum(self, terms) -> float:
        """Per-batch terms added in float64, over every process."""
        total = torch.zeros(1, dtype=torch.float64, device=self.q_weight.device)
        for term in terms:
            total += term
        return float(self.reduce(total))

    def _penalty(self, params: Params) -> Tensor:
        return 0.5 * self.lam * self.weights.penalty * sum(p.pow(2).sum() for p in params)

    def weight_loss(self, q_weight: Tensor, k_weight: Tensor) -> float:
        """The (weighted) data term for attention computed with these effective q/k weights."""
        return self.weights.data * 0.5 * self.squared_error(q_weight, k_weight)

    def weight_loss_and_grad(self, q_weight: Tensor, k_weight: Tensor,
                             sample: RowSample | None = None) -> tuple[float, Tensor, Tensor]:
        """The data term and its gradient w.r.t. the effective q/k weights (nn.Linear layout).

        With a ``sample`` (from :meth:`sample`) only its attention rows are computed, each weighted so that the
        value and the gradient are unbiased estimates of the full ones.
        """
        # one float64 buffer, so that a data-parallel run sums the value and both gradients in one collective
        sums = torch.zeros(1 + q_weight.numel() + k_weight.numel(), dtype=torch.float64, device=q_weight.device)
        data = sums[:1]
        grad_q = sums[1:1 + q_weight.numel()].view(q_weight.shape)
        grad_k = sums[1 + q_weight.numel():].view(k_weight.shape)
        for part in sample_parts(sample, len(self.batches)):
            batch = select_rows(self.batches[part.batch], part, None)
            target = select_rows(self.targets[part.batch], part, 2)
            fwd = self._forward(batch, q_weight, k_weight, part.rows)
            loss, grad_logits = softmax_loss_and_logit_grad(fwd.probs, target)
            gq, gk = fwd.backward(grad_logits)
            data += part.weight * loss
            grad_q += part.weight * gq
            grad_k += part.weight * gk
        self.reduce(sums)
        scale = self.weights.data
        return float(scale * data), (scale * grad_q).to(q_weight.dtype), (scale * grad_k).to(k_weight.dtype)

    def loss(self, params: Params) -> float:
        return self.weight_loss(*self.masked_weights(params)) + float(self._penalty(params))

    def loss_and_grad(self, params: Params) -> tuple[float, Params]:
        """Chain rule through W_eff = M o W: grad_M = W o grad_W_eff + lambda * M (weighted)."""
        data, grad_q, grad_k = self.weight_loss_and_grad(*self.masked_weights(params))
        full = {"q": grad_q * self.q_weight, "k": grad_k * self.k_weight}
        grads = tuple(full[name] + self.lam * self.weights.penalty * p for name, p in zip(self.optimize, params))
        return data + float(self._penalty(params)), grads


class KeptWeightsObjective:
    """The data term as a function of the values of the kept entries, the binary pattern B held fixed.

    Parameters are (V_Q, V_K) for the optimised sides; the weights used are B o V, so pruned entries stay exactly
    zero. Descending it refits the kept weights to the non-linear objective (docs/method.md section 7, extension).
    """

    def __init__(self, objective: FactoredAttentionObjective, keep: dict[str, Tensor],
                 start: dict[str, Tensor]) -> None:
        self.objective = objective
        self.names = tuple(name for name in ("q", "k") if name in keep)
        self.keep = {name: keep[name].to(objective.q_weight.dtype) for name in self.names}
        self.start = start

    def initial_params(self) -> Params:
        return tuple(self.start[name] * self.keep[name] for name in self.names)

    def effective(self, params: Params) -> tuple[Tensor, Tensor]:
        values = dict(zip(self.names, params))
        q = values["q"] * self.keep["q"] if "q" in values else self.objective.q_weight
        k = values["k"] * self.keep["k"] if "k" in values else self.objective.k_weight
        return q, k

    def loss(self, params: Params) -> float:
        return self.objective.weight_loss(*self.effective(params))

    def sample(self, row_fraction: float, sequence_fraction: float, generator: torch.Generator) -> RowSample:
        return self.objective.sample(row_fraction, sequence_fraction, generator)

    def loss_and_grad(self, params: Params, sample: RowSample | None = None) -> tuple[float, Params]:
        """Exact, or estimated from a ``sample`` of the attention rows (FactoredAttentionObjective.sample)."""
        data, grad_q, grad_k = self.objective.weight_loss_and_grad(*self.effective(params), sample)
        grads = {"q": grad_q, "k": grad_k}
        return data, tuple(grads[name] * self.keep[name] for name in self.names)
