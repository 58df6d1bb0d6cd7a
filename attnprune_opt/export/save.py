"""Saving a pruned model: safetensors that plain ``AutoModelForCausalLM.from_pretrained`` loads, the tokenizer,
the recipe, and a manifest of what was measured; written into a temporary folder renamed into place at the end.
"""

from __future__ import annotations

import json
import platform
from collections.abc import Iterator
from contextlib import contextmanager
from importlib import metadata
from pathlib import Path
from typing import Any

from safetensors import safe_open
from torch import nn

from ..atomic import atomic_output_dir
from ..config import PrunerConfig
from ..errors import ConfigError, UnsupportedArchitectureError
from ..models.adapters import MODULE_PATHS

MANIFEST_NAME = "attnprune_manifest.json"
RECIPE_NAME = "recipe.yaml"
FORMATS = ("dense",)
_VERSIONED = ("attnprune-opt", "torch", "transformers", "accelerate", "safetensors", "gguf")


def save_pruned(model: nn.Module, out_dir: str | Path, *, config: PrunerConfig, report=None, tokenizer=None,
                overwrite: bool = False, format: str = "dense", max_shard_size: str | int = "2GB") -> Path:
    if format not in FORMATS:
        raise ConfigError(f"unknown save format {format!r}; expected one of {', '.join(FORMATS)}")
    out_dir = Path(out_dir)
    with atomic_output_dir(out_dir, overwrite) as tmp:
        with plain_checkpoint(model):
            model.save_pretrained(tmp, max_shard_size=max_shard_size)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        (tmp / RECIPE_NAME).write_text(config.to_yaml())
        manifest = build_manifest(tmp, config, report, format)
        (tmp / MANIFEST_NAME).write_text(json.dumps(manifest, indent=2))
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


def measured_sparsity(folder: Path, config: PrunerConfig) -> dict[str, dict[str, Any]]:
    """Zeros per pruned weight, read back from the written safetensors files (what is on disk is what counts)."""
    suffixes = {f".{path}.weight": module for module, path in MODULE_PATHS.items() if config.rule_for(module)}
    result = {}
    for file in sorted(folder.glob("*.safetensors")):
        with safe_open(file, framework="pt") as f:
            for name in f.keys():
                module = next((m for s, m in suffixes.items() if name.endswith(s)), None)
                if module is None or not _in_layers(name, config):
                    continue
                tensor = f.get_tensor(name)
                zeros = int((tensor == 0).sum())
                rule = config.rule_for(module)
                result[name] = {"method": rule.method, "structure": rule.structure,
                                "target_sparsity": rule.sparsity, "zeros": zeros, "numel": tensor.numel(),
                                "sparsity": zeros / tensor.numel(), "file": file.name}
    return dict(sorted(result.items()))


def _in_layers(name: str, config: PrunerConfig) -> bool:
    if config.layers is None:
        return True
    parts = name.split(".")
    index = parts.index("layers") + 1 if "layers" in parts else None
    return index is not None and int(parts[index]) in config.layers


def build_manifest(folder: Path, config: PrunerConfig, report, format: str) -> dict[str, Any]:
    sparsity = measured_sparsity(folder, config)
    zeros = sum(m["zeros"] for m in sparsity.values())
    numel = sum(m["numel"] for m in sparsity.values())
    return {
        "format": format,
        "config": config.to_dict(),
        "seed": config.seed,
        "versions": {**{name: _version(name) for name in _VERSIONED}, "python": platform.python_version()},
        "calibration": report.calibration if report is not None else None,
        "model": report.model if report is not None else None,
        "sparsity": {"pruned_weights": numel and zeros / numel, "zeros": zeros, "numel": numel,
                     "modules": sparsity},
        "size_on_disk_bytes": sum(f.stat().st_size for f in folder.glob("*.safetensors")),
        "report": report.to_dict() if report is not None else None,
    }


def _version(package: str) -> str | None:
    try:
        return metadata.version(package)
    except metadata.PackageNotFoundError:
        return None
