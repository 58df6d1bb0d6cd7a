"""Magnitude pruning: keep the largest |W| (per output row, or per group of M inputs for N:M)."""

from __future__ import annotations

from typing import TYPE_CHECKING

from torch import Tensor

from ..core import InputStatistics, magnitude_mask
from .base import PruningMethod, register_method

if TYPE_CHECKING:
    from ..config import PrunerConfig, PruneRule


def apply_mask(weight: Tensor, keep: Tensor) -> Tensor:
    """Pruned entries set to +0.0 (multiplying by the mask would leave -0.0 for negative weights, which a
    sparse format storing "non-zeros" would then keep or lose inconsistently)."""
    return weight.masked_fill(~keep, 0.0)


@register_method
class Magnitude(PruningMethod):
    name = "magnitude"

    def prune_matrix(self, weight: Tensor, rule: PruneRule, stats: InputStatistics | None,
                     config: PrunerConfig) -> Tensor:
        return apply_mask(weight, magnitude_mask(weight, rule.sparsity, n_m=rule.n_m))
