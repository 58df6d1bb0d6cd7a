"""The method interface and registry: a recipe rule's ``method`` names an entry here.

A method says which roles it can prune, what it needs recorded from the layer's forward (input statistics of each
matrix, or the attention inputs of the layer), and its settings model: the recipe block of the same name, validated
by that model, in which a setting the chosen configuration never reads is an error (``unused``).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, ClassVar, Literal

from pydantic import BaseModel, ConfigDict
from torch import Tensor

from ..core import InputStatistics
from ..registry import Registry
from .. import methods as _package

if TYPE_CHECKING:
    from ..config import PrunerConfig, PruneRule


class MethodSettings(BaseModel):
    """A method's recipe block; unknown keys are errors, as everywhere in a recipe."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    def unused(self) -> dict[str, str]:
        """Settings this configuration never reads -> why, e.g. {"lam": "read only with mask 'descent'"}."""
        return {}

    def reads_settings_of(self) -> tuple[str, ...]:
        """Other methods whose blocks these settings make relevant (the attention method's SparseGPT pattern)."""
        return ()


class PruningMethod:
    """One pruning method. ``statistic`` is what a per-matrix method needs recorded of the matrix's input
    (``norms``: column norms; ``hessian``: X^T X; None: nothing); a ``joint`` method prunes its roles of a layer
    together from their captured inputs and is called once per layer."""

    name: ClassVar[str]
    settings: ClassVar[type[MethodSettings] | None] = None
    roles: ClassVar[tuple[str, ...] | None] = None
    statistic: ClassVar[Literal["norms", "hessian"] | None] = None
    joint: ClassVar[bool] = False

    def prune_matrix(self, weight: Tensor, rule: PruneRule, stats: InputStatistics | None,
                     config: PrunerConfig) -> Tensor:
        raise NotImplementedError(f"method {self.name!r} prunes its matrices jointly")


METHODS: Registry[PruningMethod] = Registry(_package, "method")


def register_method(cls: type[PruningMethod]) -> type[PruningMethod]:
    """Class decorator: register one instance of ``cls`` under ``cls.name``."""
    METHODS.register([cls.name])(cls())
    return cls


def method(name: str) -> PruningMethod:
    found = METHODS.get(name)
    if found is None:
        raise KeyError(f"unknown method {name!r}; known: {', '.join(METHODS.names())}")
    return found


def settings_blocks() -> dict[str, type[MethodSettings]]:
    """Method name -> settings model, for every method that has settings."""
    return {name: m.settings for name, m in METHODS.items() if m.settings is not None}
