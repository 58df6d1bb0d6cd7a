"""Calibration data: the README protocol, deterministic selection, provenance, file sources, errors, fallback."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from tokenizers import Tokenizer, models, processors
from tokenizers.pre_tokenizers import ByteLevel
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

from attnprune_opt.data import CalibrationSpec, data_file_sha256, load_calibration
from attnprune_opt.data.calibration import (
    C4_FILE,
    C4_SAMPLE_NAME,
    SELF_GENERATED,
    WIKITEXT2_VALID_FILE,
    check_source,
)
from attnprune_opt.errors import CalibrationDataError
from attnprune_opt.paths import DATA_DIR_ENV
from conftest import FULL_DATA, MINI_DATA

# Reading, tokenizing and selecting are checked on the mini data folder (autouse fixture below); the protocol's own
# figures (pool size, row counts, lengths) on the full folder, in the tests marked needs_data.
C4 = MINI_DATA / C4_FILE
WIKI_VALID = MINI_DATA / WIKITEXT2_VALID_FILE


@pytest.fixture(autouse=True)
def _mini(mini_data):
    return mini_data


def byte_tokenizer(bos: bool = False) -> PreTrainedTokenizerFast:
    """One token per UTF-8 byte (ids 1-256, ``<s>`` = 0): instant to build, and exact counts are easy to predict.

    With ``bos`` it prepends ``<s>`` to every call, like Llama's tokenizer.
    """
    vocab = {"<s>": 0, **{c: i + 1 for i, c in enumerate(sorted(ByteLevel.alphabet()))}}
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = ByteLevel(add_prefix_space=False, use_regex=False)
    if bos:
        tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 0)])
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>")


def tiny_model(vocab_size: int = 257) -> LlamaForCausalLM:
    """A random 2-layer Llama; the default vocabulary covers the byte tokenizer and keeps the LM head cheap."""
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
    )
    return LlamaForCausalLM(config)


def sha256sum(path: Path) -> str:
    return subprocess.run(["sha256sum", str(path)], capture_output=True, text=True, check=True).stdout.split()[0]


def ids(tokenizer, text: str) -> list[int]:
    return tokenizer(text)["input_ids"]


@pytest.fixture(scope="module")
def tok() -> PreTrainedTokenizerFast:
    return byte_tokenizer()


@pytest.fixture(scope="module")
def c4_texts() -> list[str]:
    return pq.read_table(C4, columns=["text"]).column("text").to_pylist()


@pytest.fixture(scope="module")
def full_c4_texts() -> list[str]:
    return pq.read_table(FULL_DATA / C4_FILE, columns=["text"]).column("text").to_pylist()


@pytest.fixture
def full_data(monkeypatch):
    """The full data folder for one protocol test (files are named relative to the data folder in use)."""
    monkeypatch.setenv(DATA_DIR_ENV, str(FULL_DATA))


@pytest.mark.needs_data
def test_default_spec_is_the_readme_protocol(tok, full_c4_texts, full_data):
    full_c4 = FULL_DATA / C4_FILE
    cal = load_calibration(CalibrationSpec(), tok, data_dir=FULL_DATA)
    assert cal.indices == tuple(range(8)) and cal.index_kind == "row"
    assert [s.tolist() for s in cal.sequences] == [ids(tok, t)[:512] for t in full_c4_texts[:8]]
    assert all(s.dtype == torch.long and s.dim() == 1 for s in cal.sequences)
    lengths = [len(s) for s in cal.sequences]
    assert max(lengths) == 512 and min(lengths) < 512  # short documents are kept at their own length
    assert cal.num_tokens == sum(lengths)
    assert cal.files == (C4_FILE,) and cal.sha256 == (sha256sum(full_c4),)  # named relative to the data folder
    assert not cal.self_generated
    assert cal.provenance()["lengths"] == lengths


def test_bos_tokenizer_starts_every_document_with_bos(c4_texts):
    cal = load_calibration(CalibrationSpec(num_samples=3, seq_len=64), byte_tokenizer(bos=True))
    assert [s.tolist() for s in cal.sequences] == [[0] + ids(byte_tokenizer(), t)[:63] for t in c4_texts[:3]]


@pytest.mark.needs_data
def test_random_sampling_is_deterministic_and_seeded(tok, full_c4_texts, full_data):
    spec = CalibrationSpec(num_samples=16, seq_len=32, sampling="random", seed=0)
    first, again = load_calibration(spec, tok, data_dir=FULL_DATA), load_calibration(spec, tok, data_dir=FULL_DATA)
    other = load_calibration(CalibrationSpec(num_samples=16, seq_len=32, sampling="random", seed=1), tok,
                             data_dir=FULL_DATA)
    assert first.indices == again.indices
    assert all(torch.equal(a, b) for a, b in zip(first.sequences, again.sequences, strict=True))
    assert first.indices != other.indices
    assert len(set(first.indices)) == 16 and list(first.indices) == sorted(first.indices)
    assert all(0 <= i < 1000 for i in first.indices + other.indices)  # the calibration pool, not evaluation rows
    assert [s.tolist() for s in first.sequences] == [ids(tok, full_c4_texts[i])[:32] for i in first.indices]


def test_rows_set_the_pool(tok):
    assert load_calibration(CalibrationSpec(num_samples=3, seq_len=16, rows=(1002, 1020)), tok).indices == (1002, 1003,
                                                                                                            1004)
    sampled = load_calibration(CalibrationSpec(num_samples=5, seq_len=16, rows=(1002, 1020), sampling="random"), tok)
    assert all(1002 <= i < 1020 for i in sampled.indices)


def test_wikitext2_is_the_validation_stream(tok):
    stream = ids(tok, WIKI_VALID.read_text(encoding="utf-8")[:600])  # one token per byte: a prefix suffices
    cal = load_calibration(CalibrationSpec("wikitext2", num_samples=4, seq_len=128), tok)
    assert cal.indices == (0, 1, 2, 3) and cal.index_kind == "window"
    assert [s.tolist() for s in cal.sequences] == [stream[i * 128 : (i + 1) * 128] for i in range(4)]
    assert cal.files == (WIKITEXT2_VALID_FILE,) and cal.sha256 == (sha256sum(WIKI_VALID),)


def test_text_file_is_one_stream_cut_into_windows(tok, tmp_path):
    path = tmp_path / "corpus.txt"
    text = WIKI_VALID.read_text(encoding="utf-8")[:3000]  # the wikitext2 source reads its file the same way
    path.write_text(text, encoding="utf-8")
    stream = ids(tok, text)
    first = load_calibration(CalibrationSpec(str(path), num_samples=5, seq_len=100), tok)
    assert [s.tolist() for s in first.sequences] == [stream[i * 100 : (i + 1) * 100] for i in range(5)]
    assert first.files == (path.name,) and first.sha256 == (sha256sum(path),)  # no absolute path
    sampled = [load_calibration(CalibrationSpec(str(path), 5, 100, seed=s, sampling="random"), tok) for s in (0, 0, 1)]
    assert sampled[0].indices == sampled[1].indices != sampled[2].indices
    assert all(torch.equal(a, b) for a, b in zip(sampled[0].sequences, sampled[1].sequences, strict=True))
    for i, seq in zip(sampled[0].indices, sampled[0].sequences, strict=True):
        assert seq.tolist() == stream[i * 100 : (i + 1) * 100]
    assert all(i < len(stream) // 100 for i in sampled[0].indices + sampled[2].indices)


def _write_rows(path: Path, texts: list[str]) -> Path:
    if path.suffix == ".jsonl":
        path.write_text("".join(json.dumps({"text": t, "id": i}) + "\n" for i, t in enumerate(texts)), encoding="utf-8")
    else:
        pq.write_table(pa.table({"text": texts, "id": list(range(len(texts)))}), path)
    return path


@pytest.mark.parametrize("suffix", [".jsonl", ".parquet"])
def test_row_files_skip_blank_documents(tok, tmp_path, suffix):
    path = _write_rows(tmp_path / f"rows{suffix}", ["", "x", "hello", "", "a longer document"])
    cal = load_calibration(CalibrationSpec(str(path), num_samples=2, seq_len=8), tok)
    assert cal.indices == (2, 4)  # rows with < 2 tokens are skipped
    assert [s.tolist() for s in cal.sequences] == [ids(tok, "hello"), ids(tok, "a longer")]
    assert cal.sha256 == (sha256sum(path),)
    with pytest.raises(CalibrationDataError, match=r"2 usable documents .*13 tokens.*need 3"):
        load_calibration(CalibrationSpec(str(path), num_samples=3, seq_len=8), tok)


@pytest.mark.parametrize(
    ("name", "content", "spec_kwargs", "message"),
    [
        ("missing.txt", None, {}, "not found"),
        ("data.csv", "text\nabc\n", {}, "unsupported calibration source"),
        ("empty.txt", "  \n", {}, "empty"),
        ("empty.jsonl", "\n", {}, "empty"),
        ("bad.jsonl", '{"body": "abc"}\n', {}, "line 1 has no string 'text' field"),
        ("broken.jsonl", '{"text": \n', {}, "line 1 is not valid JSON"),
        ("short.txt", "a" * 25, {"num_samples": 3, "seq_len": 10}, r"has 25 tokens, need 3 x 10 = 30"),
        ("rows.txt", "a" * 100, {"num_samples": 1, "seq_len": 10, "rows": (0, 5)}, "rows apply to document sources"),
    ],
)
def test_file_errors_name_the_problem(tok, tmp_path, name, content, spec_kwargs, message):
    path = tmp_path / name
    if content is not None:
        path.write_text(content, encoding="utf-8")
    with pytest.raises(CalibrationDataError, match=message):
        load_calibration(CalibrationSpec(str(path), **spec_kwargs), tok)


def test_parquet_without_text_column(tok, tmp_path):
    path = tmp_path / "no_text.parquet"
    pq.write_table(pa.table({"body": ["abc"]}), path)
    with pytest.raises(CalibrationDataError, match="no 'text' column.*body"):
        load_calibration(CalibrationSpec(str(path)), tok)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"num_samples": 0}, "num_samples must be >= 1"),
        ({"seq_len": 1}, "seq_len must be >= 2"),
        ({"rows": (5, 5)}, r"rows must be a range"),
        ({"sampling": "shuffled"}, "sampling must be"),
        ({"source": ""}, "source is empty"),
    ],
)
def test_spec_errors(kwargs, message):
    with pytest.raises(CalibrationDataError, match=message):
        CalibrationSpec(**kwargs)


def test_rows_out_of_range(tok):
    with pytest.raises(CalibrationDataError, match=r"rows \[1000, 1600\) are out of range: .* has 1032 rows"):
        load_calibration(CalibrationSpec(rows=(1000, 1600)), tok)


def test_malformed_hub_source(tok):
    with pytest.raises(CalibrationDataError, match="malformed hub source"):
        load_calibration(CalibrationSpec("hf:"), tok)


def test_hub_source_offline_says_so(tok):
    with pytest.raises(CalibrationDataError, match="could not load hub allenai/c4 .*HF_DATASETS_OFFLINE"):
        load_calibration(CalibrationSpec("hf:allenai/c4:en:validation"), tok)


@pytest.mark.parametrize("source,file", [("c4", C4_FILE), ("wikitext2", WIKITEXT2_VALID_FILE)])
def test_missing_data_is_an_error_not_a_substitute(tok, tmp_path, monkeypatch, source, file):
    monkeypatch.setenv(DATA_DIR_ENV, str(tmp_path))
    spec = CalibrationSpec(source, num_samples=3, seq_len=8, sampling="random")
    message = rf"calibration file not found: {file} in the data folder .*'self-generated'"
    with pytest.raises(CalibrationDataError, match=message):
        check_source(spec)
    with pytest.raises(CalibrationDataError, match=message):
        load_calibration(spec, tok, tiny_model())


@pytest.mark.needs_data
def test_c4_rows_in_the_packaged_sample_need_no_data_folder(tok, tmp_path, monkeypatch, full_data):
    """The paper's 8 C4 documents ship with the package: the same sequences with or without the data folder."""
    spec = CalibrationSpec("c4", num_samples=8, seq_len=512)
    full = load_calibration(spec, tok)
    monkeypatch.setenv(DATA_DIR_ENV, str(tmp_path))
    check_source(spec)
    sample = load_calibration(spec, tok)
    assert sample.indices == full.indices == tuple(range(8))
    assert all(torch.equal(a, b) for a, b in zip(sample.sequences, full.sequences, strict=True))
    assert sample.files == (f"attnprune_opt/data/c4_sample/{C4_SAMPLE_NAME}",)
    assert "C4 validation rows 0-7" in sample.description
    with pytest.raises(CalibrationDataError, match="calibration file not found"):
        load_calibration(CalibrationSpec("c4", num_samples=9, seq_len=8), tok)


