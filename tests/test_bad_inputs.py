"""Every bad input the CLI can be given is one line on stderr naming the file, key or value at fault, exit status 2,
and nothing written; checks that need no model fail before one is loaded."""

import json

import pytest
import yaml

from attnprune_opt.cli import main
from attnprune_opt.models.registry import supported_model_types

RECIPE = {"rules": [{"modules": ["q_proj", "k_proj"], "method": "attention", "sparsity": 0.5}],
          "attention": {"refit_iterations": 0},
          "calibration": {"source": "c4", "num_samples": 2, "seq_len": 32}}


@pytest.fixture
def work(tmp_path, monkeypatch):
    """An empty working folder as the current directory."""
    monkeypatch.chdir(tmp_path)
    return tmp_path


def recipe(folder, **changes) -> str:
    data = json.loads(json.dumps(RECIPE))
    for key, value in changes.items():
        section, _, field = key.partition("__")
        if field:
            data[section][field] = value
        else:
            data[section] = value
    path = folder / "recipe.yaml"
    path.write_text(yaml.safe_dump(data))
    return str(path)


def fails(argv, message: str, capsys, folder) -> str:
    """Run the CLI; it must fail with one line containing ``message`` and leave ``folder`` as it was."""
    before = sorted(p.name for p in folder.iterdir())
    assert main(argv) == 2
    captured = capsys.readouterr()
    err = captured.err.strip().splitlines()
    assert err and err[-1].startswith("error: ") and message in err[-1], captured.err
    assert "Traceback" not in captured.err and sum(line.startswith("error") for line in err) == 1, captured.err
    assert sorted(p.name for p in folder.iterdir()) == before
    return err[-1]


def prune(work, model, recipe_path, *extra) -> list[str]:
    return ["prune", "--recipe", recipe_path, "--model", str(model), "--output", str(work / "out"), "--quiet", *extra]


@pytest.mark.parametrize("name,content,message", [
    ("calib.txt", "caf\u00e9 ".encode("latin-1") * 50, "calib.txt is not UTF-8 text: byte 0xe9 at offset 3"),
    ("calib.jsonl", b'{"text": "caf\xe9"}\n', "calib.jsonl is not UTF-8 text: byte 0xe9 at offset 13"),
    ("calib.parquet", b"text\nhello\n", "calib.parquet is not a readable parquet file: "),
])
def test_undecodable_calibration_file(name, content, message, work, model_dir, capsys):
    (work / name).write_bytes(content)
    path = recipe(work, calibration__source=str(work / name))
    fails(prune(work, model_dir, path), message, capsys, work)


def test_missing_calibration_source(work, model_dir, capsys, monkeypatch):
    monkeypatch.setenv("ATTNPRUNE_DATA_DIR", str(work / "nowhere"))
    path = recipe(work, calibration__sampling="random")
    fails(prune(work, model_dir, path), "calibration file not found: c4/c4_validation_1500.parquet in the data "
                                        "folder", capsys, work)
    path = recipe(work, calibration__source=str(work / "missing.txt"))
    fails(prune(work, model_dir, path), f"calibration file not found: {work / 'missing.txt'}", capsys, work)


def test_missing_model_path(work, capsys):
    path = recipe(work)
    for model in (work / "no_such_model", "./nope", "models/x/y"):
        fails(prune(work, model, path), f"model path not found: {model}", capsys, work)
    fails(prune(work, "someone/model", path), "someone/model is not a local path, and the hub is offline", capsys,
          work)


def test_model_folder_problems(work, model_dir, capsys):
    path = recipe(work)
    pickled = work / "pickled"
    pickled.mkdir()
    (pickled / "config.json").write_text((model_dir / "config.json").read_text())
    (pickled / "pytorch_model.bin").write_bytes(b"never unpickled")
    fails(prune(work, pickled, path), "holds its weights only as pytorch_model.bin (pickle, which is never loaded)",
          capsys, work)
    config = json.loads((model_dir / "config.json").read_text())
    for model_type, message in (("no_such_arch", "model_type 'no_such_arch' is not known to transformers"),
                                ("gpt2", "model_type 'gpt2' is not supported; supported: "
                                         f"{', '.join(supported_model_types())}")):
        (pickled / "config.json").write_text(json.dumps({**config, "model_type": model_type}))
        fails(prune(work, pickled, path), f"{pickled / 'config.json'}: {message}", capsys, work)
    (pickled / "config.json").unlink()
    fails(prune(work, pickled, path), f"{pickled} is not a model folder: it has no config.json", capsys, work)


def test_recipe_values(work, model_dir, capsys):
    fails(prune(work, model_dir, recipe(work, layers=[])), "layers: must name at least one decoder layer", capsys,
          work)
    fails(prune(work, model_dir, recipe(work), "--layers", "-1"), "layers: layer indices must be >= 0, got [-1]",
          capsys, work)
    fails(prune(work, model_dir, recipe(work), "--layers", "7"), "layers [7] do not exist; the model has 2 decoder "
                                                                 "layers", capsys, work)
    fails(prune(work, model_dir, recipe(work), "--max-shard-size", "0"), "max_shard_size must be bytes or a size such as '2GB', got '0'", capsys,
          work)


def test_sequences_beyond_the_model_positions(work, model_dir, capsys):
    """seq_len 4096 on a model with 256 positions: C4 row 0 has 2041 tokens."""
    fails(prune(work, model_dir, recipe(work, calibration__seq_len=4096)),
          "calibration.seq_len 4096: calibration sequences of 2041 tokens exceed the model's "
          "max_position_embeddings 256; set seq_len <= 256", capsys, work)


def test_eval_inputs(work, model_dir, capsys):
    (work / "notes").mkdir()
    fails(["eval", str(work / "notes")], f"{work / 'notes'} is not a model folder: it has no config.json", capsys,
          work)
    for limit in ("0", "-1"):
        fails(["eval", str(model_dir), "--tasks", "arc_easy", "--limit", limit],
              f"limit (lm-eval documents per task) must be > 0, got {limit}", capsys, work)
    fails(["eval", str(model_dir), "--batch-size", "0"], "batch_size must be >= 1, got 0", capsys, work)


def test_debug_shows_the_traceback(work, capsys):
    with pytest.raises(Exception, match="model path not found"):
        main(["--debug", "prune", "--recipe", recipe(work), "--model", "./nope", "--output", "out"])
