"""Standard lm-eval tasks run offline from the local copies in the data folder; with network access, any other
lm-eval task name is passed to lm-eval, which fetches its data from the hub.

The task definitions live in ``attnprune_opt/evaluation/tasks`` (YAML that lm-eval reads); this module is their single
source of truth about which local file backs which task and how its rows map onto the hub dataset's columns, so
the official prompt templates apply unchanged. ``utils.load_local`` there calls :func:`load_local_docs`.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from attnprune_opt.data.calibration import data_file_sha256
from attnprune_opt.paths import DATA_DIR_ENV, data_dir as default_data_dir

if TYPE_CHECKING:
    import datasets

TASKS_DIR = Path(__file__).resolve().parent / "tasks"
LOCAL_TAG = "attnprune_local"


def _ai2_to_hub(question_key: str) -> Callable[[dict[str, Any]], dict[str, Any]]:
    """AI2 jsonl (ARC, OpenBookQA) -> the hub columns, as the hub's own loaders build them.

    The hub calls the question ``question`` for allenai/ai2_arc and ``question_stem`` for allenai/openbookqa.
    """

    def to_hub(row: dict[str, Any]) -> dict[str, Any]:
        choices = row["question"]["choices"]
        return {
            "id": row["id"],
            question_key: row["question"]["stem"],
            "choices": {"text": [c["text"] for c in choices], "label": [c["label"] for c in choices]},
            "answerKey": row["answerKey"],
        }

    return to_hub


_BOOLQ_LABELS = {"false": 0, "true": 1}  # aps/super_glue boolq: ClassLabel(names=["False", "True"])


def _boolq_to_hub(row: dict[str, Any]) -> dict[str, Any]:
    """SuperGLUE BoolQ jsonl (label "true"/"false") -> aps/super_glue ``boolq`` columns (label 0/1)."""
    label = str(row["label"]).lower()
    if label not in _BOOLQ_LABELS:
        raise ValueError(f"boolq row idx={row.get('idx')}: label {row['label']!r} is neither 'true' nor 'false'")
    return {"question": row["question"], "passage": row["passage"], "idx": row["idx"], "label": _BOOLQ_LABELS[label]}


@dataclass(frozen=True)
class LocalTask:
    """One local copy: the lm-eval task that reads it, its file, and how rows become hub rows."""

    task: str  # lm-eval task name of the local YAML (never clashes with the official one)
    file: str  # relative to the data folder
    split: str  # the split the official task evaluates on
    hub_columns: tuple[str, ...]  # columns the official prompt templates read
    to_hub: Callable[[dict[str, Any]], dict[str, Any]] | None = None  # None: the file already has them


LOCAL_TASKS: dict[str, LocalTask] = {
    "hellaswag": LocalTask(
        "local_hellaswag",
        "hellaswag/validation.arrow",
        "validation",
        ("activity_label", "ctx_a", "ctx_b", "endings", "label"),
    ),
    "arc_easy": LocalTask(
        "local_arc_easy",
        "arc_easy/ARC-Easy-Test.jsonl",
        "test",
        ("question", "choices", "answerKey"),
        _ai2_to_hub("question"),
    ),
    "arc_challenge": LocalTask(
        "local_arc_challenge",
        "arc_challenge/ARC-Challenge-Test.jsonl",
        "test",
        ("question", "choices", "answerKey"),
        _ai2_to_hub("question"),
    ),
    "piqa": LocalTask("local_piqa", "piqa/validation.arrow", "validation", ("goal", "sol1", "sol2", "label")),
    "winogrande": LocalTask(
        "local_winogrande", "winogrande/validation.arrow", "validation", ("sentence", "option1", "option2", "answer")
    ),
    "boolq": LocalTask(
        "local_boolq", "boolq/val.jsonl", "validation", ("passage", "question", "label"), _boolq_to_hub
    ),
    "openbookqa": LocalTask(
        "local_openbookqa",
        "openbookqa/test.jsonl",
        "test",
        ("question_stem", "choices", "answerKey"),
        _ai2_to_hub("question_stem"),
    ),
    "lambada_openai": LocalTask("local_lambada_openai", "lambada_openai/lambada_test.jsonl", "test", ("text",)),
}


def _spec(name: str) -> LocalTask:
    try:
        return LOCAL_TASKS[name]
    except KeyError:
        raise ValueError(f"unknown task {name!r}; known tasks: {', '.join(LOCAL_TASKS)}") from None


def hub_allowed() -> bool:
    """Whether lm-eval may fetch a task's data from the hub: neither HF_DATASETS_OFFLINE nor HF_HUB_OFFLINE is set."""
    return not any(os.environ.get(name, "").lower() in ("1", "true", "yes", "on")
                   for name in ("HF_DATASETS_OFFLINE", "HF_HUB_OFFLINE"))


