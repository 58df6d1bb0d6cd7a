"""Loading a pruned model folder, dense or compressed, onto any device map, checking it against its manifest.

Before loading, every weight file is opened and matched against the index and config.json (a truncated or corrupt
shard is an :class:`ArtifactError` naming the file); after loading, every pruned weight's zeros are counted in
the model (an offloaded one brought back for the count) and must equal the manifest's, else an
:class:`ArtifactError` names the module and both counts. A compressed folder is decompressed by the transformers
quantizer this package registers (:mod:`.quantizer`).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from torch import nn

from ..errors import ArtifactError
from ..models.offload import onloaded
from .bitmask import DECOMPRESSORS, TENSOR_NAMES
from .save import (
    MANIFEST_NAME,
    _Files,
    _folder_quantization,
    manifest_config,
    pruned_rule,
    read_manifest,
)
from .sharded import verify_folder

__all__ = ["load_pruned_model", "read_manifest", "check_sparsity"]


def load_pruned_model(folder: str | Path, device_map: str | dict | None = None,
                      offload_folder: str | Path | None = None, **kwargs: Any):
    """``AutoModelForCausalLM.from_pretrained`` on a pruned folder (safetensors only, no remote code unless asked),
    checked against the folder's manifest; ``kwargs`` go through (``dtype``, ``attn_implementation``...)."""
    from transformers import AutoModelForCausalLM

    folder = Path(folder)
    manifest = read_manifest(folder)
    verify_folder(folder)
    quant = _folder_quantization(folder)
    if (quant is not None) != (manifest["format"] == "bitmask"):
        raise ArtifactError(f"{folder}: {MANIFEST_NAME} says format {manifest['format']!r} but config.json "
                            f"{'has' if quant else 'has no'} attnprune-sparse quantization_config")
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
    with _Files(folder, verify_folder(folder)) as files:
        for prefix in quant["targets"]:
            try:
                DECOMPRESSORS[layout]({s: files.tensor(f"{prefix}.{s}") for s in TENSOR_NAMES[layout]}, name=prefix)
            except ArtifactError as bad:
                raise ArtifactError(f"{folder}: compressed weights do not decompress: {bad}") from exc


def check_sparsity(model: nn.Module, manifest: dict[str, Any], folder: str | Path = "model") -> None:
    """Every pruned weight of ``model`` must hold the zeros the manifest records, and the manifest must list every
    weight its recipe prunes; raises :class:`ArtifactError` naming the modules and both counts."""
    config = manifest_config(manifest, Path(folder))
    expected = manifest["sparsity"]["modules"]
    problems = []
    names = [name for name, _ in model.named_parameters() if pruned_rule(name, config)]
    problems += [f"{name}: pruned by the recipe but not in the manifest" for name in names if name not in expected]
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
        if (zeros, numel) != (entry["zeros"], entry["numel"]):
            problems.append(f"{name}: {zeros} zeros of {numel} loaded ({weight.dtype}), manifest says "
                            f"{entry['zeros']} of {entry['numel']}")
    if problems:
        more = f"; and {len(problems) - 5} more" if len(problems) > 5 else ""
        raise ArtifactError(f"{folder}: the loaded weights disagree with {MANIFEST_NAME}: "
                            + "; ".join(problems[:5]) + more)
