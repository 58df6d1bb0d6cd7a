"""OLMo-2 (q/k RMSNorm over all heads at once, post-norm layers: q_proj reads the raw layer input) on a tiny random
model: the adapter's attention is the model's own, q/k and whole-model recipes prune it exactly, save -> load is
bit-exact."""

import pytest
from transformers import Olmo2Config

from attnprune_opt import AttentionPruner
from attnprune_opt.errors import ConfigError

from family_checks import (RECIPES, TINY_SHAPE, assert_adapter_attention_is_exact, assert_recipe_prunes_and_round_trips,
                           assert_residual_claim_is_the_models, tiny_family_model)
from tiny_models import calibration


def olmo2_model():
    return tiny_family_model(Olmo2Config(**TINY_SHAPE, num_hidden_layers=2, eos_token_id=2,
                                          tie_word_embeddings=False))


def test_adapter_attention_is_the_models_own_and_its_gradient_exact():
    model = olmo2_model()
    assert model.model.layers[0].self_attn.k_norm.weight.shape == (2 * 16,)  # one norm over both KV heads
    assert_adapter_attention_is_exact(model, calibration()[3])


@pytest.mark.parametrize("recipe", RECIPES.values(), ids=RECIPES.keys())
def test_recipes_prune_exactly_and_save_load_is_bit_exact(recipe, tmp_path):
    assert_recipe_prunes_and_round_trips(olmo2_model(), recipe, tmp_path)


def test_sub_block_outputs_are_normalised_so_layer_targets_are_refused_before_calibration():
    model = olmo2_model()
    assert_residual_claim_is_the_models(model, calibration()[0])
    pruner = AttentionPruner(rules=[{"modules": ["v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
                                      "method": "layer", "sparsity": 0.5}], layer={"targets": "layer"})
    with pytest.raises(ConfigError, match="layer.targets: 'layer' .* normalises each sub-block's output"):
        pruner.prune_model(model, calibration=calibration(), progress=False)
