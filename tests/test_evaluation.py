"""Evaluation: the attention error against an independent computation, offloaded models, the runner, reports, and
the ``eval`` command."""

from __future__ import annotations

import copy
import json

import pyarrow.parquet as pq
import pytest
import torch
from accelerate import cpu_offload
from test_calibration import byte_tokenizer, sha256sum
from tiny_models import calibration, tiny_model

from attnprune_opt import AttentionPruner
from attnprune_opt.cli import main
from attnprune_opt.data.calibration import C4_FILE
from attnprune_opt.errors import ConfigError, OutputExistsError
from attnprune_opt.evaluation import report
from attnprune_opt.evaluation.attention_error import attention_error
from attnprune_opt.evaluation.runner import check_request, evaluate
from attnprune_opt.models.loading import SOURCE_ATTR, load_model
from conftest import MINI_DATA

C4 = MINI_DATA / C4_FILE
ROWS, SEQ_LEN = (1000, 1004), 40  # a small protocol: C4 rows 1000-1003 of up to 40 tokens


def magnitude_pruned(model, layers=None):
    """A copy of ``model`` with half of each row of q_proj/k_proj zeroed by magnitude (in ``layers``, default all)."""
    pruned = copy.deepcopy(model)
    with torch.no_grad():
        for index, layer in enumerate(pruned.model.layers):
            if layers is not None and index not in layers:
                continue
            for linear in (layer.self_attn.q_proj, layer.self_attn.k_proj):
                w = linear.weight
                drop = w.abs().argsort(dim=1)[:, : w.shape[1] // 2]
                w.scatter_(1, drop, 0.0)
    return pruned


@pytest.fixture(autouse=True)
def _mini(mini_data):
    return mini_data


def offloaded_copy(model):
    copied = copy.deepcopy(model)
    cpu_offload(copied, execution_device="cpu")  # weights on 'meta', re-materialised on every forward
    return copied


@pytest.fixture(scope="module")
def tok():
    return byte_tokenizer()


@pytest.fixture(scope="module")
def dense():
    return tiny_model("llama", vocab_size_override=257)


@pytest.fixture(scope="module")
def pruned(dense):
    return magnitude_pruned(dense)


@pytest.fixture(scope="module")
def documents(tok) -> list[torch.Tensor]:
    texts = pq.read_table(C4, columns=["text"]).column("text").to_pylist()[ROWS[0] : ROWS[1]]
    return [torch.tensor(tok(text)["input_ids"][:SEQ_LEN]) for text in texts]


def hand_errors(dense, pruned, documents) -> list[list[float]]:
    """Per-layer, per-head errors from the models' own eager attention (``output_attentions=True``).

    For layer i a hybrid model is the dense one with layer i's q/k weights taken from the pruned one: every layer
    before i is dense, so the hybrid's attention at layer i is the pruned layer's attention on the dense input.
    """
    errors = []
    with torch.no_grad():
        dense_attn = [dense(ids[None], output_attentions=True).attentions for ids in documents]
        for i, pruned_layer in enumerate(pruned.model.layers):
            hybrid = copy.deepcopy(dense)
            for name in ("q_proj", "k_proj"):
                getattr(hybrid.model.layers[i].self_attn, name).load_state_dict(
                    getattr(pruned_layer.self_attn, name).state_dict())
            squared_error = squared_norm = 0
            for ids, reference in zip(documents, dense_attn):
                probs = hybrid(ids[None], output_attentions=True).attentions[i][0].double()
                squared_error = squared_error + (probs - reference[i][0]).pow(2).sum(dim=(1, 2))
                squared_norm = squared_norm + reference[i][0].double().pow(2).sum(dim=(1, 2))
            errors.append((squared_error / squared_norm).tolist())
    return errors


def test_identical_models_have_zero_error_and_the_result_is_complete(dense, tok):
    result = attention_error(dense, copy.deepcopy(dense), tok, rows=ROWS, seq_len=SEQ_LEN, progress=False)
    assert result["mean"] == 0.0 and result["per_layer"] == [0.0, 0.0]
    assert result["per_head"] == [[0.0] * 4, [0.0] * 4]  # 2 layers x 4 query heads
    assert result["protocol"]["rows"] == list(ROWS) and result["protocol"]["seq_len"] == SEQ_LEN
    assert result["protocol"]["documents"] == 4 and result["protocol"]["lengths"] == [SEQ_LEN] * 4
    assert result["data_file"] == str(C4) and result["sha256"] == sha256sum(C4)
    json.dumps(result)


def test_equals_the_models_own_attention_on_dense_inputs(dense, pruned, tok, documents):
    result = attention_error(dense, pruned, tok, rows=ROWS, seq_len=SEQ_LEN, progress=False)
    expected = hand_errors(dense, pruned, documents)
    assert torch.allclose(torch.tensor(result["per_head"]), torch.tensor(expected), rtol=1e-4, atol=1e-7)
    assert min(min(heads) for heads in result["per_head"]) > 1e-3
    assert result["per_layer"] == pytest.approx([sum(h) / 4 for h in result["per_head"]], rel=1e-12)
    assert result["mean"] == pytest.approx(sum(result["per_layer"]) / 2, rel=1e-12)


def test_layer_inputs_are_the_dense_models(dense, tok):
    """Pruning layer 0 only changes what the pruned model feeds layer 1, yet layer 1's error stays exactly 0."""
    result = attention_error(dense, magnitude_pruned(dense, layers=[0]), tok, rows=ROWS, seq_len=SEQ_LEN,
                             progress=False)
    assert result["per_layer"][0] > 1e-3 and result["per_layer"][1] == 0.0


def test_offloaded_models_give_the_same_numbers(dense, pruned, tok):
    reference = attention_error(dense, pruned, tok, rows=ROWS, seq_len=SEQ_LEN, progress=False)
    result = attention_error(offloaded_copy(dense), offloaded_copy(pruned), tok, rows=ROWS, seq_len=SEQ_LEN,
                             progress=False)
    assert torch.allclose(torch.tensor(result["per_head"]), torch.tensor(reference["per_head"]), rtol=1e-6)


def test_mismatched_models_and_bad_protocol_are_named_errors(dense, tok):
    with pytest.raises(ConfigError, match="2 decoder layers, the pruned one 1"):
        attention_error(dense, tiny_model("llama", layers=1, vocab_size_override=257), tok, progress=False)
    with pytest.raises(ConfigError, match="seq_len must be >= 2"):
        attention_error(dense, dense, tok, seq_len=1, progress=False)


@pytest.fixture(scope="module")
def quick_result(dense, pruned, tok):
    return evaluate(pruned, tok, dense_model=dense, quick=True, windows=8, tasks=["arc_easy"], limit=2, batch_size=16,
                    model_info={"name": "pruned", "method": "magnitude", "sparsity": 0.5}, data_dir=MINI_DATA,
                    progress=False)


def test_runner_combines_everything_with_its_protocol(quick_result):
    result = quick_result
    assert result["model"] == {"name": "pruned", "method": "magnitude", "sparsity": 0.5}
    assert result["protocol"]["quick"] and "not comparable" in result["protocol"]["note"]
    wiki, c4 = result["perplexity"]["wikitext2"], result["perplexity"]["c4"]
    assert wiki["sequences"] == 8 and wiki["params"]["max_windows"] == 8 == result["protocol"]["wikitext2_windows"]
    assert c4["sequences"] == 32 and c4["params"]["rows"] == [1000, 1032] == result["protocol"]["c4_rows"]
    assert wiki["sha256"] and c4["sha256"] == sha256sum(C4)
    assert result["attention_error"]["protocol"]["rows"] == [1000, 1008]
    assert result["tasks"]["arc_easy"]["n_samples"] == 2 and result["tasks"]["arc_easy"]["data_sha256"]
    json.dumps(result)


def test_runner_refuses_unknown_names_before_any_work(dense, tok, monkeypatch):
    with pytest.raises(ConfigError, match="task 'arc_medium' has no local copy and the hub is offline"):
        evaluate(dense, tok, tasks=["arc_medium"], progress=False)
    monkeypatch.delenv("HF_DATASETS_OFFLINE")
    monkeypatch.delenv("HF_HUB_OFFLINE")
    check_request([], ["arc_medium"])  # with network, lm-eval is asked for it
    with pytest.raises(ConfigError, match="unknown perplexity data set 'ptb'"):
        evaluate(dense, tok, perplexity=["ptb"], progress=False)


def test_report_is_written_whole_or_not_at_all(quick_result, tmp_path, monkeypatch):
    second = {**quick_result, "model": {"name": "denser", "method": "magnitude", "sparsity": 0.3}}
    out = tmp_path / "report"
    report.write_report([quick_result, second], out)
    assert json.loads((out / report.RESULTS_JSON).read_text()) == [quick_result, second]
    markdown = (out / report.RESULTS_MARKDOWN).read_text()
    assert sum(line.startswith(("| pruned |", "| denser |")) for line in markdown.splitlines()) == 2
    assert "QUICK protocol" in markdown
    for plot in (report.ATTENTION_PLOT, report.SPARSITY_PLOT):
        assert (out / plot).read_bytes().startswith(b"\x89PNG")

    with pytest.raises(OutputExistsError):
        report.write_report([quick_result], out)
    assert json.loads((out / report.RESULTS_JSON).read_text()) == [quick_result, second]

    def broken(*args, **kwargs):
        raise RuntimeError("plotting failed")

    monkeypatch.setattr(report, "plot_attention_error", broken)
    with pytest.raises(RuntimeError):
        report.write_report([quick_result], tmp_path / "failed")
    with pytest.raises(RuntimeError):
        report.write_report([quick_result], out, overwrite=True)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["report"]  # no partial folder left behind
    assert len(json.loads((out / report.RESULTS_JSON).read_text())) == 2


@pytest.fixture(scope="module")
def pruned_folder(tmp_path_factory, dense, tok):
    """A tiny dense model folder, and a pruned folder made from it by ``load_model`` + the pruner."""
    root = tmp_path_factory.mktemp("cli")
    dense.save_pretrained(root / "dense")
    tok.save_pretrained(root / "dense")
    with pytest.MonkeyPatch.context() as patch:
        patch.chdir(root)  # a local model is recorded relative to the current directory, never by absolute path
        model = load_model("dense")
    assert getattr(model, SOURCE_ATTR)["source"] == "dense"
    assert getattr(model, SOURCE_ATTR)["sha256"].keys() == {"config.json", "model.safetensors"}
    pruner = AttentionPruner(rules=[{"modules": ["q_proj", "k_proj"], "method": "attention", "sparsity": 0.5}],
                             attention={"refit_iterations": 5})
    pruner.prune_model(model, calibration=calibration(), progress=False)
    pruner.save(model, root / "pruned", tokenizer=tok)
    return root


def test_cli_eval_pruned_folder_uses_the_manifest_source(pruned_folder, capsys, monkeypatch):
    manifest = json.loads((pruned_folder / "pruned" / "attnprune_manifest.json").read_text())
    assert manifest["model"]["source"] == "dense"
    assert main(["eval", str(pruned_folder / "pruned"), "--no-perplexity", "--quiet"]) == 0
    assert "names the dense model it was pruned from as 'dense', which is not found from here" in \
        capsys.readouterr().err
    monkeypatch.chdir(pruned_folder)
    out = pruned_folder / "report"
    assert main(["eval", "pruned", "--no-perplexity", "--quiet", "--output", str(out)]) == 0
    printed = capsys.readouterr().out
    row = next(line for line in printed.splitlines() if line.startswith("| pruned |"))
    saved = json.loads((out / report.RESULTS_JSON).read_text())[0]
    assert f"{saved['attention_error']['mean']:.5f}" in row and "| 0.500 |" in row
    assert saved["model"]["source"] == manifest["model"]["source"] and saved["perplexity"] == {}
    assert (out / report.ATTENTION_PLOT).is_file()


def test_cli_eval_plain_folder_and_one_line_errors(pruned_folder, tmp_path, capsys):
    assert main(["eval", str(pruned_folder / "dense"), "--perplexity", "c4", "--quick", "--quiet"]) == 0
    printed = capsys.readouterr().out
    assert "c4 ppl" in printed and "attention error" in printed  # no dense reference: the column says "–"

    for argv, message in (
        (["eval", str(tmp_path / "nowhere")], "error: model path not found"),
        (["eval", str(pruned_folder / "dense"), "--perplexity", "ptb"], "error: unknown perplexity data set"),
        (["eval", str(pruned_folder / "dense"), "--windows", "0"], "error: windows must be >= 1, got 0"),
        (["eval", str(pruned_folder / "dense"), "--output", str(pruned_folder / "dense")], "already exists"),
    ):
        assert main(argv) == 2
        err = capsys.readouterr().err.strip()
        assert err.count("\n") == 0 and message in err, err


@pytest.mark.slow
def test_smollm2_error_is_confined_to_the_pruned_layer(all_threads):
    from attnprune_opt.models.loading import DEFAULT_MODEL, load_tokenizer

    model = load_model()
    assert getattr(model, SOURCE_ATTR)["source"] == DEFAULT_MODEL
    result = attention_error(model, magnitude_pruned(model, layers=[3]), load_tokenizer(), rows=(1000, 1002),
                             seq_len=32, progress=False)
    assert len(result["per_head"]) == 30 and {len(heads) for heads in result["per_head"]} == {9}
    assert 0.0 < result["per_layer"][3] < 1.0
    assert all(error == 0.0 for index, error in enumerate(result["per_layer"]) if index != 3)
