"""convert-gguf: a GGUF model becomes a safetensors folder holding the same tensors bit for bit; a disk-offloading
device map for a GGUF source is refused, naming the command, before anything is loaded."""

import json

import pytest
import torch

from attnprune_opt.cli import main
from attnprune_opt.errors import ModelSourceError, OutputExistsError
from attnprune_opt.models.gguf import gguf_to_folder
from attnprune_opt.models.loading import DEFAULT_MODEL, load_model, load_tokenizer


@pytest.mark.slow
def test_default_model_converts_bit_exact_in_shards(tmp_path):
    out = gguf_to_folder(DEFAULT_MODEL, tmp_path / "smollm2", dtype="float32", max_shard_size="200MB")
    assert len(list(out.glob("*.safetensors"))) > 1
    original = load_model(DEFAULT_MODEL, dtype=torch.float32).state_dict()
    converted = load_model(str(out), dtype=torch.float32).state_dict()
    assert converted.keys() == original.keys()
    for name, tensor in original.items():
        assert torch.equal(converted[name], tensor), name
    text = "Pruning attention weights, offloaded to disk."
    assert load_tokenizer(str(out))(text)["input_ids"] == load_tokenizer()(text)["input_ids"]


def test_disk_offload_of_a_gguf_source_is_refused_before_loading(tmp_path, capsys):
    device_map = json.dumps({"model.layers.0": "disk"})
    assert main(["prune", "--output", str(tmp_path / "out"), "--device-map", device_map]) == 2
    error = capsys.readouterr().err.strip()
    assert error == (f"error: {DEFAULT_MODEL}: a GGUF model cannot be offloaded to disk; convert it once with "
                     f"`attnprune-opt convert-gguf {DEFAULT_MODEL} FOLDER` and use FOLDER")
    assert not (tmp_path / "out").exists()
    with pytest.raises(ModelSourceError, match="cannot be offloaded to disk"):
        load_model(DEFAULT_MODEL, device_map={"model.layers.0": "disk"})


def test_convert_refuses_what_is_not_gguf_and_existing_outputs(tmp_path, model_dir):
    with pytest.raises(ModelSourceError, match=f"{model_dir} is not a .gguf file"):
        gguf_to_folder(str(model_dir), tmp_path / "out")
    (tmp_path / "taken").mkdir()
    with pytest.raises(OutputExistsError, match="taken already exists"):
        gguf_to_folder(DEFAULT_MODEL, tmp_path / "taken")
    with pytest.raises(ModelSourceError, match="dtype 'int4'"):
        gguf_to_folder(DEFAULT_MODEL, tmp_path / "out", dtype="int4")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["taken"]
