"""The layer loop: one decoder layer at a time, calibrate, prune, write back, and feed the next layer.

Per layer: (1) a forward of the dense layer records the inputs of every targeted matrix (whole tensors for the
method's q/k, X^T X or column norms for the linear baselines); (2) q_proj/k_proj are solved with the method and
the other targets pruned with their rule's linear method (the layer's adapter says where each matrix lives); (3) the weights are written back, through the offload
index when the layer is offloaded; (4) the pruned layer's outputs become the next layer's inputs
(``propagate="pruned"``, as SparseGPT and Wanda do) or the dense outputs of step 1 do (``"dense"``).
"""

from __future__ import annotations

import resource
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from torch import nn
from tqdm.auto import tqdm

from ..config import PrunerConfig, PruneRule
from ..core.objective import SequenceCatalog
from ..distributed import SINGLE, World
from ..errors import CalibrationDataError, ConfigError, NonFiniteWeightsError
from ..models.base import DecoderAdapter, read_matrix
from ..methods.base import LayerContext, method
from .capture import LayerInput, check_finite, record_linear_inputs, run_layer


@dataclass
class ModuleReport:
    method: str
    structure: str
    target_sparsity: float
    sparsity: float
    zeros: int
    numel: int


@dataclass
class AttentionReport:
    """Relative attention errors on calibration inputs: the chosen pattern with the original weights, and the final
    weights after refitting."""

    error_mask: float
    error_final: float
    descent_iterations: int
    refit_kept: bool
    seconds: float


@dataclass
class LayerReport:
    index: int
    modules: dict[str, ModuleReport] = field(default_factory=dict)
    attention: AttentionReport | None = None
    refit_errors: dict[str, float] = field(default_factory=dict)  # sub-block errors before/after a layer refit
    seconds: float = 0.0
    peak_rss_mb: float = 0.0

    def to_dict(self) -> dict:
        return asdict(self)


def peak_rss_mb(status: Path = Path("/proc/self/status")) -> float:
    """Peak resident memory of this process so far, in MB.

    Linux's ``VmHWM`` belongs to the current address space. ``getrusage``'s ``ru_maxrss`` survives ``exec``, so a
    process started by a large parent (a benchmark holding a model) would report the parent's peak as its own; it
    is only the fallback where ``/proc`` is missing (it counts kilobytes on Linux, bytes on macOS).
    """
    try:
        for line in status.read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    maxrss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return maxrss / 1024 / (1024 if sys.platform == "darwin" else 1)


def target_layers(config: PrunerConfig, num_layers: int) -> list[int]:
    indices = list(range(num_layers)) if config.layers is None else sorted(set(config.layers))
    bad = [i for i in indices if not 0 <= i < num_layers]
    if bad:
        raise ConfigError(f"layers {bad} do not exist; the model has {num_layers} decoder layers")
    return indices


def check_config_fits(config: PrunerConfig, adapter: DecoderAdapter, model: nn.Module) -> None:
    """Problems that need the model's shapes, found before any calibration work."""
    layers = adapter.layers(model)
    indices = target_layers(config, len(layers))
    roles = adapter.roles()
    for i, rule in enumerate(config.rules):
        missing = [module for module in rule.modules if module not in roles]
        if missing:
            raise ConfigError(f"rules.{i}.modules: {', '.join(missing)} not in {adapter.config.model_type} layers, "
                              f"whose prunable matrices are {', '.join(roles)}")
    for rule in config.rules:
        if rule.n_m is None:
            continue
        for module in rule.modules:
            in_features = read_matrix(layers[indices[0]], adapter.prunable(indices[0], module)).shape[1]
            if in_features % rule.n_m[1]:
                raise ConfigError(f"structure {rule.structure} does not divide the input size {in_features} of "
                                  f"{module}")


def prune_layers(
    adapter: DecoderAdapter,
    model: nn.Module,
    inputs: list[LayerInput],
    config: PrunerConfig,
    progress: bool = True,
    on_layer: Callable[[LayerReport], None] | None = None,
    world: World = SINGLE,
    catalog: SequenceCatalog | None = None,
) -> list[LayerReport]:
    """Prune the configured layers in order; returns one report per pruned layer. Under torchrun ``inputs`` are this
    rank's calibration sequences, ``world`` sums over ranks and ``catalog`` places them among all ranks' sequences
    (attnprune_opt/distributed.py)."""
    if not inputs:
        raise CalibrationDataError("no calibration sequences reached the first decoder layer")
    layers = adapter.layers(model)
    indices = target_layers(config, len(layers))
    reports = []
    bar = tqdm(range(indices[-1] + 1), desc="pruning layers", unit="layer", disable=not progress)
    for index in bar:
        layer = layers[index]
        if index not in indices:
            inputs = run_layer(layer, inputs)
            continue
        report, dense_outputs = _prune_layer(adapter, index, layer, inputs, config, world, catalog)
        inputs = dense_outputs if config.propagate == "dense" else run_layer(layer, inputs)
        report.peak_rss_mb = peak_rss_mb()
        reports.append(report)
        if report.attention is not None:
            bar.set_postfix(attn_err=f"{report.attention.error_final:.4f}")
        if on_layer is not None:
            on_layer(report)
    return reports


