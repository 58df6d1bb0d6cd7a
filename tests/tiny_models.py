"""Tiny random Llama-family models built from configs, for fast pipeline tests."""

from __future__ import annotations

import torch
from accelerate import cpu_offload
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, LlamaConfig, MistralConfig, Qwen2Config

from attnprune_opt.core import multihead_attention_probs
from attnprune_opt.models.base import read_matrix
from attnprune_opt.models.registry import get_adapter
from attnprune_opt.pipeline.capture import capture_layer_inputs, record_linear_inputs, run_layer

CONFIGS = {"llama": LlamaConfig, "mistral": MistralConfig, "qwen2": Qwen2Config}
VOCAB = 96


def tiny_model(kind: str = "llama", seed: int = 0, layers: int = 2, vocab_size_override: int | None = None,
               **overrides):
    """A random model whose q/k weights are scaled up so that attention is far from uniform."""
    config = CONFIGS[kind](vocab_size=vocab_size_override or VOCAB, hidden_size=64, intermediate_size=96, num_hidden_layers=layers,
                           num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                           tie_word_embeddings=False, **overrides)
    config._attn_implementation = "eager"
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, attn_implementation="eager").eval()
    with torch.no_grad():
        for layer in model.model.layers:
            layer.self_attn.q_proj.weight.mul_(8)
            layer.self_attn.k_proj.weight.mul_(8)
    return model


def calibration(seed: int = 1, lengths: tuple[int, ...] = (24, 24, 17, 32)) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, VOCAB, (n,), generator=g) for n in lengths]


WHOLE_MODEL = dict(
    rules=[{"modules": ["q_proj", "k_proj"], "method": "attention", "sparsity": 0.5},
           {"modules": ["v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"], "method": "sparsegpt",
            "sparsity": 0.5}],
    attention={"refit_iterations": 15},
    sparsegpt={"blocksize": 32},
)
QK_ONLY = dict(rules=[{"modules": ["q_proj", "k_proj"], "method": "attention", "sparsity": 0.5}],
               attention={"refit_iterations": 15})


def assert_adapter_recomputes_attention(model, ids: torch.Tensor, atol: float) -> None:
    """The core's attention, fed by the adapter (captured inputs, its attention spec, grouped heads), equals the
    attention probabilities the model itself outputs, layer after layer and head by head."""
    adapter = get_adapter(model)
    layers = adapter.layers(model)
    with torch.no_grad():
        reference = model(ids[None], output_attentions=True).attentions
        inputs = capture_layer_inputs(model, layers, [ids])
        for index, layer in enumerate(layers):
            q, k = (adapter.prunable(index, role) for role in ("q_proj", "k_proj"))
            with record_linear_inputs({"q": layer.get_submodule(q.module)}, keep=["q"]) as recorded:
                outputs = run_layer(layer, inputs)
            spec = adapter.attention_spec(layer, index, inputs[0].kwargs)
            probs = multihead_attention_probs(recorded.tensors["q"][0], read_matrix(layer, q), read_matrix(layer, k),
                                              spec)
            assert torch.allclose(probs, reference[index], atol=atol, rtol=0), f"layer {index}"
            inputs = outputs


def saved_tensors(folder) -> dict[str, torch.Tensor]:
    return {name: tensor for file in sorted(folder.glob("*.safetensors")) for name, tensor in load_file(file).items()}


def assert_offload_is_bit_identical(folder, out, config: dict, device_map: dict,
                                    snapshot=None) -> dict[str, torch.Tensor]:
    """Prune the model saved in ``folder`` with ``AttentionPruner(**config)`` in memory, under accelerate's
    cpu_offload, and dispatched by ``device_map`` (with disk offload); the three results must be bit-identical:
    the saved outputs (under ``out``), or ``snapshot(model)`` (name -> tensor) when given. Returns the in-memory
    run's."""
    from attnprune_opt import AttentionPruner

    results = {}

    def prune_and_save(name, model):
        pruner = AttentionPruner(**config)
        pruner.prune_model(model, calibration=calibration(), progress=False)
        if snapshot is not None:
            results[name] = snapshot(model)
            return
        pruner.save(model, out / name)
        results[name] = saved_tensors(out / name)

    prune_and_save("plain", AutoModelForCausalLM.from_pretrained(folder, attn_implementation="eager"))
    offloaded = AutoModelForCausalLM.from_pretrained(folder, attn_implementation="eager")
    cpu_offload(offloaded, execution_device=torch.device("cpu"))
    assert all(p.device.type == "meta" for p in offloaded.model.layers.parameters())
    prune_and_save("cpu_offload", offloaded)
    on_disk = AutoModelForCausalLM.from_pretrained(folder, attn_implementation="eager", device_map=device_map,
                                                   offload_folder=out / "offload")
    disk_layers = [int(name.rpartition(".")[2]) for name, where in device_map.items() if where == "disk"]
    assert disk_layers and all(p.device.type == "meta" for i in disk_layers
                               for p in on_disk.model.layers[i].parameters())
    prune_and_save("disk_offload", on_disk)
    for name in ("cpu_offload", "disk_offload"):
        assert results[name].keys() == results["plain"].keys()
        for key, tensor in results["plain"].items():
            assert torch.equal(results[name][key], tensor), (name, key)
    return results["plain"]


def save_tiny_model_folder(folder, **config) -> None:
    """A tiny Llama with SmolLM2's tokenizer saved as a model folder, as a user would point --model at;
    ``config`` changes its config (e.g. max_position_embeddings) before saving."""
    from attnprune_opt.models.loading import load_tokenizer

    tokenizer = load_tokenizer()
    model = tiny_model("llama", vocab_size_override=len(tokenizer))
    for key, value in config.items():
        setattr(model.config, key, value)
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)


def pruned_tiny_model(config: dict):
    """A tiny Llama pruned by ``AttentionPruner(**config)`` on the fixed calibration sequences; (model, pruner)."""
    from attnprune_opt import AttentionPruner

    model = tiny_model("llama")
    pruner = AttentionPruner(**config)
    pruner.prune_model(model, calibration=calibration(), progress=False)
    return model, pruner
