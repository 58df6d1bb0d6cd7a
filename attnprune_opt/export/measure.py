"""What a saved folder holds, measured on its files: every pruned weight's zeros and the size of both formats."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from ..config import PrunerConfig
from ..errors import ArtifactError
from .bitmask import SPARSE_24_BITMASK, SPARSE_BITMASK
from .folder import (
    CONFIG_NAME,
    TensorFiles,
    compressed_part,
    folder_quantization,
    natural,
)
from .manifest import (
    MANIFEST_NAME,
    SCHEMA_VERSION,
    Manifest,
    Sizes,
    SparsitySummary,
    WeightSparsity,
    hash_files,
    versions,
)
from .pruned import MatrixZeros, count_zeros, folder_plan, kept_per_row
from .sharded import verify_folder


def measure_folder(folder: Path, config: PrunerConfig, format: str) -> tuple[dict[str, WeightSparsity], Sizes]:
    """Zeros of every pruned matrix as stored in ``folder``, and the size of both formats; checks the files first.

    Which matrices are pruned, and which rows of which tensor each one is, the model family's adapter says from the
    folder's config.json. A compressed tensor's zeros come from its bitmask (``sparse-bitmask``: the popcount of each
    row) or its stored values (``sparse-24-bitmask``, which also stores zeros), never from a decompressed copy; a
    dense one's are counted.
    """
    weight_map = verify_folder(folder)
    quant = folder_quantization(folder)
    if (quant is not None) != (format == "bitmask"):
        raise ArtifactError(f"{folder / CONFIG_NAME}: its quantization_config does not match format {format!r}")
    plan = folder_plan(folder, config)
    layout = quant["format"] if quant else plan.layout
    modules: dict[str, WeightSparsity] = {}
    dense_bytes = bitmask_bytes = 0
    with TensorFiles(folder, weight_map) as files:
        for key in sorted(weight_map, key=natural):
            prefix, _, suffix = key.rpartition(".")
            if compressed_part(key, quant):
                bitmask_bytes += files.nbytes(key)
                if suffix != "bitmask":
                    continue
                rows, columns = (int(v) for v in files.tensor(f"{prefix}.shape").flatten().tolist())
                values = f"{prefix}.compressed"
                if layout == SPARSE_BITMASK:
                    kept = _popcount(files.tensor(key))
                else:
                    kept = files.tensor(values).count_nonzero(dim=-1)
                dense_bytes += rows * columns * files.itemsize(values)
                name = f"{prefix}.weight"
            else:
                size = files.nbytes(key)
                dense_bytes += size
                if key not in plan.tensors:
                    bitmask_bytes += size
                    continue
                tensor = files.tensor(key)
                bitmask_bytes += _compressed_nbytes(tensor, layout)
                kept, columns, name = kept_per_row(tensor), tensor.shape[-1], key
            parts = plan.tensors.get(name)
            if parts is None:
                raise ArtifactError(f"{folder / CONFIG_NAME}: {name} is stored compressed but its recipe prunes "
                                    "nothing in it")
            for matrix, count in count_zeros(parts, kept, columns).items():
                rule = plan.matrices[matrix].rule
                modules[matrix] = WeightSparsity(**count._asdict(), method=rule.method, structure=rule.structure,
                                                 target_sparsity=rule.sparsity,
                                                 sparsity=count.zeros / count.numel if count.numel else 0.0,
                                                 file=weight_map[key])
    missing = [part.tensor for part in plan.matrices.values() if part.name not in modules]
    if missing:
        raise ArtifactError(f"{folder}: tensor {missing[0]!r} (pruned by the recipe) is missing")
    sizes = Sizes(format=format, weight_files_bytes=sum((folder / f).stat().st_size for f in set(weight_map.values())),
                  dense_bytes=dense_bytes, bitmask_bytes=bitmask_bytes, bitmask_layout=layout)
    return dict(sorted(modules.items(), key=lambda item: natural(item[0]))), sizes


def check_same_zeros(expected: dict[str, WeightSparsity], measured: Mapping[str, WeightSparsity | MatrixZeros],
                     folder: Path) -> None:
    """The measured zeros must be the recorded ones, matrix for matrix; else an :class:`ArtifactError` naming them."""
    problems = []
    for name, entry in expected.items():
        got = measured.get(name)
        if got is not None and (got.layer, got.role) != (entry.layer, entry.role):
            problems.append(f"{name}: {got.role} of layer {got.layer} in the model's layout, manifest says "
                            f"{entry.role} of layer {entry.layer}")
        elif got is None or (got.zeros, got.numel) != (entry.zeros, entry.numel):
            found = f"{got.zeros} zeros of {got.numel}" if got else "no pruned weight"
            problems.append(f"{name}: {found} in the weights, manifest says {entry.zeros} of {entry.numel}")
    problems += [f"{name}: pruned weight missing from the manifest" for name in measured if name not in expected]
    raise_disagreement(folder, problems)


def raise_disagreement(folder: Path, problems: list[str]) -> None:
    """One :class:`ArtifactError` listing the first five ``problems`` (if any) between weights and manifest."""
    if problems:
        more = f"; and {len(problems) - 5} more" if len(problems) > 5 else ""
        raise ArtifactError(f"{folder}: the weights disagree with {MANIFEST_NAME}: " + "; ".join(problems[:5]) + more)


def _compressed_nbytes(tensor: Tensor, layout: str) -> int:
    """What :func:`.bitmask.compress_bitmask` / ``compress_sparse24`` would store for ``tensor``, without doing it
    (a stacked (experts, out, in) tensor, which the bitmask format refuses, counted as its experts' rows)."""
    cols = tensor.shape[-1]
    rows = tensor.numel() // cols if cols else 0
    mask_bytes, shape_bytes = rows * ((cols + 7) // 8), 2 * 8
    if layout == SPARSE_24_BITMASK:
        return rows * (cols // 2) * tensor.element_size() + mask_bytes + shape_bytes
    return int(tensor.count_nonzero()) * tensor.element_size() + mask_bytes + rows * 8 + shape_bytes


def _popcount(packed: Tensor) -> Tensor:
    """Set bits of each row of a uint8 bitmask, in uint8 arithmetic (no wider copy of a large bitmask)."""
    x = packed - ((packed >> 1) & 0x55)
    x = (x & 0x33) + ((x >> 2) & 0x33)
    return ((x + (x >> 4)) & 0x0F).sum(dim=-1, dtype=torch.int64)


def write_manifest(folder: Path, config: PrunerConfig, format: str, **fields: Any) -> Manifest:
    """Measure ``folder``, hash its files and write its manifest last; ``fields``: model, calibration, report..."""
    modules, sizes = measure_folder(folder, config, format)
    manifest = Manifest(schema_version=SCHEMA_VERSION, format=format, config=config,
                        sparsity=SparsitySummary.of(modules), sizes=sizes, files=hash_files(folder),
                        versions=versions(), **fields)
    manifest.write(folder)
    return manifest
