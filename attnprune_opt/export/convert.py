"""Converting a saved pruned folder from one weight format to the other (``attnprune-opt export``)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from ..atomic import atomic_output_dir, check_output_dir
from .folder import (
    CONFIG_NAME,
    TensorFiles,
    folder_quantization,
    folder_tensors,
    logical_names,
    read_json,
)
from .manifest import MANIFEST_NAME, RECIPE_NAME
from .measure import check_same_zeros, write_manifest
from .pruned import folder_plan
from .save import check_format, shard_bytes
from .sharded import INDEX_NAME, quantization_config, verify_folder, write_compressed_safetensors
from .verify import verify_pruned_folder


def export_pruned(in_dir: str | Path, out_dir: str | Path, format: str, *, overwrite: bool = False,
                  max_shard_size: str | int = "2GB") -> Path:
    """Convert the pruned folder ``in_dir`` (dense or bitmask) to ``format`` in ``out_dir``.

    ``in_dir`` is verified first (every file's SHA-256). Tensor by tensor, one output shard in memory at a time;
    tokenizer files and the recipe are copied, the manifest carried over with its format, measured sparsity, sizes
    and file hashes taken from the new files. The new files must hold exactly the zeros the source manifest records
    (else :class:`ArtifactError`, and nothing is written).
    """
    check_format(format)
    max_bytes = shard_bytes(max_shard_size)
    in_dir, out_dir = Path(in_dir), Path(out_dir)
    check_output_dir(out_dir, overwrite)  # before the reading and hashing
    source = verify_pruned_folder(in_dir)
    config = source.config
    weight_map = verify_folder(in_dir)
    quant = folder_quantization(in_dir)
    plan = folder_plan(in_dir, config)
    targets = plan.targets() if format == "bitmask" else []
    with atomic_output_dir(out_dir, overwrite) as tmp:
        with TensorFiles(in_dir, weight_map) as files:
            names = logical_names(weight_map, quant)
            compress = plan.tensors.__contains__ if format == "bitmask" else _never
            write_compressed_safetensors(folder_tensors(names, quant, files), compress, tmp, max_bytes,
                                         layout=plan.layout)
        model_config = read_json(in_dir / CONFIG_NAME)
        model_config.pop("quantization_config", None)
        if format == "bitmask":
            model_config["quantization_config"] = quantization_config(plan.layout, targets)
        (tmp / CONFIG_NAME).write_text(json.dumps(model_config, indent=2, sort_keys=True) + "\n")
        for path in in_dir.iterdir():
            if not _is_weight_or_manifest(path.name):
                (shutil.copytree if path.is_dir() else shutil.copy2)(path, tmp / path.name)
        if not (tmp / RECIPE_NAME).is_file():
            (tmp / RECIPE_NAME).write_text(config.to_yaml())
        manifest = write_manifest(tmp, config, format, model=source.model, calibration=source.calibration,
                                  report=source.report,
                                  exported_from={"format": source.format, "versions": source.versions})
        check_same_zeros(source.sparsity.modules, manifest.sparsity.modules, in_dir)
    return out_dir


def _never(name: str) -> bool:
    return False


def _is_weight_or_manifest(name: str) -> bool:
    return (name.endswith(".safetensors") or name in (INDEX_NAME, CONFIG_NAME, MANIFEST_NAME)
            or name.startswith("."))
