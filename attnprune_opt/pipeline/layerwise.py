"""The layer loop: one decoder layer at a time, calibrate, prune, write back, and feed the next layer.

Per layer: (1) a forward of the dense layer records the inputs of every targeted matrix (whole tensors for the
method's q/k, X^T X or column norms for the linear baselines; the adapter picks each matrix's input, e.g. the
tokens routed to one expert); (2) q_proj/k_proj are solved with the method and
the other targets pruned with their rule's linear method (the layer's adapter says where each matrix lives); (3) the weights are written back, through the offload
index when the layer is offloaded; (4) the pruned layer's outputs become the next layer's inputs
(``propagate="pruned"``, as SparseGPT and Wanda do) or the dense outputs of step 1 do (``"dense"``).
"""

from __future__ import annotations

import logging
import resource
import sys
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import torch
from torch import nn
from tqdm.auto import tqdm

from ..config import PrunerConfig, PruneRule
from ..core.objective import SequenceCatalog
from ..distributed import SINGLE, World
from ..errors import CalibrationDataError, ConfigError, NonFiniteWeightsError
from ..methods.base import LayerContext, method
from ..models.base import DecoderAdapter, Prunable, read_matrix, write_matrices
from .capture import LayerInput, check_finite, record_matrix_inputs, run_layer

logger = logging.getLogger(__name__)


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
    uncalibrated: list[str] = field(default_factory=list)  # matrices no calibration token reached: magnitude
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
    for name in dict.fromkeys(rule.method for rule in config.rules):
        method(name).check_fits(adapter, config)
    for i, rule in enumerate(config.rules):
        if not method(rule.method).joint:
            continue
        needs = {*rule.modules, *method(rule.method).captures(dict.fromkeys(rule.modules, rule))}
        for index in indices:  # a joint method sees one matrix per role; experts are several
            counts = Counter(p.role for p in adapter.prunables(index) if p.role in needs)
            if several := sorted(role for role, n in counts.items() if n > 1):
                raise ConfigError(f"rules.{i}.method: {rule.method!r} takes one matrix per role, but layer {index} "
                                  f"of this {adapter.config.model_type} model has several {', '.join(several)} "
                                  "(one per expert); prune them with a per-matrix method")
    for rule in config.rules:
        if rule.n_m is None:
            continue
        for index in indices:  # layers may differ (a dense MLP among expert MLPs of another width)
            for p in adapter.prunables(index):
                # The shape only: an offloaded parameter is on the meta device.
                in_features = getattr(layers[index].get_submodule(p.module), p.parameter).shape[-1]
                if p.role in rule.modules and in_features % rule.n_m[1]:
                    raise ConfigError(f"structure {rule.structure} does not divide the input size {in_features} "
                                      f"of {adapter.layer_prefix(index)}.{p.label}")


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
    targets = {p: rule for p in adapter.prunables(index) if (rule := config.rule_for(p.role)) is not None}
    for prunable in targets:
        if not torch.isfinite(read_matrix(layer, prunable)).all():
            raise NonFiniteWeightsError(f"{adapter.layer_prefix(index)}.{prunable.label} contains NaN or infinity")
    joint: dict[str, dict[str, PruneRule]] = {}  # joint method -> its roles' rules, in rule order
    for prunable, rule in targets.items():
        if method(rule.method).joint:
            joint.setdefault(rule.method, {})[prunable.role] = rule

    def inputs_of(prunables: list[Prunable]) -> list[str]:
        return list(dict.fromkeys(adapter.input_key(p) for p in prunables))

    captured = dict.fromkeys(role for name, roles in joint.items() for role in method(name).captures(roles))
    captures = {role: adapter.input_key(adapter.prunable(index, role)) for role in captured}
    hessian = inputs_of([p for p, r in targets.items() if method(r.method).statistic == "hessian"])
    norms = inputs_of([p for p, r in targets.items() if method(r.method).statistic == "norms"])
    with record_matrix_inputs(adapter, index, layer, keep=list(dict.fromkeys(captures.values())), hessian=hessian,
                              norms=norms) as recorded:
        dense_outputs = run_layer(layer, inputs)
    if not check_finite([o.hidden for o in dense_outputs]):
        raise NonFiniteWeightsError(f"layer {index} produced NaN or infinite activations on the calibration data")
    for stats in recorded.stats.values():
        for tensor in (stats.hessian, stats.squared_norms):
            if tensor is not None:
                world.sum(tensor)
        stats.tokens = int(world.total(stats.tokens))

    report = LayerReport(index)
    context = LayerContext(adapter, index, layer, inputs, config, world, catalog, layer_seed(config.seed, index),
                           {role: recorded.tensors[key] for role, key in captures.items()})
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
    pruned: dict[Prunable, torch.Tensor] = {}
    linear = [(p, rule) for p, rule in targets.items() if not method(rule.method).joint]
    for i, (prunable, rule) in enumerate(linear):
        weight = read_matrix(layer, prunable)
        chosen = method(rule.method)
        stats = recorded.stats.get(adapter.input_key(prunable))
        if stats is not None and stats.tokens == 0:
            # Only a routed input (a mixture-of-experts expert) can miss every calibration token.
            logger.warning("%s.%s received no calibration token; pruned by magnitude",
                           adapter.layer_prefix(index), prunable.label)
            report.uncalibrated.append(prunable.label)
            chosen = method("magnitude")
        owner = i % world.size  # the matrices are shared out between ranks
        if world.rank == owner:
            weight = chosen.prune_matrix(weight, rule, stats, config).to(weight.dtype)
        pruned[prunable] = world.broadcast(weight.contiguous(), owner)
    write_matrices(layer, pruned)
    for prunable, rule in targets.items():
        measured = _measure(read_matrix(layer, prunable), rule)
        report.modules[prunable.role] = _combine(report.modules.get(prunable.role), measured)
    report.seconds = time.perf_counter() - start
    return report, dense_outputs


def layer_seed(seed: int, index: int) -> int:
    """Each layer's own stream of random draws, fixed by the run's seed."""
    return seed * 100_003 + index


def _measure(weight: torch.Tensor, rule: PruneRule) -> ModuleReport:
    zeros = int((weight == 0).sum())
    return ModuleReport(rule.method, rule.structure, float(rule.sparsity), zeros / weight.numel(), zeros,
                        weight.numel())


def _combine(total: ModuleReport | None, part: ModuleReport) -> ModuleReport:
    """One role's figures over all its matrices in a layer (one per expert in mixture-of-experts MLPs)."""
    if total is None:
        return part
    zeros, numel = total.zeros + part.zeros, total.numel + part.numel
    return replace(total, sparsity=zeros / numel, zeros=zeros, numel=numel)
