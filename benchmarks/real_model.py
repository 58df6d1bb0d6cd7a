"""The method against Wanda, SparseGPT and magnitude pruning on a real model (SmolLM2-135M), at equal sparsity.

Configurations: dense; q/k at 50% and at 70%; q/k at 2:4 (each with the method, Wanda, SparseGPT, magnitude); the
whole model at 50%, 70% and 2:4 (the whole-layer method with the packaged smollm2_whole*_layer recipes' settings,
against SparseGPT and Wanda everywhere).
Calibration: C4 rows 0-7 x 512 tokens (the standard protocol). Each pruning runs in its own process through the
CLI, so its wall time and peak RSS are its own; its output folder is then evaluated here against the dense model:
WikiText-2 and C4 perplexity, the attention error (C4 rows 1000-1007, 256 tokens, from the dense model's layer
inputs) and lm-eval accuracy on a subset. ``--quick``: the README's quick protocol (64 WikiText-2 windows, the
first 32 C4 documents) and 50 examples per task; the full run: all windows, 128 documents, 500 examples.

Writes real_model.json (one record per configuration, each naming the command that produced it), real_model.md and
real_model.png into --out. ``--join DIR ...`` runs nothing: it combines the records of earlier outputs (parts of one
protocol run side by side, one per core) into one table, plot and README section.
Usage: python benchmarks/real_model.py [--quick] --out DIR [--overwrite] [--only CONFIG ...] [--methods METHOD ...]
       [--tasks [TASK ...]] [--limit N] [--readme SECTION] [--model PATH]
       python benchmarks/real_model.py --join DIR [DIR ...] --out DIR [--overwrite] [--readme SECTION]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

from attnprune_opt.atomic import atomic_output_dir, check_output_dir
from attnprune_opt.evaluation.runner import evaluate
from attnprune_opt.export.load import load_pruned_model, read_manifest
from attnprune_opt.models.loading import load_model, load_tokenizer
from attnprune_opt.recipes import recipe_path

REPO = Path(__file__).resolve().parent.parent
TASKS = ("arc_easy", "piqa")
QK = ["q_proj", "k_proj"]
REST = ["v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
ALL = QK + REST
CALIBRATION = {"source": "c4", "num_samples": 8, "seq_len": 512}
METHOD_COLORS = {"attention": "C0", "layer": "C0", "wanda": "C1", "sparsegpt": "C2", "magnitude": "C3"}
WHOLE = (("whole50", 0.5, "unstructured"), ("whole70", 0.7, "unstructured"), ("whole_2of4", None, "2:4"))
#: issue 10's targets: the whole-layer method's perplexity over the better baseline's
WHOLE_TARGETS = {"whole50": 0.85, "whole70": 0.75, "whole_2of4": 0.75}


def _rule(modules: list[str], method: str, sparsity: float | None, structure: str) -> dict:
    rule = {"modules": modules, "method": method, "structure": structure}
    return rule if sparsity is None else {**rule, "sparsity": sparsity}


def configurations() -> list[dict]:
    """Every run of the benchmark: its name, the method label, and the recipe it prunes with."""
    runs = [{"config": "dense", "method": "dense", "targets": "none", "sparsity": 0.0, "structure": "dense",
             "recipe": None}]
    for name, sparsity, structure in (("qk50", 0.5, "unstructured"), ("qk70", 0.7, "unstructured"),
                                      ("qk_2of4", None, "2:4")):
        for method in ("attention", "wanda", "sparsegpt", "magnitude"):
            runs.append({"config": name, "method": method, "targets": "q_proj,k_proj",
                         "sparsity": sparsity or 0.5, "structure": structure,
                         "recipe": {"rules": [_rule(QK, method, sparsity, structure)]}})
    for name, sparsity, structure in WHOLE:
        # the method's settings are the packaged recipe's, so the benchmark measures what users run
        layer = yaml.safe_load(recipe_path(f"smollm2_{name}_layer").read_text())
        for method in ("layer", "wanda", "sparsegpt"):
            recipe = {"rules": [_rule(ALL, method, sparsity, structure)],
                      **({"layer": layer["layer"]} if method == "layer" else {})}
            runs.append({"config": name, "method": method, "targets": "all linears", "sparsity": sparsity or 0.5,
                         "structure": structure, "recipe": recipe})
    for run in runs:
        if run["recipe"] is not None:
            run["recipe"] = {**run["recipe"], "calibration": CALIBRATION, "seed": 0}
    return runs


def prune(run: dict, work: Path, model: str | None = None) -> Path:
    """Prune in a separate process (the CLI), so time and memory are measured for this run alone."""
    recipe = work / f"{run['config']}_{run['method']}.yaml"
    recipe.write_text(yaml.safe_dump(run["recipe"], sort_keys=False))
    out = work / recipe.stem
    subprocess.run([sys.executable, "-m", "attnprune_opt.cli", "prune", "--recipe", str(recipe), "--output",
                    str(out), "--quiet", *(["--model", model] if model else [])], check=True,
                   stdout=subprocess.DEVNULL)
    return out


def record(run: dict, result: dict, manifest: dict | None) -> dict:
    report = (manifest or {}).get("report") or {}
    return {
        "config": run["config"], "method": run["method"], "targets": run["targets"], "sparsity": run["sparsity"],
        "structure": run["structure"],
        "wikitext2_ppl": result["perplexity"]["wikitext2"]["perplexity"],
        "c4_ppl": result["perplexity"]["c4"]["perplexity"],
        "attention_error": (result["attention_error"] or {"mean": 0.0})["mean"],
        "lm_eval": {task: values.get("acc") for task, values in result["tasks"].items()},
        "lm_eval_stderr": {task: values.get("acc_stderr") for task, values in result["tasks"].items()},
        "prune_seconds": report.get("seconds"),
        "prune_cpu_seconds": report.get("cpu_seconds"),
        "peak_rss_mb": report.get("peak_rss_mb"),
        "measured_sparsity": (manifest or {}).get("sparsity", {}).get("pruned_weights"),
        "protocol": result["protocol"],
        "data_sha256": {key: result["perplexity"][key].get("sha256") for key in ("wikitext2", "c4")},
    }


def run_all(runs: list[dict], quick: bool, work: Path, tasks: tuple[str, ...] = TASKS,
            model: str | None = None, limit: int | None = None) -> list[dict]:
    tokenizer = load_tokenizer(*([model] if model else []))
    dense = load_model(*([model] if model else [])).eval()
    options = dict(quick=quick, tasks=tasks, limit=limit or (50 if quick else 500), progress=False)
    records = []
    for run in runs:
        start = time.perf_counter()
        if run["recipe"] is None:
            result, manifest = evaluate(dense, tokenizer, **options), None
        else:
            folder = prune(run, work, model)
            manifest = read_manifest(folder).model_dump(mode="json")
            pruned = load_pruned_model(folder).eval()
            result = evaluate(pruned, tokenizer, dense_model=dense, **options)
            del pruned
        records.append(record(run, result, manifest))
        print(f"{run['config']:8s} {run['method']:20s} done in {time.perf_counter() - start:.0f} s: "
              f"{json.dumps({k: records[-1][k] for k in ('wikitext2_ppl', 'c4_ppl', 'attention_error')})}",
              file=sys.stderr)
    return records


def markdown(records: list[dict]) -> str:
    dense = next((r for r in records if r["config"] == "dense"), None)
    tasks = list(dict.fromkeys(task for r in records for task in r["lm_eval"]))
    lines = ["| config | method | sparsity | WikiText-2 ppl | C4 ppl | attention error | "
             + "".join(f"{t} acc | " for t in tasks) + "prune s | prune CPU s | peak RSS MB |",
             "|---|---|---|---|---|---|" + "---|" * len(tasks) + "---|---|---|"]
    for r in records:
        accuracies = "".join(_accuracy(r, t) for t in tasks)
        seconds = f"{r['prune_seconds']:.0f}" if r["prune_seconds"] is not None else "–"
        cpu = f"{r['prune_cpu_seconds']:.0f}" if r.get("prune_cpu_seconds") is not None else "–"
        rss = f"{r['peak_rss_mb']:.0f}" if r["peak_rss_mb"] is not None else "–"
        sparsity = r["structure"] if r["structure"] not in ("unstructured", "dense") else f"{r['sparsity']:g}"
        lines.append(f"| {r['config']} | {r['method']} | {sparsity} | "
                     f"{r['wikitext2_ppl']:.2f} | {r['c4_ppl']:.2f} | {r['attention_error']:.4f} | {accuracies}"
                     f"{seconds} | {cpu} | {rss} |")
    lines += ["", _ratios(records, dense)]
    return "\n".join(lines)


def _accuracy(record: dict, task: str) -> str:
    acc, stderr = record["lm_eval"].get(task), record.get("lm_eval_stderr", {}).get(task)
    if acc is None:
        return "– | "
    return f"{acc:.3f} ± {stderr:.3f} | " if stderr is not None else f"{acc:.3f} | "


def _ratios(records: list[dict], dense: dict | None) -> str:
    """The issues' targets, as ratios measured in this run (the q/k rows need the dense row)."""
    out = ["| config | attention error ÷ best baseline | ppl increase ÷ best baseline's (WikiText-2, C4) | "
           "prune time ÷ SparseGPT's (wall, CPU) |", "|---|---|---|---|"]
    for config in dict.fromkeys(r["config"] for r in records if dense and r["config"] not in ("dense", *WHOLE_TARGETS)):
        group = {r["method"]: r for r in records if r["config"] == config}
        ours = group.get("attention")
        baselines = [group[m] for m in ("wanda", "sparsegpt") if m in group]
        if not ours or not baselines:
            continue
        best_err = min(b["attention_error"] for b in baselines)
        increases = []
        for key in ("wikitext2_ppl", "c4_ppl"):
            best = min(b[key] for b in baselines) - dense[key]
            increases.append(f"{(ours[key] - dense[key]) / best:.2f}" if best > 0 else "–")
        time_ratio = _time_ratio(ours, group["sparsegpt"]) if "sparsegpt" in group else "–"
        out.append(f"| {config} | {ours['attention_error'] / best_err:.2f} | {', '.join(increases)} | {time_ratio} |")
    whole = ["", "| config | perplexity ÷ the better baseline's (WikiText-2, C4) | target | "
                 "prune time ÷ SparseGPT's (wall, CPU) | target | mean accuracy: method − better baseline |",
             "|---|---|---|---|---|---|"]
    for config, target in WHOLE_TARGETS.items():
        group = {r["method"]: r for r in records if r["config"] == config}
        if not {"layer", "wanda", "sparsegpt"} <= set(group):
            continue
        ours = group["layer"]
        ratios = [ours[key] / min(group["wanda"][key], group["sparsegpt"][key]) for key in ("wikitext2_ppl", "c4_ppl")]
        whole.append(f"| {config} | {', '.join(f'{r:.3f}' for r in ratios)} | ≤ {target} | "
                     f"{_time_ratio(ours, group['sparsegpt'])} | ≤ 3 | "
                     f"{_accuracy_gain(ours, [group['wanda'], group['sparsegpt']])} |")
    return "\n".join((out if len(out) > 2 else []) + (whole if len(whole) > 4 else []))