def _prune_layer(adapter: DecoderAdapter, index: int, layer: nn.Module, inputs: list[LayerInput],
                 config: PrunerConfig, world: World,
                 catalog: SequenceCatalog | None) -> tuple[LayerReport, list[LayerInput]]:
    start = time.perf_counter()
    prunables = {p.role: p for p in adapter.prunables(index)}
    rules = {role: rule for role in prunables if (rule := config.rule_for(role)) is not None}
    for role in rules:
        matrix = read_matrix(layer, prunables[role])
        if not torch.isfinite(matrix).all():
            raise NonFiniteWeightsError(f"{adapter.layer_prefix(index)}.{prunables[role].label} contains NaN or "
                                        "infinity")
    joint: dict[str, dict[str, PruneRule]] = {}  # joint method -> its roles' rules, in rule order
    for role, rule in rules.items():
        if method(rule.method).joint:
            joint.setdefault(rule.method, {})[role] = rule

    def inputs_of(roles) -> list[str]:
        return list(dict.fromkeys(prunables[role].module for role in roles))

    captures = list(dict.fromkeys(role for name, roles in joint.items() for role in method(name).captures(roles)))
    modules = {p.module: layer.get_submodule(p.module) for p in prunables.values()}
    hessian = inputs_of([m for m, r in rules.items() if method(r.method).statistic == "hessian"])
    norms = inputs_of([m for m, r in rules.items() if method(r.method).statistic == "norms"])
    with record_linear_inputs(modules, keep=inputs_of(captures), hessian=hessian, norms=norms) as recorded:
        dense_outputs = run_layer(layer, inputs)
    if not check_finite([o.hidden for o in dense_outputs]):
        raise NonFiniteWeightsError(f"layer {index} produced NaN or infinite activations on the calibration data")
    for stats in recorded.stats.values():
        for tensor in (stats.hessian, stats.squared_norms):
            if tensor is not None:
                world.sum(tensor)

    report = LayerReport(index)
    context = LayerContext(adapter, index, layer, inputs, config, world, catalog, layer_seed(config.seed, index),
                           {role: recorded.tensors[prunables[role].module] for role in captures})
    for name, joint_rules in joint.items():
        result = method(name).prune_layer(context, joint_rules)
        # every rank computed these from the same sums; rank 0's are kept
        context.write({role: world.broadcast(weight.contiguous()) for role, weight in result.weights.items()})
        if result.attention is not None:
            attention = result.attention
            report.attention = AttentionReport(attention.error_mask, attention.error_final,
                                               attention.descent_iterations, attention.refit_kept,
                                               attention.seconds)
        report.refit_errors.update(result.errors)
    pruned: dict[str, torch.Tensor] = {}
    for i, (role, rule) in enumerate((r, rule) for r, rule in rules.items() if not method(rule.method).joint):
        weight = read_matrix(layer, prunables[role])
        owner = i % world.size  # the matrices are shared out between ranks
        if world.rank == owner:
            stats = recorded.stats.get(prunables[role].module)
            weight = method(rule.method).prune_matrix(weight, rule, stats, config).to(weight.dtype)
        pruned[role] = world.broadcast(weight.contiguous(), owner)
    context.write(pruned)
    for role, rule in rules.items():
        report.modules[role] = _measure(read_matrix(layer, prunables[role]), rule)
    report.seconds = time.perf_counter() - start
    return report, dense_outputs


def layer_seed(seed: int, index: int) -> int:
    """Each layer's own stream of random draws, fixed by the run's seed."""
    return seed * 100_003 + index


def _measure(weight: torch.Tensor, rule: PruneRule) -> ModuleReport:
    zeros = int((weight == 0).sum())
    return ModuleReport(rule.method, rule.structure, float(rule.sparsity), zeros / weight.numel(), zeros,
                        weight.numel())
