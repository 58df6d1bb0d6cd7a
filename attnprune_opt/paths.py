"""Where the offline data lives (``$ATTNPRUNE_DATA_DIR``, by default ``../shared/data`` beside the checkout), and how
inputs are named in what we write: never by an absolute local path, but by a portable name and a SHA-256."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

DATA_DIR_ENV = "ATTNPRUNE_DATA_DIR"
REPO_ROOT = Path(__file__).resolve().parent.parent


def data_dir() -> Path:
    """The data folder; it is read at call time so tests and users can point the variable elsewhere."""
    return Path(os.environ.get(DATA_DIR_ENV, REPO_ROOT.parent / "shared" / "data"))


def portable_name(path: str | Path) -> str:
    """``path`` as outputs record it: relative to the data folder (``c4/c4_validation_1500.parquet``), to the folder
    holding this package (``attnprune_opt/data/...``, a packaged file) or to the current directory when inside one,
    else its last component."""
    path = Path(path).resolve()
    for root in (data_dir(), REPO_ROOT, Path.cwd()):
        try:
            return path.relative_to(Path(root).resolve()).as_posix()
        except ValueError:
            continue
    return path.name


def file_sha256(path: str | Path, chunk_size: int = 1 << 20) -> str:
    """Hex SHA-256 of a file, read in chunks so large files do not sit in memory."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(chunk_size), b""):
            digest.update(chunk)
    return digest.hexdigest()
