"""The local lm-eval tasks must prompt and score exactly like the official lm-eval 0.4.13 tasks.

The oracle is the official task itself: its YAML from the installed lm-eval, included unchanged except for the
data source, fed the same documents converted to the hub layout by the small converters below (written from the
hub datasets' schemas, independently of the package's loader).
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import datasets
import lm_eval.tasks as lm_eval_tasks
import pytest

from attnprune_opt.evaluation.lm_eval_tasks import (
    LOCAL_TAG,
    LOCAL_TASKS,
    load_local_docs,
    local_data_file,
    resolve_tasks,
    run_lm_eval,
    tasks_dir,
)
from attnprune_opt.data.calibration import data_file_sha256
from attnprune_opt.paths import DATA_DIR_ENV
from conftest import MINI_DATA

OFFICIAL_DIR = Path(lm_eval_tasks.__file__).parent


def _ai2(question_key):
    """The hub's loaders: question.stem -> question_key, choices [{text, label}] -> {text: [...], label: [...]}."""

    def to_hub(row):
        choices = row["question"]["choices"]
        hub_choices = {"text": [c["text"] for c in choices], "label": [c["label"] for c in choices]}
        stem = row["question"]["stem"]
        return {"id": row["id"], question_key: stem, "choices": hub_choices, "answerKey": row["answerKey"]}

    return to_hub


def _boolq(row):
    return {**row, "label": {"false": 0, "true": 1}[row["label"]]}


def _same(row):
    return row


# name -> (official YAML, docs in the data README, doc indices to compare (edge cases noted), to hub layout)
CASES = {
    "hellaswag": ("hellaswag/hellaswag.yaml", 10042, [0, 3243, 10041], _same),  # 3243: WikiHow [title]/[step] text
    # ARC 14/44: labels 1-4 instead of A-D; 93/121: 3 choices; 500/836: 5 choices
    "arc_easy": ("arc/arc_easy.yaml", 2376, [0, 14, 93, 500], _ai2("question")),
    "arc_challenge": ("arc/arc_challenge.yaml", 1172, [0, 44, 121, 836], _ai2("question")),
    "piqa": ("piqa/piqa.yaml", 1838, [0, 1837], _same),
    "winogrande": ("winogrande/default.yaml", 1267, [0, 1266], _same),
    "boolq": ("super_glue/boolq/default.yaml", 3270, [0, 1, 3269], _boolq),  # 0: false, 1: true
    "openbookqa": ("openbookqa/openbookqa.yaml", 500, [0, 499], _ai2("question_stem")),
    "lambada_openai": ("lambada/lambada_openai.yaml", 5153, [0, 5152], _same),
}
# Where the local task legitimately differs: its name, tag and data source (and splits: only one is local).
DATA_SOURCE_KEYS = {
    "task", "tag", "custom_dataset", "dataset_path", "dataset_name", "dataset_kwargs", "metadata",
    "training_split", "validation_split", "test_split", "fewshot_split", "fewshot_config",
}  # fmt: skip


def _raw_rows(name: str, indices: list[int], data_dir: Path | None = None) -> list[dict]:
    path = local_data_file(name, data_dir)
    if path.suffix == ".arrow":
        table = datasets.Dataset.from_file(str(path), in_memory=True)
        return [table[i] for i in indices]
    lines = path.read_text(encoding="utf-8").splitlines()
    return [json.loads(lines[i]) for i in indices]


@pytest.fixture(scope="module")
def local_tasks():
    manager = lm_eval_tasks.TaskManager(include_path=str(tasks_dir()), include_defaults=False)
    return manager.load([spec.task for spec in LOCAL_TASKS.values()])["tasks"]


@pytest.fixture(scope="module")
def official_tasks(tmp_path_factory):
    """The official configs, data source swapped for a json file of hub-layout docs (the fixed docs only)."""
    folder = tmp_path_factory.mktemp("official_tasks")
    configs = []
    for name, (yaml_file, _, indices, to_hub) in CASES.items():
        docs = folder / f"{name}.jsonl"
        docs.write_text("".join(json.dumps(to_hub(r)) + "\n" for r in _raw_rows(name, indices)))
        config = {
            "include": str(OFFICIAL_DIR / yaml_file),
            "task": f"official_{name}",
            "dataset_path": "json",
            "dataset_name": None,
            # every split the official config names (train for few-shot too) reads the same docs
            "dataset_kwargs": {
                "data_files": {s: str(docs) for s in ("train", "validation", "test")},
                "cache_dir": str(folder / "hf_cache"),
            },
        }
        (folder / f"official_{name}.yaml").write_text(json.dumps(config))  # JSON is YAML
        configs.append(config["task"])
    manager = lm_eval_tasks.TaskManager(include_path=str(folder), include_defaults=False)
    return manager.load(configs)["tasks"]


