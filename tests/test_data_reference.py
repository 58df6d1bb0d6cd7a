"""The reference data table, the checksums the evaluation records, and ``data fetch`` (offline here: its layouts
are checked against the committed excerpts, its failure modes through the command line)."""

from __future__ import annotations

import logging

import datasets
import pytest

from attnprune_opt.cli import main
from attnprune_opt.data import fetch
from attnprune_opt.data.calibration import C4_FILE, WIKITEXT2_TEST_FILE, WIKITEXT2_VALID_FILE, data_file_sha256
from attnprune_opt.data.reference import REFERENCE_FILES, check_reference, missing_files
from attnprune_opt.evaluation.lm_eval_tasks import LOCAL_TASKS, load_local_docs
from conftest import FULL_DATA, MINI_DATA

ARC = LOCAL_TASKS["arc_easy"].file


def test_the_table_lists_every_file_the_protocol_reads():
    read = {C4_FILE, WIKITEXT2_TEST_FILE, WIKITEXT2_VALID_FILE} | {task.file for task in LOCAL_TASKS.values()}
    assert set(REFERENCE_FILES) == read
    assert missing_files(MINI_DATA) == [p for p in REFERENCE_FILES if p not in (C4_FILE, WIKITEXT2_TEST_FILE,
                                                                                WIKITEXT2_VALID_FILE, ARC,
                                                                                LOCAL_TASKS["piqa"].file)]


@pytest.mark.needs_data
def test_the_full_data_folder_is_the_reference_copy():
    for path in REFERENCE_FILES:
        assert check_reference(FULL_DATA / path, data_file_sha256(FULL_DATA / path)), path


def test_a_differing_protocol_file_is_reported(tmp_path, caplog):
    excerpt = MINI_DATA / C4_FILE
    with caplog.at_level(logging.WARNING, logger="attnprune_opt.data.reference"):
        assert not check_reference(excerpt, data_file_sha256(excerpt))
    assert "c4_validation_1500.parquet is not the reference copy" in caplog.text
    own = tmp_path / "mine.txt"
    own.write_text("my own data")
    assert check_reference(own, data_file_sha256(own))  # a user's file is not a protocol file


def _wikitext_rows(path):
    """The hub's wikitext rows for a raw file: each line with its newline, blank (" ") lines as ""."""
    lines = path.read_text(encoding="utf-8").splitlines(keepends=True)
    return datasets.Dataset.from_dict({"text": ["" if line == " \n" else line for line in lines]})


@pytest.fixture
def hub_from_excerpts(monkeypatch):
    """``data fetch`` served, instead of the hub, the hub-layout rows of the committed excerpts."""
    rows = {ARC: load_local_docs("arc_easy", MINI_DATA),  # the package's own AI2 -> hub conversion
            WIKITEXT2_TEST_FILE: _wikitext_rows(MINI_DATA / WIKITEXT2_TEST_FILE)}
    monkeypatch.setattr(fetch, "_load_rows", lambda reference: rows[reference.path])
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", False)


def test_fetched_files_are_written_byte_for_byte_in_the_reference_layout(hub_from_excerpts, tmp_path, caplog):
    out = tmp_path / "data"
    with caplog.at_level(logging.WARNING, logger="attnprune_opt.data.fetch"):
        fetch.fetch_data(out, files=[ARC, WIKITEXT2_TEST_FILE], allow_mismatch=True, progress=False)
    for path in (ARC, WIKITEXT2_TEST_FILE):
        assert (out / path).read_bytes() == (MINI_DATA / path).read_bytes(), path
    assert caplog.text.count("kept (--allow-mismatch)") == 2  # excerpts are not the reference copies


def test_a_checksum_mismatch_fails_and_leaves_nothing(hub_from_excerpts, tmp_path, capsys):
    out = tmp_path / "data"
    assert main(["data", "fetch", "--output", str(out), "--files", ARC, "--quiet"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and f"{ARC} fetched from allenai/ai2_arc has sha256 " in err
    assert REFERENCE_FILES[ARC].sha256 in err and "nothing was written" in err
    assert list(tmp_path.iterdir()) == []


def test_offline_and_bad_requests_are_one_line_errors_before_any_download(tmp_path, capsys):
    out = tmp_path / "data"
    for argv, message in (
        (["data", "fetch", "--output", str(out)], "the Hugging Face hub is switched off here"),
        (["data", "fetch", "--output", str(out), "--files", "c4/all.parquet"], "unknown data file 'c4/all.parquet'"),
        (["data", "fetch", "--output", str(tmp_path)], "already exists"),
    ):
        assert main(argv) == 2
        err = capsys.readouterr().err.strip()
        assert err.count("\n") == 0 and message in err, err
    assert list(tmp_path.iterdir()) == []
