"""The reference data folder: every file the benchmark protocol reads, its SHA-256, and the hub data set it holds.

This table is the one place the expected checksums live. ``attnprune-opt data fetch`` builds each file from the hub
and checks it against them; the evaluation records the SHA-256 of every file it reads and, through
:func:`check_reference`, warns when a protocol file differs from the reference copy (its figures would not be
comparable with the README's).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

from attnprune_opt.data.calibration import C4_FILE, WIKITEXT2_TEST_FILE, WIKITEXT2_VALID_FILE

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class HubSource:
    """Where a file's rows come from on the Hugging Face hub, and how they are written.

    ``layout``: ``parquet`` (the listed ``columns``), ``arrow`` (``Dataset.save_to_disk``'s data file), ``raw_lines``
    (WikiText rows as lines of text), ``jsonl`` (hub rows), ``ai2_jsonl`` (AI2's original ARC/OpenBookQA layout,
    ``question_key`` holding the question) or ``boolq_jsonl`` (SuperGLUE's layout, label ``"true"``/``"false"``).
    """

    dataset: str
    config: str | None
    split: str
    layout: str
    rows: int | None = None  # the first ``rows`` rows; None: the whole split
    columns: tuple[str, ...] = ()
    question_key: str = "question"
    separators: tuple[str, str] = (", ", ": ")  # of json.dumps, as in the reference file


@dataclass(frozen=True)
class ReferenceFile:
    path: str  # relative to the data folder
    sha256: str
    hub: HubSource


_FILES = (
    ReferenceFile(C4_FILE, "a801cda27b55d405cc0279136e5f1cd2dad568ffde3c1ddcfa46c61781f001f1",
                  HubSource("allenai/c4", "en", "validation", "parquet", rows=1500,
                            columns=("text", "url", "timestamp"))),
    ReferenceFile(WIKITEXT2_TEST_FILE, "173c87a53759e0201f33e0ccf978e510c2042d7f2cb78229d9a50d79b9e7dd08",
                  HubSource("Salesforce/wikitext", "wikitext-2-raw-v1", "test", "raw_lines")),
    ReferenceFile(WIKITEXT2_VALID_FILE, "4cd0f6876d07a413aa911261ff6d363c72d757d47f0fdd6015702014c89cb9c7",
                  HubSource("Salesforce/wikitext", "wikitext-2-raw-v1", "validation", "raw_lines")),
    ReferenceFile("hellaswag/validation.arrow", "5d21a8cf3f95280f2916128ed480c6b518a11aacb18b1ea200eefd8c0b92c16b",
                  HubSource("Rowan/hellaswag", None, "validation", "arrow")),
    ReferenceFile("arc_easy/ARC-Easy-Test.jsonl", "ce32a0774b4beb1977d2c6b16dda5dd2b24fdc9c7f506882c452678676bd09be",
                  HubSource("allenai/ai2_arc", "ARC-Easy", "test", "ai2_jsonl", separators=(",", ":"))),
    ReferenceFile("arc_challenge/ARC-Challenge-Test.jsonl",
                  "9fa8ffb3e3a1f88cb302d53dd95aae81e39209ad9bcf974376b319d8fd35717c",
                  HubSource("allenai/ai2_arc", "ARC-Challenge", "test", "ai2_jsonl", separators=(",", ":"))),
    ReferenceFile("piqa/validation.arrow", "6e14731c78016adc6a5738d661111f5cb4c6bce461c454561eb66be4abc39222",
                  HubSource("baber/piqa", None, "validation", "arrow")),
    ReferenceFile("winogrande/validation.arrow", "992af8404b202ada4356228ed2ebb27f10495126efdf78678ced33e94e82b830",
                  HubSource("allenai/winogrande", "winogrande_xl", "validation", "arrow")),
    ReferenceFile("boolq/val.jsonl", "21acbfbd1e7908fddd9e626bc2a6101c5a5430bda3fbf74985b979af7a63b989",
                  HubSource("aps/super_glue", "boolq", "validation", "boolq_jsonl")),
    ReferenceFile("openbookqa/test.jsonl", "feb2bd9bfa6161dca4c44ce90e51e8cdada83eb5061407fcdc5005e44aaf2313",
                  HubSource("allenai/openbookqa", "main", "test", "ai2_jsonl", question_key="question_stem")),
    ReferenceFile("lambada_openai/lambada_test.jsonl",
                  "4aa8d02cd17c719165fc8a7887fddd641f43fcafa4b1c806ca8abc31fabdb226",
                  HubSource("EleutherAI/lambada_openai", "default", "test", "jsonl")),
)
REFERENCE_FILES: dict[str, ReferenceFile] = {f.path: f for f in _FILES}


def missing_files(data_dir: str | Path) -> list[str]:
    """Reference files absent from ``data_dir`` (relative paths), in table order."""
    return [path for path in REFERENCE_FILES if not (Path(data_dir) / path).is_file()]


def check_reference(path: str | Path, sha256: str) -> bool:
    """Whether the data file ``path`` is the reference copy, judged by its last two path parts (every reference
    file is ``<folder>/<file>``); a protocol file that differs is logged as a warning. Other files (a user's own
    data) are not checked and count as matching."""
    reference = REFERENCE_FILES.get(Path(*Path(path).parts[-2:]).as_posix())
    if reference is None or reference.sha256 == sha256:
        return True
    logger.warning("%s is not the reference copy (sha256 %s..., expected %s...): its figures are not comparable "
                   "with the benchmark protocol's", path, sha256[:12], reference.sha256[:12])
    return False
