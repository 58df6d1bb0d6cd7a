"""Settling the method's open choices (docs/method.md section 7) on development data only.

Per-layer study on SmolLM2-135M: for a few decoder layers, the attention inputs of the DENSE model are captured for
the calibration set (C4 rows 0-7, 512 tokens: the standard protocol) and for a development set (C4 rows 1128-1135,
256 tokens; rows 1128-1499 are reserved for tuning, rows 1000-1127 are the test protocol and are never read here).
Each candidate setting prunes q_proj/k_proj of each layer at 50% with the product's own `prune_attention`, and is
scored by the relative attention error on the development inputs (held-out) and on the calibration inputs.
Baselines (Wanda, SparseGPT, magnitude) are scored the same way.

``--pipeline`` settles the choices that need the whole layer loop (which inputs feed the next layer; how much
calibration data the sampled refit can take at the same cost per step): each candidate prunes all q/k at 50% and
is scored by perplexity on WikiText-2 ``wiki.valid.raw`` (first 64 windows) and on C4 development rows
1128-1159.

Usage: python benchmarks/tuning.py --out DIR [--layers 2 8 15 22 28] [--quick] [--pipeline [--only NAME ...]]
       [--overwrite]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from attnprune_opt.atomic import atomic_output_dir, check_output_dir
from attnprune_opt.config import PruneRule
from attnprune_opt.methods.attention import AttentionSettings
from attnprune_opt.methods.sparsegpt import SparseGPTSettings
from attnprune_opt.core import InputStatistics, magnitude_mask, multihead_attention_probs, sparsegpt, wanda_mask
from attnprune_opt.data import CalibrationSpec, load_calibration
from attnprune_opt.evaluation.perplexity import c4_perplexity, wikitext2_perplexity
from attnprune_opt.models.base import read_matrix
from attnprune_opt.models.registry import get_adapter
from attnprune_opt.models.loading import load_model, load_tokenizer
from attnprune_opt.pipeline.capture import capture_layer_inputs, record_linear_inputs, run_layer
from attnprune_opt.methods.attention import AttentionInputs, prune_attention
from attnprune_opt.pruner import AttentionPruner

SPARSITY = 0.5
DEV_ROWS = (1128, 1500)


@dataclass
class LayerData:
    weights: dict[str, torch.Tensor]
    calibration: AttentionInputs
    development: AttentionInputs
    capture_seconds: float = 0.0  # the dense layer's forward over the calibration set, q_proj inputs recorded


def capture(layers: list[int]) -> dict[int, LayerData]:
    """Dense-model attention inputs of the chosen layers, for the calibration and the development set."""
    tokenizer, model = load_tokenizer(), load_model().eval()
    adapter = get_adapter(model)
    sets = {
        "calibration": load_calibration(CalibrationSpec(num_samples=8, seq_len=512), tokenizer).sequences,
        "development": load_calibration(CalibrationSpec(num_samples=8, seq_len=256, rows=DEV_ROWS),
                                        tokenizer).sequences,
    }
    found: dict[int, dict] = {index: {} for index in layers}
    with torch.no_grad():
        for name, sequences in sets.items():
            inputs = capture_layer_inputs(model, adapter.layers(model), sequences)
            for index, layer in enumerate(adapter.layers(model)[: max(layers) + 1]):
                q_proj = layer.get_submodule(adapter.prunable(index, "q_proj").module)
                start = time.perf_counter()
                with record_linear_inputs({"q_proj": q_proj}, keep=["q_proj"]) as recorded:
                    outputs = run_layer(layer, inputs)
                if index in layers:
                    if name == "calibration":
                        found[index]["capture_seconds"] = time.perf_counter() - start
                    longest = max(inputs, key=lambda item: item.hidden.shape[1])
                    found[index][name] = AttentionInputs(recorded.tensors["q_proj"],
                                                         adapter.attention_spec(layer, index, longest.kwargs))
                    found[index]["weights"] = {role: read_matrix(layer, adapter.prunable(index, role))
                                               for role in ("q_proj", "k_proj")}
                inputs = outputs
    return {index: LayerData(**data) for index, data in found.items()}


def attention_error(data: LayerData, weights: dict[str, torch.Tensor], split: str) -> float:
    inputs: AttentionInputs = getattr(data, split)
    numerator = denominator = 0.0
    for x in inputs.batches():
        dense = multihead_attention_probs(x, data.weights["q_proj"], data.weights["k_proj"], inputs.spec)
        pruned = multihead_attention_probs(x, weights["q_proj"].float(), weights["k_proj"].float(), inputs.spec)
        numerator += float((pruned - dense).pow(2).sum())
        denominator += float(dense.pow(2).sum())
    return numerator / denominator


def baselines(data: LayerData) -> dict[str, dict[str, torch.Tensor]]:
    stats = InputStatistics(data.weights["q_proj"].shape[1])
    for x in data.calibration.xs:
        stats.update(x)
    w = data.weights
    return {
        "magnitude": {n: w[n] * magnitude_mask(w[n], SPARSITY) for n in w},
        "wanda": {n: w[n] * wanda_mask(w[n], stats.column_norms, SPARSITY) for n in w},
        "sparsegpt": {n: sparsegpt(w[n], stats.hessian, SPARSITY)[0] for n in w},
    }


def candidates(quick: bool) -> dict[str, AttentionSettings]:
    """The settings tried; each name says what differs from the defaults of AttentionSettings."""
    exact = dict(refit_row_fraction=1.0, refit_sequence_fraction=1.0)  # the refit of version 0.1: every row
    grid = {
        "descent (paper), score M|W|": dict(mask="descent", refit_iterations=0),
        "descent (paper), score M": dict(mask="descent", score="mask", refit_iterations=0),
        "descent lam=0.1, score M|W|": dict(mask="descent", lam=0.1, refit_iterations=0),
        "descent + refit 50": dict(mask="descent", refit_iterations=50, **exact),
        "magnitude + refit 50": dict(mask="magnitude", refit_iterations=50, **exact),
        "sparsegpt + refit 50": dict(mask="sparsegpt", refit_iterations=50, **exact),
        "wanda + refit 0": dict(mask="wanda", refit_iterations=0),
        "wanda + refit 20": dict(mask="wanda", refit_iterations=20, **exact),
        "wanda + refit 50": dict(mask="wanda", refit_iterations=50, **exact),
        "wanda + refit 100": dict(mask="wanda", refit_iterations=100, **exact),
        "wanda + refit 50, lr 0.003": dict(mask="wanda", refit_iterations=50, refit_lr=0.003, **exact),
        "wanda + refit 50, lr 0.03": dict(mask="wanda", refit_iterations=50, refit_lr=0.03, **exact),
        "wanda (per head) + refit 50": dict(mask="wanda", group="head", refit_iterations=50, **exact),
        "wanda (per matrix) + refit 50": dict(mask="wanda", group="matrix", refit_iterations=50, **exact),
        "wanda + sampled refit 60 (rows 1/8)": dict(mask="wanda", refit_iterations=60, refit_sequence_fraction=1.0),
        "wanda + sampled refit 100 (default)": {},
    }
    if quick:
        grid = {k: v for k, v in grid.items() if k in ("descent (paper), score M|W|", "wanda + refit 0",
                                                       "wanda + refit 50", "wanda + sampled refit 100 (default)")}
    return {name: AttentionSettings(**values) for name, values in grid.items()}


def run(layers: list[int], quick: bool) -> list[dict]:
    data = capture(layers)
    rules = {m: PruneRule(modules=(m,), method="attention", sparsity=SPARSITY) for m in ("q_proj", "k_proj")}
    records = []
    for index, layer in data.items():
        for name, weights in baselines(layer).items():
            records.append({"layer": index, "setting": name, "kind": "baseline", "seconds": None,
                            "development": attention_error(layer, weights, "development"),
                            "calibration": attention_error(layer, weights, "calibration")})
        for name, settings in candidates(quick).items():
            start = time.perf_counter()
            result = prune_attention(layer.weights, layer.calibration, rules,
                                     settings, SparseGPTSettings())
            records.append({"layer": index, "setting": name, "kind": "method", "settings": settings.model_dump(),
                            "seconds": time.perf_counter() - start,
                            "development": attention_error(layer, result.weights, "development"),
                            "calibration": attention_error(layer, result.weights, "calibration")})
            print(f"layer {index:2d} {name:32s} dev {records[-1]['development']:.4f} "
                  f"cal {records[-1]['calibration']:.4f} {records[-1]['seconds']:.1f} s", file=sys.stderr)
    return records


PIPELINE_CANDIDATES = {
    "propagate-pruned": {"propagate": "pruned"},
    "propagate-dense": {"propagate": "dense"},
    # more calibration at the same refit cost per step: each step sees 4 sequences either way
    "calibration-32": {"calibration": {"num_samples": 32},
                       "attention": {"refit_sequence_fraction": 0.125}},
}
PIPELINE_C4_ROWS = (DEV_ROWS[0], DEV_ROWS[0] + 32)
PIPELINE_WIKI_WINDOWS = 64


def run_pipeline(only: list[str] | None = None) -> list[dict]:
    """Whole-model q/k 50% runs, scored by development perplexities (``only``: these candidates, and dense)."""
    tokenizer = load_tokenizer()
    records = []
    chosen = {name: o for name, o in PIPELINE_CANDIDATES.items() if not only or name in only}
    for name, overrides in {"dense model": None, **chosen}.items():
        model = load_model().eval()
        start = time.perf_counter()
        if overrides is not None:
            AttentionPruner(**overrides).prune_model(model, tokenizer, progress=False)
        seconds = time.perf_counter() - start
        wiki = wikitext2_perplexity(model, tokenizer, split="valid", max_windows=PIPELINE_WIKI_WINDOWS, progress=False)
        c4 = c4_perplexity(model, tokenizer, rows=PIPELINE_C4_ROWS, progress=False)
        records.append({"setting": name, "wikitext2_valid_ppl": wiki.perplexity, "c4_dev_ppl": c4.perplexity,
                        "prune_seconds": seconds if overrides is not None else None})
        print(f"{name:20s} wiki.valid {wiki.perplexity:.3f} c4 dev {c4.perplexity:.3f}", file=sys.stderr)
    return records


def pipeline_markdown(records: list[dict]) -> str:
    first, stop = PIPELINE_C4_ROWS
    lines = ["q_proj/k_proj at 50% with the default method; development perplexities (WikiText-2 wiki.valid.raw, "
             f"first {PIPELINE_WIKI_WINDOWS} windows of 512; C4 rows {first}-{stop - 1}, 512 tokens).", "",
             "| setting | WikiText-2 valid ppl | C4 dev ppl | prune s |", "|---|---|---|---|"]
    for r in records:
        seconds = f"{r['prune_seconds']:.0f}" if r["prune_seconds"] is not None else "–"
        lines.append(f"| {r['setting']} | {r['wikitext2_valid_ppl']:.3f} | {r['c4_dev_ppl']:.3f} | {seconds} |")
    return "\n".join(lines)


def markdown(records: list[dict]) -> str:
    settings = list(dict.fromkeys(r["setting"] for r in records))
    layers = sorted({r["layer"] for r in records})
    best = {layer: min(r["development"] for r in records if r["layer"] == layer and r["setting"] in
                       ("wanda", "sparsegpt")) for layer in layers}
    lines = ["Relative attention error of q_proj/k_proj pruned at 50%, on development inputs (C4 rows 1128-1135, "
             "256 tokens; held out) and calibration inputs (C4 rows 0-7, 512 tokens). Ratio: development error ÷ "
             "the better of Wanda and SparseGPT on that layer, averaged over layers.", "",
             "| setting | " + " | ".join(f"layer {layer} dev" for layer in layers)
             + " | mean dev | mean cal | ratio to best baseline | seconds/layer |",
             "|---|" + "---|" * (len(layers) + 4)]
    for name in settings:
        rows = {r["layer"]: r for r in records if r["setting"] == name}
        seconds = [r["seconds"] for r in rows.values() if r["seconds"] is not None]
        per_layer = " | ".join(f"{rows[layer]['development']:.4f}" for layer in layers)
        lines.append(
            f"| {name} | {per_layer} | {statistics.fmean(r['development'] for r in rows.values()):.4f} | "
            f"{statistics.fmean(r['calibration'] for r in rows.values()):.4f} | "
            f"{statistics.fmean(rows[layer]['development'] / best[layer] for layer in layers):.3f} | "
            f"{f'{statistics.fmean(seconds):.1f}' if seconds else '–'} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--layers", type=int, nargs="+", default=[2, 8, 15, 22, 28])
    parser.add_argument("--quick", action="store_true", help="four settings instead of the whole grid")
    parser.add_argument("--pipeline", action="store_true", help="whole-model choices (propagation, calibration "
                                                                 "amount) instead")
    parser.add_argument("--only", nargs="+", choices=sorted(PIPELINE_CANDIDATES),
                        help="with --pipeline: run only these candidates")
    parser.add_argument("--overwrite", action="store_true")
    args = parser.parse_args(argv)
    check_output_dir(args.out, args.overwrite)
    if args.pipeline:
        records = run_pipeline(args.only)
        table = pipeline_markdown(records)
    else:
        records = run(args.layers, args.quick)
        table = markdown(records)
    with atomic_output_dir(args.out, args.overwrite) as tmp:
        (tmp / "tuning.json").write_text(json.dumps(records, indent=1))
        (tmp / "tuning.md").write_text(f"# Tuning on development data\n\n{table}\n")
    print(table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
