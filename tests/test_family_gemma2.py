"""Gemma 2 (query_pre_attn_scalar scaling, attention logit soft-capping, alternating sliding-window / global
layers) on a tiny random model: the adapter's attention is the model's own, q/k and whole-model recipes prune it
exactly, save -> load is bit-exact."""

import pytest
from transformers import Gemma2Config

from attnprune_opt import AttentionPruner
from attnprune_opt.errors import ConfigError, UnsupportedArchitectureError
from attnprune_opt.models.registry import adapter_for_config, get_adapter
from family_checks import (RECIPES, TINY_SHAPE, assert_adapter_attention_is_exact, assert_recipe_prunes_and_round_trips,
                           assert_residual_claim_is_the_models, tiny_family_model)
from tiny_models import calibration


def gemma2_config(**overrides) -> Gemma2Config:
    """Sliding (window 5, shorter than every calibration sequence), global, sliding; a logit scale of 24^-0.5
    (not head_dim's 16^-0.5) and a soft-cap of 5 that the x8 q/k logits reach; tied embeddings, as Gemma's."""
    return Gemma2Config(**{**TINY_SHAPE, "num_hidden_layers": 3, "sliding_window": 5, "query_pre_attn_scalar": 24,
                           "attn_logit_softcapping": 5.0, **overrides})


def test_adapter_attention_is_the_models_own_and_its_gradient_exact():
    model = tiny_family_model(gemma2_config())
    adapter = get_adapter(model)
    assert [adapter.sliding_window(i) for i in range(3)] == [5, None, 5]
    assert_adapter_attention_is_exact(model, calibration()[3])


def test_bidirectional_attention_is_refused_by_name():
    with pytest.raises(UnsupportedArchitectureError, match="'gemma2' with use_bidirectional_attention"):
        adapter_for_config(gemma2_config(use_bidirectional_attention=True))


@pytest.mark.parametrize("recipe", RECIPES.values(), ids=RECIPES.keys())
def test_recipes_prune_exactly_and_save_load_is_bit_exact(recipe, tmp_path):
    assert_recipe_prunes_and_round_trips(tiny_family_model(gemma2_config()), recipe, tmp_path)


def test_sub_block_outputs_are_normalised_so_layer_targets_are_refused_before_calibration():
    model = tiny_family_model(gemma2_config())
    assert_residual_claim_is_the_models(model, calibration()[0])
    pruner = AttentionPruner(rules=[{"modules": ["v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
                                      "method": "layer", "sparsity": 0.5}], layer={"targets": "layer"})
    with pytest.raises(ConfigError, match="layer.targets: 'layer' .* normalises each sub-block's output"):
        pruner.prune_model(model, calibration=calibration(), progress=False)
