"""Data-parallel pruning at world size 1 and 2 on this machine, side by side (one thread per rank), and the traffic.

Each run is `torchrun --standalone --nproc-per-node N -m attnprune_opt.cli prune --recipe R` with OMP_NUM_THREADS=1;
recorded: the process's wall time, the pruning time of rank 0 (its report), load + save = the rest, the bytes each
rank passed to collectives (its report), and the saved weights compared with world size 1's. From the measured
traffic per layer, a worked estimate scales it to a 70B Llama (shapes below) on 8 ranks.

Writes distributed.json and distributed.md into --out. With --no-timing (the ranks share cores, e.g. all pinned to
one) the times are left out of both: only the traffic and the comparison with world size 1 mean something then.
Usage: python benchmarks/distributed.py --out DIR [--overwrite] [--no-timing] [--recipes smollm2_qk50 smollm2_whole50]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from safetensors.torch import load_file

from attnprune_opt.atomic import atomic_output_dir, check_output_dir

RECIPES = ("smollm2_qk50", "smollm2_whole50")
TORCHRUN = Path(sys.executable).with_name("torchrun")
# Llama-2-70B / Llama-3-70B shapes: hidden 8192, MLP 28672, 64 query heads, 8 KV heads of 128, 80 layers
LLAMA_70B = {"hidden": 8192, "intermediate": 28672, "kv_dim": 1024, "layers": 80}


def run(recipe: str, ranks: int, out: Path) -> dict:
    command = [str(TORCHRUN), "--standalone", "--nproc-per-node", str(ranks), "-m", "attnprune_opt.cli", "prune",
               "--recipe", recipe, "--output", str(out), "--quiet"]
    start = time.perf_counter()
    subprocess.run(command, check=True, env={**os.environ, "OMP_NUM_THREADS": "1"}, stdout=subprocess.DEVNULL)
    wall = time.perf_counter() - start
    report = json.loads((out / "attnprune_manifest.json").read_text())["report"]
    layers = len(report["layers"])
    sent = sum(report["communicated_bytes"].values())
    return {"recipe": recipe, "world_size": ranks, "wall_seconds": wall, "prune_seconds": report["seconds"],
            "load_and_save_seconds": wall - report["seconds"], "layers": layers,
            "mean_layer_seconds": sum(layer["seconds"] for layer in report["layers"]) / layers,
            "communicated_bytes": report["communicated_bytes"], "bytes_per_layer": sent / layers}


def compare(one: Path, two: Path) -> dict:
    a, b = load_file(one / "model.safetensors"), load_file(two / "model.safetensors")
    masks = sum(int(((a[k] == 0) != (b[k] == 0)).sum()) for k in a)
    worst = max(float((a[k] - b[k]).abs().max() / a[k].abs().max().clamp_min(1e-30)) for k in a)
    return {"mask_differences": masks, "max_relative_difference": worst}


def estimate_70b(records: list[dict]) -> list[str]:
    """Traffic per layer of a 70B Llama at world size 8, from what this implementation sends (float64 statistics
    and q/k refit gradients, weights in the model's dtype); stated as arithmetic on shapes."""
    h, i, kv, layers = LLAMA_70B["hidden"], LLAMA_70B["intermediate"], LLAMA_70B["kv_dim"], LLAMA_70B["layers"]
    hessians = 8 * (3 * h * h + i * i)  # X^T X of the q/k/v, o, gate/up and down inputs, float64
    weights = 2 * (h * h + 2 * h * kv + h * h + 3 * h * i)  # every pruned matrix broadcast once, bfloat16
    refit_step = 8 * (h * h + h * kv)  # the q/k gradient of one refit step, float64
    per_layer = {"whole (SparseGPT on v/o/MLP)": hessians + weights, "q/k refit, 100 steps": 100 * refit_step}
    lines = ["| 70B Llama, per layer | bytes sent per rank | 80 layers | at 25 GB/s (ring all-reduce ≈ 2× bytes) |",
             "|---|---|---|---|"]
    for name, size in per_layer.items():
        lines.append(f"| {name} | {size / 1e9:.1f} GB | {layers * size / 1e9:.0f} GB | "
                     f"{2 * layers * size / 25e9 / 60:.1f} min |")
    return lines


TIMES = ("wall_seconds", "prune_seconds", "load_and_save_seconds", "mean_layer_seconds")


def markdown(records: list[dict], comparisons: dict, timing: bool = True) -> str:
    if timing:
        lines = ["| recipe | ranks | wall s | pruning s | load + save s | mean layer s | speed-up (pruning) | "
                 "bytes sent per layer |", "|---|---|---|---|---|---|---|---|"]
    else:
        lines = ["| recipe | ranks | bytes sent per layer |", "|---|---|---|"]
    for r in records:
        if not timing:
            lines.append(f"| {r['recipe']} | {r['world_size']} | {r['bytes_per_layer'] / 1e6:.1f} MB |")
            continue
        base = next(b for b in records if b["recipe"] == r["recipe"] and b["world_size"] == 1)
        lines.append(f"| {r['recipe']} | {r['world_size']} | {r['wall_seconds']:.0f} | {r['prune_seconds']:.0f} | "
                     f"{r['load_and_save_seconds']:.0f} | {r['mean_layer_seconds']:.2f} | "
                     f"{base['prune_seconds'] / r['prune_seconds']:.2f} | {r['bytes_per_layer'] / 1e6:.1f} MB |")
    lines += ["", "| recipe | masks differing (2 ranks vs 1) | max relative weight difference |", "|---|---|---|"]
    lines += [f"| {name} | {c['mask_differences']} | {c['max_relative_difference']:.1e} |"
              for name, c in comparisons.items()]
    return "\n".join(lines + [""] + estimate_70b(records))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--overwrite", action="store_true")
    parser.add_argument("--recipes", nargs="+", default=list(RECIPES))
    parser.add_argument("--no-timing", action="store_true",
                        help="leave the times out (the ranks share cores, so they would mislead)")
    args = parser.parse_args(argv)
    check_output_dir(args.out, args.overwrite)
    records, comparisons = [], {}
    with tempfile.TemporaryDirectory(prefix="attnprune-dist-") as work:
        for recipe in args.recipes:
            outs = {}
            for ranks in (1, 2):
                outs[ranks] = Path(work) / f"{recipe}-{ranks}"
                records.append(run(recipe, ranks, outs[ranks]))
                print(json.dumps(records[-1]), file=sys.stderr)
            comparisons[recipe] = compare(outs[1], outs[2])
    timing = not args.no_timing
    if not timing:
        records = [{key: value for key, value in r.items() if key not in TIMES} for r in records]
    table = markdown(records, comparisons, timing)
    with atomic_output_dir(args.out, args.overwrite) as tmp:
        (tmp / "distributed.json").write_text(json.dumps({"runs": records, "comparisons": comparisons,
                                                          "threads_per_rank": 1, "timed": timing,
                                                          "torch": torch.__version__}, indent=2) + "\n")
        (tmp / "distributed.md").write_text(table + "\n")
    print(table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
