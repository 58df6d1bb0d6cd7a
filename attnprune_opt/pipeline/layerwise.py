"""The layer loop: one decoder layer at a time, calibrate, prune, write back, and feed the next layer.

Per layer: (1) a forward of the dense layer records the inputs of every targeted linear (whole tensors for the
method's q/k, X^T X or column norms for the linear baselines); (2) q_proj/k_proj are solved with the method and
the other targets pruned with their rule's linear method; (3) the weights are written back, through the offload
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

from ..config import ATTENTION_MODULES, PrunerConfig, PruneRule
from ..errors import CalibrationDataError, ConfigError, NonFiniteWeightsError
from ..models.adapters import MODULE_PATHS, LlamaFamilyAdapter
from .capture import LayerInput, check_finite, record_linear_inputs, run_layer
from .methods import AttentionInputs, AttentionResult, prune_attention, prune_linear
from ..models.offload import onloaded, write_parameter


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


def check_config_fits(config: PrunerConfig, adapter: LlamaFamilyAdapter, seq_len: int) -> None:
    """Problems that need the model's shapes, found before any calibration work."""
    indices = target_layers(config, len(adapter.layers))
    layer = adapter.layers[indices[0]]
    for rule in config.rules:
        if rule.n_m is None:
            continue
        for module in rule.modules:
            in_features = adapter.linear(layer, module).in_features
            if in_features % rule.n_m[1]:
                raise ConfigError(f"structure {rule.structure} does not divide the input size {in_features} of "
                                  f"{module}")
    if config.rule_for("q_proj") or config.rule_for("k_proj"):
        for index in indices:
            window = adapter.sliding_window(index)
            if window is not None and seq_len > window:
                raise ConfigError(f"layer {index} uses sliding-window attention ({window} tokens); calibration "
                                  f"sequences must not be longer (seq_len={seq_len})")


def prune_layers(
    adapter: LlamaFamilyAdapter,
    inputs: list[LayerInput],
    config: PrunerConfig,
    progress: bool = True,
    on_layer: Callable[[LayerReport], None] | None = None,
) -> list[LayerReport]:
    """Prune the configured layers in order; returns one report per pruned layer."""
    if not inputs:
        raise CalibrationDataError("no calibration sequences reached the first decoder layer")
    indices = target_layers(config, len(adapter.layers))
    reports = []
    bar = tqdm(range(indices[-1] + 1), desc="pruning layers", unit="layer", disable=not progress)
    for index in bar:
        layer = adapter.layers[index]
        if index not in indices:
            inputs = run_layer(layer, inputs)
            continue
        report, dense_outputs = _prune_layer(adapter, index, layer, inputs, config)
        inputs = dense_outputs if config.propagate == "dense" else run_layer(layer, inputs)
        report.peak_rss_mb = peak_rss_mb()
        reports.append(report)
        if report.attention is not None:
            bar.set_postfix(attn_err=f"{report.attention.error_final:.4f}")
        if on_layer is not None:
            on_layer(report)
    return reports


def _prune_layer(adapter: LlamaFamilyAdapter, index: int, layer: nn.Module, inputs: list[LayerInput],
                 config: PrunerConfig) -> tuple[LayerReport, list[LayerInput]]:
    start = time.perf_counter()
    rules = {module: rule for module in MODULE_PATHS if (rule := config.rule_for(module)) is not None}
    attention_rules = {m: r for m, r in rules.items() if r.method == "attention"}
    linears = {module: adapter.linear(layer, module) for module in MODULE_PATHS}
    for module in rules:
        _check_weight_finite(linears[module], adapter.module_name(index, module))

    keep = ["q_proj"] if attention_rules else []
    hessian = [m for m, r in rules.items() if r.method == "sparsegpt"]
    norms = [m for m, r in rules.items() if r.method == "wanda"]
    with record_linear_inputs(linears, keep=keep, hessian=hessian, norms=norms) as recorded:
        dense_outputs = run_layer(layer, inputs)
    if not check_finite([o.hidden for o in dense_outputs]):
        raise NonFiniteWeightsError(f"layer {index} produced NaN or infinite activations on the calibration data")

    report = LayerReport(index)
    if attention_rules:
        result = _prune_attention_modules(adapter, index, layer, linears, recorded.tensors["q_proj"], inputs,
                                          attention_rules, config)
        report.attention = AttentionReport(result.error_mask, result.error_final, result.descent_iterations,
                                           result.refit_kept, result.seconds)
        for module, weight in result.weights.items():
            write_parameter(linears[module], "weight", weight)
    for module, rule in rules.items():
        if rule.method != "attention":
            with onloaded(linears[module]):
                weight = prune_linear(linears[module].weight, rule, recorded.stats.get(module), config.sparsegpt)
            write_parameter(linears[module], "weight", weight)
    for module, rule in rules.items():
        report.modules[module] = _measure(linears[module], rule)
    report.seconds = time.perf_counter() - start
    return report, dense_outputs


def layer_seed(seed: int, index: int) -> int:
    """Each layer's own stream of random draws, fixed by the run's seed."""
    return seed * 100_003 + index


def _prune_attention_modules(adapter: LlamaFamilyAdapter, index: int, layer: nn.Module,
                             linears: dict[str, nn.Linear], xs: list[torch.Tensor], inputs: list[LayerInput],
                             rules: dict[str, PruneRule], config: PrunerConfig) -> AttentionResult:
    if not check_finite(xs):
        raise NonFiniteWeightsError("attention inputs contain NaN or infinity")
    longest = max(range(len(inputs)), key=lambda i: inputs[i].hidden.shape[1])
    cos, sin = adapter.rope_tables(inputs[longest].kwargs)
    weights, biases = {}, {}
    for module in ATTENTION_MODULES:
        with onloaded(linears[module]):
            weights[module] = linears[module].weight.detach().clone()
            bias = linears[module].bias
            biases[module] = None if bias is None else bias.detach().clone()
    return prune_attention(weights, biases, AttentionInputs(xs, cos, sin), adapter.geometry(layer), rules,
                           config.attention, config.sparsegpt, seed=layer_seed(config.seed, index))


def _check_weight_finite(linear: nn.Linear, name: str) -> None:
    with onloaded(linear):
        if not torch.isfinite(linear.weight).all():
            raise NonFiniteWeightsError(f"{name}.weight contains NaN or infinity")


def _measure(linear: nn.Linear, rule: PruneRule) -> ModuleReport:
    with onloaded(linear):
        zeros = int((linear.weight == 0).sum())
        numel = linear.weight.numel()
    return ModuleReport(rule.method, rule.structure, float(rule.sparsity), zeros / numel, zeros, numel)
