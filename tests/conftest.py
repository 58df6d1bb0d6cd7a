"""Shared fixtures: deterministic seeds and offline mode for every test."""

import os

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")


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
