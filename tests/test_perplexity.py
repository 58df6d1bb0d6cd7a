"""Perplexity: equal to a hand computation, batch-size invariant, protocol counts, offloaded models."""

from __future__ import annotations

import math
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import torch
import torch.nn.functional as F
from accelerate import cpu_offload
from test_calibration import byte_tokenizer, sha256sum, tiny_model

from attnprune_opt.data.calibration import C4_FILE, WIKITEXT2_TEST_FILE, WIKITEXT2_VALID_FILE
from attnprune_opt.errors import ConfigError
from attnprune_opt.evaluation.perplexity import QUICK_WINDOWS, c4_perplexity, wikitext2_perplexity
from conftest import FULL_DATA, MINI_DATA

# Scoring is checked on the mini data folder (autouse fixture below); the protocol's counts on the full folder.
C4 = MINI_DATA / C4_FILE
WIKI_TEST = MINI_DATA / WIKITEXT2_TEST_FILE


@pytest.fixture(autouse=True)
def _mini(mini_data):
    return mini_data


@pytest.fixture(scope="module")
def model():
    return tiny_model()


@pytest.fixture(scope="module")
def c4_texts() -> list[str]:
    return pq.read_table(C4, columns=["text"]).column("text").to_pylist()


def hand_perplexity(model, sequences: list[list[int]]) -> tuple[float, int]:
    """exp of the cross-entropy over all predicted tokens, one unpadded sequence at a time."""
    nll, count = 0.0, 0
    with torch.no_grad():
        for seq in sequences:
            ids = torch.tensor(seq)
            logits = model(ids[None]).logits[0]
            nll += F.cross_entropy(logits[:-1], ids[1:], reduction="sum").item()
            count += len(seq) - 1
    return math.exp(nll / count), count


@pytest.fixture(scope="module")
def small_wiki(tmp_path_factory) -> Path:
    """A data folder whose wiki.test.raw is the first 5000 characters of the real one, to score every window fast."""
    folder = tmp_path_factory.mktemp("data")
    (folder / "wikitext2_raw").mkdir()
    (folder / WIKITEXT2_TEST_FILE).write_text(WIKI_TEST.read_text(encoding="utf-8")[:5000], encoding="utf-8")
    return folder


@pytest.mark.parametrize("bos", [False, True])
def test_wikitext2_equals_hand_computation(model, small_wiki, bos):
    tok = byte_tokenizer(bos)
    path = small_wiki / WIKITEXT2_TEST_FILE
    stream = tok(path.read_text(encoding="utf-8"))["input_ids"]
    windows = [stream[i * 64 : (i + 1) * 64] for i in range(6)]
    assert (windows[0][0] == 0) == bos and all(w[0] != 0 for w in windows[1:])  # BOS once, at the stream start
    expected, count = hand_perplexity(model, windows)
    result = wikitext2_perplexity(model, tok, seq_len=64, max_windows=6, data_dir=small_wiki, progress=False)
    assert result.perplexity == pytest.approx(expected, rel=1e-5)
    assert (result.sequences, result.tokens) == (6, count) == (6, 6 * 63)
    assert result.nll == pytest.approx(math.log(expected) * count, rel=1e-5)
    assert result.params["available_windows"] == len(stream) // 64
    assert result.data_file == str(path) and result.sha256 == sha256sum(path)


@pytest.mark.parametrize("bos", [False, True])
def test_c4_equals_hand_computation_with_short_documents(model, c4_texts, bos):
    tok = byte_tokenizer(bos)
    documents = [tok(t)["input_ids"][:256] for t in c4_texts[1008:1016]]
    assert sum(len(d) < 256 for d in documents) == 2  # rows 1010 and 1015 are shorter than seq_len
    expected, count = hand_perplexity(model, documents)
    result = c4_perplexity(model, tok, rows=(1008, 1016), seq_len=256, batch_size=3, progress=False)
    assert result.perplexity == pytest.approx(expected, rel=1e-5)
    assert (result.sequences, result.tokens) == (8, count)
    assert result.sha256 == sha256sum(C4)


