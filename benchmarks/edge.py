"""Edge figures of the default model (SmolLM2-135M): dense, q/k at 50% and the whole model at 50%, in the
formats and dtypes a user would ship, and weight-only int8 (torchao) on top of each; from one run.

The embedded model is written as a plain safetensors folder (its GGUF load would dequantize in memory and distort
the figures), pruned by the CLI with `smollm2_qk50.yaml` and `smollm2_whole50.yaml`, and exported to bitmask
folders. Then every row is one `attnprune-opt eval FOLDER --edge` in its own process: the weights' memory, the
process's resident growth from before loading to after the speed runs, batch-1 prefill and decode tokens per
second, and the WikiText-2 perplexity of the first 16 windows of 512 tokens. Speed depends on this machine and its load; the other columns do
not. The rows run on one thread (OMP_NUM_THREADS=1): on a machine shared with other work, two threads wait on each
other at every small decode step (a first run measured 1 decoded token per second that way), so the figures are
per core.

Usage: python benchmarks/edge.py --out DIR [--overwrite] [--readme]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

from offload_memory import SAVE_DENSE

from attnprune_opt.atomic import atomic_output_dir, check_output_dir

REPO = Path(__file__).resolve().parent.parent
CLI = [sys.executable, "-m", "attnprune_opt.cli"]
PRUNED = {"qk50": "smollm2_qk50", "whole50": "smollm2_whole50"}  # packaged recipes
README_START, README_END = "<!-- edge:start -->", "<!-- edge:end -->"
WINDOWS = 16  # WikiText-2 windows per perplexity: 13 runs must fit a shared 2-core machine


def variants(model: str) -> list[dict]:
    """The rows of one model: each format it has, in float32 and bfloat16, and int8 weights (from float32)."""
    formats = ["dense"] if model == "dense" else ["dense", "bitmask"]
    rows = [{"model": model, "format": f, "dtype": d} for f in formats for d in ("float32", "bfloat16")]
    return [*rows, {"model": model, "format": "dense", "dtype": "int8"}]


def eval_args(row: dict) -> list[str]:
    return ["--int8"] if row["dtype"] == "int8" else ["--dtype", row["dtype"]]


def folder_mb(folder: Path) -> float:
    return sum(f.stat().st_size for f in folder.glob("*.safetensors")) / 1e6


def prepare(model: str, work: Path) -> dict[str, Path]:
    """The folders of one model by format: the dense model saved plainly, or pruned from it and exported."""
    if model == "dense":
        subprocess.run([sys.executable, "-c", SAVE_DENSE, str(work / "dense")], check=True)
        return {"dense": work / "dense"}
    folders = {"dense": work / model, "bitmask": work / f"{model}_bitmask"}
    subprocess.run([*CLI, "prune", "--recipe", PRUNED[model], "--model", str(work / "dense"),
                    "--output", str(folders["dense"]), "--quiet"], check=True, stdout=subprocess.DEVNULL)
    subprocess.run([*CLI, "export", str(folders["dense"]), str(folders["bitmask"]), "--format", "bitmask"],
                   check=True, stdout=subprocess.DEVNULL)
    return folders


def measure(row: dict, folder: Path, work: Path, windows: int) -> dict:
    """One row: `eval --edge` in its own process. A bitmask folder loads to the same weights as its dense export
    (bit for bit, tests/test_bitmask.py), so its perplexity is not computed again."""
    out = work / "eval" / f"{row['model']}_{row['format']}_{row['dtype']}"
    perplexity = ["--no-perplexity"] if row["format"] == "bitmask" else ["--perplexity", "wikitext2", "--windows",
                                                                         str(windows)]
    subprocess.run([*CLI, "eval", str(folder), "--edge", *eval_args(row), *perplexity, "--output", str(out),
                    "--quiet"], check=True, stdout=subprocess.DEVNULL, env={**os.environ, "OMP_NUM_THREADS": "1"})
    result = json.loads((out / "results.json").read_text())[0]
    ppl = result["perplexity"].get("wikitext2")
    if ppl is not None and ppl["sequences"] != windows:
        raise SystemExit(f"{out}: {ppl['sequences']} WikiText-2 windows scored, expected {windows}")
    return {**result["edge"], "file_mb": folder_mb(folder), "wikitext2_ppl": ppl and ppl["perplexity"],
            "attention_error": (result["attention_error"] or {}).get("mean"), **row}  # the row's dtype: int8


def markdown(records: list[dict]) -> str:
    first = records[0]
    lines = [f"Batch 1, {first['prompt_tokens']}-token prefill and {first['new_tokens']} decoded tokens (median of "
             f"{first['repeats']}), {first['threads']} threads; WikiText-2 perplexity on the first {WINDOWS} "
             "windows of 512 tokens (bitmask rows: the same weights as the dense format once loaded).", "",
             "| model | format | weights | file MB | weights MB | resident MB | prefill tok/s | decode tok/s | "
             "WikiText-2 ppl |", "|---|---|---|---|---|---|---|---|---|"]
    for r in records:
        lines.append(f"| {r['model']} | {r['format']} | {r['dtype']} | {r['file_mb']:.1f} | {r['weights_mb']:.1f} | "
                     f"{r['resident_mb']:.0f} | {r['prefill_tokens_per_s']:.0f} | {r['decode_tokens_per_s']:.1f} | "
                     f"{'=' if r['wikitext2_ppl'] is None else format(r['wikitext2_ppl'], '.2f')} |")
    return "\n".join(lines) + "\n"


def update_readme(table: str) -> None:
    readme = REPO / "README.md"
    text = readme.read_text()
    if README_START not in text or README_END not in text:
        raise SystemExit(f"README.md lacks the {README_START} ... {README_END} markers")
    head, rest = text.split(README_START, 1)
    body = f"Generated by `python benchmarks/edge.py --readme` (SmolLM2-135M, CPU).\n\n{table}"
    readme.write_text(f"{head}{README_START}\n{body}{README_END}{rest.split(README_END, 1)[1]}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, required=True, help="results folder (edge.json, edge.md)")
    parser.add_argument("--overwrite", action="store_true")
    parser.add_argument("--readme", action="store_true", help="regenerate README.md's edge table")
    args = parser.parse_args(argv)
    check_output_dir(args.out, args.overwrite)
    with tempfile.TemporaryDirectory(prefix="attnprune-edge-") as work:
        work = Path(work)
        records = []
        for model in ("dense", *PRUNED):  # measured as soon as made, so a failure shows early
            folders = prepare(model, work)
            records += [measure(row, folders[row["format"]], work, windows=WINDOWS) for row in variants(model)]
            print(markdown(records), flush=True)
    table = markdown(records)
    with atomic_output_dir(args.out, args.overwrite) as tmp:
        (tmp / "edge.json").write_text(json.dumps(records, indent=2) + "\n")
        (tmp / "edge.md").write_text(table)
    if args.readme:
        update_readme(table)
    print(table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
