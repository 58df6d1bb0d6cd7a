"""Perplexity by the project's standard protocol (``shared/data/README.md``), so figures compare between runs.

Tokenization follows GPTQ / SparseGPT / Wanda: the tokenizer's default call, so a tokenizer that adds BOS (Llama)
contributes it where that call puts it and one that adds nothing (SmolLM2, GPT-2) contributes nothing.

- WikiText-2: the text of ``wiki.test.raw`` verbatim (these papers tokenize ``"\\n\\n".join`` of the hub rows
  instead, so figures are close to theirs but not identical), tokenized as one stream: a default BOS appears once at
  the start of the stream, never per window. The stream is cut into non-overlapping windows of ``seq_len`` tokens
  and the shorter tail dropped; the quick variant scores the first 64 windows. Windows share no context, so in
  each one the first token is context only and ``seq_len - 1`` tokens are predicted (unlike lm-eval's rolling
  log-likelihood, which predicts every token and reports word perplexity).
- C4: every document of ``rows`` tokenized on its own (a default BOS starts each), truncated to its first
  ``seq_len`` tokens (shorter documents stay shorter) and scored separately.

Both report exp(total NLL / total predicted tokens), the NLL summed in float64.
"""

from __future__ import annotations

import math
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F
from torch import Tensor
from tqdm.auto import tqdm

from attnprune_opt import paths
from attnprune_opt.data.calibration import (
    C4_FILE,
    MIN_TOKENS,
    WIKITEXT2_TEST_FILE,
    WIKITEXT2_VALID_FILE,
    data_file_sha256,
    read_texts,
    select_rows,
    split_windows,
    tokenize_document,
    tokenize_stream,
)
from attnprune_opt.data.reference import check_reference
from attnprune_opt.errors import ConfigError
from attnprune_opt.models.offload import evaluating, input_device

if TYPE_CHECKING:
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

QUICK_WINDOWS = 64
WIKITEXT2_FILES = {"test": WIKITEXT2_TEST_FILE, "valid": WIKITEXT2_VALID_FILE}
C4_EVAL_ROWS = (1000, 1128)


@dataclass(frozen=True)
class PerplexityResult:
    """One perplexity figure with what it was computed on; ``sequences`` counts windows or documents scored."""

    task: str
    perplexity: float
    nll: float
    tokens: int
    sequences: int
    data_file: str
    sha256: str
    seconds: float
    params: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def wikitext2_perplexity(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    *,
    seq_len: int = 512,
    max_windows: int | None = None,
    data_dir: str | Path | None = None,
    batch_size: int = 4,
    progress: bool = True,
    split: str = "test",
) -> PerplexityResult:
    """WikiText-2 perplexity over all windows, or the first ``max_windows`` (``QUICK_WINDOWS`` = quick); ``split``
    is ``test`` (the protocol) or ``valid`` (development data, for tuning)."""
    _check(seq_len, batch_size)
    if max_windows is not None and max_windows < 1:
        raise ConfigError(f"max_windows must be >= 1 or None, got {max_windows}")
    if split not in WIKITEXT2_FILES:
        raise ConfigError(f"WikiText-2 split must be one of {', '.join(WIKITEXT2_FILES)}, got {split!r}")
    path = _data_file(data_dir, WIKITEXT2_FILES[split])
    ids = tokenize_stream(tokenizer, path.read_text(encoding="utf-8"))
    windows = split_windows(ids, seq_len)
    if not windows:
        raise ConfigError(f"seq_len {seq_len} is longer than the whole {len(ids)}-token stream of {path}")
    params = {
        "split": split,
        "seq_len": seq_len,
        "max_windows": max_windows,
        "stream_tokens": len(ids),
        "available_windows": len(windows),
        "default_special_tokens": tokenizer("")["input_ids"],
        "batch_size": batch_size,
    }
    return _evaluate("wikitext2", model, windows[:max_windows], path, params, batch_size, progress)


