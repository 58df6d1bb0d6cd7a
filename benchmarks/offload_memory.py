"""Peak memory of pruning with every layer in RAM against most layers offloaded to disk (accelerate device map).

The embedded SmolLM2 is first written as a plain safetensors folder (GGUF must be dequantized in memory as a whole,
which would hide the saving), then pruned twice by the CLI in separate processes with the same recipe: once
loaded normally, once with decoder layers 2-29 on "disk". Each process's wall time and peak RSS are measured, and
the two outputs are checked tensor for tensor. Both save in 100 MB shards.

Usage: python benchmarks/offload_memory.py --out DIR [--recipe smollm2_qk50] [--overwrite]
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

IN_RAM_LAYERS = 2
SHARD = "100MB"  # saving holds one shard in memory; with one 540 MB shard the save alone would set the peak

SAVE_DENSE = """
import sys
from attnprune_opt.export.save import plain_checkpoint
from attnprune_opt.models.loading import load_model, load_tokenizer
model = load_model()
with plain_checkpoint(model):
    model.save_pretrained(sys.argv[1])
load_tokenizer().save_pretrained(sys.argv[1])
"""


def device_map(num_layers: int) -> dict[str, str]:
    layers = {f"model.layers.{i}": "cpu" if i < IN_RAM_LAYERS else "disk" for i in range(num_layers)}
    return {"model.embed_tokens": "cpu", **layers, "model.norm": "cpu", "model.rotary_emb": "cpu", "lm_head": "cpu"}


def run_measured(args: list[str]) -> dict[str, float]:
    """Run a command in a child process; its wall time and peak RSS (the child's own, from wait4)."""
    start = time.perf_counter()
    process = subprocess.Popen(args, stdout=subprocess.DEVNULL)
    _, status, usage = os.wait4(process.pid, 0)
    if status != 0:
        raise SystemExit(f"{' '.join(args)} failed with status {status}")
    return {"seconds": time.perf_counter() - start, "peak_rss_mb": usage.ru_maxrss / 1024}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--recipe", default="smollm2_qk50", help="recipe file or packaged recipe name")
    parser.add_argument("--overwrite", action="store_true")
    args = parser.parse_args(argv)
    check_output_dir(args.out, args.overwrite)
    with tempfile.TemporaryDirectory(prefix="attnprune-offload-") as work:
        work = Path(work)
        subprocess.run([sys.executable, "-c", SAVE_DENSE, str(work / "dense")], check=True)
        num_layers = json.loads((work / "dense" / "config.json").read_text())["num_hidden_layers"]
        prune = [sys.executable, "-m", "attnprune_opt.cli", "prune", "--recipe", str(args.recipe), "--model",
                 str(work / "dense"), "--quiet", "--max-shard-size", SHARD]
        results = {
            "all layers in RAM": run_measured([*prune, "--output", str(work / "ram")]),
            f"layers {IN_RAM_LAYERS}-{num_layers - 1} on disk": run_measured(
                [*prune, "--output", str(work / "disk"), "--device-map", json.dumps(device_map(num_layers)),
                 "--offload-folder", str(work / "offload")]),
        }
        ram, disk = ({k: v for f in sorted((work / name).glob("*.safetensors")) for k, v in load_file(f).items()}
                     for name in ("ram", "disk"))
        identical = ram.keys() == disk.keys() and all(torch.equal(ram[k], disk[k]) for k in ram)
    lines = ["| run | wall time (s) | peak RSS (MB) |", "|---|---|---|"]
    lines += [f"| {name} | {r['seconds']:.0f} | {r['peak_rss_mb']:.0f} |" for name, r in results.items()]
    lines.append(f"\nRecipe {Path(args.recipe).stem}; the two saved models are "
                 f"{'bit-identical' if identical else 'DIFFERENT'}.")
    table = "\n".join(lines)
    with atomic_output_dir(args.out, args.overwrite) as tmp:
        (tmp / "offload_memory.json").write_text(json.dumps({"runs": results, "identical": identical,
                                                             "recipe": str(args.recipe)}, indent=1))
        (tmp / "offload_memory.md").write_text(f"# Pruning with layers offloaded to disk\n\n{table}\n")
    print(table)
    return 0 if identical else 1


if __name__ == "__main__":
    sys.exit(main())
