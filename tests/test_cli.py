"""The command line: prune end to end on a tiny model, one-line errors, and no output left by a failed run."""

import json

import pytest
import yaml
from transformers import AutoModelForCausalLM

from attnprune_opt.cli import main

RECIPE = {"rules": [{"modules": ["q_proj", "k_proj"], "method": "attention", "sparsity": 0.5}],
          "attention": {"refit_iterations": 5}, "calibration": {"source": "c4", "num_samples": 2, "seq_len": 32}}


@pytest.fixture(autouse=True)
def _mini(mini_data):
    """Calibration on "c4" reads the mini data folder's first rows."""
    return mini_data


@pytest.fixture
def recipe(tmp_path):
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(RECIPE))
    return path


def test_prune_end_to_end_and_refuse_to_clobber(model_dir, recipe, tmp_path, capsys):
    out = tmp_path / "pruned"
    assert main(["prune", "--recipe", str(recipe), "--model", str(model_dir), "--output", str(out), "--quiet"]) == 0
    printed = capsys.readouterr().out
    assert "attention error" in printed and f"saved to {out}" in printed
    manifest = json.loads((out / "attnprune_manifest.json").read_text())
    assert manifest["sparsity"]["pruned_weights"] == 0.5
    assert manifest["calibration"]["sha256"]
    AutoModelForCausalLM.from_pretrained(out)
    before = sorted(p.name for p in out.iterdir())

    assert main(["prune", "--recipe", str(recipe), "--model", str(model_dir), "--output", str(out), "--quiet"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("error: output") and "--overwrite" in err[-1]
    assert sorted(p.name for p in out.iterdir()) == before


def test_overrides_reach_the_run_and_the_saved_recipe(model_dir, recipe, tmp_path):
    """--layers and --refit-iterations change what runs (and are recorded); --max-shard-size shards the weights."""
    out = tmp_path / "pruned"
    assert main(["prune", "--recipe", str(recipe), "--model", str(model_dir), "--output", str(out), "--quiet",
                 "--layers", "1", "--refit-iterations", "0", "--max-shard-size", "20KB"]) == 0
    manifest = json.loads((out / "attnprune_manifest.json").read_text())
    assert manifest["config"]["layers"] == [1] and manifest["config"]["attention"]["refit_iterations"] == 0
    assert RECIPE["attention"] == {"refit_iterations": 5}  # the user's recipe is untouched
    assert len(list(out.glob("model-*-of-*.safetensors"))) > 1
    pruned = AutoModelForCausalLM.from_pretrained(out)
    assert (pruned.model.layers[1].self_attn.q_proj.weight == 0).float().mean() == 0.5
    assert (pruned.model.layers[0].self_attn.q_proj.weight != 0).all()


def test_bad_recipe_is_one_line_and_leaves_nothing(model_dir, tmp_path, capsys):
    bad = tmp_path / "bad.yaml"
    bad.write_text(yaml.safe_dump({**RECIPE, "attention": {"lamda": 0.1}}))
    out = tmp_path / "pruned"
    assert main(["prune", "--recipe", str(bad), "--model", str(model_dir), "--output", str(out)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "did you mean 'lam'" in err
    assert not out.exists()


def test_unsupported_model_and_missing_data_are_one_line(model_dir, recipe, tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("ATTNPRUNE_DATA_DIR", str(tmp_path / "nowhere"))
    nm = tmp_path / "nm.yaml"
    wanda = {key: value for key, value in RECIPE.items() if key != "attention"}
    nm.write_text(yaml.safe_dump({**wanda, "rules": [{"modules": ["q_proj"], "method": "wanda",
                                                       "structure": "3:128"}]}))
    out = tmp_path / "pruned"
    assert main(["prune", "--recipe", str(nm), "--model", str(model_dir), "--output", str(out)]) == 2
    assert "does not divide the input size 64" in capsys.readouterr().err
    assert not out.exists()


def test_validate_recipe(recipe, tmp_path, capsys):
    assert main(["validate-recipe", str(recipe)]) == 0
    assert "valid" in capsys.readouterr().out
    bad = tmp_path / "bad.yaml"
    bad.write_text("rulez: []\n")
    assert main(["validate-recipe", str(bad)]) == 2
    assert "did you mean 'rules'" in capsys.readouterr().err


def test_the_cli_decides_which_library_logs_are_shown(model_dir, caplog):
    """INFO notes of long steps by default, none with --quiet; the library itself adds no handler."""
    import logging

    assert logging.getLogger("attnprune_opt").handlers == []
    argv = ["eval", str(model_dir), "--perplexity", "c4", "--quick", "--batch-size", "8"]
    assert main(argv) == 0
    assert [r.getMessage() for r in caplog.records if r.name == "attnprune_opt.evaluation.runner"] == [
        "C4 perplexity: rows [1000, 1032), up to 512 tokens each"]
    caplog.clear()
    assert main([*argv, "--quiet"]) == 0
    assert not [r for r in caplog.records if r.name.startswith("attnprune_opt") and r.levelno < logging.WARNING]
