"""The layer-by-layer pipeline on tiny Llama, Mistral and Qwen2 models: adapter exactness, exact sparsity,
save/load round trips, offload invariance, determinism, and named errors for bad input."""

import copy

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, GPT2Config, GPT2LMHeadModel

from attnprune_opt import AttentionPruner
from attnprune_opt.errors import (
    CalibrationDataError,
    ConfigError,
    NonFiniteWeightsError,
    OutputExistsError,
    RecipeError,
    UnsupportedArchitectureError,
)
from attnprune_opt.models.registry import get_adapter, supported_model_types
from tiny_models import (
    QK_ONLY,
    WHOLE_MODEL,
    assert_adapter_recomputes_attention,
    assert_offload_is_bit_identical,
    calibration,
    tiny_model,
)

KINDS = ["llama", "mistral", "qwen2"]


@pytest.mark.parametrize("kind", KINDS)
def test_adapter_recomputes_the_models_own_attention(kind):
    assert_adapter_recomputes_attention(tiny_model(kind), calibration()[0], atol=1e-6)


@pytest.mark.parametrize("kind", ["mistral", "qwen2"])
def test_adapter_recomputes_sliding_window_attention(kind):
    """A window shorter than the sequence: query i sees only the last 5 keys, in the model and in the core."""
    extra = {"use_sliding_window": True, "max_window_layers": 0} if kind == "qwen2" else {}
    model = tiny_model(kind, sliding_window=5, **extra)
    ids = calibration()[0]
    assert get_adapter(model).sliding_window(0) == 5
    assert_adapter_recomputes_attention(model, ids, atol=1e-6)


@pytest.mark.parametrize("kind", KINDS)
def test_prune_save_and_plain_from_pretrained_give_identical_logits(kind, tmp_path):
    model = tiny_model(kind)
    pruner = AttentionPruner(**WHOLE_MODEL)
    pruner.prune_model(model, calibration=calibration(), progress=False)
    pruner.save(model, tmp_path / "out")
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path / "out", attn_implementation="eager")
    ids = calibration(seed=5)[0][None]
    with torch.no_grad():
        assert torch.equal(model(ids).logits, loaded(ids).logits)
    for name, module in pruner.report.module_sparsity().items():
        assert module["sparsity"] == 0.5, name


@pytest.mark.parametrize("mask", ["wanda", "descent", "magnitude", "sparsegpt"])
@pytest.mark.parametrize("refit", [0, 5])
def test_qk_rows_are_exactly_half_zeros_and_everything_else_is_untouched(mask, refit):
    model = tiny_model("llama")
    dense = copy.deepcopy(model.state_dict())
    descent = {"iterations": 5} if mask == "descent" else {}
    pruner = AttentionPruner(**{**QK_ONLY, "attention": {"mask": mask, "refit_iterations": refit, **descent}})
    pruner.prune_model(model, calibration=calibration(), progress=False)
    for name, tensor in model.state_dict().items():
        if name.endswith(("q_proj.weight", "k_proj.weight")):
            assert ((tensor == 0).sum(dim=1) == tensor.shape[1] // 2).all(), name
            kept = tensor != 0
            if refit or mask == "sparsegpt":
                assert not torch.equal(tensor[kept], dense[name][kept]), name
            else:
                assert torch.equal(tensor[kept], dense[name][kept]), name
        else:
            assert torch.equal(tensor, dense[name]), name
    for layer in pruner.report.layers:
        attention = layer.attention
        if refit:
            assert attention.refit_kept and attention.error_final < attention.error_mask
        else:
            assert not attention.refit_kept and attention.error_final == attention.error_mask


def test_same_seed_gives_bit_identical_masks():
    a, b = tiny_model("qwen2"), tiny_model("qwen2")
    for model in (a, b):
        AttentionPruner(**WHOLE_MODEL).prune_model(model, calibration=calibration(), progress=False)
    for (name, x), y in zip(a.state_dict().items(), b.state_dict().values()):
        assert torch.equal(x, y), name


def test_no_offload_cpu_offload_and_disk_offload_are_bit_identical(tmp_path):
    tiny_model("llama", layers=3).save_pretrained(tmp_path / "dense")
    original = load_file(tmp_path / "dense" / "model.safetensors")
    device_map = {"model.embed_tokens": "cpu", "model.layers.0": "cpu", "model.layers.1": "disk",
                  "model.layers.2": "disk", "model.norm": "cpu", "model.rotary_emb": "cpu", "lm_head": "cpu"}
    plain = assert_offload_is_bit_identical(tmp_path / "dense", tmp_path, WHOLE_MODEL, device_map)
    after = load_file(tmp_path / "dense" / "model.safetensors")  # the user's checkpoint is never written
    assert all(torch.equal(after[key], tensor) for key, tensor in original.items())
    pruned_q = plain["model.layers.2.self_attn.q_proj.weight"]
    assert (pruned_q == 0).float().mean() == 0.5
    assert not torch.equal(pruned_q, original["model.layers.2.self_attn.q_proj.weight"])


def test_config_round_trip_and_no_mutation():
    config = copy.deepcopy(WHOLE_MODEL)
    snapshot = copy.deepcopy(config)
    pruner = AttentionPruner(**config)
    assert config == snapshot
    again = AttentionPruner.from_dict(pruner.to_dict())
    assert again.to_dict() == pruner.to_dict()
    assert again.config == pruner.config


def test_unknown_architecture_is_named():
    model = GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=50))
    supported = supported_model_types()
    assert {"llama", "mistral", "qwen2"} <= set(supported) and list(supported) == sorted(supported)
    message = f"model_type 'gpt2' is not supported; supported: {', '.join(supported)}$"
    with pytest.raises(UnsupportedArchitectureError, match=message):
        AttentionPruner().prune_model(model, calibration=calibration())


