"""Which matrices a pruning config prunes in a model, asked of the model family's adapter, never parsed from names.

The adapter needs only the model's config, so a saved folder is planned from its config.json without building the
model. A matrix is named ``<layer prefix>.<label>``: ``model.layers.3.self_attn.q_proj.weight`` for a tensor of its
own, ``model.layers.3.self_attn.qkv_proj.weight[q_proj]`` for a part of a fused one. The manifest records one entry
per pruned matrix; the bitmask format stores a tensor holding any pruned matrix compressed as a whole.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import Any, NamedTuple

from torch import Tensor

from ..config import PrunerConfig, PruneRule
from ..errors import ArtifactError, ConfigError, UnsupportedArchitectureError
from ..models.base import Prunable
from ..models.registry import adapter_for_config
from .bitmask import SPARSE_24_BITMASK, SPARSE_BITMASK
from .folder import CONFIG_NAME, read_json


@dataclass(frozen=True)
class PlannedMatrix:
    """One matrix of a tensor that holds a pruned matrix; ``rule`` is None for an unpruned part of a fused tensor."""

    name: str
    layer: int
    prefix: str
    prunable: Prunable
    rule: PruneRule | None

    @property
    def tensor(self) -> str:
        """The stored tensor's name in the model's state dict."""
        return f"{self.prefix}.{self.prunable.tensor}"

    @property
    def module(self) -> str:
        return f"{self.prefix}.{self.prunable.module}"


class MatrixZeros(NamedTuple):
    """One pruned matrix as counted: its layer and role (for the manifest) and its zeros of numel."""

    layer: int
    role: str
    zeros: int
    numel: int


@dataclass(frozen=True)
class PrunePlan:
    """The matrices of every stored tensor that a config prunes (all of a fused tensor's parts), in forward order."""

    parts: tuple[PlannedMatrix, ...]

    @cached_property
    def matrices(self) -> dict[str, PlannedMatrix]:
        """The pruned matrices by name."""
        return {part.name: part for part in self.parts if part.rule is not None}

    @cached_property
    def tensors(self) -> dict[str, tuple[PlannedMatrix, ...]]:
        """Every tensor holding a pruned matrix, with all its parts."""
        tensors: dict[str, tuple[PlannedMatrix, ...]] = {}
        for part in self.parts:
            tensors[part.tensor] = (*tensors.get(part.tensor, ()), part)
        return tensors

    @property
    def layout(self) -> str:
        """``sparse-24-bitmask`` when every row of every compressed tensor is pruned 2:4 (a little denser: no row
        offsets), else ``sparse-bitmask``."""
        return SPARSE_24_BITMASK if self.parts and all(part.rule is not None and part.rule.structure == "2:4"
                                                       for part in self.parts) else SPARSE_BITMASK

    def targets(self) -> list[str]:
        """The modules the bitmask format stores compressed, after checking it can (2-D ``.weight`` tensors)."""
        for part in self.parts:
            if part.prunable.expert is not None or part.prunable.parameter != "weight":
                raise ConfigError(f"the bitmask format stores 2-D '.weight' tensors only, not {part.tensor} "
                                  f"({part.name}); save it with format 'dense'")
        return [tensor.removesuffix(".weight") for tensor in self.tensors]


def prune_plan(model_config: Any, config: PrunerConfig) -> PrunePlan:
    """What ``config`` prunes in a model of ``model_config`` (a transformers config)."""
    adapter = adapter_for_config(model_config)
    indices = range(adapter.num_layers) if config.layers is None else sorted(set(config.layers))
    parts = []
    for index in indices:
        prefix = adapter.layer_prefix(index)
        prunables = adapter.prunables(index)
        pruned = {p.tensor for p in prunables if config.rule_for(p.role) is not None}
        parts += [PlannedMatrix(f"{prefix}.{p.label}", index, prefix, p, config.rule_for(p.role))
                  for p in prunables if p.tensor in pruned]
    return PrunePlan(tuple(parts))


def folder_plan(folder: Path, config: PrunerConfig) -> PrunePlan:
    """What ``config`` prunes in the model saved in ``folder``, from its config.json (no remote code)."""
    from huggingface_hub.errors import StrictDataclassError
    from transformers import CONFIG_MAPPING, AutoConfig

    path = folder / CONFIG_NAME
    data = read_json(path)
    model_type = data.pop("model_type", None)
    if model_type not in CONFIG_MAPPING:
        raise UnsupportedArchitectureError(f"{path}: model_type {model_type!r} is not known to transformers")
    try:
        model_config = AutoConfig.for_model(model_type, **data)
    except (ValueError, TypeError, StrictDataclassError) as err:
        reason = " ".join(str(err).split())[:200]
        raise ArtifactError(f"{path}: not a valid {model_type} config ({reason})") from None
    try:
        return prune_plan(model_config, config)
    except UnsupportedArchitectureError as err:
        raise UnsupportedArchitectureError(f"{path}: {err}") from None


def kept_per_row(tensor: Tensor) -> Tensor:
    """The non-zero count of every row of a (possibly stacked) weight: what :func:`count_zeros` reads."""
    return (tensor != 0).sum(dim=-1)


def count_zeros(parts: tuple[PlannedMatrix, ...], kept: Tensor, columns: int) -> dict[str, MatrixZeros]:
    """The zeros of the pruned matrices among one tensor's ``parts``, from its non-zero count per row
    (:func:`kept_per_row`, or a bitmask's) and its column count."""
    counts = {}
    for part in parts:
        if part.rule is not None:
            rows = part.prunable.read(kept.unsqueeze(-1))
            numel = rows.numel() * columns
            counts[part.name] = MatrixZeros(part.layer, part.prunable.role, numel - int(rows.sum()), numel)
    return counts
