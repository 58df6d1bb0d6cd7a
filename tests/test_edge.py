"""Edge figures: exact weight memory (float32, bfloat16, int8), int8 that keeps a pruned model's zeros, the speed
record's shape (never its values: no timed tests), and ``eval --edge`` end to end."""

from __future__ import annotations

import copy
import json
import math
from pathlib import Path

import pytest
import torch
from tiny_models import calibration, tiny_model
from torch import nn

from attnprune_opt import AttentionPruner
from attnprune_opt.cli import main
from attnprune_opt.errors import ConfigError
from attnprune_opt.evaluation import report
from attnprune_opt.evaluation.edge import quantize_int8, token_throughput, weights_mb
from attnprune_opt.models.loading import load_tokenizer


QK50 = [{"modules": ["q_proj", "k_proj"], "method": "magnitude", "sparsity": 0.5}]


def pruned(model: nn.Module) -> AttentionPruner:
    """``model`` with half of each q/k row zeroed (in place); the pruner, to save it."""
    pruner = AttentionPruner(rules=QK50)
    pruner.prune_model(model, calibration=calibration(), progress=False)
    return pruner


def _bytes(model: nn.Module) -> int:
    return sum(t.numel() * t.element_size() for t in [*model.parameters(), *model.buffers()])


def test_weight_memory_in_each_dtype():
    model = tiny_model("llama")  # untied embeddings: every parameter has its own storage
    assert weights_mb(model) * 1e6 == _bytes(model)
    half = copy.deepcopy(model).to(torch.bfloat16)
    assert weights_mb(half) * 1e6 == _bytes(half) < _bytes(model)
    tied = tiny_model("llama")
    tied.lm_head.weight = tied.model.embed_tokens.weight
    assert weights_mb(tied) * 1e6 == _bytes(model) - model.lm_head.weight.nbytes  # a shared weight counts once


def test_int8_keeps_the_zeros_and_shrinks_exactly_the_decoder_linears():
    model = tiny_model("llama")
    pruned(model)
    before = weights_mb(model) * 1e6
    ids = torch.randint(0, 96, (1, 24), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        reference = model(ids).logits
    linears = {name: module.weight.detach().clone() for name, module in model.named_modules()
               if isinstance(module, nn.Linear) and ".layers." in f".{name}"}
    quantize_int8(model)
    saved = 0
    for name, dense_weight in linears.items():
        weight = dict(model.named_modules())[name].weight
        assert weight.qdata.dtype == torch.int8 and weight.qdata.shape == dense_weight.shape
        zeros = dense_weight == 0
        assert zeros.any() == name.endswith(("q_proj", "k_proj")), name  # the pruned ones
        assert torch.equal(weight.dequantize()[zeros], torch.zeros(int(zeros.sum()))), name
        saved += dense_weight.nbytes - sum(getattr(weight, part).nbytes for part in ("qdata", "scale", "zero_point"))
    assert before - weights_mb(model) * 1e6 == saved > 0
    assert model.lm_head.weight.dtype == torch.float32 and model.model.embed_tokens.weight.dtype == torch.float32
    with torch.no_grad():
        error = (model(ids).logits - reference).norm() / reference.norm()
    assert 0 < error < 0.02  # quantized, and close


def test_speed_record_and_bad_arguments():
    record = token_throughput(tiny_model("llama"), prompt_tokens=12, new_tokens=3, repeats=2)
    assert (record["prompt_tokens"], record["new_tokens"], record["repeats"]) == (12, 3, 2)
    assert record["dtype"] == "float32" and record["threads"] == torch.get_num_threads()
    for key in ("prefill_tokens_per_s", "decode_tokens_per_s"):
        assert math.isfinite(record[key]) and record[key] > 0
    with pytest.raises(ConfigError, match="must be >= 1"):
        token_throughput(tiny_model("llama"), new_tokens=0)


def test_int8_without_torchao_is_a_one_line_error_before_loading(tmp_path, monkeypatch, capsys):
    import importlib.util

    find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "torchao" else find_spec(name, *a))
    assert main(["eval", str(tmp_path / "not-loaded"), "--int8"]) == 2  # the folder is never looked at
    assert capsys.readouterr().err.strip() == "error: int8 weights need torchao: pip install 'attnprune-opt[int8]'"


@pytest.fixture(scope="module")
def bitmask_folder(tmp_path_factory):
    folder = tmp_path_factory.mktemp("edge") / "pruned"
    tokenizer = load_tokenizer()
    model = tiny_model("llama", vocab_size_override=len(tokenizer))
    pruned(model).save(model, folder, tokenizer=tokenizer, format="bitmask")
    return folder


@pytest.mark.parametrize(("options", "dtype", "int8"), [([], "float32", False),
                                                         (["--dtype", "bfloat16"], "bfloat16", False),
                                                         (["--int8"], "float32", True)])
def test_eval_edge_end_to_end(bitmask_folder, mini_data, tmp_path, capsys, options, dtype, int8):
    out = tmp_path / "report"
    assert main(["eval", str(bitmask_folder), "--edge", "--perplexity", "c4", "--quick", "--quiet", "--output",
                 str(out), *options]) == 0
    result = json.loads((out / report.RESULTS_JSON).read_text())[0]
    edge = result["edge"]
    assert edge["dtype"] == dtype and edge["int8_weights"] == int8 and edge["resident_mb"] is not None
    assert edge["weights_mb"] > 0 and math.isfinite(result["perplexity"]["c4"]["perplexity"])
    markdown = (out / report.RESULTS_MARKDOWN).read_text()
    assert "| weights MB | resident MB | prefill tok/s | decode tok/s |" in markdown
    assert f"{edge['weights_mb']:.1f}" in markdown and "speed at batch 1" in markdown


def test_the_benchmark_measures_every_variant_through_eval(bitmask_folder, mini_data, tmp_path, monkeypatch):
    """benchmarks/edge.py: its rows, and one row measured by `eval --edge` in a child process, as in the real run."""
    import importlib

    monkeypatch.syspath_prepend(str(Path(__file__).resolve().parent.parent / "benchmarks"))
    bench = importlib.import_module("edge")
    assert [(r["format"], r["dtype"]) for r in bench.variants("dense")] == [
        ("dense", "float32"), ("dense", "bfloat16"), ("dense", "int8")]
    assert len(bench.variants("qk50")) == 5 and {r["format"] for r in bench.variants("qk50")} == {"dense", "bitmask"}

    row = {"model": "qk50", "format": "bitmask", "dtype": "int8"}
    record = bench.measure(row, bitmask_folder, tmp_path, windows=bench.WINDOWS)
    assert record["dtype"] == "int8" and record["int8_weights"]  # the row's label, not the load dtype (float32)
    assert record["file_mb"] == bench.folder_mb(bitmask_folder) > 0 and record["decode_tokens_per_s"] > 0
    assert record["wikitext2_ppl"] is None  # bitmask: the same weights as the dense format, not scored again
    table = bench.markdown([record])
    assert f"| qk50 | bitmask | int8 | {record['file_mb']:.1f} | {record['weights_mb']:.1f} |" in table
    assert table.rstrip().endswith("| = |")
