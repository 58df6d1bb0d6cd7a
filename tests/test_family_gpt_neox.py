"""GPT-NeoX (Pythia) on tiny random models: query_key_value interleaved per head, with biases, partial rotary, no
gate. The adapter recomputes the model's own attention; q/k at 50% and a whole-model recipe prune it with exact
sparsity per interleaved part; save -> load gives the same weights and logits in both formats."""

import copy

import pytest
import torch
from transformers import GPTNeoXConfig

from attnprune_opt import AttentionPruner
from attnprune_opt.errors import ConfigError
from attnprune_opt.export.manifest import read_manifest
from attnprune_opt.models.registry import get_adapter
from tiny_models import (
    VOCAB,
    WHOLE_MODEL,
    assert_adapter_recomputes_attention,
    assert_exact_sparsity,
    assert_qk_at_half_prunes_only_qk,
    assert_saves_and_loads_exactly,
    calibration,
    tiny_from_config,
)

ROLES = ("q_proj", "k_proj", "v_proj", "o_proj", "up_proj", "down_proj")
WHOLE_MODEL = {**WHOLE_MODEL, "rules": [  # GPT-NeoX has no gate_proj
    WHOLE_MODEL["rules"][0], {"modules": ["v_proj", "o_proj", "up_proj", "down_proj"], "method": "sparsegpt",
                              "sparsity": 0.5}]}


def tiny_neox(**overrides):
    config = GPTNeoXConfig(vocab_size=VOCAB, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                           num_attention_heads=4, max_position_embeddings=256, **overrides)
    model = tiny_from_config(config)
    with torch.no_grad():  # random biases: the default initialisation zeroes them
        for layer in model.gpt_neox.layers:
            layer.attention.query_key_value.bias.normal_(0.0, 0.5)
    return model


def test_interleaved_rows_are_where_the_model_reads_them():
    """Head by head, q, k and v are the rows GPTNeoXAttention's view and chunk take out of query_key_value."""
    model = tiny_neox()
    adapter = get_adapter(model)
    fused = model.gpt_neox.layers[0].attention.query_key_value
    x = torch.randn(5, 64)
    q, k, v = fused(x).view(5, 4, 3 * 16).chunk(3, dim=-1)
    for role, expected in {"q_proj": q, "k_proj": k, "v_proj": v}.items():
        part = adapter.prunable(0, role)
        computed = x @ part.read(fused.weight).T + part.read(fused.bias)
        assert torch.equal(computed, expected.reshape(5, 64)), role


@pytest.mark.parametrize("rotary", [0.25, 1.0])
def test_adapter_recomputes_the_models_own_attention(rotary):
    model = tiny_neox(rotary_pct=rotary)
    assert model.gpt_neox.rotary_emb(torch.zeros(1), torch.arange(3)[None])[0].shape[-1] == int(16 * rotary)
    assert_adapter_recomputes_attention(model, calibration()[0], atol=1e-6)


def test_qk_at_half_prunes_only_their_rows_of_query_key_value():
    assert_qk_at_half_prunes_only_qk(tiny_neox())  # v rows and biases untouched


def test_a_rule_naming_gate_proj_lists_the_familys_roles():
    rules = [{"modules": ["gate_proj"], "method": "magnitude", "sparsity": 0.5}]
    with pytest.raises(ConfigError, match="gate_proj not in gpt_neox layers, whose prunable matrices are "
                                          "q_proj, k_proj, v_proj, o_proj, up_proj, down_proj"):
        AttentionPruner(rules=rules).prune_model(tiny_neox(), calibration=calibration(), progress=False)


def test_whole_model_recipe_prunes_exactly_and_saves_and_loads_exactly(tmp_path):
    model = tiny_neox()
    dense = copy.deepcopy(model)
    pruner = AttentionPruner(**WHOLE_MODEL)
    pruner.prune_model(model, calibration=calibration(), progress=False)
    assert_exact_sparsity(model, dense, dict.fromkeys(ROLES, 0.5))
    assert_saves_and_loads_exactly(model, pruner, tmp_path)
    manifest = read_manifest(tmp_path / "bitmask")
    assert {name for name in manifest.sparsity.modules if ".layers.1." in name} == {
        "gpt_neox.layers.1.attention.query_key_value.weight[q_proj]",
        "gpt_neox.layers.1.attention.query_key_value.weight[k_proj]",
        "gpt_neox.layers.1.attention.query_key_value.weight[v_proj]", "gpt_neox.layers.1.attention.dense.weight",
        "gpt_neox.layers.1.mlp.dense_h_to_4h.weight", "gpt_neox.layers.1.mlp.dense_4h_to_h.weight"}
    assert all(entry.sparsity == 0.5 for entry in manifest.sparsity.modules.values())
    assert manifest.sizes.bitmask_layout == "sparse-bitmask"