def _mean_accuracy(record: dict) -> tuple[float, float] | None:
    """The mean accuracy over the record's tasks and its standard error (tasks independent)."""
    accs, errs = record["lm_eval"], record.get("lm_eval_stderr", {})
    if not accs or any(accs[t] is None or errs.get(t) is None for t in accs):
        return None
    return sum(accs.values()) / len(accs), sum(errs[t] ** 2 for t in accs) ** 0.5 / len(accs)


def _accuracy_gain(ours: dict, baselines: list[dict]) -> str:
    """The method's mean accuracy minus the better baseline's, ± the difference's standard error."""
    means = [_mean_accuracy(r) for r in (ours, *baselines)]
    if any(m is None for m in means) or len({tuple(r["lm_eval"]) for r in (ours, *baselines)}) > 1:
        return "–"
    best = max(means[1:])
    return f"{means[0][0] - best[0]:+.3f} ± {(means[0][1] ** 2 + best[1] ** 2) ** 0.5:.3f}"


def _time_ratio(ours: dict, baseline: dict) -> str:
    ratios = [ours[key] / baseline[key] for key in ("prune_seconds", "prune_cpu_seconds")
              if ours.get(key) and baseline.get(key)]
    return ", ".join(f"{r:.1f}" for r in ratios) or "–"