def c4_perplexity(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    *,
    rows: tuple[int, int] = C4_EVAL_ROWS,
    seq_len: int = 512,
    data_dir: str | Path | None = None,
    batch_size: int = 4,
    progress: bool = True,
) -> PerplexityResult:
    """C4 perplexity over documents ``rows`` = [start, stop), each truncated to ``seq_len`` tokens."""
    _check(seq_len, batch_size)
    path = _data_file(data_dir, C4_FILE)
    texts = select_rows(read_texts(path), tuple(rows), str(path))
    documents = [tokenize_document(tokenizer, text, seq_len) for text in texts]
    scored = [d for d in documents if len(d) >= MIN_TOKENS]
    params = {
        "rows": list(rows),
        "seq_len": seq_len,
        "skipped_documents": len(documents) - len(scored),
        "default_special_tokens": tokenizer("")["input_ids"],
        "batch_size": batch_size,
    }
    return _evaluate("c4", model, scored, path, params, batch_size, progress)


def score_sequences(
    model: torch.nn.Module, sequences: Sequence[Tensor], *, batch_size: int = 4, progress: bool = False, desc: str = ""
) -> tuple[float, int]:
    """Total NLL (nats, float64) and number of predicted tokens of causal LM scoring of each sequence separately.

    Sequences are batched longest first and right-padded; padding is masked out of attention and loss. Inputs go
    to the model's input device (:func:`input_device`); the model is not moved.
    """
    device = input_device(model)
    order = sorted(range(len(sequences)), key=lambda i: -len(sequences[i]))
    total_nll, total_tokens = 0.0, 0
    with evaluating(model), torch.inference_mode(), tqdm(
        total=len(sequences), desc=desc, disable=not progress, unit="seq"
    ) as bar:
        for start in range(0, len(order), batch_size):
            batch = [sequences[i] for i in order[start : start + batch_size]]
            ids = torch.zeros(len(batch), len(batch[0]), dtype=torch.long)
            mask = torch.zeros_like(ids)
            for row, seq in enumerate(batch):
                ids[row, : len(seq)] = seq
                mask[row, : len(seq)] = 1
            logits = model(input_ids=ids.to(device), attention_mask=mask.to(device), use_cache=False).logits
            predicted = mask[:, 1:].bool().to(logits.device)
            targets = ids[:, 1:].to(logits.device)[predicted]
            nll = F.cross_entropy(logits[:, :-1][predicted].float(), targets, reduction="none")
            total_nll += nll.double().sum().item()
            total_tokens += int(predicted.sum())
            bar.update(len(batch))
    return total_nll, total_tokens


def _check(seq_len: int, batch_size: int) -> None:
    if seq_len < MIN_TOKENS:
        raise ConfigError(f"seq_len must be >= {MIN_TOKENS}, got {seq_len}")
    if batch_size < 1:
        raise ConfigError(f"batch_size must be >= 1, got {batch_size}")


def _data_file(data_dir: str | Path | None, relative: str) -> Path:
    path = Path(data_dir or paths.data_dir()) / relative
    if not path.is_file():
        raise FileNotFoundError(f"evaluation data not found: {path} (set {paths.DATA_DIR_ENV} to the data folder)")
    return path


def _evaluate(
    task: str,
    model: torch.nn.Module,
    sequences: Sequence[Tensor],
    path: Path,
    params: dict[str, Any],
    batch_size: int,
    progress: bool,
) -> PerplexityResult:
    started = time.perf_counter()
    nll, tokens = score_sequences(model, sequences, batch_size=batch_size, progress=progress, desc=f"{task} ppl")
    if not tokens:
        raise ValueError(f"{task}: nothing to score in {path} (every document has fewer than {MIN_TOKENS} tokens)")
    sha256 = data_file_sha256(path)
    check_reference(path, sha256)  # warns when the figure will not compare with the protocol's
    return PerplexityResult(
        task=task,
        perplexity=math.exp(nll / tokens),
        nll=nll,
        tokens=tokens,
        sequences=len(sequences),
        data_file=str(path),
        sha256=sha256,
        seconds=time.perf_counter() - started,
        params=params,
    )
