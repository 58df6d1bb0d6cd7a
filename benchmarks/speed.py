"""Where the method's time goes, and what each refit solver buys per second.

For a few decoder layers of the default model (SmolLM2-135M), with the dense model's inputs captured for the
calibration set (C4 rows 0-7 x 512 tokens, the standard protocol) and a development set (C4 rows 1128-1135, 256
tokens; held out, never the test rows):

* parts: wall time of each part of the method on one layer -- capture (the dense layer's forward with the q_proj
  input recorded), pattern (Wanda's scores and the per-row top-k), one refit step split into forward / loss /
  backward / update for exact and for sampled steps, and one evaluation of the exact calibration error;
* curves: development attention error (÷ the better of Wanda and SparseGPT on that layer) against the refit's
  wall time, for each solver variant, checkpoints every few steps (checkpoint evaluation is not timed).

Writes speed.json, speed.md and speed.png into --out.
Usage: python benchmarks/speed.py --out DIR [--layers 2 15 28] [--steps 100] [--overwrite]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from dataclasses import replace
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import torch  # noqa: E402

from attnprune_opt.atomic import atomic_output_dir, check_output_dir  # noqa: E402
from attnprune_opt.config import PruneRule  # noqa: E402
from attnprune_opt.methods.attention import AttentionSettings  # noqa: E402
from attnprune_opt.core import softmax_loss_and_logit_grad  # noqa: E402
from attnprune_opt.methods.attention import _keep, _Layer, apply_mask, refit_config  # noqa: E402
from tuning import LayerData, attention_error, baselines, capture  # noqa: E402

SPARSITY = 0.5
TARGETS = ("q_proj", "k_proj")
CHECKPOINT_EVERY = 5
DEFAULTS = AttentionSettings()
VARIANTS = {
    "exact steps (0.1 default)": dict(row_fraction=1.0),
    "rows 1/4": dict(row_fraction=0.25),
    "rows 1/8": dict(row_fraction=0.125),
    "rows 1/16": dict(row_fraction=0.0625),
    "rows 1/8, sequences 1/2 (default)": dict(row_fraction=0.125, sequence_fraction=0.5),
}


def _timed(fn, repeats: int = 5) -> float:
    """Mean wall seconds of ``fn()`` after one warm-up call."""
    fn()
    start = time.perf_counter()
    for _ in range(repeats):
        fn()
    return (time.perf_counter() - start) / repeats


def _setup(data: LayerData) -> tuple[_Layer, dict, dict]:
    rules = {name: PruneRule(modules=(name,), method="attention", sparsity=SPARSITY) for name in TARGETS}
    layer = _Layer(data.weights, data.calibration, TARGETS, DEFAULTS.lam)
    norms = layer.input_statistics(data.calibration, hessian=False).column_norms.float()
    keep = {n: _keep(layer.dense[n].abs() * norms, rules[n], DEFAULTS, layer.head_dim) for n in TARGETS}
    return layer, keep, {n: apply_mask(layer.dense[n], keep[n]) for n in TARGETS}


def parts(data: LayerData) -> dict[str, float]:
    """Seconds of each part of the method on this layer."""
    layer, keep, pattern = _setup(data)
    rules = {name: PruneRule(modules=(name,), method="attention", sparsity=SPARSITY) for name in TARGETS}
    timings = {"capture": data.capture_seconds,
               "pattern": _timed(lambda: {n: _keep(layer.dense[n].abs() * layer.input_statistics(
                   data.calibration, hessian=False).column_norms.float(), rules[n], DEFAULTS, layer.head_dim)
                   for n in TARGETS}),
               "error evaluation": _timed(lambda: layer.error(pattern), repeats=2)}
    kept = layer.kept_objective(pattern, keep)
    objective = layer.objective
    values = kept.initial_params()
    q, k = kept.effective(values)
    generator = torch.Generator().manual_seed(0)
    for label, fractions in (("exact", None), ("rows 1/8", (0.125, 1.0))):
        sample = None if fractions is None else objective.sample(*fractions, generator)
        parts_of = [(objective.batches[p.batch], objective.targets[p.batch], p.rows)
                    for p in (sample.parts if sample else [])] or [
            (b, t, None) for b, t in zip(objective.batches, objective.targets)]
        prepared = [(b, t if r is None else t.index_select(2, r), r) for b, t, r in parts_of]
        forwards = [objective._forward(b, q, k, r) for b, _, r in prepared]
        grads = [softmax_loss_and_logit_grad(f.probs, t)[1] for f, (_, t, _) in zip(forwards, prepared)]
        timings[f"{label} step: forward"] = _timed(lambda: [objective._forward(b, q, k, r) for b, _, r in prepared])
        timings[f"{label} step: loss"] = _timed(
            lambda: [softmax_loss_and_logit_grad(f.probs, t) for f, (_, t, _) in zip(forwards, prepared)])
        timings[f"{label} step: backward"] = _timed(
            lambda: [f.backward(g, b) for f, g, (b, _, _) in zip(forwards, grads, prepared)])
    params = [v.clone() for v in values]
    optimizer = torch.optim.Adam([{"params": [p]} for p in params], fused=True)
    for p in params:
        p.grad = torch.ones_like(p)
    timings["step: update (Adam)"] = _timed(optimizer.step)
    return timings


def curve(data: LayerData, reference: float, variant: dict, steps: int) -> list[dict]:
    """Development error ratio against refit wall time (checkpoint evaluation excluded) for one solver."""
    layer, keep, pattern = _setup(data)
    kept = layer.kept_objective(pattern, keep)
    points: list[dict] = []
    clock = {"elapsed": 0.0, "since": time.perf_counter()}

    def checkpoint(step: int, values: tuple[torch.Tensor, ...]) -> None:
        clock["elapsed"] += time.perf_counter() - clock["since"]
        if step % CHECKPOINT_EVERY == 0 or step == steps:
            weights = layer.fitted(kept, values, keep)
            points.append({"step": step, "seconds": clock["elapsed"],
                           "ratio": attention_error(data, weights, "development") / reference})
        clock["since"] = time.perf_counter()

    config = replace(refit_config(DEFAULTS, seed=0), iterations=steps,
                     **{"row_fraction": 1.0, "sequence_fraction": 1.0, **variant})
    clock["since"] = time.perf_counter()
    layer.refit(pattern, keep, config, checkpoint)
    return points


def run(layers: list[int], steps: int) -> dict:
    data = capture(layers)
    records: dict = {"layers": layers, "steps": steps, "threads": torch.get_num_threads(), "parts": {},
                     "curves": {}}
    for index, layer in data.items():
        errors = {name: attention_error(layer, w, "development") for name, w in baselines(layer).items()}
        reference = min(errors["wanda"], errors["sparsegpt"])
        records["parts"][index] = parts(layer)
        for name, variant in VARIANTS.items():
            records["curves"].setdefault(name, {})[index] = curve(layer, reference, variant, steps)
            last = records["curves"][name][index][-1]
            print(f"layer {index:2d} {name:28s} {last['seconds']:.2f} s -> ratio {last['ratio']:.3f}",
                  file=sys.stderr)
    return records


def markdown(records: dict) -> str:
    layers = records["layers"]
    part_names = list(next(iter(records["parts"].values())))
    threads = f"{records['threads']} thread" + ("s" if records["threads"] != 1 else "")
    lines = [f"Wall seconds on this machine ({threads}), mean over layers {layers}.", "",
             "| part | seconds |", "|---|---|"]
    for name in part_names:
        lines.append(f"| {name} | {statistics.fmean(records['parts'][i][name] for i in layers):.4f} |")
    marks = [10, 20, 30, 50, 75, 100]
    lines += ["", "Development attention error ÷ the better of Wanda and SparseGPT (mean over layers) and the refit's "
                  "wall seconds per layer, after a number of steps (step 0: the Wanda pattern unrefitted).", "",
              "| solver | " + " | ".join(f"{m} steps" for m in marks if m <= records["steps"]) + " |",
              "|---|" + "---|" * len([m for m in marks if m <= records["steps"]])]
    for name, per_layer in records["curves"].items():
        cells = []
        for mark in (m for m in marks if m <= records["steps"]):
            at = [next(p for p in per_layer[i] if p["step"] == mark) for i in layers]
            ratio, seconds = (statistics.fmean(p[key] for p in at) for key in ("ratio", "seconds"))
            cells.append(f"{ratio:.3f} in {seconds:.2f} s")
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def plot(records: dict, path: Path) -> None:
    fig, ax = plt.subplots(figsize=(7, 4.5))
    layers = records["layers"]
    for name, per_layer in records["curves"].items():
        steps = [p["step"] for p in per_layer[layers[0]]]
        seconds = [statistics.fmean(per_layer[i][k]["seconds"] for i in layers) for k in range(len(steps))]
        ratios = [statistics.fmean(per_layer[i][k]["ratio"] for i in layers) for k in range(len(steps))]
        ax.plot(seconds, ratios, marker=".", label=name)
    ax.axhline(0.5, color="grey", linestyle=":", label="target ratio 0.5")
    ax.set_xlabel("refit wall seconds per layer")
    ax.set_ylabel("dev attention error ÷ best of Wanda, SparseGPT")
    ax.set_title(f"SmolLM2-135M q/k at 50%, layers {layers}")
    ax.set_ylim(0.3, 1.2)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--layers", type=int, nargs="+", default=[2, 15, 28])
    parser.add_argument("--steps", type=int, default=100)
    parser.add_argument("--overwrite", action="store_true")
    args = parser.parse_args(argv)
    check_output_dir(args.out, args.overwrite)
    records = run(args.layers, args.steps)
    table = markdown(records)
    with atomic_output_dir(args.out, args.overwrite) as tmp:
        (tmp / "speed.json").write_text(json.dumps(records, indent=1))
        (tmp / "speed.md").write_text(f"# Where the method's time goes\n\n{table}\n")
        plot(records, tmp / "speed.png")
    print(table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