@pytest.mark.needs_data
@pytest.mark.parametrize("name", list(CASES))
def test_local_task_matches_official(name, local_tasks, official_tasks):
    _, n_docs, indices, _ = CASES[name]
    local = local_tasks[LOCAL_TASKS[name].task]
    official = official_tasks[f"official_{name}"]
    local_docs = local.eval_docs
    assert len(local_docs) == n_docs

    def strip(config):
        return {k: v for k, v in config.to_dict().items() if k not in DATA_SOURCE_KEYS}

    assert strip(local.config) == strip(official.config)  # output_type, templates, metrics, delimiters...
    assert local.OUTPUT_TYPE == official.OUTPUT_TYPE
    for official_doc, i in zip(official.eval_docs, indices, strict=True):
        doc = local_docs[i]
        assert local.doc_to_text(doc) == official.doc_to_text(official_doc), f"doc {i}"
        assert local.doc_to_target(doc) == official.doc_to_target(official_doc), f"doc {i}"
        if official.config.doc_to_choice is not None:
            assert local.doc_to_choice(doc) == official.doc_to_choice(official_doc), f"doc {i}"
        assert local.fewshot_context(doc, num_fewshot=0) == official.fewshot_context(official_doc, num_fewshot=0)


def test_local_tasks_are_tagged_and_distinct_from_official():
    manager = lm_eval_tasks.TaskManager(include_path=str(tasks_dir()), include_defaults=False)
    assert set(manager.all_subtasks) == {spec.task for spec in LOCAL_TASKS.values()}
    assert manager.all_tags == [LOCAL_TAG]
    assert not set(manager.all_subtasks) & set(LOCAL_TASKS)


def test_data_dir_is_read_at_run_time(tmp_path, monkeypatch):
    rows = _raw_rows("arc_easy", [0, 1, 2], MINI_DATA)
    (tmp_path / "arc_easy").mkdir()
    local_data_file("arc_easy", tmp_path).write_text("".join(json.dumps(r) + "\n" for r in rows))
    monkeypatch.setenv(DATA_DIR_ENV, str(tmp_path))
    manager = lm_eval_tasks.TaskManager(include_path=str(tasks_dir()), include_defaults=False)
    task = manager.load(["local_arc_easy"])["tasks"]["local_arc_easy"]
    assert [d["id"] for d in task.eval_docs] == [r["id"] for r in rows]


def test_loader_errors_name_the_problem(tmp_path):
    with pytest.raises(FileNotFoundError, match="piqa"):
        load_local_docs("piqa", tmp_path)
    (tmp_path / "boolq").mkdir()
    bad_row = {"question": "q", "passage": "p", "idx": 0, "label": "maybe"}
    local_data_file("boolq", tmp_path).write_text(json.dumps(bad_row) + "\n")
    with pytest.raises(ValueError, match="maybe"):
        load_local_docs("boolq", tmp_path)


def test_resolve_tasks(tmp_path):
    assert resolve_tasks(["arc_easy", "piqa", "boolq"], MINI_DATA) == ["local_arc_easy", "local_piqa", "boolq"]
    assert resolve_tasks(["arc_easy", "piqa"], tmp_path) == ["arc_easy", "piqa"]  # no local copy: hub task
    (tmp_path / "piqa").mkdir()
    (tmp_path / "piqa" / "validation.arrow").symlink_to(local_data_file("piqa", MINI_DATA))
    assert resolve_tasks(["arc_easy", "piqa"], tmp_path) == ["arc_easy", "local_piqa"]
    assert resolve_tasks(["mmlu_anatomy", "piqa"], tmp_path) == ["mmlu_anatomy", "local_piqa"]  # any lm-eval task


def test_hub_task_names_reach_lm_eval(tiny_model_and_tokenizer, monkeypatch):
    """With network, a task without a local copy is handed to lm-eval by name, its index included."""
    import lm_eval
    import lm_eval.tasks

    seen = {}

    def simple_evaluate(*, tasks, task_manager, **kwargs):
        seen.update(tasks=tasks, include_defaults=task_manager.include_defaults)
        return {"results": {t: {"acc,none": 0.5} for t in tasks}, "n-samples": {t: {"effective": 1} for t in tasks}}

    class Manager:
        def __init__(self, include_path, include_defaults, metadata):
            self.include_defaults = include_defaults

    monkeypatch.setattr(lm_eval, "simple_evaluate", simple_evaluate)
    monkeypatch.setattr(lm_eval.tasks, "TaskManager", Manager)
    result = run_lm_eval(*tiny_model_and_tokenizer, ["mmlu_anatomy", "piqa"], limit=1, data_dir=MINI_DATA)
    assert seen == {"tasks": ["mmlu_anatomy", "local_piqa"], "include_defaults": True}
    assert result["mmlu_anatomy"] == {"acc": 0.5, "task": "mmlu_anatomy", "n_samples": 1, "data_sha256": None}


@pytest.fixture(scope="module")
def tiny_model_and_tokenizer():
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from attnprune_opt.models.loading import load_tokenizer

    tokenizer = load_tokenizer()
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128,
        num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
    )  # fmt: skip
    return LlamaForCausalLM(config).eval(), tokenizer


def test_run_lm_eval_tiny_model(tiny_model_and_tokenizer):
    model, tokenizer = tiny_model_and_tokenizer
    first = run_lm_eval(model, tokenizer, ["arc_easy", "piqa"], limit=4, batch_size=4, data_dir=MINI_DATA)
    again = run_lm_eval(model, tokenizer, ["arc_easy", "piqa"], limit=4, batch_size=4, data_dir=MINI_DATA)
    assert first == again
    for name, result in first.items():
        assert result["task"] == f"local_{name}"
        assert result["n_samples"] == 4
        assert result["data_sha256"] == data_file_sha256(local_data_file(name, MINI_DATA))
        for metric in ("acc", "acc_norm"):
            assert math.isfinite(result[metric]) and 0.0 <= result[metric] <= 1.0
            assert math.isfinite(result[f"{metric}_stderr"])
