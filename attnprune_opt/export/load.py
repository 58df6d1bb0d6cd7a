"""Loading a pruned model folder, dense or compressed, onto any device map, checked against its manifest.

Before loading, the folder is verified (:func:`~.verify.verify_pruned_folder`: the manifest, every weight file
opened and matched against the index and config.json, and every file's SHA-256, unless ``verify_files=False``);
after loading, every pruned matrix's zeros are counted in the model (an offloaded one brought back for the count)
and must equal the manifest's. Any disagreement is an :class:`ArtifactError` naming the file or module. A
compressed folder is decompressed by the transformers quantizer this package registers (:mod:`.quantizer`).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from torch import nn

from ..errors import ArtifactError
from ..models.offload import onloaded
from .bitmask import DECOMPRESSORS, TENSOR_NAMES
from .folder import TensorFiles, folder_quantization
from .manifest import Manifest, read_manifest
from .measure import check_same_zeros
from .pruned import MatrixZeros, count_zeros, kept_per_row, prune_plan
from .sharded import verify_folder
from .verify import verify_pruned_folder

__all__ = ["load_pruned_model", "read_manifest", "check_sparsity"]


def load_pruned_model(folder: str | Path, device_map: str | dict | None = None,
                      offload_folder: str | Path | None = None, *, verify_files: bool = True, **kwargs: Any):
    """``AutoModelForCausalLM.from_pretrained`` on a pruned folder (safetensors only, no remote code unless asked),
    checked against the folder's manifest; ``kwargs`` go through (``dtype``, ``attn_implementation``...).

    ``verify_files=False`` skips hashing every file (about a second per GB of weights): a changed byte that keeps
    a pruned weight's zero count then loads unnoticed. The manifest's own checks and the zero counts still run.
    """
    from transformers import AutoModelForCausalLM

    folder = Path(folder)
    manifest = verify_pruned_folder(folder, hashes=verify_files)
    quant = folder_quantization(folder)
    kwargs.setdefault("use_safetensors", True)
    kwargs.setdefault("trust_remote_code", False)
    try:
        model = AutoModelForCausalLM.from_pretrained(folder, device_map=device_map, offload_folder=offload_folder,
                                                     **kwargs)
    except RuntimeError as exc:
        # transformers logs the errors raised while converting checkpoint tensors and then raises a generic
        # RuntimeError; find the compressed weight that does not decompress and name it.
        if quant is not None and "conversion" in str(exc):
            _raise_first_bad_weight(folder, quant, exc)
        raise
    check_sparsity(model, manifest, folder)
    return model


def _raise_first_bad_weight(folder: Path, quant: dict[str, Any], exc: RuntimeError) -> None:
    """Decompress the compressed weights one at a time; raise the first one's :class:`ArtifactError`."""
    layout = quant["format"]
    with TensorFiles(folder, verify_folder(folder)) as files:
        for prefix in quant["targets"]:
            try:
                DECOMPRESSORS[layout]({s: files.tensor(f"{prefix}.{s}") for s in TENSOR_NAMES[layout]}, name=prefix)
            except ArtifactError as bad:
                raise ArtifactError(f"{folder}: compressed weights do not decompress: {bad}") from exc


def check_sparsity(model: nn.Module, manifest: Manifest, folder: str | Path = "model") -> float:
    """Every pruned matrix of ``model`` must hold the zeros the manifest records, and the manifest must list every
    matrix its recipe prunes (else :class:`ArtifactError` naming the matrices and both counts); returns the
    fraction of zeros measured over the pruned matrices. The model's adapter says where each matrix is."""
    measured: dict[str, MatrixZeros] = {}
    for parts in prune_plan(model.config, manifest.config).tensors.values():
        try:
            module = model.get_submodule(parts[0].module)
        except AttributeError:
            continue  # reported as a matrix the manifest records and the model lacks
        with onloaded(module):
            weight = getattr(module, parts[0].prunable.parameter, None)
            if weight is None or weight.device.type == "meta":
                continue
            measured.update(count_zeros(parts, kept_per_row(weight), weight.shape[-1]))
    check_same_zeros(manifest.sparsity.modules, measured, Path(folder))
    zeros, numel = sum(m.zeros for m in measured.values()), sum(m.numel for m in measured.values())
    return zeros / numel if numel else 0.0
