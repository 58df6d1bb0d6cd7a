"""The method interface and registry: a recipe rule's ``method`` names an entry here.

A method says which roles it can prune, what it needs recorded from the layer's forward (input statistics of each
matrix, or the attention inputs of the layer), and its settings model: the recipe block of the same name, validated
by that model, in which a setting the chosen configuration never reads is an error (``unused``).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, ClassVar, Literal

from pydantic import BaseModel, ConfigDict
from torch import Tensor, nn

from .. import methods as _package
from ..core import AttentionSpec, InputStatistics
from ..core.objective import SequenceCatalog
from ..distributed import World
from ..models.base import DecoderAdapter, read_matrix, write_matrices
from ..pipeline.capture import LayerInput, record_linear_inputs, run_layer
from ..registry import Registry

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


@dataclass
class LayerContext:
    """What a joint method sees of one decoder layer: its matrices (read and written through the adapter), the
    layer's inputs on this rank, and the inputs of the modules its ``captures`` name, recorded in the forward pass
    of the still-dense layer."""

    adapter: DecoderAdapter
    index: int
    layer: nn.Module
    inputs: list[LayerInput]
    config: PrunerConfig
    world: World
    catalog: SequenceCatalog | None
    seed: int
    recorded: dict[str, list[Tensor]] = field(default_factory=dict)

    def matrix(self, role: str) -> Tensor:
        return read_matrix(self.layer, self.adapter.prunable(self.index, role))

    def write(self, weights: dict[str, Tensor]) -> None:
        write_matrices(self.layer, {self.adapter.prunable(self.index, role): w for role, w in weights.items()})

    def attention_spec(self) -> AttentionSpec:
        """The layer's attention spec, with RoPE tables for this rank's longest sequence."""
        longest = max(self.inputs, key=lambda item: item.hidden.shape[1])
        return self.adapter.attention_spec(self.layer, self.index, longest.kwargs)

    def record(self, roles: tuple[str, ...]) -> dict[str, list[Tensor]]:
        """Run the layer as it now is and return the inputs of these roles' modules."""
        paths = {role: self.adapter.prunable(self.index, role).module for role in roles}
        modules = {path: self.layer.get_submodule(path) for path in paths.values()}
        with record_linear_inputs(modules, keep=list(dict.fromkeys(paths.values()))) as recorded:
            run_layer(self.layer, self.inputs)
        return {role: recorded.tensors[path] for role, path in paths.items()}


@dataclass
class JointResult:
    """A joint method's pruned matrices by role, its attention figures if it fitted q/k, and the relative errors
    of the sub-blocks it refitted (``{"vo_before": ..., "vo_after": ...}``)."""

    weights: dict[str, Tensor]
    attention: Any = None
    errors: dict[str, float] = field(default_factory=dict)


class PruningMethod:
    """One pruning method. ``statistic`` is what a per-matrix method needs recorded of the matrix's input
    (``norms``: column norms; ``hessian``: X^T X; None: nothing); a ``joint`` method prunes its roles of a layer
    together (:meth:`prune_layer`), once per layer, from the inputs of the roles it :meth:`captures`."""

    name: ClassVar[str]
    settings: ClassVar[type[MethodSettings] | None] = None
    roles: ClassVar[tuple[str, ...] | None] = None
    statistic: ClassVar[Literal["norms", "hessian"] | None] = None
    joint: ClassVar[bool] = False

    def prune_matrix(self, weight: Tensor, rule: PruneRule, stats: InputStatistics | None,
                     config: PrunerConfig) -> Tensor:
        raise NotImplementedError(f"method {self.name!r} prunes its matrices jointly")

    def captures(self, rules: dict[str, PruneRule]) -> tuple[str, ...]:
        """The roles whose inputs a joint method needs from the dense forward pass, given its rules' roles."""
        return ()

    def check_fits(self, adapter: DecoderAdapter, config: PrunerConfig) -> None:
        """Refuses (ConfigError) settings this model family cannot honour, before any calibration work."""

    def prune_layer(self, context: LayerContext, rules: dict[str, PruneRule]) -> JointResult:
        raise NotImplementedError(f"method {self.name!r} prunes one matrix at a time")


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
