"""The method's math, free of Hugging Face imports: attention, loss and gradient, solver, masks, baselines."""

from .attention import attention_matrix, causal_mask, relative_error, softmax_attention
from .attention_spec import AttentionSpec, RMSNormSpec
from .baselines import InputStatistics, magnitude_mask, sparsegpt, wanda_mask
from .masks import binarize, check_n_m, check_sparsity, n_m_mask, prune_count, topk_mask
from .objective import (
    FactoredAttentionObjective,
    FusedAttentionObjective,
    multihead_attention_probs,
    softmax_loss_and_logit_grad,
)
from .rope import apply_rotary, apply_rotary_transpose
from .solver import SolverConfig, SolverResult, solve

__all__ = [
    "AttentionSpec",
    "RMSNormSpec",
    "FactoredAttentionObjective",
    "FusedAttentionObjective",
    "InputStatistics",
    "SolverConfig",
    "SolverResult",
    "apply_rotary",
    "apply_rotary_transpose",
    "attention_matrix",
    "binarize",
    "causal_mask",
    "check_n_m",
    "check_sparsity",
    "magnitude_mask",
    "multihead_attention_probs",
    "n_m_mask",
    "prune_count",
    "relative_error",
    "softmax_attention",
    "softmax_loss_and_logit_grad",
    "solve",
    "sparsegpt",
    "topk_mask",
    "wanda_mask",
]
