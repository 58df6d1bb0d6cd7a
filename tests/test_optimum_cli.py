"""``optimum-cli attnprune``: found by optimum in its command namespace, with the same subcommands and options as
``attnprune-opt``, and a real prune run through it (subprocesses: optimum reads ``sys.argv`` itself)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import yaml
from test_cli import RECIPE
from tiny_models import tiny_model
from transformers import AutoModelForCausalLM

from attnprune_opt.cli import build_parser
from attnprune_opt.models.loading import load_tokenizer
from attnprune_opt.paths import DATA_DIR_ENV
from conftest import MINI_DATA

OPTIMUM_CLI = str(Path(sys.executable).with_name("optimum-cli"))


def optimum_cli(*args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, DATA_DIR_ENV: str(MINI_DATA)}
    return subprocess.run([OPTIMUM_CLI, "attnprune", *args], capture_output=True, text=True, env=env, timeout=300)


def _subcommands(help_text: str) -> str:
    return help_text.split("{", 1)[1].split("}", 1)[0]


def test_every_attnprune_opt_command_and_option_is_there():
    top = optimum_cli("--help")
    assert top.returncode == 0, top.stderr
    ours = build_parser()
    assert _subcommands(top.stdout) == _subcommands(ours.format_help())  # prune,eval,export,...
    prune = optimum_cli("prune", "--help")
    assert prune.returncode == 0
    for option in ("--recipe", "--model", "--output", "--overwrite", "--format", "--max-shard-size", "--layers",
                   "--refit-iterations", "--device-map", "--offload-folder", "--trust-remote-code", "--quiet"):
        assert option in prune.stdout, option


def test_a_tiny_prune_through_optimum_cli(tmp_path):
    model_dir, out, recipe = tmp_path / "model", tmp_path / "pruned", tmp_path / "recipe.yaml"
    tokenizer = load_tokenizer()
    tiny_model("llama", vocab_size_override=len(tokenizer)).save_pretrained(model_dir)
    tokenizer.save_pretrained(model_dir)
    recipe.write_text(yaml.safe_dump(RECIPE))
    run = optimum_cli("prune", "--recipe", str(recipe), "--model", str(model_dir), "--output", str(out), "--quiet")
    assert run.returncode == 0, run.stderr
    assert f"saved to {out}" in run.stdout
    assert json.loads((out / "attnprune_manifest.json").read_text())["sparsity"]["pruned_weights"] == 0.5
    pruned = AutoModelForCausalLM.from_pretrained(out)
    assert (pruned.model.layers[0].self_attn.q_proj.weight == 0).float().mean() == 0.5

    again = optimum_cli("prune", "--recipe", str(recipe), "--model", str(model_dir), "--output", str(out))
    assert again.returncode == 2 and again.stderr.strip().splitlines()[-1].startswith("error: output")
