"""lm-eval hook for the local task copies: the data folder is chosen when the task is built, not in the YAML."""

from __future__ import annotations

from typing import Any

import datasets

from attnprune_opt.evaluation.lm_eval_tasks import LOCAL_TASKS, load_local_docs


def load_local(attnprune_task: str, data_dir: str | None = None, **_metadata: Any) -> datasets.DatasetDict:
    """``custom_dataset`` hook; lm-eval passes the task's ``dataset_kwargs`` and metadata as keywords.

    ``data_dir`` comes from TaskManager/--metadata when given (run_lm_eval always sets it); otherwise
    ``$ATTNPRUNE_DATA_DIR`` or its default. Other metadata (version, model_args from the CLI) is ignored.
    """
    split = LOCAL_TASKS[attnprune_task].split
    return datasets.DatasetDict({split: load_local_docs(attnprune_task, data_dir)})