def test_bad_inputs_raise_named_errors():
    with pytest.raises(RecipeError, match="sparsity"):
        AttentionPruner(rules=[{"modules": ["q_proj"], "method": "attention", "sparsity": 1.0}])
    with pytest.raises(RecipeError, match="did you mean 'lam'"):
        AttentionPruner(attention={"lamda": 0.1})
    model = tiny_model("llama")
    with pytest.raises(CalibrationDataError, match="empty"):
        AttentionPruner().prune_model(model, calibration=[])
    with pytest.raises(CalibrationDataError, match="fewer than 2 tokens"):
        AttentionPruner().prune_model(model, calibration=[torch.tensor([3])])
    with pytest.raises(ConfigError, match="does not divide the input size 64"):
        AttentionPruner(rules=[{"modules": ["v_proj"], "method": "magnitude", "structure": "3:128"}]).prune_model(
            model, calibration=calibration())
    with pytest.raises(ConfigError, match="layers \\[7\\] do not exist"):
        AttentionPruner(layers=[7]).prune_model(model, calibration=calibration())
    with torch.no_grad():
        model.model.layers[1].self_attn.k_proj.weight[0, 0] = float("nan")
    with pytest.raises(NonFiniteWeightsError, match="model.layers.1.self_attn.k_proj.weight"):
        AttentionPruner(**QK_ONLY).prune_model(model, calibration=calibration(), progress=False)


def test_existing_output_is_refused_and_overwrite_replaces_it(tmp_path):
    model = tiny_model("llama")
    pruner = AttentionPruner(**QK_ONLY)
    pruner.prune_model(model, calibration=calibration(), progress=False)
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "keep.txt").write_text("user data")
    with pytest.raises(OutputExistsError):
        pruner.save(model, tmp_path / "out")
    assert (tmp_path / "out" / "keep.txt").read_text() == "user data"
    pruner.save(model, tmp_path / "out", overwrite=True)
    assert not (tmp_path / "out" / "keep.txt").exists()
    assert (tmp_path / "out" / "attnprune_manifest.json").exists()
    assert [p.name for p in tmp_path.iterdir()] == ["out"]


def test_failure_while_saving_leaves_no_output(tmp_path, monkeypatch):
    model = tiny_model("llama")
    pruner = AttentionPruner(**QK_ONLY)
    pruner.prune_model(model, calibration=calibration(), progress=False)

    def broken(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(type(model), "save_pretrained", broken)
    with pytest.raises(OSError, match="disk full"):
        pruner.save(model, tmp_path / "out")
    assert list(tmp_path.iterdir()) == []


def test_peak_memory_is_the_processs_own_not_its_parents(tmp_path):
    """A prune started by a large process (a benchmark holding a model) reports its own peak RSS; getrusage's
    ru_maxrss would report the parent's, since it survives exec."""
    import subprocess
    import sys

    from attnprune_opt.pipeline.layerwise import peak_rss_mb

    ballast = torch.ones(3 * 2**27)  # 1.5 GiB, resident
    child = subprocess.run(
        [sys.executable, "-c", "from attnprune_opt.pipeline.layerwise import peak_rss_mb; print(peak_rss_mb())"],
        check=True, capture_output=True, text=True)
    parent = peak_rss_mb()
    assert parent > 1536 and float(child.stdout) < parent - 1024
    assert abs(peak_rss_mb(tmp_path / "missing") - parent) < 64  # without /proc: getrusage, in the same unit
    del ballast


def test_a_refit_that_raises_the_error_is_discarded():
    """A diverging refit (an absurd step) must not be kept: the Wanda pattern's own weights are returned."""
    model = tiny_model("llama")
    dense = copy.deepcopy(model.state_dict())
    pruner = AttentionPruner(**{**QK_ONLY, "attention": {"refit_iterations": 3, "refit_lr": 1000.0}})
    pruner.prune_model(model, calibration=calibration(), progress=False)
    for layer in pruner.report.layers:
        assert not layer.attention.refit_kept and layer.attention.error_final == layer.attention.error_mask
    for name, tensor in model.state_dict().items():
        if name.endswith(("q_proj.weight", "k_proj.weight")):
            kept = tensor != 0
            assert torch.equal(tensor[kept], dense[name][kept]), name


def test_the_report_gives_wall_and_cpu_time_and_prints_both():
    model = tiny_model("llama")
    pruner = AttentionPruner(**{**QK_ONLY, "attention": {"refit_iterations": 2}})
    pruner.prune_model(model, calibration=calibration(), progress=False)
    report = pruner.report
    assert 0 < report.cpu_seconds and 0 < report.seconds
    assert report.to_dict()["cpu_seconds"] == report.cpu_seconds
    assert f"({report.cpu_seconds:.1f} CPU s)" in report.to_markdown()
