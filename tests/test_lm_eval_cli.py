"""``attnprune-opt lm-eval``: lm-eval's own command line reads a bitmask folder and the local tasks, and scores it
exactly as the in-process evaluation does."""

from __future__ import annotations

import json

import pytest
from tiny_models import calibration, tiny_model

from attnprune_opt import AttentionPruner, load_pruned_model
from attnprune_opt.cli import main
from attnprune_opt.evaluation.lm_eval_cli import with_local_tasks
from attnprune_opt.evaluation.lm_eval_tasks import run_lm_eval, tasks_dir
from attnprune_opt.models.loading import load_tokenizer


@pytest.fixture(scope="module")
def bitmask_folder(tmp_path_factory):
    """A tiny Llama with SmolLM2's tokenizer, q/k pruned by magnitude, saved as compressed bitmasks."""
    folder = tmp_path_factory.mktemp("lm_eval") / "pruned"
    tokenizer = load_tokenizer()
    model = tiny_model("llama", vocab_size_override=len(tokenizer))
    pruner = AttentionPruner(rules=[{"modules": ["q_proj", "k_proj"], "method": "magnitude", "sparsity": 0.5}])
    pruner.prune_model(model, calibration=calibration(), progress=False)
    pruner.save(model, folder, tokenizer=tokenizer, format="bitmask")
    assert "quantization_config" in json.loads((folder / "config.json").read_text())
    return folder


def test_lm_eval_command_line_equals_the_in_process_evaluation(bitmask_folder, mini_data, tmp_path):
    out = tmp_path / "lm_eval"
    assert main(["lm-eval", "run", "--model", "hf", "--model_args", f"pretrained={bitmask_folder}",
                 "--tasks", "local_arc_easy", "--limit", "4", "--batch_size", "4", "--output_path", str(out)]) == 0
    (results_file,) = out.rglob("results_*.json")
    cli = json.loads(results_file.read_text())["results"]["local_arc_easy"]

    model, tokenizer = load_pruned_model(bitmask_folder), load_tokenizer(str(bitmask_folder))
    in_process = run_lm_eval(model, tokenizer, ["arc_easy"], limit=4, batch_size=4, data_dir=mini_data)["arc_easy"]
    assert in_process["task"] == "local_arc_easy" and in_process["n_samples"] == 4
    for metric in ("acc", "acc_norm"):
        assert cli[f"{metric},none"] == in_process[metric]
        assert cli[f"{metric}_stderr,none"] == in_process[f"{metric}_stderr"]


def test_the_local_tasks_join_the_users_include_path():
    local = str(tasks_dir())
    assert with_local_tasks(["run", "--tasks", "x"]) == ["run", "--tasks", "x", "--include_path", local]
    assert with_local_tasks(["run", "--include_path", "mine"]) == ["run", "--include_path", f"mine:{local}"]
    assert with_local_tasks(["ls", "tasks", "--include_path=mine"]) == ["ls", "tasks", f"--include_path=mine:{local}"]
    assert with_local_tasks(["--help"]) == ["--help"]


def test_lm_eval_errors_keep_lm_evals_exit_status(capsys):
    assert main(["lm-eval", "run", "--no-such-option"]) == 2
    assert "--no-such-option" in capsys.readouterr().err
