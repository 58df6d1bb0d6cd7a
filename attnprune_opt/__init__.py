"""attnprune_opt: prune attention weights by optimising the softmax attention matrix.

``AttentionPruner`` and ``load_pruned_model`` are imported on first use, so ``import attnprune_opt.core`` stays
free of transformers and accelerate.
"""

from typing import Any

from .export import register

__version__ = "0.1.0"
__all__ = ["AttentionPruner", "load_pruned_model", "__version__"]

# Lets plain `AutoModelForCausalLM.from_pretrained` load our compressed folders; defers importing transformers.
register()


def __getattr__(name: str) -> Any:
    if name == "AttentionPruner":
        from .pruner import AttentionPruner

        return AttentionPruner
    if name == "load_pruned_model":
        from .export.load import load_pruned_model

        return load_pruned_model
    raise AttributeError(f"module 'attnprune_opt' has no attribute {name!r}")
