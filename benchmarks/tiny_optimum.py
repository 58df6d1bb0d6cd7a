"""How far the binarised descent lands from the exact optimum, on tiny instances where every mask is enumerated.

Fused form (paper Def. 1.2), d = 4: W has 16 entries, so all C(16, 8) = 12,870 masks at 50% are scored. X has
16 tokens, X and W i.i.d. N(0, 1), logits scaled by 0.5, causal. For each instance: the exact optimum, the
descent (lambda on the normalised loss, 300 iterations) binarised per matrix by M and by M * |W|, and
magnitude pruning of W. Prints the distribution of error / optimum.

Usage: python benchmarks/tiny_optimum.py [--instances 30] [--lam 0.1]
"""

from __future__ import annotations

import argparse
import statistics

import torch

from attnprune_opt.core import FusedAttentionObjective, SolverConfig, binarize, solve
from attnprune_opt.core.exhaustive import all_masks, fused_mask_errors

SCALING = 0.5


def ratios(instances: int, lam: float) -> dict[str, list[float]]:
    masks = all_masks((4, 4), 0.5)
    out: dict[str, list[float]] = {"gd_mask": [], "gd_mask_weight": [], "magnitude": []}
    for seed in range(instances):
        g = torch.Generator().manual_seed(seed)
        x = torch.randn(16, 4, dtype=torch.float64, generator=g)
        w = torch.randn(4, 4, dtype=torch.float64, generator=g)
        optimum = fused_mask_errors(x, w, masks, SCALING).min()
        relaxed = solve(FusedAttentionObjective(x, w, scaling=SCALING, lam=lam), SolverConfig(iterations=300))
        candidates = {
            "gd_mask": binarize(relaxed.masks[0], w, 0.5, group="matrix", score="mask"),
            "gd_mask_weight": binarize(relaxed.masks[0], w, 0.5, group="matrix", score="mask_weight"),
            "magnitude": binarize(torch.ones_like(w), w, 0.5, group="matrix"),
        }
        for name, keep in candidates.items():
            out[name].append(float(fused_mask_errors(x, w, keep[None], SCALING)[0] / optimum))
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--instances", type=int, default=30)
    parser.add_argument("--lam", type=float, default=0.1)
    args = parser.parse_args()
    print(f"error / exact optimum over {args.instances} instances (d = 4, rho = 0.5, lambda = {args.lam})")
    print("| method | mean | median | p90 | max | exactly optimal |")
    print("|---|---|---|---|---|---|")
    for name, values in ratios(args.instances, args.lam).items():
        deciles = statistics.quantiles(values, n=10)
        optimal = sum(v < 1 + 1e-9 for v in values)
        print(f"| {name} | {statistics.fmean(values):.3f} | {statistics.median(values):.3f} | {deciles[-1]:.3f} | "
              f"{max(values):.3f} | {optimal}/{len(values)} |")


if __name__ == "__main__":
    main()
