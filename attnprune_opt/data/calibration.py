"""Calibration data: which token sequences the pruning sees, chosen deterministically and recorded with provenance.

Sources come in two shapes:

- documents (``c4``, ``.jsonl``, ``.parquet``, ``hf:...``): every row is tokenized on its own and truncated to
  its first ``seq_len`` tokens. Shorter documents are kept at their own length, as the README protocol ("each
  truncated to 512 tokens") implies; with SmolLM2, C4 rows 0-7 have 2041, 76, 313, 292, 392, 480, 255 and 758
  tokens, so the standard set is 8 sequences of 512, 76, 313, ... tokens. Rows with fewer than 2 tokens (blank
  text) are skipped and the next row in selection order is taken instead.
- a stream (``wikitext2`` = ``wiki.valid.raw``, ``.txt``): the whole text is tokenized at once and cut into
  non-overlapping windows of exactly ``seq_len`` tokens; the tail shorter than a window is dropped.

Tokenization is the tokenizer's default call, as in GPTQ-style pipelines: a tokenizer that adds BOS (Llama) puts it
at the start of each document and once at the start of a stream; one that adds nothing (SmolLM2, GPT-2) adds
nothing. The same helpers serve the perplexity evaluation, so calibration and evaluation see text the same way.

Selection: ``sampling="first"`` takes the first usable rows (windows) of the pool in order, which with the
defaults is the README standard, C4 rows 0-7. ``sampling="random"`` draws them without replacement from the pool in
the order of ``torch.randperm`` under ``torch.Generator().manual_seed(seed)``; the chosen indices are then sorted.
The pool of ``c4`` and ``hf:`` sources is rows [0, 1000) unless ``rows`` says otherwise (C4 rows 1000-1499 are
kept for evaluation); a local file's pool is all its rows.

When the local ``c4`` or ``wikitext2`` file is absent (a fresh offline machine without the data folder), the model
writes its own calibration text instead, see :func:`generate_sequences`; the set then says so.
"""

from __future__ import annotations

import itertools
import json
import logging
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import torch
from torch import Tensor

from attnprune_opt import paths
from attnprune_opt.paths import file_sha256 as data_file_sha256
from attnprune_opt.errors import CalibrationDataError
from attnprune_opt.models.offload import evaluating, input_device

if TYPE_CHECKING:
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

logger = logging.getLogger(__name__)

C4_FILE = "c4/c4_validation_1500.parquet"
WIKITEXT2_VALID_FILE = "wikitext2_raw/wiki.valid.raw"
WIKITEXT2_TEST_FILE = "wikitext2_raw/wiki.test.raw"
DEFAULT_POOL = (0, 1000)
HF_DEFAULT_SPLIT = "train"
MIN_TOKENS = 2  # one context token and one predicted token
_GENERATION_BATCH = 8  # fixed, so self-generated text does not depend on anything but the spec
_LOCAL_DEFAULTS = {"c4": C4_FILE, "wikitext2": WIKITEXT2_VALID_FILE}

Sampling = Literal["first", "random"]
IndexKind = Literal["row", "window"]


@dataclass(frozen=True)
class CalibrationSpec:
    """What to calibrate on: a source and how many sequences of at most how many tokens.

    ``source``: ``"c4"``, ``"wikitext2"``, ``"hf:<name>[:<config>][:<split>]"`` or a ``.txt``/``.jsonl``/``.parquet``
    path. ``rows``: a half-open [start, stop) pool of rows for document sources.
    """

    source: str = "c4"
    num_samples: int = 8
    seq_len: int = 512
    seed: int = 0
    sampling: Sampling = "first"
    rows: tuple[int, int] | None = None

    def __post_init__(self) -> None:
        if not self.source:
            raise CalibrationDataError("calibration source is empty")
        if self.num_samples < 1:
            raise CalibrationDataError(f"num_samples must be >= 1, got {self.num_samples}")
        if self.seq_len < MIN_TOKENS:
            raise CalibrationDataError(f"seq_len must be >= {MIN_TOKENS}, got {self.seq_len}")
        if self.sampling not in ("first", "random"):
            raise CalibrationDataError(f"sampling must be 'first' or 'random', got {self.sampling!r}")
        if self.rows is not None:
            start, stop = self.rows
            if not 0 <= start < stop:
                raise CalibrationDataError(f"rows must be a range [start, stop), 0 <= start < stop, got {self.rows}")


