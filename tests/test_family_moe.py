"""Mixture-of-experts families (Qwen3-MoE, Qwen2-MoE, Mixtral) on tiny random models: every family's acceptance
checks (attention and gradient exact, q/k recipes prune and round-trip bit-exact, the whole-model recipe prunes every
expert matrix exactly), and each expert calibrated on exactly the tokens the model routes to it, with its own
statistics. Saving pruned experts is export's part and is not covered here."""

import copy

import pytest
import torch
from transformers import MixtralConfig, Qwen2MoeConfig, Qwen3MoeConfig

from attnprune_opt import AttentionPruner
from attnprune_opt.core import InputStatistics
from attnprune_opt.errors import ConfigError
from attnprune_opt.methods.base import method
from attnprune_opt.models.base import read_matrix
from attnprune_opt.models.registry import get_adapter
from attnprune_opt.pipeline.capture import capture_layer_inputs, record_matrix_inputs, run_layer
from family_checks import (
    RECIPES,
    assert_adapter_attention_is_exact,
    assert_prunes_to_exact_sparsity,
    assert_recipe_prunes_and_round_trips,
    assert_save_and_load_are_bit_exact,
    tiny_family_model,
)
from tiny_models import VOCAB, assert_offload_is_bit_identical, calibration

KINDS = ["qwen3_moe", "qwen2_moe", "mixtral"]
EXPERTS = 4
CONFIGS = {"qwen3_moe": Qwen3MoeConfig, "qwen2_moe": Qwen2MoeConfig}


def tiny_moe(kind: str, seed: int = 0, **overrides):
    """Two layers of 4 experts, 2 per token, as every family's tiny model (q/k scaled up, norms moved off 1), the
    router scaled up so that routing depends on the token."""
    common = dict(vocab_size=VOCAB, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, head_dim=16, num_experts_per_tok=2, max_position_embeddings=256,
                  tie_word_embeddings=False)
    if kind == "mixtral":
        config = MixtralConfig(**{"num_local_experts": EXPERTS, "intermediate_size": 32, **common, **overrides})
    else:
        extra = {"shared_expert_intermediate_size": 40} if kind == "qwen2_moe" else {}
        config = CONFIGS[kind](**{"num_experts": EXPERTS, "moe_intermediate_size": 32, "intermediate_size": 48,
                                  **extra, **common, **overrides})
    model = tiny_family_model(config, seed)
    with torch.no_grad():
        for layer in model.model.layers:
            if hasattr(layer.mlp, "experts"):
                layer.mlp.gate.weight.mul_(50)
    return model


