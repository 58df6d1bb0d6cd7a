"""A compressed model folder on disk: safetensors shards named as ``save_pretrained`` names them, and a check of one.

Besides the reference tensors of each compressed weight (see :mod:`.bitmask`), the folder holds a zero-element uint8
``<module>.weight``: the guard. transformers without this package skips a ``quant_method`` it does not know with a
mere warning and would fill the compressed layers with random weights; the guard makes it stop instead, since a
checkpoint tensor whose shape differs from the parameter's is a hard error (unless ``ignore_mismatched_sizes=True``).
With this package the loader (:mod:`.quantizer`) consumes the guard with the other tensors of the weight.
"""

from __future__ import annotations

import json
import os
import re
import weakref
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file
from torch import Tensor

from ..errors import ArtifactError, ConfigError
from .bitmask import COMPRESSORS, SPARSE_BITMASK, TENSOR_NAMES

QUANT_METHOD = "attnprune-sparse"
WEIGHTS_NAME = "model.safetensors"
INDEX_NAME = "model.safetensors.index.json"
_SHARD_NAME = re.compile(r"model-\d{5}-of-\d{5}\.safetensors")


def quantization_config(layout: str, targets: Iterable[str]) -> dict[str, Any]:
    """The ``quantization_config`` entry of config.json for a folder whose ``targets`` (module names) are compressed."""
    _check_layout(layout)
    return {"quant_method": QUANT_METHOD, "format": layout, "targets": sorted(targets)}


def write_compressed_safetensors(
    named_tensors: Iterable[tuple[str, Tensor]],
    compress: Callable[[str], bool],
    out_dir: Path,
    max_shard_size: int,
    *,
    layout: str = SPARSE_BITMASK,
) -> dict[str, Any]:
    """Write ``named_tensors`` (``compress(name)`` ones in ``layout``) into ``out_dir``; return the index.

    Shards are split like ``save_pretrained`` does (greedily, a group larger than ``max_shard_size`` alone) and
    written as soon as they are full, so at most one shard is held in memory. A tensor that is the same view of the
    same storage as an earlier one (a tied weight) is skipped: iterate in ``state_dict`` order and the tie source is
    kept, as ``save_pretrained`` keeps it. The index is returned even for a single shard, where no index file is
    written. Stale weight files of an earlier save in ``out_dir`` are removed.
    """
    _check_layout(layout)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    writer = _ShardWriter(out_dir, max_shard_size)
    ties = _TieDetector()
    try:
        for name, tensor in named_tensors:
            if ties.is_repeat(name, tensor):
                continue
            tensor = tensor.detach().cpu()
            if compress(name):
                if not name.endswith(".weight"):
                    raise ConfigError(f"only '.weight' tensors can be compressed, got {name!r}")
                prefix = name.removesuffix(".weight")
                group = {f"{prefix}.{suffix}": part for suffix, part in COMPRESSORS[layout](tensor).items()}
                group[name] = torch.empty(0, dtype=torch.uint8)  # the guard, see the module docstring
            else:
                group = {name: tensor}
            writer.add(group, tensor.numel())
        return writer.finish()
    except BaseException:
        writer.discard()
        raise


def verify_folder(folder: Path) -> dict[str, str]:
    """Check every weight file of ``folder`` opens and covers exactly what the index and config.json promise.

    Returns the tensor-to-file map. Raises :class:`ArtifactError` naming the file for a truncated or corrupt shard,
    a tensor the index lists but its file lacks (or the reverse), or a compressed weight missing one of its tensors
    or its guard.
    """
    folder = Path(folder)
    index_path = folder / INDEX_NAME
    if index_path.is_file():
        weight_map = _read_index(index_path)
        files = sorted(set(weight_map.values()))
    elif (folder / WEIGHTS_NAME).is_file():
        weight_map, files = None, [WEIGHTS_NAME]
    else:
        raise ArtifactError(f"{folder}: has neither {WEIGHTS_NAME} nor {INDEX_NAME}")

    found: dict[str, str] = {}
    for file in files:
        for key in _read_keys(folder / file):
            if key in found:
                raise ArtifactError(f"{folder / file}: tensor {key!r} is also in {found[key]}")
            found[key] = file
    if weight_map is not None:
        for key, file in sorted(weight_map.items()):
            if found.get(key) != file:
                raise ArtifactError(f"{folder / file}: lacks tensor {key!r} listed in {INDEX_NAME}")
        extra = sorted(set(found) - set(weight_map))
        if extra:
            raise ArtifactError(f"{folder / found[extra[0]]}: tensor {extra[0]!r} is not listed in {INDEX_NAME}")
    _check_compressed_groups(folder, found)
    return found


