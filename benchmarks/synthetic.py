"""The paper's synthetic study (its Figure 2): relative error of the attention matrix against lambda, n and rho.

Setting (stated, not tuned): d = 64; W_Q, W_K in R^{d x k} with k in {16, 64} and i.i.d. N(0, 1/d) entries;
calibration X of n tokens and held-out X' of 4 x n tokens, both i.i.d. N(0, 1); logits scaled by 1/sqrt(k), so a
logit has standard deviation 1; causal attention. Every error is ||f~ - f||_F^2 / ||f||_F^2 of binarised
masks, reported on the held-out inputs (``relative_error``) and on the calibration inputs
(``relative_error_calibration``).

Methods
  ours_factored    masks on W_Q and W_K from the non-linear objective (the form that a model can store)
  ours_fused       the paper's form: one mask on the fused W = W_Q W_K^T (d^2 entries: another budget)
  wanda, sparsegpt the paper's "linear pruning": W_Q and W_K pruned separately to keep X W_Q, X W_K
  magnitude        |W| on W_Q and W_K;  magnitude_fused: |W| on the fused W (ours_fused's fair reference)
  *_relaxed        the relaxed M o W before binarisation; NOT a pruning (every weight rescaled), shown only
                   to explain the gap between the paper's figure and binary masks.

Usage: python benchmarks/synthetic.py [--quick] --out DIR [--overwrite]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import torch

from attnprune_opt.atomic import atomic_output_dir, check_output_dir
from attnprune_opt.core import (
    FactoredAttentionObjective,
    FusedAttentionObjective,
    InputStatistics,
    SolverConfig,
    attention_matrix,
    binarize,
    magnitude_mask,
    multihead_attention_probs,
    relative_error,
    solve,
    sparsegpt,
    wanda_mask,
)

D = 64
HELD_OUT_SEQUENCES = 4
DEFAULTS = {"n": 128, "lambda": 0.01, "rho": 0.5}
SOLVER = SolverConfig(iterations=200)
BASELINES = ("wanda", "sparsegpt", "magnitude")
NOT_PRUNING = ("ours_factored_relaxed", "ours_fused_relaxed")


@dataclass(frozen=True)
class Plan:
    ks: tuple[int, ...]
    seeds: tuple[int, ...]
    sweeps: dict[str, tuple[float, ...]]


QUICK = Plan(ks=(16, 64), seeds=(0, 1), sweeps={
    "lambda": (0.001, 0.01, 0.1, 1.0), "n": (32, 128, 512), "rho": (0.3, 0.5, 0.7, 0.9)})
FULL = Plan(ks=(16, 64), seeds=(0, 1, 2, 3, 4), sweeps={
    "lambda": (0.0001, 0.001, 0.003, 0.01, 0.03, 0.1, 0.3, 1.0), "n": (16, 32, 64, 128, 256, 512, 1024),
    "rho": (0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9)})


@dataclass(frozen=True)
class Problem:
    k: int
    x: torch.Tensor
    x_test: torch.Tensor
    wq: torch.Tensor  # (k, d): nn.Linear layout of W_Q^T
    wk: torch.Tensor

    @property
    def fused(self) -> torch.Tensor:
        return self.wq.T @ self.wk

    def factored_errors(self, wq: torch.Tensor, wk: torch.Tensor) -> tuple[float, float]:
        """(held-out, calibration) relative error of attention with the given (pruned) W_Q, W_K."""
        return tuple(float(relative_error(multihead_attention_probs(x, wq, wk, head_dim=self.k),
                                          multihead_attention_probs(x, self.wq, self.wk, head_dim=self.k)))
                     for x in (self.x_test, self.x))

    def fused_errors(self, w: torch.Tensor) -> tuple[float, float]:
        scaling = self.k**-0.5
        return tuple(float(relative_error(attention_matrix(x, w, scaling), attention_matrix(x, self.fused, scaling)))
                     for x in (self.x_test, self.x))


@lru_cache(maxsize=None)
def make_problem(k: int, n: int, seed: int) -> Problem:
    g = torch.Generator().manual_seed(seed)
    wq = torch.randn(k, D, generator=g) / D**0.5
    wk = torch.randn(k, D, generator=g) / D**0.5
    x = torch.randn(1, n, D, generator=g)
    x_test = torch.randn(HELD_OUT_SEQUENCES, n, D, generator=g)
    return Problem(k, x, x_test, wq, wk)


@lru_cache(maxsize=None)
def baseline_errors(k: int, n: int, rho: float, seed: int) -> dict[str, tuple[float, float]]:
    p = make_problem(k, n, seed)
    stats = InputStatistics(D)
    stats.update(p.x)
    q_sgpt, _ = sparsegpt(p.wq, stats.hessian, rho)
    k_sgpt, _ = sparsegpt(p.wk, stats.hessian, rho)
    fused = p.fused
    return {
        "wanda": p.factored_errors(p.wq * wanda_mask(p.wq, stats.column_norms, rho),
                                   p.wk * wanda_mask(p.wk, stats.column_norms, rho)),
        "sparsegpt": p.factored_errors(q_sgpt, k_sgpt),
        "magnitude": p.factored_errors(p.wq * magnitude_mask(p.wq, rho), p.wk * magnitude_mask(p.wk, rho)),
        "magnitude_fused": p.fused_errors(fused * magnitude_mask(fused, rho)),
    }


@lru_cache(maxsize=None)
def relaxed_masks(k: int, n: int, lam: float, seed: int) -> tuple[tuple[torch.Tensor, ...], torch.Tensor]:
    """M_T of the factored (M_Q, M_K) and the fused descent; depends on lambda but not on rho."""
    p = make_problem(k, n, seed)
    factored = solve(FactoredAttentionObjective(p.x, p.wq, p.wk, head_dim=k, lam=lam), SOLVER).masks
    fused = solve(FusedAttentionObjective(p.x, p.fused, scaling=k**-0.5, lam=lam), SOLVER).masks[0]
    return factored, fused


def our_errors(k: int, n: int, lam: float, rho: float, seed: int) -> dict[str, tuple[float, float]]:
    p = make_problem(k, n, seed)
    (mq, mk), mf = relaxed_masks(k, n, lam, seed)
    fused = p.fused
    return {
        "ours_factored": p.factored_errors(p.wq * binarize(mq, p.wq, rho), p.wk * binarize(mk, p.wk, rho)),
        "ours_fused": p.fused_errors(fused * binarize(mf, fused, rho)),
        "ours_factored_relaxed": p.factored_errors(p.wq * mq, p.wk * mk),
        "ours_fused_relaxed": p.fused_errors(fused * mf),
    }


def run(plan: Plan) -> list[dict]:
    records = []
    for sweep, values in plan.sweeps.items():
        for k in plan.ks:
            for value in values:
                point = {**DEFAULTS, sweep: value}
                n, lam, rho = int(point["n"]), float(point["lambda"]), float(point["rho"])
                for seed in plan.seeds:
                    results = {**baseline_errors(k, n, rho, seed), **our_errors(k, n, lam, rho, seed)}
                    for method, (held_out, calibration) in results.items():
                        records.append({"sweep": sweep, "k": k, "n": n, "lambda": lam, "rho": rho,
                                        "method": method, "relative_error": held_out,
                                        "relative_error_calibration": calibration, "seed": seed,
                                        "is_pruning": method not in NOT_PRUNING})
    return records


def mean_error(records: list[dict], key: str = "relative_error", **where) -> dict[str, float]:
    """Mean over seeds of ``key`` per method, for the records matching ``where``."""
    groups: dict[str, list[float]] = {}
    for r in records:
        if all(r[name] == value for name, value in where.items()):
            groups.setdefault(r["method"], []).append(r[key])
    return {method: statistics.fmean(values) for method, values in groups.items()}


def markdown_table(records: list[dict]) -> str:
    lines = [f"Defaults: d = {D}, n = {DEFAULTS['n']}, lambda = {DEFAULTS['lambda']}, rho = {DEFAULTS['rho']}; "
             f"mean over seeds. Ratios divide by the best linear baseline (min of {', '.join(BASELINES)}); "
             "ours_fused is also divided by magnitude_fused, its same-budget reference.", ""]
    for k in sorted({r["k"] for r in records}):
        where = dict(sweep="rho", k=k, rho=DEFAULTS["rho"])
        held = mean_error(records, **where)
        calib = mean_error(records, "relative_error_calibration", **where)
        best = min(held[b] for b in BASELINES)
        best_calib = min(calib[b] for b in BASELINES)
        lines += [f"### k = {k}", "",
                  "| method | held-out error | ÷ best baseline | calibration error | ÷ best baseline |",
                  "|---|---|---|---|---|"]
        for method in held:
            note = " (not a pruning)" if method in NOT_PRUNING else ""
            lines.append(f"| {method}{note} | {held[method]:.4f} | {held[method] / best:.3f} | "
                         f"{calib[method]:.4f} | {calib[method] / best_calib:.3f} |")
        lines.append(f"| ours_fused ÷ magnitude_fused | {held['ours_fused'] / held['magnitude_fused']:.3f} | | "
                     f"{calib['ours_fused'] / calib['magnitude_fused']:.3f} | |")
        lines.append("")
    return "\n".join(lines)


def plot(records: list[dict], path: Path, key: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ks = sorted({r["k"] for r in records})
    sweeps = ("lambda", "n", "rho")
    fig, axes = plt.subplots(len(ks), 3, figsize=(15, 4.2 * len(ks)), squeeze=False)
    methods = [m for m in dict.fromkeys(r["method"] for r in records)]
    for row, k in enumerate(ks):
        for col, sweep in enumerate(sweeps):
            ax = axes[row][col]
            xs = sorted({r[sweep] for r in records if r["sweep"] == sweep and r["k"] == k})
            for method in methods:
                ys = [mean_error(records, key, sweep=sweep, k=k, method=method, **{sweep: x})[method] for x in xs]
                style = ":" if method in NOT_PRUNING else ("-" if method.startswith("ours") else "--")
                ax.plot(xs, ys, style, marker="o", markersize=3, label=method)
            if sweep in ("lambda", "n"):
                ax.set_xscale("log")
                ax.minorticks_off()
            ax.set_xticks(xs, [f"{x:g}" for x in xs])
            ax.set_yscale("log")
            ax.set_xlabel({"lambda": "λ", "n": "sequence length n", "rho": "pruning ratio ρ"}[sweep])
            ax.set_ylabel("relative error")
            ax.set_title(f"k = {k}: error vs {sweep}")
            ax.grid(alpha=0.3)
    axes[0][0].legend(fontsize=7)
    where = "held-out inputs" if key == "relative_error" else "calibration inputs"
    fig.suptitle(f"Relative attention error on {where} (d = {D}; defaults n = {DEFAULTS['n']}, "
                 f"λ = {DEFAULTS['lambda']}, ρ = {DEFAULTS['rho']})")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="fewer points and seeds (well under a minute)")
    parser.add_argument("--out", type=Path, required=True, help="output folder (created atomically)")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing output folder")
    args = parser.parse_args(argv)
    check_output_dir(args.out, args.overwrite)
    torch.set_num_threads(1)  # small matrices: threads only add overhead, and results stay reproducible
    start = time.perf_counter()
    records = run(QUICK if args.quick else FULL)
    table = markdown_table(records)
    with atomic_output_dir(args.out, args.overwrite) as tmp:
        (tmp / "synthetic.json").write_text(json.dumps(records, indent=1))
        (tmp / "synthetic.md").write_text(f"# Synthetic study (paper Figure 2)\n\n{table}\n")
        plot(records, tmp / "synthetic.png", "relative_error")
        plot(records, tmp / "synthetic_calibration.png", "relative_error_calibration")
    print(table)
    print(f"wrote {args.out}/synthetic.json, synthetic.md, synthetic.png, synthetic_calibration.png "
          f"({len(records)} records, {time.perf_counter() - start:.1f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
