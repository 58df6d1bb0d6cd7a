"""A GGUF model as a safetensors model folder (``attnprune-opt convert-gguf``).

transformers dequantizes a GGUF file as a whole on every load (its tokenizer too, slowly for large vocabularies),
and accelerate cannot offload a GGUF-loaded model to disk. A folder has neither limit, so a GGUF source is converted
once: loaded once (the dequantized model is held in memory once, 2 bytes per parameter in bfloat16), written in
shards, and each written tensor compared with the loaded one.
"""

from __future__ import annotations

from pathlib import Path

import torch
from safetensors import safe_open

from ..atomic import atomic_output_dir, check_output_dir
from ..errors import ArtifactError, ModelSourceError
from .loading import check_model_source, load_model, load_tokenizer, resolve_model

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def gguf_to_folder(gguf: str, out: str | Path, *, dtype: str = "bfloat16", max_shard_size: str = "2GB",
                   overwrite: bool = False) -> Path:
    """Write the model and tokenizer of a ``.gguf`` file (or the default model's) as a safetensors folder ``out``,
    atomically."""
    from ..export.save import plain_checkpoint, shard_bytes

    check_model_source(gguf)
    if not resolve_model(gguf).gguf_file:
        raise ModelSourceError(f"{gguf} is not a .gguf file")
    if dtype not in DTYPES:
        raise ModelSourceError(f"dtype {dtype!r} is not one of {', '.join(DTYPES)}")
    check_output_dir(out, overwrite)
    shard_bytes(max_shard_size)
    model = load_model(str(gguf), dtype=DTYPES[dtype])
    tokenizer = load_tokenizer(str(gguf))
    with atomic_output_dir(out, overwrite) as tmp:
        with plain_checkpoint(model):
            model.save_pretrained(tmp, max_shard_size=max_shard_size)
        tokenizer.save_pretrained(tmp)
        _check_saved(model, tmp)
    return Path(out)


def _check_saved(model: torch.nn.Module, folder: Path) -> None:
    """Every tensor of the state dict is in the folder, bit for bit (tied weights once)."""
    state = model.state_dict()
    found: set[str] = set()
    for file in sorted(folder.glob("*.safetensors")):
        with safe_open(str(file), "pt") as tensors:
            for name in tensors.keys():
                if name in state and not torch.equal(tensors.get_tensor(name), state[name]):
                    raise ArtifactError(f"{file.name}: {name} differs from the loaded model's")
                found.add(name)
    tied = {name for name in state if name not in found and _is_tied(model, name)}
    if missing := sorted(set(state) - found - tied):
        raise ArtifactError(f"{folder.name}: {missing[0]} (and {len(missing) - 1} more) were not written")


def _is_tied(model: torch.nn.Module, name: str) -> bool:
    return bool(getattr(model.config, "tie_word_embeddings", False)) and name == "lm_head.weight"
