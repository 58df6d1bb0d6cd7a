"""The acceptance checks each model family's test file runs on its own tiny model (built from its transformers
config): the closed-form gradient under the adapter's attention spec is autograd's, q/k at 50% and a whole-model
recipe prune it to exact sparsity, and the pruned model saved in either format loads back bit-exact with the same
logits."""

from __future__ import annotations

import copy
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM

from attnprune_opt import AttentionPruner, load_pruned_model
from attnprune_opt.core import FactoredAttentionObjective, multihead_attention_probs
from attnprune_opt.models.base import ATTENTION_ROLES, read_matrix, write_matrices
from attnprune_opt.models.registry import get_adapter
from attnprune_opt.pipeline.capture import capture_layer_inputs, record_linear_inputs, run_layer
from tiny_models import QK_ONLY, VOCAB, WHOLE_MODEL, assert_adapter_recomputes_attention, calibration

#: The shape every family's tiny model shares: 4 query heads over 2 KV heads (grouped-query) of 16 values.
TINY_SHAPE = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=96, num_attention_heads=4,
                  num_key_value_heads=2, head_dim=16, max_position_embeddings=256)

#: The recipes each family is pruned with: q/k at 50% (the default Wanda pattern and refit; and the paper's descent,
#: which solves per KV group, or all heads at once where a norm couples them) and the whole model at 50%.
RECIPES = {"qk": QK_ONLY, "qk_descent": {**QK_ONLY, "attention": {"mask": "descent", "iterations": 15,
                                                                  "refit_iterations": 5}},
           "whole": WHOLE_MODEL}


def tiny_family_model(config, seed: int = 0):
    """A random eager model from ``config`` whose q/k weights are scaled up (x8) so attention is far from
    uniform, and whose norm weights are moved off their initial 1 (Gemma: 0) so a norm's weight applied wrongly
    shows; the adapter says where q/k live, so this works for any registered family."""
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, attn_implementation="eager").eval()
    adapter = get_adapter(model)
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if name.endswith("norm.weight"):
                parameter.add_(torch.rand_like(parameter) - 0.5)
        for index, layer in enumerate(adapter.layers(model)):
            qk = [adapter.prunable(index, role) for role in ATTENTION_ROLES]
            write_matrices(layer, {p: 8 * read_matrix(layer, p) for p in qk})
    return model


def bits(t: torch.Tensor) -> torch.Tensor:
    """The bytes of ``t``: equal bits, not just equal values (-0.0 is not 0.0)."""
    return t.detach().reshape(-1).contiguous().view(torch.uint8)