def tasks_dir() -> Path:
    """The folder lm-eval is pointed at (``include_path``); package data, so it ships in the wheel."""
    return TASKS_DIR


def local_data_file(name: str, data_dir: Path | str | None = None) -> Path:
    """Path of the local copy for user-facing task ``name`` (it may not exist)."""
    return Path(data_dir or default_data_dir()) / _spec(name).file


def load_local_docs(name: str, data_dir: Path | str | None = None) -> datasets.Dataset:
    """The local copy of ``name`` as a Dataset with the hub dataset's columns, in file order."""
    import datasets

    spec = _spec(name)
    path = local_data_file(name, data_dir)
    if not path.is_file():
        raise FileNotFoundError(
            f"local data for task {name!r} not found: {path} (the data folder comes from ${DATA_DIR_ENV})"
        )
    if path.suffix == ".arrow":
        # in_memory: map() must not try to write cache files next to the read-only data
        docs = datasets.Dataset.from_file(str(path), in_memory=True)
    else:
        with path.open(encoding="utf-8") as fh:
            docs = datasets.Dataset.from_list([json.loads(line) for line in fh if line.strip()])
    if spec.to_hub is not None:
        docs = docs.map(spec.to_hub, remove_columns=docs.column_names)
    missing = [c for c in spec.hub_columns if c not in docs.column_names]
    if missing:
        raise ValueError(f"{path} lacks the columns {missing} that the official {name!r} task reads")
    return docs


def resolve_tasks(names: list[str], data_dir: Path | None = None) -> list[str]:
    """lm-eval task names for user-facing ``names``: the local task if its copy exists, else the name itself (an
    official or any other lm-eval task, whose data lm-eval fetches from the hub)."""
    return [_spec(name).task if name in LOCAL_TASKS and local_data_file(name, data_dir).is_file() else name
            for name in names]


def _compact(metrics: dict[str, Any]) -> dict[str, float | None]:
    """``{"acc,none": x, "acc_stderr,none": "N/A"}`` -> ``{"acc": x, "acc_stderr": None}``."""
    out: dict[str, float | None] = {}
    for key, value in metrics.items():
        if "," not in key:  # "alias": not a metric
            continue
        metric, _, filter_name = key.partition(",")
        name = metric if filter_name == "none" else f"{metric},{filter_name}"
        out[name] = float(value) if isinstance(value, (int, float)) and math.isfinite(value) else None
    return out


def run_lm_eval(
    model: Any,
    tokenizer: Any,
    tasks: list[str],
    *,
    limit: int | float | None = None,
    batch_size: int = 8,
    num_fewshot: int | None = None,
    seed: int = 0,
    data_dir: Path | str | None = None,
) -> dict[str, dict[str, Any]]:
    """Evaluate an in-memory model on user-facing ``tasks`` with lm-eval; local copies are used where present.

    Returns, per user-facing name: the metrics (``acc``, ``acc_norm``, ``perplexity`` and their ``*_stderr``),
    ``task`` (the lm-eval task run), ``n_samples`` (docs scored) and ``data_sha256`` (None for hub data).
    """
    from lm_eval import simple_evaluate
    from lm_eval.models.huggingface import HFLM
    from lm_eval.tasks import TaskManager

    names = list(dict.fromkeys(tasks))
    if not names:
        raise ValueError("no tasks given")
    root = Path(data_dir or default_data_dir())
    lm_names = resolve_tasks(names, root)
    local = [n for n, t in zip(names, lm_names) if t != n]
    # The built-in index takes seconds to scan; only hub tasks need it.
    manager = TaskManager(
        include_path=str(tasks_dir()),
        include_defaults=len(local) < len(names),
        metadata={"data_dir": str(root)},  # reaches utils.load_local, so the run uses this folder
    )
    lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=batch_size)
    results = simple_evaluate(
        model=lm,
        tasks=lm_names,
        num_fewshot=num_fewshot,
        limit=limit,
        task_manager=manager,
        log_samples=False,
        random_seed=seed,
        numpy_random_seed=seed,
        torch_random_seed=seed,
        fewshot_random_seed=seed,
    )
    out: dict[str, dict[str, Any]] = {}
    for name, lm_name in zip(names, lm_names):
        out[name] = {
            **_compact(results["results"][lm_name]),
            "task": lm_name,
            "n_samples": int(results["n-samples"][lm_name]["effective"]),
            "data_sha256": data_file_sha256(local_data_file(name, root)) if name in local else None,
        }
    return out
