"""The whole-layer method ('layer') in the pipeline: exact sparsity of every linear, the sub-block refits lower
their errors, and a whole-model prune saves and loads bit-exactly in both formats."""

import pytest
import torch
from family_checks import assert_recipe_prunes_and_round_trips, assert_residual_claim_is_the_models
from tiny_models import calibration, tiny_model

from attnprune_opt import AttentionPruner
from attnprune_opt.errors import RecipeError
from attnprune_opt.models.base import ROLES, read_matrix
from attnprune_opt.models.registry import get_adapter

MLP = ("gate_proj", "up_proj", "down_proj")
WHOLE_LAYER = {"rules": [{"modules": list(ROLES), "method": "layer", "sparsity": 0.5}],
               "layer": {"refit_iterations": 10}}


@pytest.mark.parametrize("kind", ["llama", "qwen2"])
def test_whole_layer_prune_is_exact_and_round_trips(kind, tmp_path):
    assert_recipe_prunes_and_round_trips(tiny_model(kind), WHOLE_LAYER, tmp_path)


@pytest.mark.parametrize("settings", [{"refit_iterations": 10}, {"refit_iterations": 10, "pattern": "sparsegpt"},
                                      {"refit_iterations": 10, "refit_qk": True},
                                      {"refit_iterations": 10, "refit_qk": True, "refit_qk_iterations": 7},
                                      {"refit_iterations": 10, "solve_iterations": 20},
                                      {"refit_iterations": 10, "solve_iterations": 20, "solve_percdamp": 1.0},
                                      {"refit_iterations": 10, "targets": "layer"}])
def test_every_row_is_exactly_2_of_4_and_each_refit_lowers_its_error(settings):
    model = tiny_model("llama")
    pruner = AttentionPruner(rules=[{"modules": list(ROLES), "method": "layer", "structure": "2:4"}],
                             layer=settings, **({"sparsegpt": {"blocksize": 32}} if "pattern" in settings else {}))
    pruner.prune_model(model, calibration=calibration(), progress=False)
    adapter = get_adapter(model)
    for index, layer in enumerate(adapter.layers(model)):
        for role in ROLES:
            matrix = read_matrix(layer, adapter.prunable(index, role))
            zeros = (matrix.view(matrix.shape[0], -1, 4) == 0).sum(dim=-1)
            assert (zeros >= 2).all() and (matrix == 0).float().mean() == 0.5, (index, role)
    for report in pruner.report.layers:
        errors = report.refit_errors
        assert errors["vo_after"] < errors["vo_before"] and errors["mlp_after"] < errors["mlp_before"], errors
        assert (report.attention is not None) == settings.get("refit_qk", False)
        if settings.get("solve_iterations"):  # the least-squares solve of o_proj / down_proj lowers them further
            assert errors["vo_solved"] < errors["vo_after"] and errors["mlp_solved"] < errors["mlp_after"], errors
        else:
            assert "vo_solved" not in errors and "mlp_solved" not in errors


def test_solve_iterations_0_is_the_adam_refit_alone_and_a_solve_moves_only_o_and_down():
    """solve_iterations 0 gives the plain refit bit for bit; with a solve, the first layer's q/k/v are the same
    (o_proj and down_proj are solved after them) and its o_proj / down_proj differ, with the same zeros."""
    rules = [{"modules": list(ROLES), "method": "layer", "sparsity": 0.5}]
    models = {}
    for name, settings in (("default", {}), ("0", {"solve_iterations": 0}), ("20", {"solve_iterations": 20})):
        models[name] = tiny_model("llama")
        AttentionPruner(rules=rules, layer={"refit_iterations": 10, **settings}).prune_model(
            models[name], calibration=calibration(), progress=False)
    for (name, a), b in zip(models["default"].state_dict().items(), models["0"].state_dict().values()):
        assert torch.equal(a, b), name
    adapter = get_adapter(models["0"])
    plain, solved = (adapter.layers(models[name])[0] for name in ("0", "20"))
    for role in ROLES:
        a, b = (read_matrix(layer, adapter.prunable(0, role)) for layer in (plain, solved))
        assert torch.equal(a, b) == (role in ("q_proj", "k_proj", "v_proj")), role
        assert torch.equal(a == 0, b == 0), role


