"""Slow (still run in CI): the real SmolLM2-135M, loaded from its GGUF file."""

import copy

import pytest
import torch
from transformers import AutoModelForCausalLM

from attnprune_opt import AttentionPruner, load_pruned_model
from attnprune_opt.models.loading import load_model, load_tokenizer
from tiny_models import assert_adapter_recomputes_attention

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def smollm2():
    return load_model(attn_implementation="eager").eval(), load_tokenizer()


def test_adapter_recomputes_smollm2_attention(smollm2, all_threads):
    model, tokenizer = smollm2
    ids = torch.tensor(tokenizer("The quick brown fox jumps over the lazy dog near the river bank.")["input_ids"])
    assert_adapter_recomputes_attention(model, ids, atol=1e-5)


def test_smollm2_end_to_end_on_two_layers(smollm2, tmp_path, all_threads, mini_data):
    model, tokenizer = smollm2
    model = copy.deepcopy(model)
    dense = copy.deepcopy(model.state_dict())
    pruner = AttentionPruner(layers=[0, 1], attention={"refit_iterations": 5},
                             calibration={"source": "c4", "num_samples": 2, "seq_len": 64})
    pruner.prune_model(model, tokenizer, progress=False)
    assert pruner.report.calibration["indices"] == [0, 1]
    pruner.save(model, tmp_path / "out")

    loaded = load_pruned_model(tmp_path / "out", attn_implementation="eager")
    plain = AutoModelForCausalLM.from_pretrained(tmp_path / "out", attn_implementation="eager")
    ids = torch.tensor(tokenizer("Pruning attention weights")["input_ids"])[None]
    with torch.no_grad():
        logits = model(ids).logits
        assert torch.equal(logits, loaded(ids).logits)
        assert torch.equal(logits, plain(ids).logits)
    for name, tensor in plain.state_dict().items():
        if any(f"layers.{i}.self_attn.{m}.weight" in name for i in (0, 1) for m in ("q_proj", "k_proj")):
            assert ((tensor == 0).sum(dim=1) == tensor.shape[1] // 2).all(), name
        else:
            assert torch.equal(tensor, dense[name]), name