class _ShardWriter:
    """Accumulates tensor groups into shards and writes each one to a hidden temporary file when full."""

    def __init__(self, out_dir: Path, max_shard_size: int):
        if max_shard_size <= 0:
            raise ConfigError(f"max_shard_size must be positive, got {max_shard_size}")
        self.out_dir, self.max_shard_size = out_dir, max_shard_size
        self.current: dict[str, Tensor] = {}
        self.current_size = 0
        self.written: list[tuple[Path, list[str]]] = []
        self.total_size = self.total_parameters = 0

    def add(self, group: dict[str, Tensor], numel: int) -> None:
        group = {key: _own_storage(tensor) for key, tensor in group.items()}
        size = sum(tensor.nbytes for tensor in group.values())
        self.total_size += size
        self.total_parameters += numel
        if size > self.max_shard_size:
            self._write(group)
            return
        if self.current and self.current_size + size > self.max_shard_size:
            self._flush()
        self.current.update(group)
        self.current_size += size

    def finish(self) -> dict[str, Any]:
        if self.current or not self.written:
            self._flush()
        count = len(self.written)
        names = [f"model-{i:05d}-of-{count:05d}.safetensors" for i in range(1, count + 1)]
        if count == 1:
            names = [WEIGHTS_NAME]
        weight_map = {}
        for (temp, keys), name in zip(self.written, names):
            os.replace(temp, self.out_dir / name)
            weight_map.update(dict.fromkeys(keys, name))
        index = {
            "metadata": {"total_parameters": self.total_parameters, "total_size": self.total_size},
            "weight_map": weight_map,
        }
        kept = set(names)
        if count > 1:
            (self.out_dir / INDEX_NAME).write_text(json.dumps(index, indent=2, sort_keys=True) + "\n", encoding="utf-8")
            kept.add(INDEX_NAME)
        for path in self.out_dir.iterdir():
            stale = path.name in (WEIGHTS_NAME, INDEX_NAME) or _SHARD_NAME.fullmatch(path.name)
            if stale and path.name not in kept:
                path.unlink()
        return index

    def discard(self) -> None:
        for temp, _ in self.written:
            temp.unlink(missing_ok=True)

    def _flush(self) -> None:
        self._write(self.current)
        self.current, self.current_size = {}, 0

    def _write(self, tensors: dict[str, Tensor]) -> None:
        temp = self.out_dir / f".model-{len(self.written) + 1:05d}.safetensors.tmp"
        save_file(tensors, temp, metadata={"format": "pt"})
        self.written.append((temp, list(tensors)))


class _TieDetector:
    """Recognises a tensor that is the very same view as one already seen, without keeping either alive.

    Keyed on the storage's address, and confirmed through a weak reference to the storage object (torch keeps one
    Python object per live storage), so a new tensor reusing freed memory is not mistaken for a tie.
    """

    def __init__(self) -> None:
        self.seen: dict[tuple, weakref.ref] = {}

    def is_repeat(self, name: str, tensor: Tensor) -> bool:
        if tensor.device.type == "meta":
            raise ConfigError(f"{name!r} is on the meta device (offloaded?); pass materialised tensors")
        storage = tensor.untyped_storage()
        view = (storage.data_ptr(), tensor.storage_offset(), tuple(tensor.shape), tensor.stride(), tensor.dtype)
        earlier = self.seen.get(view)
        if earlier is not None and earlier() is storage:
            return True
        self.seen[view] = weakref.ref(storage)
        return False


def _check_layout(layout: str) -> None:
    if layout not in TENSOR_NAMES:
        raise ConfigError(f"unknown sparse layout {layout!r}; expected one of {sorted(TENSOR_NAMES)}")


def _own_storage(tensor: Tensor) -> Tensor:
    """A contiguous tensor that owns its whole storage: safetensors refuses tensors sharing memory in one file."""
    tensor = tensor.contiguous()
    return tensor if tensor.untyped_storage().nbytes() == tensor.nbytes else tensor.clone()


def _read_index(path: Path) -> dict[str, str]:
    try:
        weight_map = json.loads(path.read_text(encoding="utf-8"))["weight_map"]
    except (OSError, ValueError, KeyError, TypeError) as err:
        raise ArtifactError(f"{path}: not a readable index with a weight_map ({err})") from err
    if not isinstance(weight_map, dict) or not all(isinstance(v, str) for v in weight_map.values()):
        raise ArtifactError(f"{path}: weight_map must map tensor names to file names")
    return weight_map


def _read_keys(path: Path) -> list[str]:
    """The tensor names of one safetensors file; safetensors validates the header against the file size."""
    try:
        with safe_open(path, framework="pt") as handle:
            metadata = handle.metadata() or {}
            keys = list(handle.keys())
    except (SafetensorError, OSError) as err:
        raise ArtifactError(f"{path}: unreadable safetensors file ({err})") from err
    if metadata.get("format") != "pt":
        raise ArtifactError(f"{path}: metadata format is {metadata.get('format')!r}, expected 'pt'")
    return keys


def _check_compressed_groups(folder: Path, found: dict[str, str]) -> None:
    try:
        config = json.loads((folder / "config.json").read_text(encoding="utf-8")).get("quantization_config") or {}
    except (OSError, ValueError) as err:
        raise ArtifactError(f"{folder / 'config.json'}: unreadable ({err})") from err
    if config.get("quant_method") != QUANT_METHOD:
        return
    suffixes = TENSOR_NAMES.get(config.get("format"))
    if suffixes is None:
        raise ArtifactError(f"{folder / 'config.json'}: unknown sparse format {config.get('format')!r}")
    for target in config.get("targets", []):
        missing = [f"{target}.{suffix}" for suffix in (*suffixes, "weight") if f"{target}.{suffix}" not in found]
        if missing:
            raise ArtifactError(f"{folder}: compressed weight {target!r} lacks {missing}")
