"""One evaluation of a model, as one JSON-ready result: perplexities, the attention error against a dense reference,
and lm-eval task accuracies, each with the protocol parameters and data file hashes it was computed with.

The standard protocol is ``shared/data/README.md``'s. ``quick`` scores the first 64 WikiText-2 windows (the README's
quick variant) and the first 32 of the 128 C4 documents (ours); its figures are not comparable with full ones, and
the result says so.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from attnprune_opt.errors import ConfigError
from attnprune_opt.paths import portable_name
from attnprune_opt.evaluation.attention_error import attention_error
from attnprune_opt.evaluation.lm_eval_tasks import LOCAL_TASKS, hub_allowed, run_lm_eval
from attnprune_opt.evaluation.perplexity import C4_EVAL_ROWS, QUICK_WINDOWS, c4_perplexity, wikitext2_perplexity

if TYPE_CHECKING:
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

logger = logging.getLogger(__name__)

PERPLEXITY_SETS = ("wikitext2", "c4")
QUICK_DOCUMENTS = 32
DEFAULT_BATCH_SIZE = 4


def check_request(perplexity: Iterable[str], tasks: Iterable[str], batch_size: int = DEFAULT_BATCH_SIZE,
                  limit: int | float | None = None, windows: int | None = None) -> None:
    """Unknown perplexity sets or tasks, a bad batch size, limit or window count fail here, before any model is
    loaded or run."""
    if batch_size < 1:
        raise ConfigError(f"batch_size must be >= 1, got {batch_size}")
    if limit is not None and not limit > 0:
        raise ConfigError(f"limit (lm-eval documents per task) must be > 0, got {limit}")
    if windows is not None and windows < 1:
        raise ConfigError(f"windows must be >= 1, got {windows}")
    unknown = [name for name in perplexity if name not in PERPLEXITY_SETS]
    if unknown:
        raise ConfigError(f"unknown perplexity data set {', '.join(map(repr, unknown))}; known: "
                          f"{', '.join(PERPLEXITY_SETS)}")
    hub_tasks = [name for name in tasks if name not in LOCAL_TASKS]
    if hub_tasks and not hub_allowed():
        raise ConfigError(f"task {', '.join(map(repr, hub_tasks))} has no local copy and the hub is offline "
                          f"(HF_DATASETS_OFFLINE / HF_HUB_OFFLINE); local tasks: {', '.join(LOCAL_TASKS)}")


def evaluate(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    *,
    dense_model: PreTrainedModel | None = None,
    perplexity: Sequence[str] = PERPLEXITY_SETS,
    quick: bool = False,
    tasks: Sequence[str] = (),
    limit: int | float | None = None,
    windows: int | None = None,
    documents: int | None = None,
    seq_len: int = 512,
    batch_size: int = DEFAULT_BATCH_SIZE,
    model_info: Mapping[str, Any] | None = None,
    data_dir: str | Path | None = None,
    progress: bool = True,
    edge: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """Evaluate ``model``; the attention error needs ``dense_model``, the task accuracies ``tasks``.

    ``windows`` caps the WikiText-2 windows (default all, 64 when ``quick``); ``documents`` is the number of C4
    documents from row 1000 (default 128, 32 when ``quick``); ``limit`` caps lm-eval's documents per task.
    ``model_info`` describes the model in the result (name, method, sparsity...; the name defaults to its
    name_or_path); reports label and group models by it. ``edge``: the model's memory and speed record from
    :func:`~attnprune_opt.evaluation.edge.edge_figures`, measured right after loading (before a dense reference
    is loaded beside it), kept with the result.
    """
    check_request(perplexity, tasks, batch_size, limit, windows)
    windows = QUICK_WINDOWS if windows is None and quick else windows
    documents = documents if documents is not None else QUICK_DOCUMENTS if quick else C4_EVAL_ROWS[1] - C4_EVAL_ROWS[0]
    if documents < 1:
        raise ConfigError(f"documents must be >= 1, got {documents}")
    c4_rows = (C4_EVAL_ROWS[0], C4_EVAL_ROWS[0] + documents)
    started = time.perf_counter()
    result: dict[str, Any] = {
        "model": {"name": _portable(getattr(model, "name_or_path", None) or model.config.name_or_path),
                  **(model_info or {})},
        "protocol": {
            "quick": quick,
            "wikitext2_windows": windows,
            "c4_rows": list(c4_rows),
            "seq_len": seq_len,
            "batch_size": batch_size,
            "lm_eval_limit": limit,
            "note": (f"quick: the first {windows} WikiText-2 windows and C4 rows [{c4_rows[0]}, {c4_rows[1]}) "
                     "instead of the standard protocol; not comparable with full figures") if quick else None,
        },
        "attention_error": None,
        "perplexity": {},
        "tasks": {},
        "edge": None,
    }
    if edge is not None:
        result["edge"] = dict(edge)
    if dense_model is not None:
        logger.info("attention error against the dense model, layer by layer")
        result["attention_error"] = attention_error(dense_model, model, tokenizer, data_dir=data_dir,
                                                    progress=progress)
    common = dict(seq_len=seq_len, data_dir=data_dir, batch_size=batch_size, progress=progress)
    if "wikitext2" in perplexity:
        logger.info("WikiText-2 perplexity: %s windows of %d tokens", windows or "all", seq_len)
        result["perplexity"]["wikitext2"] = wikitext2_perplexity(model, tokenizer, max_windows=windows,
                                                                 **common).to_dict()
    if "c4" in perplexity:
        logger.info("C4 perplexity: rows [%d, %d), up to %d tokens each", *c4_rows, seq_len)
        result["perplexity"]["c4"] = c4_perplexity(model, tokenizer, rows=c4_rows, **common).to_dict()
    if tasks:
        logger.info("lm-eval tasks %s%s", ", ".join(tasks), f" ({limit} documents each)" if limit else "")
        result["tasks"] = run_lm_eval(model, tokenizer, list(tasks), limit=limit, batch_size=batch_size,
                                      data_dir=data_dir)
    result["seconds"] = time.perf_counter() - started
    return result


def _portable(name: str) -> str:
    """A model's name_or_path without the absolute local path it may be."""
    return portable_name(name) if name and Path(name).exists() else name
