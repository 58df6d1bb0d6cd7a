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

A missing source is an error, never replaced by other text. Two exceptions that are not replacements: ``c4`` rows
that lie in the C4 sample shipped with this package (validation rows 0-7, see ``c4_sample/PROVENANCE.md``) come
from the sample when the data folder is absent, as they are the same documents; and the source
``self-generated``, named in a recipe, has the model write its own calibration text (:func:`generate_sequences`).
"""

from __future__ import annotations

import itertools
import json
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

C4_FILE = "c4/c4_validation_1500.parquet"
WIKITEXT2_VALID_FILE = "wikitext2_raw/wiki.valid.raw"
WIKITEXT2_TEST_FILE = "wikitext2_raw/wiki.test.raw"
DEFAULT_POOL = (0, 1000)
HF_DEFAULT_SPLIT = "train"
MIN_TOKENS = 2  # one context token and one predicted token
_GENERATION_BATCH = 8  # fixed, so self-generated text does not depend on anything but the spec
_LOCAL_DEFAULTS = {"c4": C4_FILE, "wikitext2": WIKITEXT2_VALID_FILE}
SELF_GENERATED = "self-generated"
C4_SAMPLE_NAME = "c4_validation_rows_0-7.jsonl"
C4_SAMPLE = Path(__file__).resolve().parent / "c4_sample" / C4_SAMPLE_NAME
C4_SAMPLE_ROWS = 8

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
    """Tokenized calibration sequences for ``spec``; ``model`` writes them when the source is ``self-generated``."""
    source = spec.source
    if source == SELF_GENERATED:
        return _self_generated(spec, tokenizer, model)
    if source.startswith("hf:"):
        return _from_hub(spec, tokenizer)
    path, pool = _source_file(spec, data_dir)
    if source == "wikitext2" or path.suffix == ".txt":
        return _from_stream(spec, tokenizer, path)
    texts = read_texts(path)
    description = f"{C4_SAMPLE_NAME} (C4 validation rows 0-{len(texts) - 1})" if path == C4_SAMPLE else None
    return _from_documents(spec, tokenizer, texts, description or paths.portable_name(path),
                           pool=pool or (0, len(texts)), path=path)


def check_source(spec: CalibrationSpec, data_dir: str | Path | None = None) -> None:
    """Fail before any model is loaded if the source's file is missing or does not decode (text is not UTF-8, a
    .parquet is not parquet, a .jsonl line is not JSON with a 'text' field)."""
    if spec.source == SELF_GENERATED or spec.source.startswith("hf:"):
        return
    path, _ = _source_file(spec, data_dir)
    if spec.source == "wikitext2" or path.suffix == ".txt":
        read_text_file(path)
    else:
        read_texts(path)


def _source_file(spec: CalibrationSpec, data_dir: str | Path | None) -> tuple[Path, tuple[int, int] | None]:
    """The file a file-backed source reads, and the pool of rows for a document source (None: all rows).

    ``c4`` reads the data folder's copy; without one, rows that lie in the C4 sample shipped with this package
    (its first rows, taken in order) come from the sample, which holds the very same documents.
    """
    if spec.source in _LOCAL_DEFAULTS:
        path = Path(data_dir or paths.data_dir()) / _LOCAL_DEFAULTS[spec.source]
        if path.is_file():
            return path, (spec.rows or DEFAULT_POOL) if spec.source == "c4" else None
        if spec.source == "c4" and _in_sample(spec):
            return C4_SAMPLE, spec.rows
        raise CalibrationDataError(
            f"calibration file not found: {_LOCAL_DEFAULTS[spec.source]} in the data folder {paths.data_dir()} "
            f"(set {paths.DATA_DIR_ENV}); or name another calibration.source in the recipe, e.g. "
            f"{SELF_GENERATED!r}"
        )
    path = Path(spec.source)
    if path.suffix not in (".txt", ".jsonl", ".parquet"):
        raise CalibrationDataError(
            f"unsupported calibration source {spec.source!r}: expected 'c4', 'wikitext2', {SELF_GENERATED!r}, "
            "'hf:<name>[:<config>][:<split>]' or a .txt, .jsonl or .parquet file"
        )
    if not path.is_file():
        raise CalibrationDataError(f"calibration file not found: {path}")
    return path, spec.rows


def _in_sample(spec: CalibrationSpec) -> bool:
    """Whether the rows ``spec`` selects from C4 are all in the packaged sample (first rows, in order)."""
    if spec.sampling != "first":
        return False
    start, stop = spec.rows or (0, C4_SAMPLE_ROWS)
    return stop <= C4_SAMPLE_ROWS and spec.num_samples <= stop - start


# --- reading and tokenizing (shared with the perplexity evaluation) -------------------------------------------------


def read_texts(path: Path) -> list[str]:
    """The ``text`` of every row of a .parquet (column) or .jsonl (field) file, in file order."""
    if path.suffix == ".parquet":
        import pyarrow
        import pyarrow.parquet as pq

        try:
            names = pq.read_schema(path).names
            if "text" not in names:
                raise CalibrationDataError(f"{path} has no 'text' column (columns: {', '.join(names)})")
            texts = pq.read_table(path, columns=["text"]).column("text").to_pylist()
        except pyarrow.ArrowException as exc:
            raise CalibrationDataError(f"{path} is not a readable parquet file: {exc}") from None
    else:
        texts = []
        for number, line in enumerate(read_text_file(path).splitlines(), start=1):
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


def read_text_file(path: Path) -> str:
    """A whole file as UTF-8 text; anything else is an error naming the file and the first bad byte."""
    data = path.read_bytes()
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise CalibrationDataError(f"{path} is not UTF-8 text: byte 0x{data[exc.start]:02x} at offset {exc.start} "
                                   "cannot be decoded") from None


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
    text = read_text_file(path)
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
    spec: CalibrationSpec, tokenizer: PreTrainedTokenizerBase, model: PreTrainedModel | None
) -> CalibrationSet:
    if model is None:
        raise CalibrationDataError(f"calibration source {SELF_GENERATED!r} needs the model to generate text")
    bos = tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.eos_token_id
    if bos is None:
        raise CalibrationDataError(
            f"calibration source {SELF_GENERATED!r}: the tokenizer has neither a BOS nor an EOS token to start from"
        )
    return CalibrationSet(
        sequences=generate_sequences(model, bos, spec.num_samples, spec.seq_len, spec.seed),
        spec=spec,
        description=(
            f"self-generated: {spec.num_samples} sequences of {spec.seq_len} tokens sampled (temperature 1) by the "
            f"model from token {bos}, seed {spec.seed}"
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
