"""Loading a pruned model folder, dense or compressed, onto any device map, checked against its manifest.

Before loading, the folder is verified (:func:`~.verify.verify_pruned_folder`: the manifest, every weight file
opened and matched against the index and config.json, and every file's SHA-256, unless ``verify_files=False``);
after loading, every pruned weight's zeros are counted in the model (an offloaded one brought back for the count)
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
from .folder import TensorFiles, folder_quantization, pruned_rule
from .manifest import Manifest, read_manifest
from .measure import raise_disagreement
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
    """Every pruned weight of ``model`` must hold the zeros the manifest records, and the manifest must list every
    weight its recipe prunes (else :class:`ArtifactError` naming the modules and both counts); returns the
    fraction of zeros measured over the pruned weights."""
    expected = manifest.sparsity.modules
    problems = []
    names = [name for name, _ in model.named_parameters() if pruned_rule(name, manifest.config)]
    problems += [f"{name}: pruned by the recipe but not in the manifest" for name in names if name not in expected]
    zeros_total = numel_total = 0
    for name, entry in expected.items():
        prefix, _, leaf = name.rpartition(".")
        try:
            module = model.get_submodule(prefix)
        except AttributeError:
            problems.append(f"{name}: in the manifest but not in the model")
            continue
        with onloaded(module):
            weight = getattr(module, leaf, None)
            if weight is None or weight.device.type == "meta":
                problems.append(f"{name}: in the manifest but the model has no readable weight there")
                continue
            zeros, numel = int((weight == 0).sum()), weight.numel()
        zeros_total, numel_total = zeros_total + zeros, numel_total + numel
        if (zeros, numel) != (entry.zeros, entry.numel):
            problems.append(f"{name}: {zeros} zeros of {numel} loaded ({weight.dtype}), manifest says "
                            f"{entry.zeros} of {entry.numel}")
    raise_disagreement(Path(folder), problems)
    return zeros_total / numel_total if numel_total else 0.0
