"""``--model attnprune`` for lm-eval: a folder this package wrote, loaded by :func:`load_pruned_model`, so its
files and sparsity are checked against its manifest before anything is scored (``--model hf`` loads the same
weights unchecked). Registered when ``attnprune-opt lm-eval`` starts lm-eval."""

from __future__ import annotations

from typing import Any

from lm_eval.api.registry import register_model
from lm_eval.models.huggingface import HFLM

from attnprune_opt.export.load import load_pruned_model
from attnprune_opt.models.loading import load_tokenizer

MODEL_NAME = "attnprune"


@register_model(MODEL_NAME)
class AttnPruneLM(HFLM):
    """lm-eval's Hugging Face model around a checked pruned folder; other ``model_args`` are HFLM's."""

    def __init__(self, pretrained: str, dtype: str = "auto", trust_remote_code: bool = False, tokenizer: Any = None,
                 **kwargs: Any) -> None:
        model = load_pruned_model(pretrained, dtype=dtype, trust_remote_code=bool(trust_remote_code))
        super().__init__(pretrained=model, tokenizer=tokenizer or load_tokenizer(pretrained), **kwargs)
