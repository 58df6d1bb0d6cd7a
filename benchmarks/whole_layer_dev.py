"""Development study of the whole-layer refit (issue 10, docs/method.md section 8c), on development data only.

Whole-model pruning of SmolLM2-135M (every linear of every decoder layer) at one sparsity or N:M structure:
Wanda everywhere and SparseGPT everywhere (the package's own pipeline), against variants of the whole-layer
method, which per layer (1) chooses every linear's pattern (Wanda's score, or SparseGPT's pattern with its updated
weights as the start), (2) optionally refits q/k to the attention-probability loss (``prune_attention``), (3)
optionally refits the kept v_proj/o_proj values to the attention sub-block's output with the pruned attention
probabilities (``AttentionOutputObjective``), (4) optionally refits the kept gate/up/down values to the MLP
sub-block's output on the inputs the pruned attention gives (``MLPObjective``), and feeds the pruned layer's
output to the next layer. Targets are the dense layer's sub-block outputs on the dense model's inputs ("dense") or
on the pruned model's ("pruned").

Calibration: C4 rows 0-7, 512 tokens (the standard protocol). Scores: perplexity on WikiText-2 ``wiki.valid.raw``
(first ``--windows`` windows of 512) and on C4 development rows 1128..1128+``--c4-docs``-1 (512 tokens); the test
windows are never read. Run it under ``taskset -c 1`` (one thread) so the times compare.

Usage: taskset -c 1 python benchmarks/whole_layer_dev.py [--structure 0.5|2:4|0.7] [--only NAME ...]
       [--windows 32] [--c4-docs 32] [--out benchmarks/results] [--overwrite]
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from torch import Tensor

from attnprune_opt.config import PruneRule
from attnprune_opt.core import InputStatistics, multihead_attention_probs, sparsegpt, wanda_mask
from attnprune_opt.core.layer_objective import AttentionOutputObjective, MLPObjective, refit_kept_weights
from attnprune_opt.core.solver import AdamConfig
from attnprune_opt.data import CalibrationSpec, load_calibration
from attnprune_opt.evaluation.perplexity import c4_perplexity, wikitext2_perplexity
from attnprune_opt.methods.attention import AttentionInputs, AttentionSettings, batches_by_length, prune_attention
from attnprune_opt.methods.magnitude import apply_mask
from attnprune_opt.models.loading import load_model, load_tokenizer
from attnprune_opt.models.registry import get_adapter
from attnprune_opt.pipeline.capture import LayerInput, capture_layer_inputs, record_linear_inputs, run_layer
from attnprune_opt.pruner import AttentionPruner

MODULES = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
INPUT_OF = {"q_proj": "q_proj", "k_proj": "q_proj", "v_proj": "q_proj", "o_proj": "o_proj",
            "gate_proj": "gate_proj", "up_proj": "gate_proj", "down_proj": "down_proj"}
C4_DEV_START = 1128
F32 = torch.float32


@dataclass(frozen=True)
class Refit:
    """Adam settings of one sub-block refit (``lr`` relative to the weight's RMS)."""

    iterations: int = 40
    lr: float = 0.01
    row_fraction: float = 0.125
    sequence_fraction: float = 0.5
    check_fraction: float = 0.25  # share of the tokens (all sequences) on which the error before/after is compared
    solve_iterations: int = 0  # then o_proj / down_proj by masked least squares (conjugate-gradient steps)
    solve_percdamp: float = 0.01  # its damping toward the Adam result, a share of mean diag G


@dataclass(frozen=True)
class Variant:
    pattern: str = "wanda"  # "wanda" | "sparsegpt" (its pattern and updated weights as the start)
    qk: bool = False  # the existing q/k refit to the attention-probability loss
    qk_iterations: int = 100  # its Adam steps (the attention method's default)
    vo: Refit | None = Refit()
    mlp: Refit | None = Refit()
    # "dense": the dense layer's sub-block outputs on the dense model's inputs; "pruned": on the pruned model's;
    # "residual": what makes the residual stream match the dense model's after each sub-block (dense sub-block
    # output on dense inputs plus the dense-minus-pruned residual stream entering it); "layer": pruned-input
    # targets, but the MLP's also carries what the fitted attention sub-block still misses, so the two sub-blocks
    # together aim at the dense layer's output on the pruned model's inputs
    targets: str = "dense"


def both(targets: str = "dense", qk: bool = False, qk_iterations: int = 100, **refit) -> Variant:
    """The same Adam settings (and solve) for the v/o and the MLP refit."""
    return Variant(qk=qk, qk_iterations=qk_iterations, vo=Refit(**refit), mlp=Refit(**refit), targets=targets)


SOLVED = dict(iterations=60, lr=0.02, solve_percdamp=1.0)  # the refit, then the solve damped toward its values
VARIANTS = {
    "wanda+mlp": Variant(vo=None),
    "wanda+vo": Variant(mlp=None),
    "wanda+vo+mlp": Variant(),
    "wanda+qk+vo+mlp": Variant(qk=True),
    "wanda+vo+mlp/pruned-targets": Variant(targets="pruned"),
    "wanda+vo+mlp/residual-targets": Variant(targets="residual"),
    "sparsegpt+vo+mlp": Variant(pattern="sparsegpt"),
    "sparsegpt+vo+mlp/pruned-targets": Variant(pattern="sparsegpt", targets="pruned"),
    "wanda+vo+mlp 80 it": both(iterations=80),
    "wanda+vo+mlp 20 it": both(iterations=20),
    "wanda+vo+mlp lr 0.02": both(lr=0.02),
    "wanda+vo+mlp 60 it lr 0.02": both(iterations=60, lr=0.02),
    "wanda+vo+mlp/residual-targets 60 it lr 0.02": both("residual", iterations=60, lr=0.02),
    "wanda+vo+mlp/pruned-targets 60 it lr 0.02": both("pruned", iterations=60, lr=0.02),
    # for 32 calibration sequences: each step still sees 4 of them
    "wanda+vo+mlp/pruned-targets 60 it lr 0.02 seqs 1/8": both("pruned", iterations=60, lr=0.02,
                                                               sequence_fraction=0.125),
    # (the record "... + solve 30 toward zero" is from commit 3d4777e, whose solve damped toward zero)
    "wanda+vo+mlp/pruned-targets 60 it lr 0.02 + solve 30 toward Adam": both("pruned", iterations=60, lr=0.02,
                                                                             solve_iterations=30),
    "wanda+vo+mlp/pruned-targets 60 it lr 0.02 seqs 1/8 + solve 30 toward Adam": both(
        "pruned", iterations=60, lr=0.02, sequence_fraction=0.125, solve_iterations=30),
    "wanda+vo+mlp/pruned-targets 60 it lr 0.02 + solve 30 toward Adam damp 1": both(
        "pruned", solve_iterations=30, **SOLVED),
    "wanda+vo+mlp/pruned-targets 60 it lr 0.02 + solve 10 toward Adam damp 1": both(
        "pruned", solve_iterations=10, **SOLVED),
    "wanda+qk+vo+mlp/pruned-targets 60 it lr 0.02 + solve 30 toward Adam damp 1": both(
        "pruned", qk=True, solve_iterations=30, **SOLVED),
    # for 32 and 128 calibration sequences: each step still sees 4 of them
    "wanda+vo+mlp/pruned-targets 60 it lr 0.02 seqs 1/8 + solve 30 toward Adam damp 1": both(
        "pruned", sequence_fraction=0.125, solve_iterations=30, **SOLVED),
    "wanda+vo+mlp/pruned-targets 60 it lr 0.02 seqs 1/32 + solve 30 toward Adam damp 1": both(
        "pruned", sequence_fraction=1 / 32, solve_iterations=30, **SOLVED),
    "wanda+vo+mlp/layer-targets 60 it lr 0.02": both("layer", iterations=60, lr=0.02),
    "wanda+vo+mlp/layer-targets 60 it lr 0.02 + solve 30 toward Adam damp 1": both(
        "layer", solve_iterations=30, **SOLVED),
    "wanda+vo+mlp/layer-targets 60 it lr 0.02 + solve 10 toward Adam damp 1": both(
        "layer", solve_iterations=10, **SOLVED),
    "wanda+vo+mlp/layer-targets 60 it lr 0.02 seqs 1/8 + solve 10 toward Adam damp 1": both(
        "layer", sequence_fraction=0.125, solve_iterations=10, **SOLVED),
    "wanda+vo+mlp/layer-targets 60 it lr 0.02 seqs 1/32 + solve 10 toward Adam damp 1": both(
        "layer", sequence_fraction=1 / 32, solve_iterations=10, **SOLVED),
    "wanda+vo+mlp/layer-targets 60 it lr 0.02 + solve 10 toward Adam damp 0.3": both(
        "layer", solve_iterations=10, **{**SOLVED, "solve_percdamp": 0.3}),
    "wanda+qk+vo+mlp/layer-targets 60 it lr 0.02 + solve 10 toward Adam damp 1": both(
        "layer", qk=True, solve_iterations=10, **SOLVED),
    # cheaper: fewer q/k steps, and fewer v/o and MLP steps to pay for them
    "wanda+qk 30 it+vo+mlp/layer-targets 30 it lr 0.02 + solve 10 toward Adam damp 1": both(
        "layer", qk=True, qk_iterations=30, solve_iterations=10, **{**SOLVED, "iterations": 30}),
    "wanda+qk 30 it+vo+mlp/layer-targets 30 it lr 0.02 seqs 1/8 + solve 10 toward Adam damp 1": both(
        "layer", qk=True, qk_iterations=30, sequence_fraction=0.125, solve_iterations=10,
        **{**SOLVED, "iterations": 30}),
    "wanda+qk 30 it+vo+mlp/layer-targets 30 it lr 0.02 seqs 1/32 + solve 10 toward Adam damp 1": both(
        "layer", qk=True, qk_iterations=30, sequence_fraction=1 / 32, solve_iterations=10,
        **{**SOLVED, "iterations": 30}),
    "wanda+qk 50 it+vo+mlp/layer-targets 30 it lr 0.02 + solve 10 toward Adam damp 1": both(
        "layer", qk=True, qk_iterations=50, solve_iterations=10, **{**SOLVED, "iterations": 30}),
    "wanda+vo+mlp rows 1/16 all seqs": both(row_fraction=1 / 16, sequence_fraction=1.0),
}
BASELINES = ("wanda everywhere", "sparsegpt everywhere")


@dataclass
class LayerLog:
    """Relative sub-block errors on the calibration data before/after each refit, and CPU seconds per stage
    (process time: the machine's cores are shared, so wall time would measure the neighbours too)."""

    index: int
    seconds: float
    errors: dict[str, float] = field(default_factory=dict)
    cpu: dict[str, float] = field(default_factory=dict)

    def lap(self, stage: str, since: float) -> float:
        now = time.process_time()
        self.cpu[stage] = self.cpu.get(stage, 0.0) + now - since
        return now


def rule_kwargs(structure: str) -> dict:
    return {"structure": structure} if ":" in structure else {"sparsity": float(structure)}


def n_m_of(structure: str) -> tuple[int, int] | None:
    return tuple(int(v) for v in structure.split(":")) if ":" in structure else None


def sparsity_of(structure: str) -> float:
    n_m = n_m_of(structure)
    return 1 - n_m[0] / n_m[1] if n_m else float(structure)


def stacked(tensors: list[Tensor]) -> list[Tensor]:
    """One (b, n, d) batch per sequence length (calibration documents can be shorter than seq_len), as the
    package's whole-layer method batches them."""
    return batches_by_length(tensors)


def statistics(xs: list[Tensor], hessian: bool) -> InputStatistics:
    stats = InputStatistics(xs[0].shape[-1], hessian=hessian)
    for x in xs:
        stats.update(x)
    return stats


def refit(objective, settings: Refit, seed: int, log: LayerLog, name: str) -> dict[str, Tensor]:
    config = AdamConfig(iterations=settings.iterations, lr=settings.lr, row_fraction=settings.row_fraction,
                        sequence_fraction=settings.sequence_fraction, seed=seed)
    result = refit_kept_weights(objective, config, settings.check_fraction, settings.solve_iterations,
                                settings.solve_percdamp)
    log.errors[f"{name}_before"], log.errors[f"{name}_after"] = result.error_before, result.error_after
    if result.error_solved is not None:
        log.errors[f"{name}_solved"] = result.error_solved
    return result.weights


def prune_layer(adapter, index: int, layer, pruned_in: list[LayerInput], dense_in: list[LayerInput] | None,
                variant: Variant, structure: str, seed: int) -> tuple[list[LayerInput], list[LayerInput] | None,
                                                                       LayerLog]:
    start_time = clock = time.process_time()
    log = LayerLog(index, 0.0)
    n_m, sparsity = n_m_of(structure), sparsity_of(structure)
    linears = {m: layer.get_submodule(adapter.prunable(index, m).module) for m in MODULES}
    dense = {m: linears[m].weight.detach().clone().to(F32) for m in MODULES}
    with torch.no_grad():
        with record_linear_inputs(linears, keep=["q_proj", "o_proj", "gate_proj", "down_proj"]) as on_pruned:
            run_layer(layer, pruned_in)
        dense_out = None
        if variant.targets not in ("pruned", "layer"):
            with record_linear_inputs(linears, keep=["o_proj", "down_proj"]) as on_dense:
                dense_out = run_layer(layer, dense_in)
        target_source = on_pruned if variant.targets in ("pruned", "layer") else on_dense
        drift = None  # dense minus pruned residual stream entering the layer
        if variant.targets == "residual":
            drift = [a - b for a, b in zip(stacked([item.hidden for item in dense_in]),
                                           stacked([item.hidden for item in pruned_in]))]
        clock = log.lap("forward", clock)

        # (1) the pattern of every linear, from the pruned model's inputs (as the baselines do)
        inputs = on_pruned.tensors
        stats = {name: statistics(inputs[name], variant.pattern == "sparsegpt") for name in set(INPUT_OF.values())}
        keep, start = {}, {}
        for m in MODULES:
            st = stats[INPUT_OF[m]]
            if variant.pattern == "sparsegpt":
                start[m], keep[m] = sparsegpt(dense[m], st.hessian, sparsity, n_m=n_m)
            else:
                keep[m] = wanda_mask(dense[m], st.column_norms, sparsity, n_m=n_m)
                start[m] = dense[m]
        weights = {m: apply_mask(start[m], keep[m]) for m in MODULES}
        clock = log.lap("pattern", clock)

        # (2) q/k: the existing refit to the attention-probability loss
        longest = max(pruned_in, key=lambda item: item.hidden.shape[1])
        spec = adapter.attention_spec(layer, index, longest.kwargs).to(F32)
        x_attn = stacked(inputs["q_proj"])
        if variant.qk:  # sampled like the v/o refit, as the package's method does
            sampling = variant.vo or Refit()
            rules = {m: PruneRule(modules=(m,), method="attention", **rule_kwargs(structure))
                     for m in ("q_proj", "k_proj")}
            result = prune_attention({m: dense[m] for m in rules}, AttentionInputs(inputs["q_proj"], spec), rules,
                                     AttentionSettings(mask=variant.pattern, refit_iterations=variant.qk_iterations,
                                                       refit_row_fraction=sampling.row_fraction,
                                                       refit_sequence_fraction=sampling.sequence_fraction),
                                     seed=seed)
            weights.update(result.weights)
            log.errors["qk_before"], log.errors["qk_after"] = result.error_mask, result.error_final
            clock = log.lap("qk", clock)

        # (3) v/o against the attention sub-block's output, with the pruned q/k's probabilities
        if variant.vo is not None:
            probs = [multihead_attention_probs(x, weights["q_proj"], weights["k_proj"], spec) for x in x_attn]
            targets = [t @ dense["o_proj"].T for t in stacked(target_source.tensors["o_proj"])]
            if drift is not None:
                targets = [t + e for t, e in zip(targets, drift)]
            objective = AttentionOutputObjective(
                x_attn, probs, {"v": dense["v_proj"], "o": dense["o_proj"]},
                {"v": keep["v_proj"], "o": keep["o_proj"]}, head_dim=spec.head_dim,
                start={"v": weights["v_proj"], "o": weights["o_proj"]}, targets=targets)
            fitted = refit(objective, variant.vo, seed, log, "vo")
            weights["v_proj"], weights["o_proj"] = fitted["v"], fitted["o"]
            del probs, objective
            clock = log.lap("vo", clock)

        # (4) gate/up/down against the MLP's output, on the inputs the pruned attention gives
        if variant.mlp is not None:
            for m in ("q_proj", "k_proj", "v_proj", "o_proj"):
                linears[m].weight.data.copy_(apply_mask(weights[m], keep[m]))
            with record_linear_inputs(linears, keep=["o_proj", "gate_proj"]) as after_attention:
                run_layer(layer, pruned_in)
            clock = log.lap("forward", clock)
            targets = [t @ dense["down_proj"].T for t in stacked(target_source.tensors["down_proj"])]
            if drift is not None:  # dense h_mid - pruned h_mid, with the pruned attention as now fitted
                attention = [o @ weights["o_proj"].T - t @ dense["o_proj"].T for o, t in
                             zip(stacked(after_attention.tensors["o_proj"]), stacked(on_dense.tensors["o_proj"]))]
                targets = [t + e - a for t, e, a in zip(targets, drift, attention)]
            if variant.targets == "layer":  # dense minus fitted attention output, both on the pruned inputs
                missed = [t @ dense["o_proj"].T - o @ weights["o_proj"].T for o, t in
                          zip(stacked(after_attention.tensors["o_proj"]), stacked(on_pruned.tensors["o_proj"]))]
                targets = [t + e for t, e in zip(targets, missed)]
            objective = MLPObjective(
                stacked(after_attention.tensors["gate_proj"]),
                {"gate": dense["gate_proj"], "up": dense["up_proj"], "down": dense["down_proj"]},
                {"gate": keep["gate_proj"], "up": keep["up_proj"], "down": keep["down_proj"]},
                start={"gate": weights["gate_proj"], "up": weights["up_proj"], "down": weights["down_proj"]},
                targets=targets)
            fitted = refit(objective, variant.mlp, seed, log, "mlp")
            for name in ("gate", "up", "down"):
                weights[f"{name}_proj"] = fitted[name]
            del objective
            clock = log.lap("mlp", clock)

        for m in MODULES:
            linears[m].weight.data.copy_(apply_mask(weights[m], keep[m]))
            assert int((linears[m].weight == 0).sum()) >= int((~keep[m]).sum())
        pruned_out = run_layer(layer, pruned_in)
    log.lap("forward", clock)
    log.seconds = time.process_time() - start_time
    return pruned_out, dense_out, log


def prune_whole_layer(model, tokenizer, variant: Variant, structure: str, calibration: int = 8, seed: int = 0,
                      layers: int | None = None) -> list[LayerLog]:
    """The method on every decoder layer (or the first ``layers``), in order."""
    adapter = get_adapter(model)
    sequences = load_calibration(CalibrationSpec(num_samples=calibration, seq_len=512), tokenizer).sequences
    with torch.no_grad():
        pruned = capture_layer_inputs(model, adapter.layers(model), sequences)
    dense = None if variant.targets == "pruned" else pruned
    logs = []
    for index, layer in enumerate(adapter.layers(model)[:layers]):
        pruned, dense, log = prune_layer(adapter, index, layer, pruned, dense, variant, structure,
                                         seed * 100_003 + index)
        logs.append(log)
        errors = " ".join(f"{k} {v:.3f}" for k, v in log.errors.items())
        cpu = " ".join(f"{k} {v:.1f}" for k, v in log.cpu.items())
        print(f"  layer {index:2d} {log.seconds:5.1f} s cpu ({cpu})  {errors}", file=sys.stderr, flush=True)
    return logs


def prune_baseline(model, tokenizer, name: str, structure: str, calibration: int) -> None:
    method = name.split()[0]
    AttentionPruner(rules=[{"modules": list(MODULES), "method": method, **rule_kwargs(structure)}],
                    calibration={"num_samples": calibration}).prune_model(model, tokenizer, progress=False)


def evaluate(model, tokenizer, windows: int, c4_docs: int) -> dict[str, float]:
    wiki = wikitext2_perplexity(model, tokenizer, split="valid", max_windows=windows, progress=False)
    c4 = c4_perplexity(model, tokenizer, rows=(C4_DEV_START, C4_DEV_START + c4_docs), progress=False)
    return {"wikitext2_valid_ppl": wiki.perplexity, "c4_dev_ppl": c4.perplexity}


def run(name: str, structure: str, windows: int, c4_docs: int, calibration: int) -> dict:
    tokenizer = load_tokenizer()
    model = load_model().eval()
    start, wall = time.process_time(), time.perf_counter()
    logs: list[LayerLog] = []
    if name in BASELINES:
        prune_baseline(model, tokenizer, name, structure, calibration)
    elif name != "dense":
        logs = prune_whole_layer(model, tokenizer, VARIANTS[name], structure, calibration)
    seconds, wall = time.process_time() - start, time.perf_counter() - wall
    record = {"setting": name, "structure": structure, "prune_seconds": seconds if name != "dense" else None,
              "prune_wall_seconds": wall if name != "dense" else None,
              **evaluate(model, tokenizer, windows, c4_docs), "windows": windows, "c4_docs": c4_docs,
              "calibration": calibration,
              "variant": asdict(VARIANTS[name]) if name in VARIANTS else None,
              "layers": [asdict(log) for log in logs]}
    print(f"{name:34s} {structure:5s} wiki.valid {record['wikitext2_valid_ppl']:8.3f} c4 dev "
          f"{record['c4_dev_ppl']:8.3f} prune {seconds:6.1f} s cpu ({wall:.0f} s wall)", file=sys.stderr, flush=True)
    return record


def markdown(records: list[dict]) -> str:
    lines = ["Whole model (every linear of every layer), SmolLM2-135M, calibration C4 rows from 0 x 512 tokens "
             "(calib = sequences); development perplexities (WikiText-2 wiki.valid.raw, first windows of 512; C4 rows "
             "from 1128, 512 tokens); CPU seconds of one thread (taskset -c 1). Ratios are to the better baseline "
             "at the same structure and calibration (8 sequences where no baseline ran at that amount).", "",
             "| structure | calib | setting | WikiText-2 valid ppl | C4 dev ppl | wiki ratio | C4 ratio | "
             "prune CPU s | CPU time ratio to SparseGPT |", "|---|---|---|---|---|---|---|---|---|"]
    for r in records:
        comparable = [b for b in records if b["structure"] == r["structure"] and b["setting"] in BASELINES
                      and b["windows"] == r["windows"] and b["c4_docs"] == r["c4_docs"]]
        calibration = r.get("calibration", 8)
        same = [b for b in comparable if b.get("calibration", 8) == calibration] or [
            b for b in comparable if b.get("calibration", 8) == 8]
        best = {k: min((b[k] for b in same), default=None) for k in ("wikitext2_valid_ppl", "c4_dev_ppl")}
        sgpt = next((b["prune_seconds"] for b in same if b["setting"] == "sparsegpt everywhere"), None)
        ratio = {k: f"{r[k] / best[k]:.3f}" if best[k] else "–" for k in best}
        seconds = r["prune_seconds"]
        lines.append(f"| {r['structure']} | {calibration} | {r['setting']} | {r['wikitext2_valid_ppl']:.2f} | "
                     f"{r['c4_dev_ppl']:.2f} | "
                     f"{ratio['wikitext2_valid_ppl']} | {ratio['c4_dev_ppl']} | "
                     f"{'–' if seconds is None else f'{seconds:.0f}'} | "
                     f"{f'{seconds / sgpt:.2f}' if seconds and sgpt else '–'} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--structure", default="0.5", help="sparsity (e.g. 0.5) or N:M (e.g. 2:4)")
    parser.add_argument("--only", nargs="+", choices=["dense", *BASELINES, *VARIANTS], help="settings to run")
    parser.add_argument("--windows", type=int, default=32)
    parser.add_argument("--calibration", type=int, default=8, help="calibration sequences (C4 rows from 0)")
    parser.add_argument("--c4-docs", type=int, default=32)
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results"))
    parser.add_argument("--overwrite", action="store_true", help="replace existing records of the same setting")
    parser.add_argument("--smoke", action="store_true", help="prune the first two layers only; no scores, no output")
    args = parser.parse_args()
    n_m_of(args.structure) or sparsity_of(args.structure)  # a bad structure fails here, before any work
    if args.smoke:
        for name in args.only or VARIANTS:
            prune_whole_layer(load_model().eval(), load_tokenizer(), VARIANTS[name], args.structure, layers=2)
        return
    path = args.out / "whole_layer_dev.json"
    records = json.loads(path.read_text()) if path.exists() else []
    key = lambda r: (r["setting"], r["structure"], r["windows"], r["c4_docs"], r.get("calibration", 8))  # noqa: E731
    names = args.only or ["dense", *BASELINES, *VARIANTS]
    for name in names:
        probe = {"setting": name, "structure": args.structure, "windows": args.windows, "c4_docs": args.c4_docs,
                 "calibration": args.calibration}
        if any(key(r) == key(probe) for r in records) and not args.overwrite:
            print(f"{name}: already in {path}, skipped (--overwrite replaces it)", file=sys.stderr)
            continue
        record = run(name, args.structure, args.windows, args.c4_docs, args.calibration)
        records = [r for r in records if key(r) != key(record)] + [record]
        args.out.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".json.tmp")
        tmp.write_text(json.dumps(records, indent=1))
        tmp.replace(path)
        md = args.out / "whole_layer_dev.md"
        md.with_suffix(".md.tmp").write_text(markdown(records))
        md.with_suffix(".md.tmp").replace(md)


if __name__ == "__main__":
    main()
