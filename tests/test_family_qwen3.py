"""Qwen3 (per-head q/k RMSNorm before RoPE, sliding-window layers by layer_types) on a tiny random model: the
adapter's attention is the model's own, q/k and whole-model recipes prune it exactly, save -> load is bit-exact."""

import pytest
from transformers import Qwen3Config

from attnprune_opt.models.registry import get_adapter
from family_checks import (RECIPES, TINY_SHAPE, assert_adapter_attention_is_exact, assert_recipe_prunes_and_round_trips,
                           tiny_family_model)
from tiny_models import calibration


def qwen3_model():
    """Layer 0 global, layers 1-2 sliding with a window of 5, shorter than every calibration sequence."""
    config = Qwen3Config(**TINY_SHAPE, num_hidden_layers=3, use_sliding_window=True, sliding_window=5,
                         max_window_layers=1, tie_word_embeddings=False)
    return tiny_family_model(config)


def test_adapter_attention_is_the_models_own_and_its_gradient_exact():
    model = qwen3_model()
    assert [get_adapter(model).sliding_window(i) for i in range(3)] == [None, 5, 5]
    assert_adapter_attention_is_exact(model, calibration()[3])


@pytest.mark.parametrize("recipe", RECIPES.values(), ids=RECIPES.keys())
def test_recipes_prune_exactly_and_save_load_is_bit_exact(recipe, tmp_path):
    assert_recipe_prunes_and_round_trips(qwen3_model(), recipe, tmp_path)
