"""Wanda (Sun et al., 2023): keep the largest |W_ij| * ||X_j|| per output row; the kept values are unchanged."""

from __future__ import annotations

from typing import TYPE_CHECKING

from torch import Tensor

from ..core import InputStatistics, wanda_mask
from .base import PruningMethod, register_method
from .magnitude import apply_mask

if TYPE_CHECKING:
    from ..config import PrunerConfig, PruneRule


@register_method
class Wanda(PruningMethod):
    name = "wanda"
    statistic = "norms"

    def prune_matrix(self, weight: Tensor, rule: PruneRule, stats: InputStatistics | None,
                     config: PrunerConfig) -> Tensor:
        return apply_mask(weight, wanda_mask(weight.float(), stats.column_norms, rule.sparsity, n_m=rule.n_m))
