"""The package installed from a built wheel (not the editable checkout) finds its recipes, calibration sample and
lm-eval task definitions: prune a tiny model with a packaged recipe, then evaluate it, from a folder outside the
checkout. The fresh environment borrows this one's dependencies (torch stays the local CPU build) without its
editable install of attnprune_opt."""

import json
import os
import shutil
import site
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import MINI_DATA
from tiny_models import save_tiny_model_folder

REPO = Path(__file__).resolve().parent.parent


def run(*args, cwd, env=None) -> str:
    done = subprocess.run([str(a) for a in args], cwd=cwd, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout + done.stderr
    return done.stdout


@pytest.mark.slow
def test_wheel_installs_and_prunes_outside_the_checkout(tmp_path):
    source = tmp_path / "source"  # a copy, so that building leaves nothing in the checkout
    shutil.copytree(REPO / "attnprune_opt", source / "attnprune_opt",
                    ignore=shutil.ignore_patterns("__pycache__"))
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(REPO / name, source / name)
    run(sys.executable, "-m", "pip", "wheel", "--quiet", "--no-deps", "--no-build-isolation", "-w", tmp_path / "dist",
        source, cwd=tmp_path)
    (wheel,) = (tmp_path / "dist").glob("attnprune_opt-*.whl")

    venv = tmp_path / "venv"
    run(sys.executable, "-m", "venv", venv, cwd=tmp_path)
    python = venv / "bin" / "python"
    fresh_site = run(python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])", cwd=tmp_path).strip()
    # Dependencies from this environment: a plain path entry, so its .pth files (our editable install) are not run.
    Path(fresh_site, "borrowed_dependencies.pth").write_text("\n".join(site.getsitepackages()) + "\n")
    run(python, "-m", "pip", "install", "--quiet", "--no-deps", "--no-index", wheel, cwd=tmp_path)

    work = tmp_path / "work"
    work.mkdir()
    save_tiny_model_folder(work / "tiny", max_position_embeddings=512)  # the recipe's sequences have 512 tokens
    env = {**os.environ, "PYTHONPATH": ""}
    env.pop("ATTNPRUNE_DATA_DIR", None)  # calibration comes from the packaged C4 sample
    where = run(python, "-c", "import attnprune_opt, torch; print(attnprune_opt.__file__, torch.__version__)", cwd=work,
                env=env)
    assert where.startswith(fresh_site) and where.split()[1].startswith("2.13.0"), where

    attnprune = venv / "bin" / "attnprune-opt"
    run(attnprune, "prune", "--recipe", "smollm2_qk50", "--model", "tiny", "--output", "pruned", "--refit-iterations",
        "2", "--quiet", cwd=work, env=env)
    manifest = json.loads((work / "pruned" / "attnprune_manifest.json").read_text())
    assert manifest["calibration"]["files"] == ["attnprune_opt/data/c4_sample/c4_validation_rows_0-7.jsonl"]
    assert manifest["sparsity"]["pruned_weights"] == 0.5
    assert "verified" in run(attnprune, "verify", "pruned", cwd=work, env=env)

    env["ATTNPRUNE_DATA_DIR"] = str(MINI_DATA)  # arc_easy and the attention error's C4 rows, as in every checkout
    printed = run(attnprune, "eval", "pruned", "--no-perplexity", "--tasks", "arc_easy", "--limit", "2", "--quiet",
                  cwd=work, env=env)
    assert "| pruned |" in printed and "0.500" in printed
