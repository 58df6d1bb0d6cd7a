"""Hooks that capture what the layer loop needs: the first decoder layer's inputs (with every keyword argument
the model passes: position embeddings, masks, position ids) and the inputs of chosen linears inside a layer."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from ..core import InputStatistics
from ..models.offload import input_device


@dataclass
class LayerInput:
    """One calibration sequence at the input of a decoder layer."""

    hidden: Tensor
    kwargs: dict


class _Captured(Exception):
    """Raised by the capture hook to stop the forward pass once the first layer's inputs are known."""


def capture_layer_inputs(model: nn.Module, first_layer: nn.Module, sequences: Sequence[Tensor]) -> list[LayerInput]:
    """Run the model on each token sequence up to ``first_layer`` and keep that layer's arguments."""
    captured: list[LayerInput] = []

    def hook(module: nn.Module, args: tuple, kwargs: dict) -> None:
        kwargs = dict(kwargs)
        hidden = args[0] if args else kwargs.pop("hidden_states")
        captured.append(LayerInput(hidden.detach(), kwargs))
        raise _Captured

    device = input_device(model)
    handle = first_layer.register_forward_pre_hook(hook, with_kwargs=True)
    try:
        for ids in sequences:
            try:
                model(input_ids=ids.reshape(1, -1).to(device), use_cache=False)
            except _Captured:
                pass
    finally:
        handle.remove()
    return captured


def run_layer(layer: nn.Module, inputs: Sequence[LayerInput]) -> list[LayerInput]:
    """The layer's outputs for each sequence, as the next layer's inputs (same keyword arguments)."""
    outputs = []
    for item in inputs:
        out = layer(item.hidden, **item.kwargs)
        outputs.append(LayerInput(out[0] if isinstance(out, tuple) else out, item.kwargs))
    return outputs


@dataclass
class Recorded:
    """Inputs seen by linears during a layer forward: full tensors for ``keep`` modules, statistics for others."""

    tensors: dict[str, list[Tensor]]
    stats: dict[str, InputStatistics]


@contextmanager
def record_linear_inputs(linears: dict[str, nn.Linear], keep: Sequence[str] = (),
                         hessian: Sequence[str] = (), norms: Sequence[str] = ()) -> Iterator[Recorded]:
    """While active, forward passes record the input of each named linear: kept whole (``keep``), as X^T X
    (``hessian``, SparseGPT) or as column norms only (``norms``, Wanda)."""
    recorded = Recorded({name: [] for name in keep}, {})
    for name in (*hessian, *norms):
        recorded.stats[name] = InputStatistics(linears[name].in_features, hessian=name in hessian)
    handles = []

    def make_hook(name: str):
        def hook(module: nn.Module, args: tuple) -> None:
            x = args[0].detach()
            if name in recorded.tensors:
                recorded.tensors[name].append(x)
            if name in recorded.stats:
                recorded.stats[name].update(x)
        return hook

    for name in {*keep, *recorded.stats}:
        handles.append(linears[name].register_forward_pre_hook(make_hook(name)))
    try:
        yield recorded
    finally:
        for handle in handles:
            handle.remove()


def check_finite(tensors: Sequence[Tensor]) -> bool:
    return all(bool(torch.isfinite(t).all()) for t in tensors)