@pytest.mark.parametrize("steps, sampling", [(7, {}), (100, {}),
                                             (7, {"refit_row_fraction": 0.5, "refit_sequence_fraction": 0.25})])
def test_the_q_k_refit_is_the_attention_methods_with_the_layer_settings_steps_and_sampling(steps, sampling):
    """The first layer sees the same inputs under both methods, so its q/k are the attention method's bit for bit
    at the same step count and sampling fractions (and differ at another step count)."""
    models = {name: tiny_model("llama") for name in ("layer", "attention", "other")}
    AttentionPruner(rules=[{"modules": list(ROLES), "method": "layer", "sparsity": 0.5}],
                    layer={"refit_iterations": 5, "refit_qk": True, "refit_qk_iterations": steps,
                           **sampling}).prune_model(models["layer"], calibration=calibration(), progress=False)
    for name, refit in (("attention", steps), ("other", steps + 3)):
        AttentionPruner(rules=[{"modules": ["q_proj", "k_proj"], "method": "attention", "sparsity": 0.5}],
                        attention={"refit_iterations": refit, **sampling}).prune_model(
            models[name], calibration=calibration(), progress=False)
    adapter = get_adapter(models["layer"])
    for role in ("q_proj", "k_proj"):
        ours, same, other = (read_matrix(adapter.layers(models[name])[0], adapter.prunable(0, role))
                             for name in ("layer", "attention", "other"))
        assert torch.equal(ours, same) and not torch.equal(ours, other), role


def test_without_refit_the_kept_weights_are_wandas():
    """refit_iterations 0 is Wanda everywhere: the same pattern and the kept values untouched."""
    ours, theirs = tiny_model("llama"), tiny_model("llama")
    AttentionPruner(rules=[{"modules": list(ROLES), "method": "layer", "sparsity": 0.5}],
                    layer={"refit_iterations": 0}).prune_model(ours, calibration=calibration(), progress=False)
    AttentionPruner(rules=[{"modules": list(ROLES), "method": "wanda", "sparsity": 0.5}]).prune_model(
        theirs, calibration=calibration(), progress=False)
    for (name, a), b in zip(ours.state_dict().items(), theirs.state_dict().values()):
        assert torch.equal(a, b), name


def test_settings_the_method_does_not_read_are_errors():
    with pytest.raises(RecipeError, match="layer.refit_lr: not used: read only when refit_iterations > 0"):
        AttentionPruner(rules=[{"modules": list(ROLES), "method": "layer", "sparsity": 0.5}],
                        layer={"refit_iterations": 0, "refit_lr": 0.1})
    with pytest.raises(RecipeError, match="layer.solve_iterations: not used: read only when refit_iterations > 0"):
        AttentionPruner(rules=[{"modules": list(ROLES), "method": "layer", "sparsity": 0.5}],
                        layer={"refit_iterations": 0, "solve_iterations": 10})
    with pytest.raises(RecipeError, match="layer.solve_percdamp: not used: read only when solve_iterations > 0"):
        AttentionPruner(rules=[{"modules": list(ROLES), "method": "layer", "sparsity": 0.5}],
                        layer={"refit_iterations": 10, "solve_percdamp": 1.0})
    with pytest.raises(RecipeError, match="layer.refit_sequence_fraction: not used: read only when refit_iterations "
                                          "> 0 or refit_qk is true"):
        AttentionPruner(rules=[{"modules": list(ROLES), "method": "layer", "sparsity": 0.5}],
                        layer={"refit_iterations": 0, "refit_sequence_fraction": 0.25})
    AttentionPruner(rules=[{"modules": list(ROLES), "method": "layer", "sparsity": 0.5}],  # the q/k refit's sampling
                    layer={"refit_iterations": 0, "refit_qk": True, "refit_sequence_fraction": 0.25})
    with pytest.raises(RecipeError, match="layer.refit_qk_iterations: not used: read only when refit_qk is true"):
        AttentionPruner(rules=[{"modules": list(ROLES), "method": "layer", "sparsity": 0.5}],
                        layer={"refit_qk_iterations": 30})
    with pytest.raises(RecipeError, match="sparsegpt: settings of method 'sparsegpt', which no rule uses"):
        AttentionPruner(rules=[{"modules": list(ROLES), "method": "layer", "sparsity": 0.5}],
                        sparsegpt={"blocksize": 32})


