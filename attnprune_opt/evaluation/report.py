"""Evaluation results on disk and on screen: JSON, a Markdown table (one row per model) and matplotlib plots.

``write_report`` writes a whole folder atomically (it appears complete or not at all; an existing one is only
replaced with ``overwrite``). The plot helpers draw into a given path so benchmarks can put them in their own
atomic folders.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from attnprune_opt.atomic import atomic_output_dir
from attnprune_opt.errors import ConfigError

RESULTS_JSON = "results.json"
RESULTS_MARKDOWN = "results.md"
ATTENTION_PLOT = "attention_error.png"
SPARSITY_PLOT = "perplexity_vs_sparsity.png"
MISSING = "–"

Result = dict[str, Any]


def _label(result: Result) -> str:
    return str(result["model"]["name"])


def to_markdown(results: Sequence[Result]) -> str:
    """A table with a row per model (perplexities, mean attention error, task accuracies) and its protocols."""
    ppl_sets = list(dict.fromkeys(name for r in results for name in r["perplexity"]))
    tasks = list(dict.fromkeys(name for r in results for name in r["tasks"]))
    edge = any(r.get("edge") for r in results)
    header = (["model", "sparsity"] + [f"{name} ppl" for name in ppl_sets] + ["attention error"]
              + [f"{name} acc / acc_norm" for name in tasks] + (list(EDGE_COLUMNS) if edge else []))
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for r in results:
        sparsity = r["model"].get("sparsity")
        attention = r["attention_error"]
        cells = [_label(r), MISSING if sparsity is None else f"{sparsity:.3f}"]
        cells += [f"{r['perplexity'][n]['perplexity']:.3f}" if n in r["perplexity"] else MISSING for n in ppl_sets]
        cells.append(MISSING if attention is None else f"{attention['mean']:.5f}")
        cells += [_accuracy(r["tasks"].get(name)) for name in tasks]
        if edge:
            cells += [_figure(r.get("edge"), key) for key in EDGE_COLUMNS.values()]
        lines.append("| " + " | ".join(cells) + " |")
    lines.append("")
    lines += [f"- {_label(r)}: {_protocol(r)}" for r in results]
    return "\n".join(lines)


EDGE_COLUMNS = {"weights MB": "weights_mb", "resident MB": "resident_mb", "prefill tok/s": "prefill_tokens_per_s",
                "decode tok/s": "decode_tokens_per_s"}


def _figure(edge: dict[str, Any] | None, key: str) -> str:
    value = (edge or {}).get(key)
    return MISSING if value is None else f"{value:.1f}"


def _accuracy(metrics: dict[str, Any] | None) -> str:
    if metrics is None:
        return MISSING
    values = [metrics.get(key) for key in ("acc", "acc_norm")]
    return " / ".join(MISSING if v is None else f"{v:.4f}" for v in values) + f" (n={metrics['n_samples']})"


def _protocol(result: Result) -> str:
    """What each figure was computed on, in words."""
    parts = []
    for name, ppl in result["perplexity"].items():
        unit = "windows" if name == "wikitext2" else "documents"
        parts.append(f"{name} {ppl['sequences']} {unit} of ≤{ppl['params']['seq_len']} tokens")
    attention = result["attention_error"]
    if attention is not None:
        rows = attention["protocol"]["rows"]
        parts.append(f"attention error on C4 rows [{rows[0]}, {rows[1]}) of ≤{attention['protocol']['seq_len']} "
                     "tokens")
    edge = result.get("edge")
    if edge:
        parts.append(f"speed at batch 1 on {edge['threads']} threads, {edge['dtype']}"
                     f"{' with int8 weights' if edge['int8_weights'] else ''}: {edge['prompt_tokens']}-token prefill, "
                     f"{edge['new_tokens']} decoded tokens, median of {edge['repeats']}")
    if result["tasks"]:
        parts.append(f"lm-eval limit {result['protocol']['lm_eval_limit']}")
    if result["protocol"]["quick"]:
        parts.append("QUICK protocol")
    return "; ".join(parts) or "nothing evaluated"


def plot_attention_error(results: Sequence[Result], path: str | Path) -> None:
    """Per-layer attention error, one series per model that has one."""
    plt = _pyplot()
    measured = [r for r in results if r["attention_error"] is not None]
    if not measured:
        raise ConfigError("no result has an attention error to plot")
    fig, ax = plt.subplots(figsize=(9, 4.5))
    for r in measured:
        per_layer = r["attention_error"]["per_layer"]
        ax.plot(range(len(per_layer)), per_layer, marker="o", markersize=3,
                label=f"{_label(r)} (mean {r['attention_error']['mean']:.4f})")
    ax.set_xlabel("layer")
    ax.set_ylabel("relative attention error (mean over heads)")
    ax.set_title("‖A_pruned − A_dense‖² / ‖A_dense‖² on dense layer inputs")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    _save(plt, fig, path)


def plot_perplexity_vs_sparsity(results: Sequence[Result], path: str | Path, *, dataset: str = "wikitext2") -> None:
    """Perplexity on ``dataset`` against ``model["sparsity"]``, a line per ``model["method"]`` (else per name).

    Results at sparsity 0 are drawn as horizontal reference lines (the dense model).
    """
    plt = _pyplot()
    points: dict[str, list[tuple[float, float]]] = {}
    for r in results:
        sparsity = r["model"].get("sparsity")
        if sparsity is None or dataset not in r["perplexity"]:
            raise ConfigError(f"result {_label(r)!r} has no model sparsity or no {dataset} perplexity to plot")
        series = _label(r) if sparsity == 0 else str(r["model"].get("method") or _label(r))
        points.setdefault(series, []).append((float(sparsity), r["perplexity"][dataset]["perplexity"]))
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for series, xy in points.items():
        xy.sort()
        if all(x == 0 for x, _ in xy):
            ax.axhline(xy[0][1], linestyle=":", color="gray", label=series)
        else:
            ax.plot([x for x, _ in xy], [y for _, y in xy], marker="o", label=series)
    ax.set_yscale("log")
    for axis in (ax.yaxis.set_major_formatter, ax.yaxis.set_minor_formatter):
        axis(lambda value, _: f"{value:g}")  # plain numbers, not 3.1 x 10^1
    ax.set_xlabel("sparsity of the pruned weights")
    ax.set_ylabel(f"{dataset} perplexity")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    _save(plt, fig, path)


def write_report(results: Sequence[Result], out_dir: str | Path, *, overwrite: bool = False) -> Path:
    """``results.json``, ``results.md``, the attention-error plot if any result has one, and the perplexity-vs-
    sparsity plot if two or more results carry a sparsity and a WikiText-2 perplexity."""
    results = list(results)
    with atomic_output_dir(out_dir, overwrite) as tmp:
        (tmp / RESULTS_JSON).write_text(json.dumps(results, indent=2), encoding="utf-8")
        (tmp / RESULTS_MARKDOWN).write_text(to_markdown(results) + "\n", encoding="utf-8")
        if any(r["attention_error"] is not None for r in results):
            plot_attention_error(results, tmp / ATTENTION_PLOT)
        plottable = [r for r in results if r["model"].get("sparsity") is not None and "wikitext2" in r["perplexity"]]
        if len(plottable) >= 2:
            plot_perplexity_vs_sparsity(plottable, tmp / SPARSITY_PLOT)
    return Path(out_dir)


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(plt, fig, path: str | Path) -> None:
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
