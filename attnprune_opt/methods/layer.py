"""The whole-layer method: every linear of a decoder layer gets an activation-aware pattern, then the kept values
are refitted so that the pruned layer reproduces the dense layer's non-linear sub-block outputs
(docs/method.md section 8c): q/k to the attention probabilities (the paper's objective, optional), v/o to the
attention sub-block's output under the pruned attention, gate/up/down to the MLP's output on the inputs the pruned
attention gives. Targets are the dense layer's sub-block outputs on the pruned model's layer inputs.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Literal

from pydantic import Field
from torch import Tensor

from ..core import InputStatistics, multihead_attention_probs, sparsegpt, wanda_mask
from ..core.layer_objective import AttentionOutputObjective, MLPObjective, RefitResult, refit_kept_weights
from ..core.solver import AdamConfig
from ..errors import ConfigError
from .attention import SOLVE_DTYPE, AttentionInputs, AttentionSettings, batches_by_length, prune_attention
from .base import JointResult, LayerContext, MethodSettings, PruningMethod, register_method
from .magnitude import apply_mask

if TYPE_CHECKING:
    from ..config import PrunerConfig, PruneRule
    from ..models.base import DecoderAdapter


class LayerSettings(MethodSettings):
    """``pattern``: Wanda's score, or SparseGPT's pattern with its updated weights as the refit's start;
    ``refit_qk``: also fit q/k to the attention probabilities (the attention method's refit at its learning rate,
    ``refit_qk_iterations`` Adam steps sampled by the fractions below);
    the ``refit_*`` settings drive Adam on the v/o and MLP sub-blocks (steps sampled like the q/k refit's), and a
    refit is kept only if it lowers the sub-block's error on a fixed ``check_fraction`` of the tokens;
    ``solve_iterations`` > 0 then solves o_proj and down_proj (each sub-block's output is linear in it) by masked
    least squares on every calibration token, at most that many conjugate-gradient steps, kept on the same test,
    damped toward the Adam refit's weights by ``solve_percdamp`` x mean diag of the features' Gram matrix (strong at
    8 calibration sequences, where the undamped fit over-fits; docs/method.md section 8c).
    ``targets``: ``sub_block`` fits each sub-block to the dense sub-block's output on the inputs the pruned model
    gives it; ``layer`` also asks the MLP to make up what the fitted attention sub-block still misses, so the two
    aim at the dense layer's output on the layer's (pruned-model) inputs (pre-norm families only)."""

    pattern: Literal["wanda", "sparsegpt"] = "wanda"
    refit_qk: bool = False
    refit_qk_iterations: int = Field(default=100, ge=1)
    refit_iterations: int = Field(default=40, ge=0)
    refit_lr: float = Field(default=0.01, gt=0.0, allow_inf_nan=False)
    refit_row_fraction: float = Field(default=0.125, gt=0.0, le=1.0, allow_inf_nan=False)
    refit_sequence_fraction: float = Field(default=0.5, gt=0.0, le=1.0, allow_inf_nan=False)
    check_fraction: float = Field(default=0.25, gt=0.0, le=1.0, allow_inf_nan=False)
    solve_iterations: int = Field(default=0, ge=0)
    solve_percdamp: float = Field(default=0.01, ge=0.0, allow_inf_nan=False)
    targets: Literal["sub_block", "layer"] = "sub_block"

    def unused(self) -> dict[str, str]:
        unused = {} if self.refit_qk else {"refit_qk_iterations": "read only when refit_qk is true"}
        if not self.refit_iterations:
            unused.update(dict.fromkeys(("refit_lr", "check_fraction", "solve_iterations", "solve_percdamp", "targets"),
                                        "read only when refit_iterations > 0"))
            if not self.refit_qk:  # the q/k refit samples by these too
                unused.update(dict.fromkeys(("refit_row_fraction", "refit_sequence_fraction"),
                                            "read only when refit_iterations > 0 or refit_qk is true"))
        elif not self.solve_iterations:
            unused["solve_percdamp"] = "read only when solve_iterations > 0"
        return unused

    def reads_settings_of(self) -> tuple[str, ...]:
        return ("sparsegpt",) if self.pattern == "sparsegpt" else ()


@register_method
class Layer(PruningMethod):
    """Joint over the layer: the roles of its rule are pruned together, sub-block by sub-block."""

    name = "layer"
    settings = LayerSettings
    joint = True

    def captures(self, rules: dict[str, PruneRule]) -> tuple[str, ...]:
        """Every pruned role's input (its pattern's statistics; v's is the attention input, o's and down's give
        the sub-blocks' dense outputs), the attention input for q/k's refit, and o's input with down's (the
        attention output the layer targets add to the MLP's)."""
        return tuple(dict.fromkeys((*rules, *(("q_proj",) if "k_proj" in rules else ()),
                                    *(("o_proj",) if "down_proj" in rules else ()))))

    def check_fits(self, adapter: DecoderAdapter, config: PrunerConfig) -> None:
        if config.layer.targets == "layer" and not adapter.residual_adds_projections:
            raise ConfigError(f"layer.targets: 'layer' adds the attention's output to the MLP's target, but "
                              f"{adapter.config.model_type} normalises each sub-block's output before the residual "
                              "add; use 'sub_block'")

    def prune_layer(self, context: LayerContext, rules: dict[str, PruneRule]) -> JointResult:
        if context.world.size > 1:
            raise ConfigError("method 'layer' runs in one process for now; under torchrun use 'attention', "
                              "'wanda', 'sparsegpt' or 'magnitude'")
        settings: LayerSettings = context.config.layer
        dense = {role: context.matrix(role).to(SOLVE_DTYPE) for role in rules}
        keep, weights = self._patterns(context, rules, dense, settings)
        spec = context.attention_spec().to(SOLVE_DTYPE)
        attention, errors = None, {}
        if settings.refit_qk and {"q_proj", "k_proj"} <= set(rules):
            qk = {role: rules[role] for role in ("q_proj", "k_proj")}
            attention = prune_attention({role: dense[role] for role in qk},
                                        AttentionInputs(context.recorded["q_proj"], spec, context.catalog), qk,
                                        AttentionSettings(mask=settings.pattern,
                                                          refit_iterations=settings.refit_qk_iterations,
                                                          refit_row_fraction=settings.refit_row_fraction,
                                                          refit_sequence_fraction=settings.refit_sequence_fraction),
                                        context.config.sparsegpt,
                                        seed=context.seed)
            weights.update(attention.weights)
        adam = AdamConfig(iterations=settings.refit_iterations, lr=settings.refit_lr,
                          row_fraction=settings.refit_row_fraction,
                          sequence_fraction=settings.refit_sequence_fraction, seed=context.seed)
        if settings.refit_iterations and {"v_proj", "o_proj"} <= set(rules):
            weights.update(self._refit_attention_output(context, dense, keep, weights, spec, adam, settings,
                                                        errors))
        if settings.refit_iterations and {"gate_proj", "up_proj", "down_proj"} <= set(rules):  # gated MLPs
            context.write({role: weights[role] for role in ("q_proj", "k_proj", "v_proj", "o_proj")
                           if role in weights})
            weights.update(self._refit_mlp(context, dense, keep, weights, adam, settings, errors))
        return JointResult({role: apply_mask(weights[role], keep[role]) for role in rules}, attention, errors)

    @staticmethod
    def _patterns(context: LayerContext, rules: dict[str, PruneRule], dense: dict[str, Tensor],
                  settings: LayerSettings) -> tuple[dict[str, Tensor], dict[str, Tensor]]:
        """Each role's keep-mask and start weights (dense for Wanda, SparseGPT's update for its pattern)."""
        stats = {}  # matrices reading one module's input share its statistics
        for role in rules:
            xs = context.recorded[role]
            key = (xs[0].data_ptr(), tuple(xs[0].shape))
            if key not in stats:
                stats[key] = InputStatistics(xs[0].shape[-1], hessian=settings.pattern == "sparsegpt")
                for x in xs:
                    stats[key].update(x)
        keep, start = {}, {}
        for role, rule in rules.items():
            first = context.recorded[role][0]
            st = stats[(first.data_ptr(), tuple(first.shape))]
            if settings.pattern == "sparsegpt":
                sg = context.config.sparsegpt
                start[role], keep[role] = sparsegpt(dense[role], st.hessian, rule.sparsity, n_m=rule.n_m,
                                                    blocksize=sg.blocksize, percdamp=sg.percdamp)
            else:
                keep[role] = wanda_mask(dense[role], st.column_norms, rule.sparsity, n_m=rule.n_m)
                start[role] = dense[role]
        return keep, {role: apply_mask(start[role], keep[role]) for role in rules}

    @staticmethod
    def _refit_attention_output(context: LayerContext, dense: dict[str, Tensor], keep: dict[str, Tensor],
                                weights: dict[str, Tensor], spec, adam: AdamConfig, settings: LayerSettings,
                                errors: dict[str, float]) -> dict[str, Tensor]:
        """v/o against the dense attention sub-block's output, with the probabilities of the pruned q/k."""
        x = batches_by_length(context.recorded["v_proj"])
        q = weights.get("q_proj", context.matrix("q_proj").to(SOLVE_DTYPE))
        k = weights.get("k_proj", context.matrix("k_proj").to(SOLVE_DTYPE))
        probs = [multihead_attention_probs(batch, q, k, spec) for batch in x]
        bias = {role: context.adapter.bias(context.layer, context.adapter.prunable(context.index, role))
                for role in ("v_proj", "o_proj")}
        bias = {role: None if b is None else b.to(SOLVE_DTYPE) for role, b in bias.items()}
        targets = [z @ dense["o_proj"].T + (0 if bias["o_proj"] is None else bias["o_proj"])
                   for z in batches_by_length(context.recorded["o_proj"])]
        objective = AttentionOutputObjective(
            x, probs, {"v": dense["v_proj"], "o": dense["o_proj"]}, {"v": keep["v_proj"], "o": keep["o_proj"]},
            head_dim=spec.head_dim, start={"v": weights["v_proj"], "o": weights["o_proj"]},
            v_bias=bias["v_proj"], o_bias=bias["o_proj"], targets=targets)
        result = refit_kept_weights(objective, adam, settings.check_fraction, settings.solve_iterations,
                                    settings.solve_percdamp)
        errors.update(_refit_errors("vo", result))
        return {"v_proj": result.weights["v"], "o_proj": result.weights["o"]}

    @staticmethod
    def _refit_mlp(context: LayerContext, dense: dict[str, Tensor], keep: dict[str, Tensor],
                   weights: dict[str, Tensor], adam: AdamConfig, settings: LayerSettings,
                   errors: dict[str, float]) -> dict[str, Tensor]:
        """gate/up/down against the dense MLP's output, on the MLP inputs the pruned attention gives (with
        ``targets: layer``, plus the dense minus the pruned attention output on the layer's inputs)."""
        layer_targets = settings.targets == "layer"
        recorded = context.record(("up_proj", "o_proj") if layer_targets else ("up_proj",))
        x = batches_by_length(recorded["up_proj"])
        targets = [h @ dense["down_proj"].T for h in batches_by_length(context.recorded["down_proj"])]
        if layer_targets:  # o_proj's bias is in both outputs and cancels
            dense_o = dense.get("o_proj", context.matrix("o_proj").to(SOLVE_DTYPE))
            pruned_o = weights.get("o_proj", dense_o)
            missed = [z @ dense_o.T - y @ pruned_o.T for z, y in
                      zip(batches_by_length(context.recorded["o_proj"]), batches_by_length(recorded["o_proj"]))]
            targets = [t + m for t, m in zip(targets, missed)]
        names = {"gate": "gate_proj", "up": "up_proj", "down": "down_proj"}
        objective = MLPObjective(x, {n: dense[r] for n, r in names.items()}, {n: keep[r] for n, r in names.items()},
                                 start={n: weights[r] for n, r in names.items()}, targets=targets,
                                 activation=context.adapter.mlp_activation())
        result = refit_kept_weights(objective, adam, settings.check_fraction, settings.solve_iterations,
                                    settings.solve_percdamp)
        errors.update(_refit_errors("mlp", result))
        return {r: result.weights[n] for n, r in names.items()}


def _refit_errors(prefix: str, result: RefitResult) -> dict[str, float]:
    """The sub-block's relative errors for the layer report: before, after Adam and, if run, after the solve."""
    errors = {f"{prefix}_before": result.error_before, f"{prefix}_after": result.error_after}
    if result.error_solved is not None:
        errors[f"{prefix}_solved"] = result.error_solved
    return errors