def test_self_generated_text_only_when_named(tok):
    model = tiny_model()
    spec = CalibrationSpec(SELF_GENERATED, num_samples=3, seq_len=8, seed=5)
    cal = load_calibration(spec, tok, model)
    assert cal.self_generated and "self-generated" in cal.description and cal.files == ()
    assert [len(s) for s in cal.sequences] == [8, 8, 8]
    assert all(s[0] == tok.bos_token_id for s in cal.sequences)
    again = load_calibration(spec, tok, model)
    assert all(torch.equal(a, b) for a, b in zip(cal.sequences, again.sequences, strict=True))
    other = load_calibration(CalibrationSpec(SELF_GENERATED, num_samples=3, seq_len=8, seed=6), tok, model)
    assert not all(torch.equal(a, b) for a, b in zip(cal.sequences, other.sequences, strict=True))
    assert len({tuple(s.tolist()) for s in cal.sequences}) == 3  # sampled, not greedy: the samples differ
    with pytest.raises(CalibrationDataError, match="'self-generated' needs the model"):
        load_calibration(spec, tok)


@pytest.mark.parametrize("name,content,message", [
    ("latin1.txt", "caf\u00e9 ".encode("latin-1") * 50, r"latin1.txt is not UTF-8 text: byte 0xe9 at offset 3"),
    ("latin1.jsonl", b'{"text": "caf\xe9"}\n', r"latin1.jsonl is not UTF-8 text: byte 0xe9 at offset 13"),
    ("fake.parquet", b"text,url\nhello,x\n", r"fake.parquet is not a readable parquet file: "),
])
def test_undecodable_files_are_named_before_loading_a_model(name, content, message, tmp_path):
    path = tmp_path / name
    path.write_bytes(content)
    with pytest.raises(CalibrationDataError, match=message):
        check_source(CalibrationSpec(str(path)))


def test_data_file_sha256_matches_sha256sum(tmp_path):
    path = tmp_path / "blob.bin"
    path.write_bytes(bytes(range(256)) * 41)
    assert data_file_sha256(path, chunk_size=7) == sha256sum(path)
    assert data_file_sha256(C4) == sha256sum(C4)
