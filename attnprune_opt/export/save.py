"""Saving a pruned model, dense or compressed (converting a saved folder is :mod:`.convert`).

Both formats share one path: a temporary folder renamed into place at the end (:func:`~attnprune_opt.atomic.
atomic_output_dir`, so an existing output is replaced only with ``overwrite`` and only once the new one is
complete), the tokenizer, the recipe, and a manifest of what is measured *on disk*. Only the weight files differ:

``dense``
    ``save_pretrained``'s own safetensors; plain ``from_pretrained`` loads them, with or without this package.
``bitmask``
    every tensor holding a pruned matrix (all of a fused tensor: Phi-3's ``qkv_proj`` when only q/k are pruned) in
    the compressed-tensors ``sparse-bitmask`` layout (``sparse-24-bitmask`` when every row of those tensors is
    pruned 2:4), every other tensor dense, tied weights written once; sharded like ``save_pretrained`` and written
    shard by shard (:mod:`.sharded`), reading an offloaded module's weights only while it is written.
    ``from_pretrained`` decompresses it exactly once ``attnprune_opt`` is imported (:mod:`.quantizer`); without
    this package transformers refuses it.

The manifest (:mod:`.manifest`), written last, records what is measured on the files (:mod:`.measure`) and the
SHA-256 of every file.
"""

from __future__ import annotations

import copy
from collections.abc import Iterator
from contextlib import contextmanager
from itertools import groupby
from pathlib import Path

from torch import Tensor, nn

from ..atomic import atomic_output_dir
from ..config import PrunerConfig
from ..errors import ConfigError, UnsupportedArchitectureError
from ..models.offload import onloaded
from .manifest import FORMATS, RECIPE_NAME
from .measure import write_manifest
from .pruned import prune_plan
from .sharded import quantization_config, write_compressed_safetensors


def save_pruned(model: nn.Module, out_dir: str | Path, *, config: PrunerConfig, report=None, tokenizer=None,
                overwrite: bool = False, format: str = "dense", max_shard_size: str | int = "2GB") -> Path:
    """Write ``model`` (weights in ``format``), ``tokenizer``, the recipe and the manifest into ``out_dir``."""
    check_format(format)
    max_bytes = shard_bytes(max_shard_size)
    out_dir = Path(out_dir)
    with atomic_output_dir(out_dir, overwrite) as tmp:
        with plain_checkpoint(model):
            if format == "dense":
                # stacked expert weights stay stacked, under the names the pruned model and the manifest use
                model.save_pretrained(tmp, max_shard_size=max_shard_size, save_original_format=False)
            else:
                _save_compressed(model, tmp, config, max_bytes)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        (tmp / RECIPE_NAME).write_text(config.to_yaml())
        write_manifest(tmp, config, format, model=report.model if report else None,
                       calibration=report.calibration if report else None, report=report.to_dict() if report else None)
    return out_dir


@contextmanager
def plain_checkpoint(model: nn.Module) -> Iterator[None]:
    """Make ``save_pretrained`` write plain, complete weights, then restore the model as it was.

    * A GGUF-loaded model was dequantized on load, but its GGUF quantizer marks it unserializable and would write
      a gguf quantization_config; both are set aside while saving.
    * transformers reloads offloaded (``meta``) weights while saving only when ``hf_device_map`` says so; a model
      offloaded by accelerate directly (``cpu_offload``, ``dispatch_model``) gets such a map for the duration.
    """
    quantizer = getattr(model, "hf_quantizer", None)
    if quantizer is not None:
        method = str(getattr(quantizer.quantization_config, "quant_method", "")).lower()
        if "gguf" not in method:
            raise UnsupportedArchitectureError(f"cannot save a model quantized with {method!r} as plain weights")
    quant_config = model.config.__dict__.pop("quantization_config", None) if quantizer is not None else None
    device_map = getattr(model, "hf_device_map", None)
    offloaded = any(p.device.type == "meta" for p in model.parameters())
    if offloaded and not (device_map and {"cpu", "disk"} & set(device_map.values())):
        model.hf_device_map = {"": "cpu"}
    model.hf_quantizer = None
    try:
        yield
    finally:
        model.hf_quantizer = quantizer
        if quant_config is not None:
            model.config.quantization_config = quant_config
        if device_map is None:
            model.__dict__.pop("hf_device_map", None)
        else:
            model.hf_device_map = device_map


def _save_compressed(model: nn.Module, folder: Path, config: PrunerConfig, shard_bytes: int) -> None:
    plan = prune_plan(model.config, config)
    targets = plan.targets()
    state, names = _unique_state(model)
    write_compressed_safetensors(_model_tensors(model, state, names), plan.tensors.__contains__, folder, shard_bytes,
                                 layout=plan.layout)
    # What save_pretrained writes besides the weights, with our quantization_config.
    model_config = copy.deepcopy(model.config)
    model_config.dtype = str(model.dtype).removeprefix("torch.")
    model_config.architectures = [type(model).__name__]
    model_config.quantization_config = quantization_config(plan.layout, targets)
    model_config.save_pretrained(folder)
    if model.can_generate() and getattr(model, "generation_config", None) is not None:
        model.generation_config.save_pretrained(folder)


def _unique_state(model: nn.Module) -> tuple[dict[str, Tensor], list[str]]:
    """The state dict (parameters as themselves, ``meta`` if offloaded) and its names, a tied weight named once.

    A tie is the very same parameter under two names; the first name in ``state_dict`` order is kept, as
    ``save_pretrained`` keeps the embedding rather than ``lm_head``."""
    state = model.state_dict(keep_vars=True)
    seen: set[int] = set()
    names = []
    for name, tensor in state.items():
        if id(tensor) not in seen:
            seen.add(id(tensor))
            names.append(name)
    return state, names


def _model_tensors(model: nn.Module, state: dict[str, Tensor], names: list[str]) -> Iterator[tuple[str, Tensor]]:
    """``(name, tensor)`` in ``state_dict`` order; an offloaded module is brought back one module at a time."""
    for prefix, group in groupby(names, key=lambda name: name.rpartition(".")[0]):
        group = list(group)
        if not any(state[name].device.type == "meta" for name in group):
            for name in group:
                yield name, state[name].detach()
            continue
        module = model.get_submodule(prefix)
        with onloaded(module):
            for name in group:
                tensor = getattr(module, name.rpartition(".")[2])
                if tensor.device.type == "meta":
                    raise ConfigError(f"{name} is offloaded and could not be read back (no accelerate offload hook)")
                yield name, tensor.detach().cpu()


def check_format(format: str) -> None:
    if format not in FORMATS:
        raise ConfigError(f"unknown save format {format!r}; expected one of {', '.join(FORMATS)}")


def shard_bytes(max_shard_size: str | int) -> int:
    from transformers.utils.hub import convert_file_size_to_int

    try:
        size = convert_file_size_to_int(max_shard_size)
    except (ValueError, TypeError):
        raise ConfigError(f"max_shard_size must be bytes or a size such as '2GB', got {max_shard_size!r}") from None
    if size <= 0:
        raise ConfigError(f"max_shard_size must be positive, got {max_shard_size!r}")
    return size