@dataclass(frozen=True)
class CalibrationSet:
    """Token sequences (1-D LongTensors, at most ``spec.seq_len`` long) and where they came from.

    ``indices`` are file rows for document sources and window numbers for stream sources (``index_kind``); the
    files and their sha256 are empty for hub and self-generated data.
    """

    sequences: list[Tensor]
    spec: CalibrationSpec
    description: str
    files: tuple[str, ...] = ()
    sha256: tuple[str, ...] = ()
    indices: tuple[int, ...] = ()
    index_kind: IndexKind | None = None
    self_generated: bool = False

    def __len__(self) -> int:
        return len(self.sequences)

    @property
    def num_tokens(self) -> int:
        return sum(len(s) for s in self.sequences)

    def provenance(self) -> dict[str, Any]:
        """JSON-ready record for manifests and reports."""
        return {
            "spec": asdict(self.spec),
            "description": self.description,
            "files": list(self.files),
            "sha256": list(self.sha256),
            "indices": list(self.indices),
            "index_kind": self.index_kind,
            "self_generated": self.self_generated,
            "num_sequences": len(self.sequences),
            "num_tokens": self.num_tokens,
            "lengths": [len(s) for s in self.sequences],
        }


def load_calibration(
    spec: CalibrationSpec,
    tokenizer: PreTrainedTokenizerBase,
    model: PreTrainedModel | None = None,
    *,
    data_dir: str | Path | None = None,
) -> CalibrationSet:
    """Tokenized calibration sequences for ``spec``; ``model`` is only used when the local default data is absent."""
    source = spec.source
    if source in _LOCAL_DEFAULTS:
        path = Path(data_dir or paths.data_dir()) / _LOCAL_DEFAULTS[source]
        if not path.is_file():
            return _self_generated(spec, tokenizer, model, missing=path)
        if source == "c4":
            pool = spec.rows or DEFAULT_POOL
            return _from_documents(spec, tokenizer, read_texts(path), paths.portable_name(path), pool=pool, path=path)
        return _from_stream(spec, tokenizer, path)
    if source.startswith("hf:"):
        return _from_hub(spec, tokenizer)
    path = Path(source)
    if path.suffix not in (".txt", ".jsonl", ".parquet"):
        raise CalibrationDataError(
            f"unsupported calibration source {source!r}: expected 'c4', 'wikitext2', 'hf:<name>[:<config>][:<split>]' "
            "or a .txt, .jsonl or .parquet file"
        )
    if not path.is_file():
        raise CalibrationDataError(f"calibration file not found: {path}")
    if path.suffix == ".txt":
        return _from_stream(spec, tokenizer, path)
    texts = read_texts(path)
    return _from_documents(spec, tokenizer, texts, paths.portable_name(path), pool=spec.rows or (0, len(texts)),
                           path=path)


# --- reading and tokenizing (shared with the perplexity evaluation) -------------------------------------------------


def read_texts(path: Path) -> list[str]:
    """The ``text`` of every row of a .parquet (column) or .jsonl (field) file, in file order."""
    if path.suffix == ".parquet":
        import pyarrow.parquet as pq

        names = pq.read_schema(path).names
        if "text" not in names:
            raise CalibrationDataError(f"{path} has no 'text' column (columns: {', '.join(names)})")
        texts = pq.read_table(path, columns=["text"]).column("text").to_pylist()
    else:
        texts = []
        with open(path, encoding="utf-8") as f:
            for number, line in enumerate(f, start=1):
                if not line.strip():
                    continue
                try:
                    record = json.loads(line)
                except json.JSONDecodeError as exc:
                    raise CalibrationDataError(f"{path} line {number} is not valid JSON: {exc}") from exc
                if not isinstance(record, dict) or not isinstance(record.get("text"), str):
                    raise CalibrationDataError(f"{path} line {number} has no string 'text' field")
                texts.append(record["text"])
    if not texts:
        raise CalibrationDataError(f"{path} is empty: no rows")
    return [t or "" for t in texts]


