"""Phi-3 on tiny random models: fused qkv_proj ([q | k | v] rows) and gate_up_proj ([gate | up]). The adapter
recomputes the model's own attention (partial rotary, sliding window); q/k at 50% and a whole-model recipe prune
it with exact sparsity per fused part; save -> load gives the same weights and logits in both formats."""

import copy

import pytest
import torch
from safetensors.torch import load_file
from transformers import Phi3Config

from attnprune_opt import AttentionPruner
from attnprune_opt.export.convert import export_pruned
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

ROLES = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def tiny_phi3(**overrides):
    config = Phi3Config(vocab_size=VOCAB, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                        pad_token_id=0, bos_token_id=1, eos_token_id=2, **overrides)
    return tiny_from_config(config)


def test_fused_rows_are_where_the_model_reads_them():
    """q, k, v, gate and up are the rows Phi3Attention and Phi3MLP slice out of the fused outputs."""
    model = tiny_phi3()
    adapter = get_adapter(model)
    attention, mlp = model.model.layers[0].self_attn, model.model.layers[0].mlp
    x = torch.randn(5, 64)
    qkv, gate_up = attention.qkv_proj(x), mlp.gate_up_proj(x)
    for role, expected in {"q_proj": qkv[:, :64], "k_proj": qkv[:, 64:96], "v_proj": qkv[:, 96:],
                           "gate_proj": gate_up.chunk(2, dim=-1)[0], "up_proj": gate_up.chunk(2, dim=-1)[1]}.items():
        part = adapter.prunable(0, role)
        weight = model.model.layers[0].get_submodule(part.module).weight
        assert torch.equal(x @ part.read(weight).T, expected), role


@pytest.mark.parametrize("overrides", [
    {},
    {"rope_parameters": {"rope_type": "default", "rope_theta": 10000.0, "partial_rotary_factor": 0.5}},
    {"sliding_window": 5},
], ids=["full-rotary", "partial-rotary", "sliding-window"])
def test_adapter_recomputes_the_models_own_attention(overrides):
    model = tiny_phi3(**overrides)
    if "rope_parameters" in overrides:
        assert model.model.rotary_emb(torch.zeros(1), torch.arange(3)[None])[0].shape[-1] == 8  # of head_dim 16
    assert get_adapter(model).sliding_window(1) == overrides.get("sliding_window")
    assert_adapter_recomputes_attention(model, calibration()[0], atol=1e-6)


def test_qk_at_half_prunes_only_their_rows_of_qkv_proj():
    assert_qk_at_half_prunes_only_qk(tiny_phi3())  # v rows of qkv_proj untouched


@pytest.fixture(scope="module")
def whole_model(tmp_path_factory):
    model = tiny_phi3()
    dense = copy.deepcopy(model)
    pruner = AttentionPruner(**WHOLE_MODEL)
    pruner.prune_model(model, calibration=calibration(), progress=False)
    return model, dense, pruner, tmp_path_factory.mktemp("phi3")


def test_whole_model_recipe_prunes_every_part_exactly(whole_model):
    model, dense, pruner, _ = whole_model
    assert_exact_sparsity(model, dense, dict.fromkeys(ROLES, 0.5))
    assert set(pruner.report.module_sparsity()) == set(ROLES)


def test_save_and_load_are_exact_with_one_manifest_entry_per_fused_part(whole_model):
    model, _, pruner, root = whole_model
    assert_saves_and_loads_exactly(model, pruner, root)
    manifest = read_manifest(root / "bitmask")
    assert {name for name in manifest.sparsity.modules if ".layers.0." in name} == {
        "model.layers.0.self_attn.qkv_proj.weight[q_proj]", "model.layers.0.self_attn.qkv_proj.weight[k_proj]",
        "model.layers.0.self_attn.qkv_proj.weight[v_proj]", "model.layers.0.self_attn.o_proj.weight",
        "model.layers.0.mlp.gate_up_proj.weight[gate_proj]", "model.layers.0.mlp.gate_up_proj.weight[up_proj]",
        "model.layers.0.mlp.down_proj.weight"}
    assert len(manifest.sparsity.modules) == 14
    assert all(entry.sparsity == 0.5 for entry in manifest.sparsity.modules.values())
    assert manifest.sparsity.modules["model.layers.1.mlp.gate_up_proj.weight[up_proj]"].numel == 96 * 64


def test_export_converts_fused_tensors_both_ways(whole_model, tmp_path):
    model, _, pruner, _ = whole_model
    for format in ("dense", "bitmask"):
        pruner.save(model, tmp_path / "saved" / format, format=format)
    for source, format in (("bitmask", "dense"), ("dense", "bitmask")):
        export_pruned(tmp_path / "saved" / source, tmp_path / format, format)
        exported, saved = (load_file(root / format / "model.safetensors") for root in (tmp_path, tmp_path / "saved"))
        assert exported.keys() == saved.keys()
        assert all(torch.equal(exported[key], tensor) for key, tensor in saved.items()), format
        assert read_manifest(tmp_path / format).sparsity == read_manifest(tmp_path / "saved" / format).sparsity


@pytest.mark.parametrize("roles, layout", [(["q_proj", "k_proj"], "sparse-bitmask"),
                                           (["q_proj", "k_proj", "v_proj"], "sparse-24-bitmask")])
def test_qkv_proj_uses_the_2_of_4_layout_only_when_all_its_rows_are_2_of_4(roles, layout, tmp_path):
    model = tiny_phi3()
    dense = copy.deepcopy(model)
    pruner = AttentionPruner(rules=[{"modules": roles, "method": "magnitude", "structure": "2:4"}])
    pruner.prune_model(model, calibration=calibration(), progress=False)
    assert_exact_sparsity(model, dense, dict.fromkeys(roles, 0.5))
    assert_saves_and_loads_exactly(model, pruner, tmp_path)
    manifest = read_manifest(tmp_path / "bitmask")
    assert manifest.sizes.bitmask_layout == layout
    assert len(manifest.sparsity.modules) == 2 * len(roles)
