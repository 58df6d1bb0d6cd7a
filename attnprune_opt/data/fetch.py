"""``attnprune-opt data fetch``: build the data folder from the Hugging Face hub with ``datasets``.

Each file is rebuilt in the layout of the reference copy (``reference.py``) and must have the reference SHA-256,
the checksum the evaluation records, so figures computed on a fetched folder compare with the README's. The
folder appears whole or not at all; a file whose checksum differs fails the fetch with both checksums named
(``allow_mismatch`` keeps it instead, and the evaluation then records and warns about the difference).
"""

from __future__ import annotations

import itertools
import json
import logging
import tempfile
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from tqdm.auto import tqdm

from attnprune_opt.atomic import atomic_output_dir, check_output_dir
from attnprune_opt.data.calibration import data_file_sha256
from attnprune_opt.data.reference import REFERENCE_FILES, HubSource, ReferenceFile
from attnprune_opt.errors import AttnPruneError

logger = logging.getLogger(__name__)


class FetchError(AttnPruneError):
    """The hub cannot be reached, or a fetched file is not the reference copy."""


def fetch_data(output: str | Path, *, files: Iterable[str] | None = None, overwrite: bool = False,
               allow_mismatch: bool = False, progress: bool = True) -> Path:
    """Write the reference files (all, or the relative paths ``files``) into the new folder ``output``."""
    chosen = list(files) if files is not None else list(REFERENCE_FILES)
    unknown = [name for name in chosen if name not in REFERENCE_FILES]
    if unknown:
        raise FetchError(f"unknown data file {unknown[0]!r}; known: {', '.join(REFERENCE_FILES)}")
    output = check_output_dir(output, overwrite)  # fail before any download
    import datasets

    if datasets.config.HF_HUB_OFFLINE:
        raise FetchError("the Hugging Face hub is switched off here (HF_HUB_OFFLINE or HF_DATASETS_OFFLINE is set); "
                         "unset it where the hub is reachable, or point ATTNPRUNE_DATA_DIR at an existing data folder")
    with atomic_output_dir(output, overwrite) as tmp:
        for name in tqdm(chosen, desc="fetching", unit="file", disable=not progress):
            reference = REFERENCE_FILES[name]
            path = tmp / reference.path
            path.parent.mkdir(parents=True, exist_ok=True)
            _write(reference.hub, _load_rows(reference), path)
            _check(reference, path, allow_mismatch)
    return output


def _load_rows(reference: ReferenceFile) -> Any:
    hub = reference.hub
    try:
        import datasets

        if hub.rows is None:
            return datasets.load_dataset(hub.dataset, hub.config, split=hub.split)
        # the first rows of a large split (C4): streamed, not the whole split downloaded
        stream = datasets.load_dataset(hub.dataset, hub.config, split=hub.split, streaming=True)
        return datasets.Dataset.from_list(list(itertools.islice(stream, hub.rows)), features=stream.features)
    except Exception as exc:  # offline mode, no network, a renamed data set: all mean "not fetchable here"
        first = (str(exc).strip().splitlines() or [""])[0]
        raise FetchError(f"cannot fetch {reference.path} from the hub ({hub.dataset}, {hub.config or 'default'}, "
                         f"{hub.split}): {type(exc).__name__}: {first} (is the hub reachable? HF_DATASETS_OFFLINE "
                         "must be unset)") from None


def _write(hub: HubSource, rows: Any, path: Path) -> None:
    """Rows of the hub data set in the reference file's layout."""
    if hub.layout == "parquet":
        import pyarrow.parquet as pq

        pq.write_table(rows.select_columns(list(hub.columns)).data.table, path, compression="zstd")
    elif hub.layout == "arrow":
        with tempfile.TemporaryDirectory(dir=path.parent) as saved:
            rows.flatten_indices().save_to_disk(saved)
            (arrow,) = Path(saved).glob("*.arrow")
            arrow.rename(path)
    elif hub.layout == "raw_lines":  # the hub keeps each line's "\n" and blanks the empty " " lines
        path.write_text("".join(row["text"] or " \n" for row in rows), encoding="utf-8")
    else:
        convert = {"jsonl": dict, "ai2_jsonl": lambda row: _ai2_row(row, hub.question_key),
                   "boolq_jsonl": _boolq_row}[hub.layout]
        path.write_text("".join(json.dumps(convert(row), separators=hub.separators) + "\n" for row in rows),
                        encoding="utf-8")


def _ai2_row(row: dict[str, Any], question_key: str) -> dict[str, Any]:
    """allenai/ai2_arc or allenai/openbookqa columns -> AI2's original jsonl layout."""
    choices = [{"text": text, "label": label} for text, label in zip(row["choices"]["text"], row["choices"]["label"],
                                                                      strict=True)]
    return {"id": row["id"], "question": {"stem": row[question_key], "choices": choices}, "answerKey": row["answerKey"]}


def _boolq_row(row: dict[str, Any]) -> dict[str, Any]:
    """aps/super_glue boolq (label 0/1) -> SuperGLUE's jsonl layout (label "false"/"true")."""
    return {"question": row["question"], "passage": row["passage"], "idx": row["idx"],
            "label": ("false", "true")[row["label"]]}


def _check(reference: ReferenceFile, path: Path, allow_mismatch: bool) -> None:
    sha256 = data_file_sha256(path)
    if sha256 == reference.sha256:
        return
    message = (f"{reference.path} fetched from {reference.hub.dataset} has sha256 {sha256}, the reference copy "
               f"{reference.sha256}")
    if not allow_mismatch:
        raise FetchError(f"{message}; nothing was written (--allow-mismatch keeps it)")
    logger.warning("%s; kept (--allow-mismatch): figures computed on it are not comparable with the README's", message)