def plot(records: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    pruned = [r for r in records if r["config"] != "dense"]
    configs = list(dict.fromkeys(r["config"] for r in pruned))
    fig, axes = plt.subplots(1, 3, figsize=(16, 4.5))
    for ax, key, title in zip(axes, ("attention_error", "wikitext2_ppl", "c4_ppl"),
                              ("attention error (mean over heads and layers)", "WikiText-2 perplexity",
                               "C4 perplexity")):
        for i, config in enumerate(configs):
            group = [r for r in pruned if r["config"] == config]
            for j, r in enumerate(group):
                ax.bar(i + 0.2 * (j - (len(group) - 1) / 2), r[key], width=0.18,
                       color=METHOD_COLORS.get(r["method"], "C5"), label=r["method"])
        dense = next((r for r in records if r["config"] == "dense"), None)
        if dense and key != "attention_error":
            ax.axhline(dense[key], color="k", linestyle="--", linewidth=1, label="dense")
        ax.set_xticks(range(len(configs)), configs)
        ax.set_yscale("log")
        ax.set_title(title)
    handles, labels = axes[0].get_legend_handles_labels()
    unique = dict(zip(labels, handles))
    axes[2].legend(unique.values(), unique.keys(), fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def readme_markers(section: str) -> tuple[str, str]:
    """The README's markers around a generated section: ``results`` (q/k rows) or ``whole`` (whole-model rows)."""
    return f"<!-- {section}:start -->", f"<!-- {section}:end -->"


def join(parts: list[Path]) -> list[dict]:
    """The records of earlier outputs, in the order :func:`configurations` runs them; a configuration and method
    measured twice, or parts run with different protocols, are refused (they would not compare)."""
    records = [r for part in parts for r in json.loads((part / "real_model.json").read_text())]
    seen: set[tuple[str, str]] = set()
    for r in records:
        key = (r["config"], r["method"])
        if key in seen:
            raise SystemExit(f"{key[0]} {key[1]} is in more than one of {', '.join(map(str, parts))}")
        seen.add(key)
    protocols = {json.dumps(r["protocol"], sort_keys=True)
                 for r in records}
    if len(protocols) > 1:
        raise SystemExit(f"the parts were evaluated with different protocols: {sorted(protocols)}")
    order = {(r["config"], r["method"]): i for i, r in enumerate(configurations())}
    return sorted(records, key=lambda r: order.get((r["config"], r["method"]), len(order)))


def portable_command(arguments: list[str]) -> str:
    """The benchmark's arguments with each absolute path reduced to its name (records hold no local paths)."""
    return " ".join(Path(a).name if Path(a).is_absolute() else a for a in arguments)


def commands(records: list[dict]) -> str:
    runs = (f"python benchmarks/real_model.py {r['command']}" for r in records if "command" in r)
    return "` and `".join(dict.fromkeys(runs))


def update_readme(records: list[dict], section: str) -> None:
    """Regenerate a results section of README.md from these records, naming the commands that produced them."""
    readme = REPO / "README.md"
    text = readme.read_text()
    README_START, README_END = readme_markers(section)
    if README_START not in text or README_END not in text:
        raise SystemExit(f"README.md lacks the {README_START} ... {README_END} markers")
    body = f"Generated by `{commands(records)}` (SmolLM2-135M, CPU).\n\n{markdown(records)}\n"
    head, rest = text.split(README_START, 1)
    tail = rest.split(README_END, 1)[1]
    readme.write_text(f"{head}{README_START}\n{body}{README_END}{tail}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="the short protocol")
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--overwrite", action="store_true")
    parser.add_argument("--only", nargs="+", help="run only these configs (e.g. dense qk50)")
    parser.add_argument("--methods", nargs="+", help="run only these methods (dense always runs when selected)")
    parser.add_argument("--tasks", nargs="*", default=list(TASKS),
                        help=f"lm-eval tasks (default: {' '.join(TASKS)}; none: --tasks with no name)")
    parser.add_argument("--readme", metavar="SECTION", choices=("results", "whole"),
                        help="regenerate this section of README.md (results: q/k rows; whole: whole-model rows)")
    parser.add_argument("--limit", type=int, help="lm-eval documents per task (default 50 with --quick, else 500)")
    parser.add_argument("--model", help="a model folder or .gguf file instead of SmolLM2-135M (README: other families)")
    parser.add_argument("--join", nargs="+", type=Path, metavar="DIR",
                        help="run nothing: combine these earlier outputs' records")
    args = parser.parse_args(argv)
    if args.readme and args.model:
        parser.error("--readme regenerates the SmolLM2 results; run another --model without it")
    check_output_dir(args.out, args.overwrite)
    if args.join:
        missing = [str(part) for part in args.join if not (part / "real_model.json").is_file()]
        if missing:
            parser.error(f"no real_model.json in {', '.join(missing)}")
        records = join(args.join)
    else:
        runs = [r for r in configurations() if (not args.only or r["config"] in args.only)
                and (not args.methods or r["method"] in args.methods or r["config"] == "dense")]
        with tempfile.TemporaryDirectory(prefix="attnprune-bench-") as work:
            records = run_all(runs, args.quick, Path(work), tuple(args.tasks), args.model, args.limit)
        command = portable_command(sys.argv[1:] if argv is None else argv)
        records = [{**r, "command": command} for r in records]
    table = markdown(records)
    with atomic_output_dir(args.out, args.overwrite) as tmp:
        (tmp / "real_model.json").write_text(json.dumps(records, indent=1))
        name = Path(args.model).name if args.model else "SmolLM2-135M"
        (tmp / "real_model.md").write_text(f"# {name}: the method against linear pruning\n\n{table}\n")
        plot(records, tmp / "real_model.png")
    if args.readme:
        update_readme(records, args.readme)
    print(table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
