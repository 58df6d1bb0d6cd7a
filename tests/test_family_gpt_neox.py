"""GPT-NeoX / Pythia (query_key_value fused and interleaved per head, with biases; partial rotary; no gate_proj) on
tiny random models: the adapter's attention is the model's own, q/k and whole-model recipes prune it exactly (per
interleaved part), save -> load is bit-exact, and a rule naming gate_proj is refused with the family's roles."""

import pytest
import torch
from transformers import GPTNeoXConfig

from attnprune_opt import AttentionPruner
from attnprune_opt.errors import ConfigError
from attnprune_opt.export.manifest import read_manifest
from attnprune_opt.models.registry import get_adapter
from family_checks import (RECIPES, assert_adapter_attention_is_exact, assert_recipe_prunes_and_round_trips,
                           tiny_family_model)
from tiny_models import VOCAB, calibration

WHOLE_MODEL = {**RECIPES["whole"], "rules": [  # no gate_proj
    RECIPES["whole"]["rules"][0], {"modules": ["v_proj", "o_proj", "up_proj", "down_proj"], "method": "sparsegpt",
                                   "sparsity": 0.5}]}
NEOX_RECIPES = {**RECIPES, "whole": WHOLE_MODEL}


def neox_model(**overrides):
    """4 heads of 16 (NeoX has no grouped-query heads), random q/k/v biases (they start at zero)."""
    config = GPTNeoXConfig(vocab_size=VOCAB, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                           num_attention_heads=4, max_position_embeddings=256, **overrides)
    model = tiny_family_model(config)
    with torch.no_grad():
        for layer in model.gpt_neox.layers:
            layer.attention.query_key_value.bias.normal_(0.0, 0.5)
    return model


def test_interleaved_rows_are_where_the_model_reads_them():
    """Head by head, q, k and v are the rows GPTNeoXAttention's view and chunk take out of query_key_value."""
    model = neox_model()
    adapter, fused = get_adapter(model), model.gpt_neox.layers[0].attention.query_key_value
    x = torch.randn(5, 64)
    q, k, v = fused(x).view(5, 4, 3 * 16).chunk(3, dim=-1)
    for role, expected in {"q_proj": q, "k_proj": k, "v_proj": v}.items():
        part = adapter.prunable(0, role)
        computed = x @ part.read(fused.weight).T + part.read(fused.bias)
        assert torch.equal(computed, expected.reshape(5, 64)), role


@pytest.mark.parametrize("rotary", [0.25, 1.0])
def test_adapter_attention_is_the_models_own_and_its_gradient_exact(rotary):
    model = neox_model(rotary_pct=rotary)
    assert model.gpt_neox.rotary_emb(torch.zeros(1), torch.arange(3)[None])[0].shape[-1] == int(16 * rotary)
    assert_adapter_attention_is_exact(model, calibration()[0])


@pytest.mark.parametrize("recipe", NEOX_RECIPES.values(), ids=NEOX_RECIPES.keys())
def test_recipes_prune_exactly_and_save_load_is_bit_exact(recipe, tmp_path):
    assert_recipe_prunes_and_round_trips(neox_model(), recipe, tmp_path)
    names = set(read_manifest(tmp_path / "bitmask").sparsity.modules)
    assert "gpt_neox.layers.1.attention.query_key_value.weight[k_proj]" in names
    assert ("gpt_neox.layers.1.attention.query_key_value.weight[v_proj]" in names) == (recipe is WHOLE_MODEL)


def test_a_rule_naming_gate_proj_lists_the_familys_roles():
    rules = [{"modules": ["gate_proj"], "method": "magnitude", "sparsity": 0.5}]
    with pytest.raises(ConfigError, match="gate_proj not in gpt_neox layers, whose prunable matrices are "
                                          "q_proj, k_proj, v_proj, o_proj, up_proj, down_proj"):
        AttentionPruner(rules=rules).prune_model(neox_model(), calibration=calibration(), progress=False)
