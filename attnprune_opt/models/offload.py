"""Devices and weights of models dispatched by accelerate, including cpu- and disk-offloaded layers.

accelerate keeps offloaded parameters on the ``meta`` device and re-materialises them from the hook's
``weights_map`` on every forward, so assigning to ``module.weight`` would be silently dropped. Writes therefore
go to the weights map: the in-memory state dict for cpu offload, or a fresh file in the offload folder for disk
offload (accelerate's own ``offload_weight``; the user's checkpoint is never written).
"""

from __future__ import annotations

import shutil
import tempfile
import weakref
from collections.abc import Iterator
from contextlib import contextmanager

import torch
from accelerate.hooks import AlignDevicesHook, SequentialHook
from accelerate.utils import OffloadedWeightsLoader, align_module_device, offload_weight
from torch import Tensor, nn


def _align_hooks(module: nn.Module) -> list[AlignDevicesHook]:
    hook = getattr(module, "_hf_hook", None)
    hooks = hook.hooks if isinstance(hook, SequentialHook) else [hook]
    return [h for h in hooks if isinstance(h, AlignDevicesHook)]


def _offload_hook(module: nn.Module) -> AlignDevicesHook | None:
    return next((h for h in _align_hooks(module) if h.offload and h.weights_map is not None), None)


def execution_device(module: nn.Module) -> torch.device:
    """Where ``module`` computes: its accelerate hook's execution device, else where its weights are."""
    for hook in _align_hooks(module):
        if hook.execution_device is not None:
            return torch.device(hook.execution_device)
    param = next(module.parameters(), None)
    return torch.device("cpu") if param is None or param.device.type == "meta" else param.device


def input_device(model: nn.Module) -> torch.device:
    """Where input ids must go: the embedding's execution device (its weight may be offloaded to ``meta``)."""
    return execution_device(model.get_input_embeddings())


@contextmanager
def evaluating(model: nn.Module) -> Iterator[nn.Module]:
    """Eval mode (no dropout) for the duration; the training flag is restored after."""
    was_training = model.training
    model.eval()
    try:
        yield model
    finally:
        model.train(was_training)


@contextmanager
def onloaded(module: nn.Module) -> Iterator[nn.Module]:
    """Within the block the module's own parameters are real tensors on its execution device."""
    with align_module_device(module):
        yield module


def write_parameter(module: nn.Module, name: str, value: Tensor) -> None:
    """Set ``module.<name>`` to ``value`` so that it persists, offloaded or not."""
    hook = _offload_hook(module)
    if hook is None:
        with torch.no_grad():
            getattr(module, name).copy_(value)
        return
    weights_map = hook.weights_map
    key = weights_map.prefix + name
    store = weights_map.dataset
    value = value.detach().to("cpu").contiguous()
    if isinstance(store, OffloadedWeightsLoader):
        if key in store.state_dict:
            store.state_dict[key] = value
        elif key in store.index:
            if store.save_folder is None:
                store.save_folder = _owned_folder(module)
            offload_weight(value, key, store.save_folder, index=store.index)
        else:
            raise KeyError(f"{key} is not in the offload index")
    else:
        store[key] = value


def _owned_folder(module: nn.Module) -> str:
    """A temporary folder for rewritten disk-offloaded weights, removed when the module is garbage collected."""
    folder = tempfile.mkdtemp(prefix="attnprune-offload-")
    weakref.finalize(module, shutil.rmtree, folder, True)
    return folder
