"""Hooks that capture what the layer loop needs: the first decoder layer's inputs, the keyword arguments the model
passes to each layer (position embeddings, masks, position ids), and the inputs of chosen linears inside a layer."""

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
    """One calibration sequence at the input of decoder layer ``index``, with the keyword arguments the model
    passes to every layer (they differ by layer in families that mix attention types: masks, RoPE tables)."""

    hidden: Tensor
    layer_kwargs: tuple[dict, ...]
    index: int = 0

    @property
    def kwargs(self) -> dict:
        """This layer's keyword arguments (position embeddings, attention mask, position ids...)."""
        return self.layer_kwargs[self.index]


class _Captured(Exception):
    """Raised by the capture hook to stop the forward pass once every layer's arguments are known."""


def capture_layer_inputs(model: nn.Module, layers: Sequence[nn.Module],
                         sequences: Sequence[Tensor]) -> list[LayerInput]:
    """Run the model on each token sequence and keep the first layer's input and every layer's keyword arguments.

    The layers do no work meanwhile (each returns its input), so this costs the embedding and what the model
    computes once for all layers (masks, rotary tables), not a forward pass.
    """
    captured: list[LayerInput] = []
    current: dict = {}

    def make_hook(index: int):
        def hook(module: nn.Module, args: tuple, kwargs: dict) -> None:
            kwargs = dict(kwargs)
            hidden = args[0] if args else kwargs.pop("hidden_states")
            if index == 0:
                current["hidden"], current["kwargs"] = hidden.detach(), []
            current["kwargs"].append(kwargs)
            if index == len(layers) - 1:
                captured.append(LayerInput(current["hidden"], tuple(current["kwargs"])))
                raise _Captured
        return hook

    device = input_device(model)
    handles = [layer.register_forward_pre_hook(make_hook(i), with_kwargs=True) for i, layer in enumerate(layers)]
    saved = [layer.__dict__.get("forward") for layer in layers]
    for layer in layers:
        layer.forward = _passthrough
    try:
        for ids in sequences:
            try:
                model(input_ids=ids.reshape(1, -1).to(device), use_cache=False)
            except _Captured:
                pass
    finally:
        for handle in handles:
            handle.remove()
        for layer, forward in zip(layers, saved):
            if forward is None:
                del layer.forward
            else:
                layer.forward = forward
    return captured


def _passthrough(hidden_states: Tensor, *args, **kwargs) -> Tensor:
    return hidden_states


def run_layer(layer: nn.Module, inputs: Sequence[LayerInput]) -> list[LayerInput]:
    """The layer's outputs for each sequence, as the next layer's inputs."""
    outputs = []
    for item in inputs:
        out = layer(item.hidden, **item.kwargs)
        outputs.append(LayerInput(out[0] if isinstance(out, tuple) else out, item.layer_kwargs, item.index + 1))
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
