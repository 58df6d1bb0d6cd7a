"""Which device map a rank loads its model with: under NCCL one GPU per rank, otherwise the map as given."""

import pytest

from attnprune_opt.distributed import SINGLE, rank_device_map


@pytest.fixture
def launched(monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("LOCAL_RANK", "1")
    return monkeypatch


def test_under_nccl_each_rank_takes_its_own_gpu(launched):
    launched.setenv("ATTNPRUNE_DIST_BACKEND", "nccl")
    assert rank_device_map(None) == {"": "cuda:1"}
    assert rank_device_map("auto") == {"": "cuda:1"}  # not every GPU for every rank's copy
    assert rank_device_map({"": "cuda:0"}) == {"": "cuda:0"}  # an explicit map is the user's


def test_under_gloo_and_in_one_process_the_map_is_kept(launched, monkeypatch):
    disk = {"model.layers.0": "disk"}
    for device_map in (None, "auto", "cpu", disk):
        assert rank_device_map(device_map) == device_map
    monkeypatch.setenv("ATTNPRUNE_DIST_BACKEND", "nccl")
    monkeypatch.setenv("WORLD_SIZE", "1")
    assert rank_device_map(None) is None
    assert SINGLE.device == "cpu"
