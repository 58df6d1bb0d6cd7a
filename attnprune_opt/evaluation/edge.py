"""Figures that decide deployment on a small machine: how much memory the loaded model takes and how fast it runs
at batch 1 (prefill and decode tokens per second), and the weight-only int8 variant through torchao.

Memory is given two ways: ``weights_mb`` counts the bytes of every parameter and buffer (int8 tensors by their
int8 data, scales and zero points), exact and machine-independent; ``resident_mb`` is the growth of the process's
resident memory from before the model was loaded (the caller's :func:`process_rss_mb`) to after the speed runs,
when every weight has been paged in (safetensors are memory-mapped, so right after loading much of a model is not
resident yet): weights, what loading left allocated, the KV cache and activations. Speed is measured on this
machine with the threads torch uses, on fixed token ids (the values do not change the cost of a dense forward):
the median of ``repeats`` timed prefills of ``prompt_tokens`` tokens, and of ``repeats`` greedy decodes of
``new_tokens`` tokens one at a time with the KV cache. Zeros in a dense matrix cost as much as any value, so a
pruned model is expected at the dense model's speed.
"""

from __future__ import annotations

import ctypes
import gc
import importlib.util
import statistics
import time
from typing import Any

import psutil
import torch
from torch import nn

from attnprune_opt.errors import AttnPruneError, ConfigError
from attnprune_opt.models.offload import evaluating, input_device

INT8_SCOPE = ".layers."  # the decoder layers' linears; the embedding and a tied LM head keep the load dtype


def process_rss_mb() -> float:
    """The current resident memory of this process, in MB (10^6 bytes), after handing memory freed by Python and
    torch back to the system (glibc's ``malloc_trim``), so what was loaded and dropped again does not count."""
    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):  # not glibc: the figure may include freed memory the allocator kept
        pass
    return psutil.Process().memory_info().rss / 1e6


def _storages(tensor: torch.Tensor) -> list[tuple[int, int]]:
    """(address, bytes) of each storage a tensor holds; a wrapper subclass (torchao's int8 weights) by its inner
    tensors."""
    from torch.utils._python_dispatch import is_traceable_wrapper_subclass

    if is_traceable_wrapper_subclass(tensor):
        names, _ = tensor.__tensor_flatten__()
        return [storage for name in names for storage in _storages(getattr(tensor, name))]
    storage = tensor.untyped_storage()
    return [(storage.data_ptr(), storage.nbytes())]


def weights_mb(model: nn.Module) -> float:
    """MB held by the model's parameters and buffers, each storage counted once (tied weights share one)."""
    storages = dict(storage for tensor in [*model.parameters(), *model.buffers()] for storage in _storages(tensor))
    return sum(storages.values()) / 1e6


def check_int8_available() -> None:
    """Fail before any model is loaded when int8 weights are asked for and torchao is not installed."""
    if importlib.util.find_spec("torchao") is None:
        raise AttnPruneError("int8 weights need torchao: pip install 'attnprune-opt[int8]'")


def quantize_int8(model: nn.Module) -> nn.Module:
    """Weight-only int8 (per output channel, symmetric; torchao ``Int8WeightOnlyConfig``) of every linear in the
    decoder layers, in place; a zero weight stays exactly zero, so a pruned model keeps its sparsity."""
    check_int8_available()
    from torchao.quantization import Int8WeightOnlyConfig, quantize_

    quantize_(model, Int8WeightOnlyConfig(), filter_fn=lambda module, name: isinstance(module, nn.Linear)
              and INT8_SCOPE in f".{name}")
    return model


def token_throughput(model: nn.Module, *, prompt_tokens: int = 128, new_tokens: int = 32, repeats: int = 3,
                     seed: int = 0) -> dict[str, Any]:
    """Batch-1 prefill and decode tokens per second (medians of ``repeats`` runs after one warm-up)."""
    if min(prompt_tokens, new_tokens, repeats) < 1:
        raise ConfigError(f"prompt_tokens, new_tokens and repeats must be >= 1, got {prompt_tokens}, {new_tokens}, "
                          f"{repeats}")
    vocab = model.get_input_embeddings().num_embeddings
    ids = torch.randint(0, vocab, (1, prompt_tokens), generator=torch.Generator().manual_seed(seed))
    ids = ids.to(input_device(model))
    prefill, decode = [], []
    with evaluating(model), torch.inference_mode():
        _decode(model, ids, 2)  # warm-up: first calls allocate and pick kernels
        for _ in range(repeats):
            started = time.perf_counter()
            model(input_ids=ids, use_cache=False)
            prefill.append(time.perf_counter() - started)
            decode.append(_decode(model, ids, new_tokens))
    return {
        "prefill_tokens_per_s": prompt_tokens / statistics.median(prefill),
        "decode_tokens_per_s": new_tokens / statistics.median(decode),
        "prompt_tokens": prompt_tokens,
        "new_tokens": new_tokens,
        "repeats": repeats,
        "threads": torch.get_num_threads(),
        "dtype": str(next(model.parameters()).dtype).removeprefix("torch."),
    }


def _decode(model: nn.Module, ids: torch.Tensor, new_tokens: int) -> float:
    """Seconds to decode ``new_tokens`` greedy tokens one at a time after a prefill of ``ids`` (not timed)."""
    out = model(input_ids=ids, use_cache=True)
    token = out.logits[:, -1:].argmax(dim=-1)
    cache = out.cache
    started = time.perf_counter()
    for _ in range(new_tokens):
        out = model(input_ids=token, cache=cache, use_cache=True)
        cache, token = out.cache, out.logits[:, -1:].argmax(dim=-1)
    return time.perf_counter() - started


def edge_figures(model: nn.Module, *, rss_before_load_mb: float | None = None, int8: bool = False,
                 **throughput: Any) -> dict[str, Any]:
    """The memory and speed record of one loaded model (see the module docstring); measure it before anything
    else is loaded, as ``resident_mb`` is the growth of the whole process since ``rss_before_load_mb``."""
    record = {"weights_mb": weights_mb(model), "int8_weights": int8, **token_throughput(model, **throughput)}
    record["resident_mb"] = None if rss_before_load_mb is None else process_rss_mb() - rss_before_load_mb
    return record
