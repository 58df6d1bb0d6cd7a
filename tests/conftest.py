"""Shared fixtures: deterministic seeds and offline mode for every test; the mini data folder committed with the
tests, and the ``needs_data`` marker for tests of the benchmark protocol, which need the full data folder."""

import os
from pathlib import Path

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

from attnprune_opt.data.reference import missing_files  # noqa: E402  (after the offline switches)
from attnprune_opt.paths import DATA_DIR_ENV, data_dir  # noqa: E402

MINI_DATA = Path(__file__).resolve().parent / "fixtures" / "data"  # excerpts, see its PROVENANCE.md
FULL_DATA = data_dir()  # as the session started, before any test points the variable elsewhere


def pytest_collection_modifyitems(config, items):
    """Tests marked ``needs_data`` run when the full data folder is present (as in CI) and are skipped, with the
    reason and how to get it, when it is not."""
    missing = missing_files(FULL_DATA)
    if not missing:
        return
    skip = pytest.mark.skip(reason=(
        f"needs the full data folder: {FULL_DATA} lacks {missing[0]}"
        f"{f' and {len(missing) - 1} more files' if len(missing) > 1 else ''}; set {DATA_DIR_ENV} to it, or build "
        "it with `attnprune-opt data fetch --output DIR` where the Hugging Face hub is reachable"))
    for item in items:
        if "needs_data" in item.keywords:
            item.add_marker(skip)


@pytest.fixture
def mini_data(monkeypatch) -> Path:
    """``$ATTNPRUNE_DATA_DIR`` pointed at the mini data folder for one test."""
    monkeypatch.setenv(DATA_DIR_ENV, str(MINI_DATA))
    return MINI_DATA


@pytest.fixture(scope="session", autouse=True)
def one_thread():
    """Tiny models gain nothing from threads, which only add overhead (and contention on a shared machine);
    the slow real-model tests ask for ``all_threads``."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield threads
    torch.set_num_threads(threads)


@pytest.fixture
def all_threads(one_thread):
    torch.set_num_threads(one_thread)
    yield
    torch.set_num_threads(1)


@pytest.fixture
def gen() -> torch.Generator:
    return torch.Generator().manual_seed(0)


@pytest.fixture(scope="session")
def model_dir(tmp_path_factory):
    """A tiny Llama with SmolLM2's tokenizer, saved as the model folder a user points --model at."""
    from tiny_models import save_tiny_model_folder

    folder = tmp_path_factory.mktemp("model")
    save_tiny_model_folder(folder)
    return folder