def select_rows(texts: Sequence[str], rows: tuple[int, int], origin: str) -> list[str]:
    """Rows [start, stop) of ``texts``; out of range is an error, not a silent clip."""
    start, stop = rows
    if not 0 <= start < stop <= len(texts):
        raise CalibrationDataError(f"rows [{start}, {stop}) are out of range: {origin} has {len(texts)} rows")
    return list(texts[start:stop])


def tokenize_document(tokenizer: PreTrainedTokenizerBase, text: str, seq_len: int) -> Tensor:
    """The first ``seq_len`` tokens of one document, special tokens as the tokenizer adds them by default."""
    return torch.tensor(tokenizer(text, verbose=False)["input_ids"][:seq_len], dtype=torch.long)


def tokenize_stream(tokenizer: PreTrainedTokenizerBase, text: str) -> Tensor:
    """The whole text as one token stream (a default BOS, if any, appears once at the start)."""
    return torch.tensor(tokenizer(text, verbose=False)["input_ids"], dtype=torch.long)


def split_windows(ids: Tensor, seq_len: int) -> list[Tensor]:
    """Non-overlapping windows of exactly ``seq_len`` tokens; the shorter tail is dropped."""
    count = len(ids) // seq_len
    return list(ids[: count * seq_len].view(count, seq_len).clone()) if count else []


# --- sources ----------------------------------------------------------------------------------------------------------


def _selection_order(count: int, spec: CalibrationSpec) -> list[int]:
    if spec.sampling == "first":
        return list(range(count))
    return torch.randperm(count, generator=torch.Generator().manual_seed(spec.seed)).tolist()


def _from_documents(
    spec: CalibrationSpec,
    tokenizer: PreTrainedTokenizerBase,
    texts: Sequence[str],
    origin: str,
    *,
    pool: tuple[int, int],
    path: Path | None = None,
) -> CalibrationSet:
    start, stop = pool
    pool_texts = select_rows(texts, pool, origin)
    chosen: dict[int, Tensor] = {}
    for offset in _selection_order(len(pool_texts), spec):
        ids = tokenize_document(tokenizer, pool_texts[offset], spec.seq_len)
        if len(ids) >= MIN_TOKENS:
            chosen[start + offset] = ids
            if len(chosen) == spec.num_samples:
                break
    if len(chosen) < spec.num_samples:
        found = sum(len(ids) for ids in chosen.values())
        raise CalibrationDataError(
            f"{origin}: rows [{start}, {stop}) hold {len(chosen)} usable documents (>= {MIN_TOKENS} tokens, "
            f"{found} tokens in all), need {spec.num_samples}"
        )
    indices = tuple(sorted(chosen))
    files, hashes = ((paths.portable_name(path),), (data_file_sha256(path),)) if path else ((), ())
    return CalibrationSet(
        sequences=[chosen[i] for i in indices],
        spec=spec,
        description=(
            f"{origin}: {spec.num_samples} documents ({spec.sampling}, seed {spec.seed}) from rows [{start}, {stop}), "
            f"each truncated to {spec.seq_len} tokens, shorter ones kept"
        ),
        files=files,
        sha256=hashes,
        indices=indices,
        index_kind="row",
    )


def _from_stream(spec: CalibrationSpec, tokenizer: PreTrainedTokenizerBase, path: Path) -> CalibrationSet:
    if spec.rows is not None:
        raise CalibrationDataError(
            f"rows apply to document sources (c4, .jsonl, .parquet, hf:); {spec.source!r} is one text stream"
        )
    text = path.read_text(encoding="utf-8")
    if not text.strip():
        raise CalibrationDataError(f"{path} is empty")
    ids = tokenize_stream(tokenizer, text)
    windows = split_windows(ids, spec.seq_len)
    if len(windows) < spec.num_samples:
        raise CalibrationDataError(
            f"{path} has {len(ids)} tokens, need {spec.num_samples} x {spec.seq_len} = "
            f"{spec.num_samples * spec.seq_len}"
        )
    indices = tuple(sorted(_selection_order(len(windows), spec)[: spec.num_samples]))
    return CalibrationSet(
        sequences=[windows[i] for i in indices],
        spec=spec,
        description=(
            f"{path.name} as one stream of {len(ids)} tokens: {spec.num_samples} of its {len(windows)} windows of "
            f"{spec.seq_len} tokens ({spec.sampling}, seed {spec.seed})"
        ),
        files=(paths.portable_name(path),),
        sha256=(data_file_sha256(path),),
        indices=indices,
        index_kind="window",
    )


