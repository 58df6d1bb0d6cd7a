"""The paper's metric on a real model, by the protocol of ``shared/data/README.md``: for every layer and head, the
relative error ||A_pruned - A_dense||_F^2 / ||A_dense||_F^2 of the causal softmax attention matrix, both computed
from the same (dense model's) layer input, on C4 rows 1000-1007 truncated to 256 tokens.

Layer by layer: the dense layer runs on the dense inputs, recording its q_proj input and producing the next layer's
inputs (so errors measure each layer alone, never accumulated ones); the pruned layer runs on the same inputs to give
its own q_proj input (the norm before it is not pruned, but it is the pruned model's); both attention matrices are
then recomputed from each model's q/k weights and attention spec (the family's adapter says what the attention
computes: RoPE, biases, q/k norms, soft-cap, window). Only one layer's activations
are held at a time. A head's error pools the documents: squared errors and squared norms are summed over all of
them before dividing. The layer figure is the mean over its heads; ``mean`` is the mean over heads and layers.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

from attnprune_opt.core import multihead_attention_probs
from attnprune_opt.data.calibration import (
    C4_FILE,
    MIN_TOKENS,
    data_file_sha256,
    read_texts,
    select_rows,
    tokenize_document,
)
from attnprune_opt.errors import ConfigError
from attnprune_opt.evaluation.perplexity import _data_file
from attnprune_opt.models.base import ATTENTION_ROLES, DecoderAdapter, read_matrix
from attnprune_opt.models.offload import evaluating
from attnprune_opt.models.registry import get_adapter
from attnprune_opt.pipeline.capture import LayerInput, capture_layer_inputs, record_linear_inputs, run_layer

if TYPE_CHECKING:
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

ATTENTION_ROWS = (1000, 1008)
ATTENTION_SEQ_LEN = 256
METRIC = "||A_pruned - A_dense||_F^2 / ||A_dense||_F^2 per head, causal softmax attention, dense layer inputs"


def attention_error(
    dense_model: PreTrainedModel,
    pruned_model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    *,
    rows: tuple[int, int] = ATTENTION_ROWS,
    seq_len: int = ATTENTION_SEQ_LEN,
    data_dir: str | Path | None = None,
    progress: bool = True,
) -> dict[str, Any]:
    """Relative attention error of ``pruned_model`` against ``dense_model`` on C4 ``rows`` = [start, stop).

    Returns a JSON-ready dict: ``mean``, ``per_layer`` (mean over heads), ``per_head`` (layers x heads),
    ``protocol`` and the data file with its sha256. Either model may be dispatched with accelerate offload.
    """
    if seq_len < MIN_TOKENS:
        raise ConfigError(f"seq_len must be >= {MIN_TOKENS}, got {seq_len}")
    started = time.perf_counter()
    dense, pruned = get_adapter(dense_model), get_adapter(pruned_model)
    dense_layers, pruned_layers = dense.layers(dense_model), pruned.layers(pruned_model)
    if len(dense_layers) != len(pruned_layers):
        raise ConfigError(f"the dense model has {len(dense_layers)} decoder layers, the pruned one "
                          f"{len(pruned_layers)}: they are not the same architecture")
    path = _data_file(data_dir, C4_FILE)
    texts = select_rows(read_texts(path), tuple(rows), str(path))
    documents = [ids for text in texts if len(ids := tokenize_document(tokenizer, text, seq_len)) >= MIN_TOKENS]
    if not documents:
        raise ConfigError(f"rows [{rows[0]}, {rows[1]}) of {path} hold no document of >= {MIN_TOKENS} tokens")

    per_head: list[list[float]] = []
    with evaluating(dense_model), evaluating(pruned_model), torch.no_grad():
        inputs = capture_layer_inputs(dense_model, dense_layers, documents)
        for index in tqdm(range(len(dense_layers)), desc="attention error", unit="layer", disable=not progress):
            errors, inputs = _layer_errors(dense, pruned, dense_layers[index], pruned_layers[index], index, inputs)
            per_head.append(errors)
    per_layer = [statistics.fmean(heads) for heads in per_head]
    return {
        "metric": METRIC,
        "mean": statistics.fmean(e for heads in per_head for e in heads),
        "per_layer": per_layer,
        "per_head": per_head,
        "protocol": {
            "rows": list(rows),
            "seq_len": seq_len,
            "documents": len(documents),
            "skipped_documents": len(texts) - len(documents),
            "lengths": [len(ids) for ids in documents],
            "inputs": "dense model's layer inputs",
            "pooling": "per head: sums over documents, then divided; per layer: mean over heads",
        },
        "data_file": str(path),
        "sha256": data_file_sha256(path),
        "seconds": time.perf_counter() - started,
    }


def _layer_errors(dense: DecoderAdapter, pruned: DecoderAdapter, dense_layer: nn.Module, pruned_layer: nn.Module,
                  index: int, inputs: Sequence[LayerInput]) -> tuple[list[float], list[LayerInput]]:
    """Per-head relative errors of layer ``index`` on ``inputs``, and the dense layer's outputs."""
    q_dense, q_pruned = dense.prunable(index, "q_proj"), pruned.prunable(index, "q_proj")
    with record_linear_inputs({"q": dense_layer.get_submodule(q_dense.module)}, keep=["q"]) as dense_x:
        outputs = run_layer(dense_layer, inputs)
    with record_linear_inputs({"q": pruned_layer.get_submodule(q_pruned.module)}, keep=["q"]) as pruned_x:
        run_layer(pruned_layer, inputs)
    device = dense_x.tensors["q"][0].device
    dense_qk, pruned_qk = _qk_weights(dense, dense_layer, index, device), _qk_weights(pruned, pruned_layer, index, device)
    if dense_qk[0].shape != pruned_qk[0].shape or dense_qk[1].shape != pruned_qk[1].shape:
        raise ConfigError(f"layer {index}: the pruned model's q/k shapes differ from the dense model's")
    heads = dense_qk[0].shape[0] // dense.head_dim
    squared_error = torch.zeros(heads, dtype=torch.float64, device=device)
    squared_norm = torch.zeros_like(squared_error)
    for x, x_pruned, item in zip(dense_x.tensors["q"], pruned_x.tensors["q"], inputs, strict=True):
        dense_spec = dense.attention_spec(dense_layer, index, item.kwargs).to(torch.float32, device)
        pruned_spec = pruned.attention_spec(pruned_layer, index, item.kwargs).to(torch.float32, device)
        reference = multihead_attention_probs(x.to(device, torch.float32), *dense_qk, dense_spec)
        probs = multihead_attention_probs(x_pruned.to(device, torch.float32), *pruned_qk, pruned_spec)
        squared_error += (probs - reference).pow(2).sum(dim=(0, 2, 3)).double()
        squared_norm += reference.pow(2).sum(dim=(0, 2, 3)).double()
    return (squared_error / squared_norm).tolist(), outputs


def _qk_weights(adapter: DecoderAdapter, layer: nn.Module, index: int, device: torch.device) -> tuple[Tensor, Tensor]:
    """q and k weights in float32 on ``device``, read through accelerate's offload hooks if any."""
    return tuple(read_matrix(layer, adapter.prunable(index, role)).to(device, torch.float32) for role in ATTENTION_ROLES)
