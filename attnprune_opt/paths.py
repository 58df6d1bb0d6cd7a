"""Where the offline data lives: ``$ATTNPRUNE_DATA_DIR``, by default ``../shared/data`` beside the checkout."""

from __future__ import annotations

import os
from pathlib import Path

DATA_DIR_ENV = "ATTNPRUNE_DATA_DIR"
REPO_ROOT = Path(__file__).resolve().parent.parent


def data_dir() -> Path:
    """The data folder; it is read at call time so tests and users can point the variable elsewhere."""
    return Path(os.environ.get(DATA_DIR_ENV, REPO_ROOT.parent / "shared" / "data"))
