"""SparseGPT (Frantar & Alistarh, 2023): OBS pruning with the input Hessian X^T X; the kept values are updated to
compensate for the pruned ones."""

from __future__ import annotations

from typing import TYPE_CHECKING

from pydantic import Field
from torch import Tensor

from ..core import InputStatistics, sparsegpt
from .base import MethodSettings, PruningMethod, register_method

if TYPE_CHECKING:
    from ..config import PrunerConfig, PruneRule


class SparseGPTSettings(MethodSettings):
    blocksize: int = Field(default=128, ge=1)
    percdamp: float = Field(default=0.01, gt=0.0, allow_inf_nan=False)


@register_method
class SparseGPT(PruningMethod):
    name = "sparsegpt"
    settings = SparseGPTSettings
    statistic = "hessian"

    def prune_matrix(self, weight: Tensor, rule: PruneRule, stats: InputStatistics | None,
                     config: PrunerConfig) -> Tensor:
        settings = config.sparsegpt
        updated, _ = sparsegpt(weight, stats.hessian, rule.sparsity, n_m=rule.n_m, blocksize=settings.blocksize,
                               percdamp=settings.percdamp)
        return updated
