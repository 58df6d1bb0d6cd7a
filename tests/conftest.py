"""Shared fixtures: deterministic seeds and offline mode for every test."""

import os

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")


@pytest.fixture
def gen() -> torch.Generator:
    return torch.Generator().manual_seed(0)
