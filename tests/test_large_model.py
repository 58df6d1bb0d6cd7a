"""The scale-up benchmark, scaled down to two layers of the 7B shape: the random model is written in shards, pruned
with every layer on disk, and the saved folder verified and loaded with offload; the figures it records add up."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "large_model.py"


def test_two_layers_of_the_7b_shape_prune_with_disk_offload(tmp_path, mini_data):
    work, out = tmp_path / "work", tmp_path / "results"
    done = subprocess.run([sys.executable, str(SCRIPT), "--work", str(work), "--out", str(out), "--layers", "2",
                           "--runs", "smollm2_qk50:refit=1:samples=2"],
                          capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-2000:]
    results = json.loads((out / "large_model.json").read_text())
    model, (run,) = results["model"], results["runs"]
    assert model["layers"] == 2 and model["shards"] >= 1
    # Llama-2-7B's layer: 4 * 4096^2 + 3 * 4096 * 11008 weights and two norms
    layer = 4 * 4096**2 + 3 * 4096 * 11008 + 2 * 4096
    assert model["parameters"] == 2 * layer + 2 * model["vocab_size"] * 4096 + 4096
    # torch.randn gives an exact 0 about once in 2^24 draws
    assert run["sparsity"] == pytest.approx({"q_proj": 0.5, "k_proj": 0.5, "v_proj": 0.0, "o_proj": 0.0,
                                             "gate_proj": 0.0, "up_proj": 0.0, "down_proj": 0.0}, abs=1e-6)
    assert run["verify"]["status"] == 0 and run["load"]["forward"] == {"finite": True, "shape": [1, 16, 49152]}
    assert len(run["report"]["layer_seconds"]) == 2
    # sampled every 0.2 s, the tree's peak can fall a little short of the pruner's own high-water mark
    assert run["prune"]["peak_tree_rss_mb"] > 0.9 * run["report"]["peak_rss_mb"] > 0
    assert run["saved_bytes"] > 2 * layer * 2  # bfloat16
    assert not work.exists()  # removed without --keep
    assert "| smollm2_qk50 | all | 2 x 512 | 1 |" in (out / "large_model.md").read_text()
