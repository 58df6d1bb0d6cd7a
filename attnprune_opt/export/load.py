"""Loading a pruned model folder onto any device map, checking it against its manifest."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from ..errors import ArtifactError
from .save import MANIFEST_NAME


def read_manifest(folder: str | Path) -> dict[str, Any]:
    path = Path(folder) / MANIFEST_NAME
    if not path.is_file():
        raise ArtifactError(f"{folder} has no {MANIFEST_NAME}: it was not written by attnprune_opt")
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise ArtifactError(f"{path} is not valid JSON: {exc}") from None


def load_pruned_model(folder: str | Path, device_map: str | dict | None = None, **kwargs: Any):
    """``AutoModelForCausalLM.from_pretrained`` on a pruned folder (safetensors only, no remote code unless asked)."""
    from transformers import AutoModelForCausalLM

    read_manifest(folder)
    kwargs.setdefault("use_safetensors", True)
    kwargs.setdefault("trust_remote_code", False)
    return AutoModelForCausalLM.from_pretrained(folder, device_map=device_map, **kwargs)