def test_fused_and_ungated_families(tmp_path):
    """Phi-3 (fused qkv and gate_up) refits both sub-blocks; GPT-NeoX (no gate_proj) refits v/o and gives up/down
    their pattern; both prune exactly and round-trip."""
    from transformers import GPTNeoXConfig, Phi3Config

    from family_checks import tiny_family_model

    phi3 = tiny_family_model(Phi3Config(vocab_size=96, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                                        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                                        pad_token_id=0))
    neox = tiny_family_model(GPTNeoXConfig(vocab_size=96, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                                           num_attention_heads=4, max_position_embeddings=256))
    for name, model in (("phi3", phi3), ("neox", neox)):
        roles = get_adapter(model).roles()
        recipe = {"rules": [{"modules": list(roles), "method": "layer", "sparsity": 0.5}],
                  "layer": {"refit_iterations": 5}}
        assert_recipe_prunes_and_round_trips(model, recipe, tmp_path / name)


def _first_layer_error(model, dense) -> float:
    """||h1 - h1_dense|| / ||h1_dense||: the first decoder layer's output against the dense model's, on the same
    (unpruned) embeddings."""
    ids = calibration()[0].reshape(1, -1)
    with torch.no_grad():
        ours, theirs = (m(ids, output_hidden_states=True).hidden_states[1] for m in (model, dense))
    return float((ours - theirs).norm() / theirs.norm())


def test_layer_targets_fit_the_layer_output_and_change_only_the_mlp():
    """targets 'layer': the attention sub-block is fitted as with 'sub_block' (q/k/v/o identical), and the MLP,
    also asked to make up the attention's remaining error, brings the first layer's output closer to the dense
    layer's; with the attention left dense there is nothing to make up and the result is 'sub_block''s bit for
    bit."""
    dense = tiny_model("llama")
    models = {}
    for name, modules, targets in (("sub_block", ROLES, "sub_block"), ("layer", ROLES, "layer"),
                                   ("mlp_sub_block", MLP, "sub_block"), ("mlp_layer", MLP, "layer")):
        models[name] = tiny_model("llama")
        AttentionPruner(rules=[{"modules": list(modules), "method": "layer", "sparsity": 0.5}],
                        layer={"refit_iterations": 10, "targets": targets}).prune_model(
            models[name], calibration=calibration(), progress=False)
    adapter = get_adapter(dense)
    first = {name: adapter.layers(model)[0] for name, model in models.items()}
    for role in ROLES:
        a, b = (read_matrix(first[name], adapter.prunable(0, role)) for name in ("sub_block", "layer"))
        assert torch.equal(a, b) == (role not in MLP), role
    assert _first_layer_error(models["layer"], dense) < _first_layer_error(models["sub_block"], dense)
    for (name, a), b in zip(models["mlp_sub_block"].state_dict().items(), models["mlp_layer"].state_dict().values()):
        assert torch.equal(a, b), name


@pytest.mark.parametrize("kind", ["llama", "qwen2"])
def test_pre_norm_families_add_their_projections_to_the_residual(kind):
    assert_residual_claim_is_the_models(tiny_model(kind), calibration()[0])