def logits(model, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(ids[None]).logits


def assert_objective_gradient_matches_autograd(model, ids: torch.Tensor) -> None:
    """With every layer's own spec from the adapter (in float64), the closed-form gradient of the q/k mask loss
    equals autograd's through the same attention."""
    adapter = get_adapter(model)
    layers = adapter.layers(model)
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        inputs = capture_layer_inputs(model, layers, [ids])
    for index, layer in enumerate(layers):
        q, k = (adapter.prunable(index, role) for role in ATTENTION_ROLES)
        with torch.no_grad(), record_linear_inputs({"q": layer.get_submodule(q.module)}, keep=["q"]) as recorded:
            outputs = run_layer(layer, inputs)
        spec = adapter.attention_spec(layer, index, inputs[0].kwargs).to(torch.float64)
        x = recorded.tensors["q"][0].double()
        weights = [read_matrix(layer, p).double() for p in (q, k)]
        objective = FactoredAttentionObjective(x, *weights, spec)
        masks = [torch.rand(w.shape, dtype=torch.float64, generator=generator).requires_grad_() for w in weights]
        value, grads = objective.loss_and_grad(tuple(m.detach() for m in masks))
        probs = multihead_attention_probs(x, masks[0] * weights[0], masks[1] * weights[1], spec)
        loss = objective.weights.data * 0.5 * (probs - objective.targets[0]).pow(2).sum()
        loss.backward()
        assert abs(value - loss.item()) <= 1e-8 * loss.item(), f"layer {index}"
        for grad, mask in zip(grads, masks):
            assert 0 < mask.grad.norm() and (grad - mask.grad).norm() <= 1e-8 * mask.grad.norm(), f"layer {index}"
        inputs = outputs


def assert_adapter_attention_is_exact(model, ids: torch.Tensor) -> None:
    """The adapter's attention is the model's own (probabilities, every layer and head), and the objective's
    closed-form gradient under it is autograd's."""
    assert_adapter_recomputes_attention(model, ids, atol=1e-6)
    assert_objective_gradient_matches_autograd(model, ids)


def assert_prunes_to_exact_sparsity(model, config: dict) -> AttentionPruner:
    """Prune ``model`` in place with ``AttentionPruner(**config)``: every targeted matrix of every layer is exactly
    50% zeros (q/k: in every row), and no other matrix (the other parts of a fused tensor: v of a qkv_proj pruned on
    q/k) or parameter changes; returns the pruner."""
    adapter = get_adapter(model)
    dense = copy.deepcopy(model.state_dict())
    pruner = AttentionPruner(**config)
    pruner.prune_model(model, calibration=calibration(), progress=False)
    targeted = {role for rule in pruner.config.rules for role in rule.modules}
    tensors = set()
    for index, layer in enumerate(adapter.layers(model)):
        assert targeted <= {p.role for p in adapter.prunables(index)}
        for prunable in adapter.prunables(index):  # every expert's, in mixture-of-experts layers
            label = f"{adapter.layer_prefix(index)}.{prunable.label}"
            tensor = f"{adapter.layer_prefix(index)}.{prunable.tensor}"
            matrix = read_matrix(layer, prunable)
            if prunable.role not in targeted:
                assert torch.equal(matrix, prunable.read(dense[tensor])), label
                continue
            assert (matrix == 0).float().mean() == 0.5, label
            if prunable.role in ATTENTION_ROLES:
                assert ((matrix == 0).sum(dim=1) == matrix.shape[1] // 2).all(), label
            tensors.add(tensor)
    for name, tensor in model.state_dict().items():
        if name not in tensors:
            assert torch.equal(tensor, dense[name]), name
    assert {role: entry["sparsity"] for role, entry in pruner.report.module_sparsity().items()} == dict.fromkeys(
        targeted, 0.5)
    return pruner


def assert_save_and_load_are_bit_exact(model, pruner: AttentionPruner, out: Path,
                                       formats: tuple[str, ...] = ("dense", "bitmask")) -> None:
    """Saved dense and as bitmasks, loaded by load_pruned_model and by plain from_pretrained: every tensor equals
    the pruned model's bit for bit, and so do the logits."""
    ids = calibration(seed=5)[0]
    expected = logits(model, ids)
    for format in formats:
        folder = pruner.save(model, out / format, format=format)
        for loaded in (load_pruned_model(folder, attn_implementation="eager"),
                       AutoModelForCausalLM.from_pretrained(folder, attn_implementation="eager")):
            state = loaded.state_dict()
            assert state.keys() == model.state_dict().keys(), format
            for name, tensor in model.state_dict().items():
                assert torch.equal(bits(state[name]), bits(tensor)), (format, name)
            assert torch.equal(bits(logits(loaded, ids)), bits(expected)), format


def assert_recipe_prunes_and_round_trips(model, recipe: dict, out: Path) -> None:
    """Both of the above in turn: prune ``model`` with ``recipe`` to exact sparsity, then save and load it back."""
    assert_save_and_load_are_bit_exact(model, assert_prunes_to_exact_sparsity(model, recipe), out)


def assert_residual_claim_is_the_models(model, ids: torch.Tensor) -> None:
    """The adapter's ``residual_adds_projections`` is what the model computes: a layer's output minus its input
    is o_proj's output plus down_proj's exactly when the adapter says so (the whole-layer method's layer targets
    rely on it)."""
    adapter = get_adapter(model)
    layer = adapter.layers(model)[0]
    seen: dict[str, torch.Tensor] = {}

    def keep(name):
        return lambda module, args, output: seen.__setitem__(name, output[0] if isinstance(output, tuple) else output)

    modules = {role: layer.get_submodule(adapter.prunable(0, role).module) for role in ("o_proj", "down_proj")}
    handles = [module.register_forward_hook(keep(role)) for role, module in modules.items()]
    handles.append(layer.register_forward_pre_hook(
        lambda module, args, kwargs: seen.__setitem__("input", args[0] if args else kwargs["hidden_states"]),
        with_kwargs=True))
    handles.append(layer.register_forward_hook(keep("output")))
    try:
        with torch.no_grad():
            model(ids.reshape(1, -1))
    finally:
        for handle in handles:
            handle.remove()
    added = torch.allclose(seen["output"] - seen["input"], seen["o_proj"] + seen["down_proj"], atol=1e-5)
    assert added == adapter.residual_adds_projections, (model.config.model_type, added)
