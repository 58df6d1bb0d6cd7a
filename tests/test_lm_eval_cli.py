"""``attnprune-opt lm-eval``: lm-eval's own command line reads a bitmask folder and the local tasks, and scores it
exactly as the in-process evaluation does."""

from __future__ import annotations

import json
import shutil

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


def lm_eval_scores(model: str, folder, out) -> dict:
    """local_arc_easy on 4 documents through `attnprune-opt lm-eval run --model MODEL`."""
    assert main(["lm-eval", "run", "--model", model, "--model_args", f"pretrained={folder}", "--tasks",
                 "local_arc_easy", "--limit", "4", "--batch_size", "4", "--output_path", str(out)]) == 0
    (results_file,) = out.rglob("results_*.json")
    return json.loads(results_file.read_text())["results"]["local_arc_easy"]


@pytest.mark.parametrize("lm_eval_model", ["hf", "attnprune"])
def test_lm_eval_command_line_equals_the_in_process_evaluation(bitmask_folder, mini_data, tmp_path, lm_eval_model):
    cli = lm_eval_scores(lm_eval_model, bitmask_folder, tmp_path / "lm_eval")

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


def test_model_attnprune_refuses_a_tampered_folder(bitmask_folder, mini_data, tmp_path, capsys):
    """--model hf would score the altered weights; --model attnprune checks the files against the manifest."""
    tampered = tmp_path / "tampered"
    shutil.copytree(bitmask_folder, tampered)
    weights = next(tampered.glob("*.safetensors"))
    data = bytearray(weights.read_bytes())
    data[-3] ^= 0xFF
    weights.write_bytes(bytes(data))
    assert main(["lm-eval", "run", "--model", "attnprune", "--model_args", f"pretrained={tampered}", "--tasks",
                 "local_arc_easy", "--limit", "2", "--output_path", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err.startswith(f"error: {weights}: ")  # one line naming the file at fault
    assert not (tmp_path / "out").exists()