def recipe(linear_method: str) -> dict:
    settings = {"sparsegpt": {"blocksize": 16}} if linear_method == "sparsegpt" else {}
    return dict(rules=[{"modules": ["q_proj", "k_proj"], "method": "attention", "sparsity": 0.5},
                       {"modules": ["v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
                        "method": linear_method, "sparsity": 0.5}],
                attention={"refit_iterations": 5}, **settings)


def what_experts_receive(model, sequences, monkeypatch) -> dict[tuple[int, str], list[torch.Tensor]]:
    """(layer, input key) -> the rows each expert matrix multiplies in the model's own eager forward, per sequence,
    seen by intercepting its F.linear calls."""
    adapter = get_adapter(model)
    experts = {}
    for index, layer in enumerate(adapter.layers(model)):
        for p in adapter.prunables(index):
            if p.expert is not None:
                experts[(index, adapter.input_key(p))] = getattr(layer.get_submodule(p.module), p.parameter)[p.expert]
    seen = {key: [] for key in experts}
    linear = torch.nn.functional.linear

    def spy(x, weight, *args, **kwargs):
        for key, matrix in experts.items():
            if weight.shape == matrix.shape and torch.equal(weight, matrix):
                seen[key][-1] = torch.cat([seen[key][-1], x.detach()])
        return linear(x, weight, *args, **kwargs)

    monkeypatch.setattr(torch.nn.functional, "linear", spy)
    with torch.no_grad():
        for ids in sequences:
            for key, matrix in experts.items():
                seen[key].append(torch.zeros(0, matrix.shape[1]))
            model(ids[None])
    monkeypatch.undo()
    return seen


def recorded_routed_inputs(model, sequences) -> dict[tuple[int, str], list[torch.Tensor]]:
    """The same, as the pipeline records it: layer by layer through the adapter's input keys."""
    adapter = get_adapter(model)
    recorded = {}
    with torch.no_grad():
        inputs = capture_layer_inputs(model, adapter.layers(model), sequences)
        for index, layer in enumerate(adapter.layers(model)):
            keys = [k for k in dict.fromkeys(adapter.input_key(p) for p in adapter.prunables(index)) if "[" in k]
            with record_matrix_inputs(adapter, index, layer, keep=keys) as rec:
                outputs = run_layer(layer, inputs)
            recorded.update({(index, key): rec.tensors[key] for key in keys})
            inputs = outputs
    return recorded


@pytest.mark.parametrize("kind", KINDS)
def test_adapter_attention_is_the_models_own_and_its_gradient_exact(kind):
    assert_adapter_attention_is_exact(tiny_moe(kind), calibration()[3])


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("name", ["qk", "qk_descent"])
def test_qk_recipes_prune_exactly_and_save_load_is_bit_exact(kind, name, tmp_path):
    assert_recipe_prunes_and_round_trips(tiny_moe(kind), RECIPES[name], tmp_path)


@pytest.mark.parametrize("kind", KINDS)
def test_whole_model_recipe_prunes_every_expert_matrix_exactly_and_saves_dense_bit_exactly(kind, tmp_path):
    """Stacked expert weights are saved stacked (dense format) and load back bit for bit; the bitmask format, which
    stores 2-D matrices, refuses them by name before writing anything."""
    model = tiny_moe(kind)
    pruner = assert_prunes_to_exact_sparsity(model, RECIPES["whole"])
    assert_save_and_load_are_bit_exact(model, pruner, tmp_path, formats=("dense",))
    with pytest.raises(ConfigError, match=r"stores 2-D '\.weight' tensors only, not model\.layers\.0\.mlp\.experts"):
        pruner.save(model, tmp_path / "bitmask", format="bitmask")
    assert not (tmp_path / "bitmask").exists()


@pytest.mark.parametrize("kind", KINDS)
def test_expert_matrices_are_the_stacked_tensors_rows(kind):
    """gate rows first, then up rows, of gate_up_proj; each expert its own slice."""
    model = tiny_moe(kind)
    adapter, layer = get_adapter(model), model.model.layers[0]
    size = layer.mlp.experts.down_proj.shape[-1]
    matrices = {(p.role, p.expert): read_matrix(layer, p) for p in adapter.prunables(0) if p.expert is not None}
    assert len(matrices) == 3 * EXPERTS
    for e in range(EXPERTS):
        assert torch.equal(matrices["gate_proj", e], layer.mlp.experts.gate_up_proj[e, :size])
        assert torch.equal(matrices["up_proj", e], layer.mlp.experts.gate_up_proj[e, size:])
        assert torch.equal(matrices["down_proj", e], layer.mlp.experts.down_proj[e])


@pytest.mark.parametrize("kind", KINDS)
def test_routed_inputs_are_exactly_what_each_expert_receives(kind, monkeypatch):
    model = tiny_moe(kind, experts_implementation="eager")
    sequences = calibration()
    seen = what_experts_receive(model, sequences, monkeypatch)
    recorded = recorded_routed_inputs(model, sequences)
    assert recorded.keys() == seen.keys()
    for key, rows in seen.items():
        assert len(recorded[key]) == len(rows) == len(sequences)
        for got, want in zip(recorded[key], rows):
            assert torch.equal(got, want), key
    tokens = sum(len(ids) for ids in sequences)
    for index in range(2):
        counts = [sum(len(x) for x in recorded[index, f"mlp.experts.gate_up_proj[{e}]"]) for e in range(EXPERTS)]
        assert min(counts) > 0 and sum(counts) == 2 * tokens, counts  # every expert used; top-2 of every token


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("name", ["sparsegpt", "wanda"])
def test_whole_model_recipe_prunes_each_expert_with_its_own_tokens(kind, name, monkeypatch):
    """Every matrix of every expert ends exactly half zeros, and layer 0's experts are what the linear method
    gives on each expert's own routed inputs (the first layer's inputs do not depend on earlier pruning)."""
    model = tiny_moe(kind)
    dense = copy.deepcopy(model)
    sequences = calibration()
    pruner = AttentionPruner(**recipe(name))
    pruner.prune_model(model, calibration=sequences, progress=False)
    adapter = get_adapter(model)
    for index, layer in enumerate(adapter.layers(model)):
        for p in adapter.prunables(index):
            weight = read_matrix(layer, p)
            assert int((weight == 0).sum()) == weight.numel() // 2, (index, p.label)
    assert all(not layer.uncalibrated for layer in pruner.report.layers)

    dense.config._experts_implementation = "eager"
    seen = what_experts_receive(dense, sequences, monkeypatch)
    rule = pruner.config.rule_for("gate_proj")
    for p in adapter.prunables(0):
        if p.expert is None:
            continue
        stats = InputStatistics(read_matrix(dense.model.layers[0], p).shape[1], hessian=name == "sparsegpt")
        for x in seen[0, adapter.input_key(p)]:
            stats.update(x)
        assert stats.tokens > 0, p.label
        expected = method(name).prune_matrix(read_matrix(dense.model.layers[0], p), rule, stats, pruner.config)
        assert torch.equal(read_matrix(model.model.layers[0], p), expected), p.label


def prunable_matrices(model) -> dict[str, torch.Tensor]:
    """Every prunable matrix of the model by its label, read through accelerate's offload hooks."""
    adapter = get_adapter(model)
    return {f"{adapter.layer_prefix(i)}.{p.label}": read_matrix(layer, p)
            for i, layer in enumerate(adapter.layers(model)) for p in adapter.prunables(i)}


@pytest.mark.parametrize("kind", KINDS)
def test_no_offload_cpu_offload_and_disk_offload_are_bit_identical(kind, tmp_path):
    """Routed inputs, q/k norms and biases are read through accelerate's offload hooks; stacked expert tensors
    are written back through its weights map (compared in memory: saving pruned experts is export's part)."""
    tiny_moe(kind).save_pretrained(tmp_path / "dense")
    device_map = {"model.embed_tokens": "cpu", "model.layers.0": "cpu", "model.layers.1": "disk", "model.norm": "cpu",
                  "model.rotary_emb": "cpu", "lm_head": "cpu"}
    plain = assert_offload_is_bit_identical(tmp_path / "dense", tmp_path, recipe("sparsegpt"), device_map,
                                            snapshot=prunable_matrices)
    experts = [label for label in plain if "experts" in label]
    assert len(experts) == 2 * 3 * EXPERTS and all((plain[label] == 0).float().mean() == 0.5 for label in experts)


def test_an_expert_no_token_reaches_is_pruned_by_magnitude_and_reported():
    """The router is forced to experts 0 and 1: experts 2 and 3 see no calibration token, so SparseGPT has no
    Hessian for them; they are pruned by magnitude and named in the report."""
    model = tiny_moe("qwen3_moe")
    dense = copy.deepcopy(model)

    def only_first_two(module, args, output):
        logits, weights, indices = output
        return logits, weights, torch.stack([torch.zeros_like(indices[:, 0]), torch.ones_like(indices[:, 1])], -1)

    for layer in model.model.layers:
        layer.mlp.gate.register_forward_hook(only_first_two)
    pruner = AttentionPruner(**recipe("sparsegpt"))
    pruner.prune_model(model, calibration=calibration(), progress=False)
    adapter = get_adapter(model)
    starved = [p for p in adapter.prunables(0) if p.expert in (2, 3)]
    for report in pruner.report.layers:
        assert report.uncalibrated == [p.label for p in starved]
    for p in starved:
        expected = method("magnitude").prune_matrix(read_matrix(dense.model.layers[0], p),
                                                    pruner.config.rule_for(p.role), None, pruner.config)
        assert torch.equal(read_matrix(model.model.layers[0], p), expected)
    assert "no calibration token" in pruner.report.to_markdown()


@pytest.mark.parametrize("kind", ["qwen3_moe", "qwen2_moe"])
def test_dense_mlp_layers_prune_as_plain_linears(kind):
    """mlp_only_layers=[0]: layer 0 has a dense MLP (its own gate/up/down linears), layer 1 experts (and in
    Qwen2-MoE a shared expert of plain linears)."""
    model = tiny_moe(kind, mlp_only_layers=[0])
    adapter = get_adapter(model)
    assert [p.module for p in adapter.prunables(0)] == [f"self_attn.{r}" for r in ("q_proj", "k_proj", "v_proj",
                                                        "o_proj")] + [f"mlp.{r}" for r in ("gate_proj", "up_proj",
                                                                                         "down_proj")]
    shared = [p.module for p in adapter.prunables(1) if p.module.startswith("mlp.shared_expert")]
    assert shared == (["mlp.shared_expert.gate_proj", "mlp.shared_expert.up_proj", "mlp.shared_expert.down_proj"]
                      if kind == "qwen2_moe" else [])
    assert {p.expert for p in adapter.prunables(1)} == {None, *range(EXPERTS)}
    pruner = AttentionPruner(**recipe("sparsegpt"))
    pruner.prune_model(model, calibration=calibration(), progress=False)
    for index, layer in enumerate(adapter.layers(model)):
        for p in adapter.prunables(index):
            weight = read_matrix(layer, p)
            assert int((weight == 0).sum()) == weight.numel() // 2, (index, p.label)
    sparsity = pruner.report.module_sparsity()
    assert {name: figures["sparsity"] for name, figures in sparsity.items()} == dict.fromkeys(
        ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"), 0.5)


def test_n_m_structure_is_checked_on_every_layers_matrices_before_pruning():
    """Layer 0's dense MLP is 48 wide (2:4 divides it), the experts of layer 1 are 30 wide: refused up front,
    naming the expert matrix."""
    model = tiny_moe("qwen3_moe", mlp_only_layers=[0], moe_intermediate_size=30)
    dense = copy.deepcopy(model.state_dict())
    rules = [{"modules": ["down_proj"], "method": "magnitude", "structure": "2:4"}]
    with pytest.raises(ConfigError, match=r"does not divide the input size 30 of model\.layers\.1\.mlp\.experts"
                                          r"\.down_proj\[0\]"):
        AttentionPruner(rules=rules).prune_model(model, calibration=calibration(), progress=False)
    assert all(torch.equal(tensor, dense[name]) for name, tensor in model.state_dict().items())


def test_a_joint_method_needing_one_matrix_per_role_is_refused_on_expert_layers():
    """The whole-layer method fits one gate/up/down per layer: on experts it is refused before any work; the
    attention method (q/k only, one matrix each) is not."""
    model = tiny_moe("mixtral")
    dense = copy.deepcopy(model.state_dict())
    layer = {"rules": [{"modules": ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
                        "method": "layer", "sparsity": 0.5}]}
    with pytest.raises(ConfigError, match=r"rules\.0\.method: 'layer' takes one matrix per role, but layer 0 of this "
                                          r"mixtral model has several down_proj, gate_proj, up_proj \(one per expert\)"):
        AttentionPruner(**layer).prune_model(model, calibration=calibration(), progress=False)
    assert all(torch.equal(tensor, dense[name]) for name, tensor in model.state_dict().items())
