"""What a saved folder holds, measured on its files: every pruned weight's zeros and the size of both formats."""

from __future__ import annotations

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
    compressed_layout,
    compressed_part,
    folder_quantization,
    natural,
    pruned_rule,
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
from .sharded import verify_folder


def measure_folder(folder: Path, config: PrunerConfig, format: str) -> tuple[dict[str, WeightSparsity], Sizes]:
    """Zeros of every pruned weight as stored in ``folder``, and the size of both formats; checks the files first.

    A compressed weight's zeros come from its bitmask (``sparse-bitmask``: the popcount) or its stored values
    (``sparse-24-bitmask``, which also stores zeros), never from a decompressed copy; a dense one's are counted.
    """
    weight_map = verify_folder(folder)
    quant = folder_quantization(folder)
    if (quant is not None) != (format == "bitmask"):
        raise ArtifactError(f"{folder / CONFIG_NAME}: its quantization_config does not match format {format!r}")
    layout = quant["format"] if quant else compressed_layout(config)
    modules: dict[str, WeightSparsity] = {}
    dense_bytes = bitmask_bytes = 0
    with TensorFiles(folder, weight_map) as files:
        for key in sorted(weight_map, key=natural):
            prefix, _, suffix = key.rpartition(".")
            if compressed_part(key, quant):
                bitmask_bytes += files.nbytes(key)
                if suffix != "bitmask":
                    continue
                rows, cols = (int(v) for v in files.tensor(f"{prefix}.shape").flatten().tolist())
                values = f"{prefix}.compressed"
                if layout == SPARSE_BITMASK:
                    stored = _popcount(files.tensor(key))
                else:
                    stored = int(files.tensor(values).count_nonzero())
                numel = rows * cols
                dense_bytes += numel * files.itemsize(values)
                name, zeros = f"{prefix}.weight", numel - stored
            else:
                size = files.nbytes(key)
                dense_bytes += size
                if pruned_rule(key, config) is None:
                    bitmask_bytes += size
                    continue
                tensor = files.tensor(key)
                bitmask_bytes += _compressed_nbytes(tensor, layout)
                name, zeros, numel = key, int((tensor == 0).sum()), tensor.numel()
            rule = pruned_rule(name, config)
            modules[name] = WeightSparsity(method=rule.method, structure=rule.structure,
                                           target_sparsity=rule.sparsity, zeros=zeros, numel=numel,
                                           sparsity=zeros / numel if numel else 0.0, file=weight_map[key])
    sizes = Sizes(format=format, weight_files_bytes=sum((folder / f).stat().st_size for f in set(weight_map.values())),
                  dense_bytes=dense_bytes, bitmask_bytes=bitmask_bytes, bitmask_layout=layout)
    return dict(sorted(modules.items(), key=lambda item: natural(item[0]))), sizes


def check_same_zeros(expected: dict[str, WeightSparsity], measured: dict[str, WeightSparsity], folder: Path) -> None:
    """The measured zeros must be the recorded ones, weight for weight; else an :class:`ArtifactError` naming them."""
    problems = []
    for name, entry in expected.items():
        got = measured.get(name)
        if got is None or (got.zeros, got.numel) != (entry.zeros, entry.numel):
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
    """What :func:`.bitmask.compress_bitmask` / ``compress_sparse24`` would store for ``tensor``, without doing it."""
    rows, cols = tensor.shape
    mask_bytes, shape_bytes = rows * ((cols + 7) // 8), 2 * 8
    if layout == SPARSE_24_BITMASK:
        return rows * (cols // 2) * tensor.element_size() + mask_bytes + shape_bytes
    return int(tensor.count_nonzero()) * tensor.element_size() + mask_bytes + rows * 8 + shape_bytes


def _popcount(packed: Tensor) -> int:
    """Set bits of a uint8 tensor, in uint8 arithmetic (no wider copy of a large bitmask)."""
    x = packed - ((packed >> 1) & 0x55)
    x = (x & 0x33) + ((x >> 2) & 0x33)
    return int(((x + (x >> 4)) & 0x0F).sum(dtype=torch.int64))


def write_manifest(folder: Path, config: PrunerConfig, format: str, **fields: Any) -> Manifest:
    """Measure ``folder``, hash its files and write its manifest last; ``fields``: model, calibration, report..."""
    modules, sizes = measure_folder(folder, config, format)
    manifest = Manifest(schema_version=SCHEMA_VERSION, format=format, config=config,
                        sparsity=SparsitySummary.of(modules), sizes=sizes, files=hash_files(folder),
                        versions=versions(), **fields)
    manifest.write(folder)
    return manifest