def _from_hub(spec: CalibrationSpec, tokenizer: PreTrainedTokenizerBase) -> CalibrationSet:
    parts = spec.source[3:].split(":")
    name, config, split = (parts + [None, None])[:3]
    if not name or len(parts) > 3:
        raise CalibrationDataError(f"malformed hub source {spec.source!r}: use hf:<name>[:<config>][:<split>]")
    config, split = config or None, split or HF_DEFAULT_SPLIT
    start, stop = spec.rows or DEFAULT_POOL
    origin = f"hub {name} ({config or 'default'}, {split})"
    try:
        import datasets

        stream = datasets.load_dataset(name, config, split=split, streaming=True)
        records = list(itertools.islice(stream, stop))
    except Exception as exc:  # offline mode, no network, unknown name: all mean "not loadable here"
        raise CalibrationDataError(
            f"could not load {origin} from the Hugging Face hub ({type(exc).__name__}: {exc}); without network "
            "(HF_DATASETS_OFFLINE) use a local source: 'c4', 'wikitext2' or a .txt/.jsonl/.parquet file"
        ) from exc
    if not records:
        raise CalibrationDataError(f"{origin} is empty")
    if "text" not in records[0]:
        raise CalibrationDataError(f"{origin} has no 'text' column (columns: {', '.join(records[0])})")
    texts = [r["text"] or "" for r in records]
    return _from_documents(spec, tokenizer, texts, origin, pool=(start, stop))


def _self_generated(
    spec: CalibrationSpec, tokenizer: PreTrainedTokenizerBase, model: PreTrainedModel | None, *, missing: Path
) -> CalibrationSet:
    if model is None:
        raise CalibrationDataError(
            f"calibration file not found: {missing} (set {paths.DATA_DIR_ENV} to the data folder), and no model "
            "was given to generate calibration text instead"
        )
    bos = tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.eos_token_id
    if bos is None:
        raise CalibrationDataError(
            f"{missing} not found, and the tokenizer has neither a BOS nor an EOS token to start generated text"
        )
    logger.warning(
        "%s not found: calibrating on %d x %d tokens the model generates itself (seed %d); results are not "
        "comparable with the %s protocol",
        missing,
        spec.num_samples,
        spec.seq_len,
        spec.seed,
        spec.source,
    )
    return CalibrationSet(
        sequences=generate_sequences(model, bos, spec.num_samples, spec.seq_len, spec.seed),
        spec=spec,
        description=(
            f"self-generated: {missing} not found; {spec.num_samples} sequences of {spec.seq_len} tokens sampled "
            f"(temperature 1) by the model from token {bos}, seed {spec.seed}"
        ),
        self_generated=True,
    )


def generate_sequences(model: torch.nn.Module, bos: int, num_samples: int, seq_len: int, seed: int) -> list[Tensor]:
    """``num_samples`` sequences of ``seq_len`` tokens: ``bos`` then plain sampling at temperature 1.

    Greedy decoding would give the same sequence every time, so tokens are drawn with a private generator seeded
    by ``seed`` (the global RNG is untouched); EOS does not stop a sequence. Batches have a fixed size so the tokens
    depend on the seed alone.
    """
    generator = torch.Generator().manual_seed(seed)
    device = input_device(model)
    sequences: list[Tensor] = []
    with evaluating(model), torch.no_grad():  # not inference_mode: the tokens are later fed to autograd-enabled code
        for start in range(0, num_samples, _GENERATION_BATCH):
            ids = torch.full((min(_GENERATION_BATCH, num_samples - start), 1), bos, dtype=torch.long)
            cache = None
            for _ in range(seq_len - 1):
                out = model(input_ids=ids[:, -1:].to(device), cache=cache, use_cache=True)
                cache = out.cache
                probs = out.logits[:, -1].float().softmax(dim=-1).cpu()
                ids = torch.cat([ids, torch.multinomial(probs, 1, generator=generator)], dim=1)
            sequences.extend(row.clone() for row in ids)
    return sequences
