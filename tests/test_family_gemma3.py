"""Gemma 3 text (per-head q/k RMSNorm with Gemma's 1 + w, query_pre_attn_scalar scaling, sliding and global layers
with their own RoPE tables) on a tiny random model: the adapter's attention is the model's own, q/k and
whole-model recipes prune it exactly, save -> load is bit-exact."""

import pytest
import torch
from transformers import Gemma3TextConfig

from attnprune_opt.errors import UnsupportedArchitectureError
from attnprune_opt.models.registry import adapter_for_config, get_adapter
from attnprune_opt.pipeline.capture import capture_layer_inputs
from family_checks import (RECIPES, TINY_SHAPE, assert_adapter_attention_is_exact, assert_recipe_prunes_and_round_trips,
                           tiny_family_model)
from tiny_models import calibration

LAYER_TYPES = ["sliding_attention", "full_attention", "sliding_attention", "full_attention"]


def gemma3_config(**overrides) -> Gemma3TextConfig:
    """Sliding (window 5, shorter than every calibration sequence) and global layers alternating, RoPE bases 10^4
    and 10^6 (global also linearly scaled by 8, as Gemma 3's), logit scale 24^-0.5 (not head_dim's 16^-0.5). The
    config's soft-cap is set to show that the model ignores it (and so must the adapter)."""
    rope = {"sliding_attention": {"rope_type": "default", "rope_theta": 10_000.0},
            "full_attention": {"rope_type": "linear", "factor": 8.0, "rope_theta": 1_000_000.0}}
    return Gemma3TextConfig(**{**TINY_SHAPE, "num_hidden_layers": 4, "layer_types": LAYER_TYPES, "sliding_window": 5,
                               "query_pre_attn_scalar": 24, "rope_parameters": rope, "attn_logit_softcapping": 5.0,
                               **overrides})


def test_adapter_attention_is_the_models_own_and_its_gradient_exact():
    model = tiny_family_model(gemma3_config())
    adapter = get_adapter(model)
    assert [adapter.sliding_window(i) for i in range(4)] == [5, None, 5, None]
    ids = calibration()[3]
    (item,) = capture_layer_inputs(model, adapter.layers(model), [ids])
    sliding, full = (item.layer_kwargs[i]["position_embeddings"][0] for i in (0, 1))
    assert not torch.allclose(sliding, full)  # each layer type really has its own tables
    assert_adapter_attention_is_exact(model, ids)


def test_bidirectional_attention_is_refused_by_name():
    with pytest.raises(UnsupportedArchitectureError, match="'gemma3_text' with use_bidirectional_attention"):
        adapter_for_config(gemma3_config(use_bidirectional_attention=True))


@pytest.mark.parametrize("recipe", RECIPES.values(), ids=RECIPES.keys())
def test_recipes_prune_exactly_and_save_load_is_bit_exact(recipe, tmp_path):
    assert_recipe_prunes_and_round_trips(tiny_family_model(gemma3_config()), recipe, tmp_path)
