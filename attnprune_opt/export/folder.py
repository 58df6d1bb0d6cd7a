"""Reading a saved folder's tensors: how they are stored, and the tensors themselves.

Shared by measuring a folder (:mod:`.measure`), converting it (:mod:`.convert`) and loading it (:mod:`.load`).
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable, Iterator
from contextlib import ExitStack
from pathlib import Path
from typing import Any

from safetensors import SafetensorError, safe_open
from torch import Tensor

from ..errors import ArtifactError
from .bitmask import DECOMPRESSORS, TENSOR_NAMES
from .sharded import QUANT_METHOD

CONFIG_NAME = "config.json"
_DTYPE_BYTES = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U8": 1, "BOOL": 1}


def folder_quantization(folder: Path) -> dict[str, Any] | None:
    """The folder's own ``quantization_config`` (checked), or None for a dense folder."""
    quant = read_json(folder / CONFIG_NAME).get("quantization_config")
    if quant is None:
        return None
    if not isinstance(quant, dict) or quant.get("quant_method") != QUANT_METHOD:
        raise ArtifactError(f"{folder / CONFIG_NAME}: quantization_config is not {QUANT_METHOD!r}: {quant!r}")
    if quant.get("format") not in TENSOR_NAMES or not isinstance(quant.get("targets"), list):
        raise ArtifactError(f"{folder / CONFIG_NAME}: quantization_config needs a known format and a targets list")
    return quant


def logical_names(weight_map: dict[str, str], quant: dict[str, Any] | None) -> list[str]:
    """The model's tensor names in a folder: a compressed weight's tensors count as its one ``.weight``."""
    names = {f"{key.rpartition('.')[0]}.weight" if compressed_part(key, quant) else key for key in weight_map}
    return sorted(names, key=natural)


def compressed_part(key: str, quant: dict[str, Any] | None) -> bool:
    """Whether ``key`` is one of a compressed weight's tensors (its guard ``.weight`` included; not its bias)."""
    if quant is None:
        return False
    prefix, _, suffix = key.rpartition(".")
    return prefix in quant["targets"] and suffix in (*TENSOR_NAMES[quant["format"]], "weight")


def folder_tensors(names: Iterable[str], quant: dict[str, Any] | None, files: TensorFiles) -> Iterator[tuple[str, Tensor]]:
    """The dense tensors of a saved folder, one at a time; compressed weights are decompressed as they come."""
    targets = set(quant["targets"]) if quant else set()
    for name in names:
        prefix = name.removesuffix(".weight")
        if not (name.endswith(".weight") and prefix in targets):
            yield name, files.tensor(name)
            continue
        layout = quant["format"]
        parts = {suffix: files.tensor(f"{prefix}.{suffix}") for suffix in TENSOR_NAMES[layout]}
        if files.tensor(name).numel():
            raise ArtifactError(f"{files.folder}: {name} is stored both dense and compressed")
        yield name, DECOMPRESSORS[layout](parts, name=prefix)


class TensorFiles:
    """Open safetensors files of a folder by tensor name; errors reading them name the file."""

    def __init__(self, folder: Path, weight_map: dict[str, str]):
        self.folder, self.weight_map = folder, weight_map
        self.stack = ExitStack()
        self.handles: dict[str, Any] = {}

    def __enter__(self) -> TensorFiles:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stack.close()

    def _handle(self, key: str) -> Any:
        file = self.weight_map.get(key)
        if file is None:
            raise ArtifactError(f"{self.folder}: tensor {key!r} is missing")
        if file not in self.handles:
            try:
                self.handles[file] = self.stack.enter_context(safe_open(self.folder / file, framework="pt"))
            except (SafetensorError, OSError) as err:
                raise ArtifactError(f"{self.folder / file}: unreadable safetensors file ({err})") from err
        return self.handles[file]

    def tensor(self, key: str) -> Tensor:
        try:
            return self._handle(key).get_tensor(key)
        except (SafetensorError, OSError) as err:
            raise ArtifactError(f"{self.folder / self.weight_map[key]}: cannot read {key!r} ({err})") from err

    def itemsize(self, key: str) -> int:
        dtype = self._handle(key).get_slice(key).get_dtype()
        return _DTYPE_BYTES[dtype] if dtype in _DTYPE_BYTES else self.tensor(key).element_size()

    def nbytes(self, key: str) -> int:
        numel = 1
        for dim in self._handle(key).get_slice(key).get_shape():
            numel *= dim
        return numel * self.itemsize(key)


def read_json(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as err:
        raise ArtifactError(f"{path}: unreadable ({err})") from err
    if not isinstance(data, dict):
        raise ArtifactError(f"{path}: expected a JSON object")
    return data


def natural(name: str) -> tuple:
    """Sort key putting ``layers.2`` before ``layers.10``."""
    return tuple(int(part) if part.isdigit() else part for part in re.split(r"(\d+)", name))
