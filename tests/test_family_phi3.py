"""Phi-3 (fused qkv_proj with rows [q | k | v] and gate_up_proj with rows [gate | up]; partial rotary; sliding
window) on tiny random models: the adapter's attention is the model's own, q/k and whole-model recipes prune it
exactly (per fused part: q/k pruned, v rows untouched), save -> load is bit-exact, one manifest entry per part."""

import pytest
import torch
from safetensors.torch import load_file
from transformers import Phi3Config

from attnprune_opt.export.convert import export_pruned
from attnprune_opt.export.manifest import read_manifest
from attnprune_opt.models.registry import get_adapter
from family_checks import (RECIPES, TINY_SHAPE, assert_adapter_attention_is_exact, assert_prunes_to_exact_sparsity,
                           assert_recipe_prunes_and_round_trips, assert_save_and_load_are_bit_exact,
                           tiny_family_model)
from tiny_models import calibration

PARTIAL_ROTARY = {"rope_parameters": {"rope_type": "default", "rope_theta": 10000.0, "partial_rotary_factor": 0.5}}


def phi3_model(**overrides):
    config = Phi3Config(**TINY_SHAPE, num_hidden_layers=2, pad_token_id=0, bos_token_id=1, eos_token_id=2,
                        **overrides)
    return tiny_family_model(config)


def test_fused_rows_are_where_the_model_reads_them():
    """q, k, v, gate and up are the rows Phi3Attention and Phi3MLP slice out of the fused outputs."""
    model = phi3_model()
    adapter, layer = get_adapter(model), model.model.layers[0]
    x = torch.randn(5, 64)
    qkv, (gate, up) = layer.self_attn.qkv_proj(x), layer.mlp.gate_up_proj(x).chunk(2, dim=-1)
    for role, expected in {"q_proj": qkv[:, :64], "k_proj": qkv[:, 64:96], "v_proj": qkv[:, 96:],
                           "gate_proj": gate, "up_proj": up}.items():
        part = adapter.prunable(0, role)
        assert torch.equal(x @ part.read(layer.get_submodule(part.module).weight).T, expected), role


@pytest.mark.parametrize("overrides", [{}, PARTIAL_ROTARY, {"sliding_window": 5}],
                         ids=["full-rotary", "partial-rotary", "sliding-window"])
def test_adapter_attention_is_the_models_own_and_its_gradient_exact(overrides):
    model = phi3_model(**overrides)
    rotary = model.model.rotary_emb(torch.zeros(1), torch.arange(3)[None])[0].shape[-1]
    assert rotary == (8 if overrides is PARTIAL_ROTARY else 16)
    assert get_adapter(model).sliding_window(1) == overrides.get("sliding_window")
    assert_adapter_attention_is_exact(model, calibration()[0])


@pytest.mark.parametrize("recipe", RECIPES.values(), ids=RECIPES.keys())
def test_recipes_prune_exactly_and_save_load_is_bit_exact(recipe, tmp_path):
    assert_recipe_prunes_and_round_trips(phi3_model(), recipe, tmp_path)
    manifest = read_manifest(tmp_path / "bitmask")
    assert len(manifest.sparsity.modules) == 2 * len({role for rule in recipe["rules"] for role in rule["modules"]})
    assert all(entry.sparsity == 0.5 for entry in manifest.sparsity.modules.values())
    if recipe is RECIPES["whole"]:
        assert {name for name in manifest.sparsity.modules if ".layers.0." in name} == {
            "model.layers.0.self_attn.qkv_proj.weight[q_proj]", "model.layers.0.self_attn.qkv_proj.weight[k_proj]",
            "model.layers.0.self_attn.qkv_proj.weight[v_proj]", "model.layers.0.self_attn.o_proj.weight",
            "model.layers.0.mlp.gate_up_proj.weight[gate_proj]", "model.layers.0.mlp.gate_up_proj.weight[up_proj]",
            "model.layers.0.mlp.down_proj.weight"}
        assert manifest.sparsity.modules["model.layers.1.mlp.gate_up_proj.weight[up_proj]"].numel == 96 * 64


@pytest.mark.parametrize("roles, layout", [(["q_proj", "k_proj"], "sparse-bitmask"),
                                           (["q_proj", "k_proj", "v_proj"], "sparse-24-bitmask")])
def test_qkv_proj_uses_the_2_of_4_layout_only_when_all_its_rows_are_2_of_4(roles, layout, tmp_path):
    model = phi3_model()
    pruner = assert_prunes_to_exact_sparsity(model, {"rules": [{"modules": roles, "method": "magnitude",
                                                                "structure": "2:4"}]})
    assert_save_and_load_are_bit_exact(model, pruner, tmp_path)
    assert read_manifest(tmp_path / "bitmask").sizes.bitmask_layout == layout


def test_export_converts_fused_tensors_both_ways(tmp_path):
    model = phi3_model()
    pruner = assert_prunes_to_exact_sparsity(model, RECIPES["whole"])
    for format in ("dense", "bitmask"):
        pruner.save(model, tmp_path / "saved" / format, format=format)
    for source, format in (("bitmask", "dense"), ("dense", "bitmask")):
        export_pruned(tmp_path / "saved" / source, tmp_path / format, format)
        exported, saved = (load_file(root / format / "model.safetensors") for root in (tmp_path, tmp_path / "saved"))
        assert exported.keys() == saved.keys()
        assert all(torch.equal(exported[key], tensor) for key, tensor in saved.items()), format
        assert read_manifest(tmp_path / format).sparsity == read_manifest(tmp_path / "saved" / format).sparsity
