"""Data-parallel pruning under torchrun (gloo, 2 processes) against a single process, and a rank that dies."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from attnprune_opt import load_pruned_model

HERE = Path(__file__).parent
TORCHRUN = Path(sys.executable).with_name("torchrun")


def run(out: Path, *extra: str, ranks: int | None = None, timeout: int = 60) -> subprocess.CompletedProcess:
    script = [str(HERE / "distributed_prune.py"), str(out), "dense", *extra]
    command = ([str(TORCHRUN), "--standalone", "--nproc-per-node", str(ranks)] if ranks else
               [sys.executable]) + script
    path = os.pathsep.join(filter(None, [str(HERE), os.environ.get("PYTHONPATH")]))
    env = {**os.environ, "ATTNPRUNE_DIST_TIMEOUT": str(timeout), "OMP_NUM_THREADS": "1", "PYTHONPATH": path}
    return subprocess.run(command, cwd=HERE, env=env, capture_output=True, text=True, timeout=600)


@pytest.fixture(scope="module")
def single(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("single") / "out"
    assert run(out).returncode == 0
    return out


def test_two_ranks_give_the_single_process_weights(single, tmp_path):
    out = tmp_path / "out"
    result = run(out, ranks=2)
    assert result.returncode == 0, result.stderr[-2000:]
    one, two = load_file(single / "model.safetensors"), load_file(out / "model.safetensors")
    assert one.keys() == two.keys()
    # every sum over sequences adds each sequence's own float32 terms exactly in float64 (distributed.py): the
    # weights are the single process's bit for bit, not merely within float32 summation tolerance
    different = [name for name in one if not torch.equal(one[name], two[name])]
    assert different == []
    manifest = json.loads((out / "attnprune_manifest.json").read_text())
    assert manifest["report"]["world_size"] == 2
    assert json.loads((single / "attnprune_manifest.json").read_text())["report"]["world_size"] == 1
    load_pruned_model(out)  # verified against its manifest


def test_a_rank_that_dies_stops_the_others_and_nothing_is_written(tmp_path):
    out = tmp_path / "out"
    result = run(out, "1", ranks=2)
    assert result.returncode != 0
    # rank 0 reports the lost peer, unless torchrun, which saw rank 1 die, stopped rank 0 before it could
    assert ("DistributedError: rank 0 of 2: all_reduce with the other ranks failed" in result.stderr
            or "Signal 9 (SIGKILL) received by PID" in result.stderr), result.stderr[-2000:]
    assert not out.exists() and list(tmp_path.iterdir()) == []


def test_a_rank_that_hangs_stops_the_others_within_the_timeout(tmp_path):
    out = tmp_path / "out"
    result = run(out, "1", "SIGSTOP", ranks=2, timeout=10)  # torchrun does not notice a stopped rank; rank 0 does
    assert result.returncode != 0
    assert "DistributedError: rank 0 of 2: all_reduce with the other ranks failed" in result.stderr
    assert "within the timeout (ATTNPRUNE_DIST_TIMEOUT)" in result.stderr
    assert not out.exists() and list(tmp_path.iterdir()) == []