def test_batch_size_does_not_change_the_result(model, small_wiki):
    tok = byte_tokenizer()
    c4 = [c4_perplexity(model, tok, rows=(1008, 1016), seq_len=256, batch_size=b, progress=False) for b in (1, 3, 8)]
    wiki = [
        wikitext2_perplexity(model, tok, seq_len=64, max_windows=5, data_dir=small_wiki, batch_size=b, progress=False)
        for b in (1, 2)
    ]
    for results in (c4, wiki):
        assert all(r.perplexity == pytest.approx(results[0].perplexity, rel=1e-6) for r in results)
        assert len({r.tokens for r in results}) == 1


@pytest.mark.needs_data
def test_standard_protocol_counts(model):
    tok = byte_tokenizer()
    quick = wikitext2_perplexity(model, tok, max_windows=QUICK_WINDOWS, batch_size=16, progress=False,
                                 data_dir=FULL_DATA)
    assert (quick.sequences, quick.tokens, quick.params["seq_len"]) == (64, 64 * 511, 512)
    wiki_test = FULL_DATA / WIKITEXT2_TEST_FILE
    assert quick.data_file == str(wiki_test) and quick.sha256 == sha256sum(wiki_test)
    c4 = c4_perplexity(model, tok, batch_size=16, progress=False, data_dir=FULL_DATA)
    c4_texts = pq.read_table(FULL_DATA / C4_FILE, columns=["text"]).column("text").to_pylist()
    lengths = [min(len(tok(t)["input_ids"]), 512) for t in c4_texts[1000:1128]]
    assert (c4.sequences, c4.tokens, c4.params["rows"]) == (128, sum(n - 1 for n in lengths), [1000, 1128])


def test_all_windows_are_scored_when_unbounded(model, small_wiki):
    tok = byte_tokenizer(bos=True)
    expected_windows = len(tok((small_wiki / WIKITEXT2_TEST_FILE).read_text(encoding="utf-8"))["input_ids"]) // 96
    result = wikitext2_perplexity(model, tok, seq_len=96, data_dir=small_wiki, progress=False)
    assert (result.sequences, result.tokens) == (expected_windows, expected_windows * 95)


def test_offloaded_model_and_training_mode(model):
    tok = byte_tokenizer()
    reference = c4_perplexity(model, tok, rows=(1000, 1004), seq_len=64, progress=False)
    offloaded = tiny_model()
    offloaded.load_state_dict(model.state_dict())
    cpu_offload(offloaded, execution_device="cpu")  # weights on 'meta', so model.device is of no use
    offloaded.train()
    result = c4_perplexity(offloaded, tok, rows=(1000, 1004), seq_len=64, progress=False)
    assert result.perplexity == pytest.approx(reference.perplexity, rel=1e-6)
    assert offloaded.training  # evaluated in eval mode, then restored


def test_errors(model, tmp_path):
    tok = byte_tokenizer()
    with pytest.raises(ConfigError, match="seq_len must be >= 2"):
        wikitext2_perplexity(model, tok, seq_len=1)
    with pytest.raises(ConfigError, match="batch_size must be >= 1"):
        c4_perplexity(model, tok, batch_size=0)
    with pytest.raises(FileNotFoundError, match="wiki.test.raw"):
        wikitext2_perplexity(model, tok, data_dir=tmp_path)
    with pytest.raises(ConfigError, match="split must be one of test, valid, got 'train'"):
        wikitext2_perplexity(model, tok, split="train")


def test_valid_split_reads_the_development_file(model, small_wiki):
    """Tuning scores wiki.valid.raw, never the test windows; the split is recorded with the result."""
    tok = byte_tokenizer()
    (small_wiki / WIKITEXT2_VALID_FILE).write_text(WIKI_TEST.read_text(encoding="utf-8")[5000:10000], encoding="utf-8")
    valid = wikitext2_perplexity(model, tok, seq_len=64, max_windows=4, data_dir=small_wiki, split="valid",
                                 progress=False)
    test = wikitext2_perplexity(model, tok, seq_len=64, max_windows=4, data_dir=small_wiki, progress=False)
    assert valid.data_file == str(small_wiki / WIKITEXT2_VALID_FILE) and valid.params["split"] == "valid"
    assert test.params["split"] == "test" and valid.perplexity != test.perplexity
