"""The paper's metric on a real model, by the protocol of ``shared/data/README.md``: for every layer and head, the
relative error ||A_pruned - A_dense||_F^2 / ||A_dense||_F^2 of the causal softmax attention matrix, both computed
from the same (dense model's) layer input, on C4 rows 1000-1007 truncated to 256 tokens.

Layer by layer: the dense layer runs on the dense inputs, recording its q_proj input and producing the next layer's
inputs (so errors measure each layer alone, never accumulated ones); the pruned layer's pre-attention norm is applied
to the same inputs to give its own q_proj input (the norm is not pruned, but it is the pruned model's); both
attention matrices are then
recomputed from each model's q/k weights with the rotary tables the dense model made. Only one layer's activations
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
from attnprune_opt.models.adapters import LlamaFamilyAdapter, get_adapter
from attnprune_opt.models.offload import evaluating, onloaded
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
    if len(dense.layers) != len(pruned.layers):
        raise ConfigError(f"the dense model has {len(dense.layers)} decoder layers, the pruned one "
                          f"{len(pruned.layers)}: they are not the same architecture")
    path = _data_file(data_dir, C4_FILE)
    texts = select_rows(read_texts(path), tuple(rows), str(path))
    documents = [ids for text in texts if len(ids := tokenize_document(tokenizer, text, seq_len)) >= MIN_TOKENS]
    if not documents:
        raise ConfigError(f"rows [{rows[0]}, {rows[1]}) of {path} hold no document of >= {MIN_TOKENS} tokens")
    longest = max(len(ids) for ids in documents)

    per_head: list[list[float]] = []
    with evaluating(dense_model), evaluating(pruned_model), torch.no_grad():
        inputs = capture_layer_inputs(dense_model, dense.layers[0], documents)
        for index in tqdm(range(len(dense.layers)), desc="attention error", unit="layer", disable=not progress):
            window = dense.sliding_window(index)
            if window is not None and longest > window:
                raise ConfigError(f"layer {index} uses sliding-window attention ({window} tokens); the documents "
                                  f"must not be longer (seq_len={seq_len})")
            errors, inputs = _layer_errors(dense, pruned, index, inputs)
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


def _layer_errors(dense: LlamaFamilyAdapter, pruned: LlamaFamilyAdapter, index: int,
                  inputs: Sequence[LayerInput]) -> tuple[list[float], list[LayerInput]]:
    """Per-head relative errors of layer ``index`` on ``inputs``, and the dense layer's outputs."""
    dense_layer, pruned_layer = dense.layers[index], pruned.layers[index]
    geometry = dense.geometry(dense_layer)
    if pruned.geometry(pruned_layer) != geometry:
        raise ConfigError(f"layer {index}: the pruned model's heads {pruned.geometry(pruned_layer)} differ from the "
                          f"dense model's {geometry}")
    with record_linear_inputs({"q_proj": dense.linear(dense_layer, "q_proj")}, keep=["q_proj"]) as dense_x:
        outputs = run_layer(dense_layer, inputs)
    device = dense_x.tensors["q_proj"][0].device
    dense_qk, pruned_qk = _qk_weights(dense, dense_layer, device), _qk_weights(pruned, pruned_layer, device)
    squared_error = torch.zeros(geometry.num_heads, dtype=torch.float64, device=device)
    squared_norm = torch.zeros_like(squared_error)
    for x, item in zip(dense_x.tensors["q_proj"], inputs, strict=True):
        x_pruned = pruned.attention_input(pruned_layer, item.hidden)
        cos, sin = (t.to(device, torch.float32) for t in dense.rope_tables(item.kwargs))
        static = dict(head_dim=geometry.head_dim, cos=cos, sin=sin, scaling=geometry.scaling)
        reference = multihead_attention_probs(x.float(), **dense_qk, **static)
        probs = multihead_attention_probs(x_pruned.to(device, torch.float32), **pruned_qk, **static)
        squared_error += (probs - reference).pow(2).sum(dim=(0, 2, 3)).double()
        squared_norm += reference.pow(2).sum(dim=(0, 2, 3)).double()
    return (squared_error / squared_norm).tolist(), outputs


def _qk_weights(adapter: LlamaFamilyAdapter, layer: nn.Module, device: torch.device) -> dict[str, Tensor | None]:
    """q/k weights and biases in float32 on ``device``, read through accelerate's offload hooks if any."""
    found: dict[str, Tensor | None] = {}
    for side in ("q", "k"):
        linear = adapter.linear(layer, f"{side}_proj")
        with onloaded(linear):
            found[f"{side}_weight"] = linear.weight.detach().to(device, torch.float32, copy=True)
            bias = linear.bias
            found[f"{side}_bias"] = None if bias is None else bias.detach().to(device, torch.float32, copy=True)
    return found
