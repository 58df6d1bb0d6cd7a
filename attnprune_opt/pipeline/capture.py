"""Hooks that capture what the layer loop needs: the first decoder layer's inputs, the keyword arguments the model
passes to each layer (position embeddings, masks, position ids), and the inputs of chosen linears inside a layer."""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import AbstractContextManager, contextmanager
from dataclasses import dataclass
from functools import partial

import torch
from torch import Tensor, nn

from ..core import InputStatistics
from ..models.base import DecoderAdapter, Prunable
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
    """Inputs seen by linears during a layer forward: full tensors for ``keep`` names, statistics for others."""

    tensors: dict[str, list[Tensor]]
    stats: dict[str, InputStatistics]


def first_argument(args: tuple) -> Tensor:
    return args[0]


@contextmanager
def record_linear_inputs(modules: dict[str, nn.Module], keep: Sequence[str] = (), hessian: Sequence[str] = (),
                         norms: Sequence[str] = (),
                         select: Mapping[str, Callable[[tuple], Tensor]] | None = None) -> Iterator[Recorded]:
    """While active, forward passes record for each name the input of ``modules[name]`` (``select[name]`` picks it
    from the call's positional arguments; default: the first): kept whole (``keep``), as X^T X (``hessian``,
    SparseGPT) or as column norms only (``norms``, Wanda). Statistics exist once a call was seen, with
    ``tokens == 0`` if no row reached the name."""
    recorded = Recorded({name: [] for name in keep}, {})
    select = select or {}
    handles = []

    def make_hook(name: str):
        pick = select.get(name, first_argument)

        def hook(module: nn.Module, args: tuple) -> None:
            x = pick(args).detach()
            if name in recorded.tensors:
                recorded.tensors[name].append(x)
            if name in hessian or name in norms:
                if name not in recorded.stats:
                    recorded.stats[name] = InputStatistics(x.shape[-1], hessian=name in hessian)
                recorded.stats[name].update(x)
        return hook

    for name in dict.fromkeys((*keep, *hessian, *norms)):
        handles.append(modules[name].register_forward_pre_hook(make_hook(name)))
    try:
        yield recorded
    finally:
        for handle in handles:
            handle.remove()


def record_matrix_inputs(adapter: DecoderAdapter, index: int, layer: nn.Module, keep: Sequence[str] = (),
                         hessian: Sequence[str] = (), norms: Sequence[str] = ()) -> AbstractContextManager[Recorded]:
    """:func:`record_linear_inputs` by the adapter's input keys (``adapter.input_key``) of layer ``index``: each
    key records what its matrices multiply (``adapter.matrix_input``), e.g. only the tokens routed to an expert."""
    sources: dict[str, Prunable] = {}
    for prunable in adapter.prunables(index):
        sources.setdefault(adapter.input_key(prunable), prunable)
    return record_linear_inputs({key: layer.get_submodule(p.module) for key, p in sources.items()}, keep=keep,
                                hessian=hessian, norms=norms,
                                select={key: partial(adapter.matrix_input, layer, p) for key, p in sources.items()})


def check_finite(tensors: Sequence[Tensor]) -> bool:
    return all(bool(torch.isfinite(t).all()) for t in tensors)
