"""Nothing lost, nothing silently wrong: corrupted folders are named by ``load_pruned_model`` and ``verify``; a run
killed at any step of a save or an overwrite leaves the output path holding a complete model (old or new) and the
next run cleans up; a full disk and a read-only output are one-line errors that leave nothing behind."""

import json
import shutil
import struct

import pytest
import torch
import yaml

from attnprune_opt import AttentionPruner, load_pruned_model
from attnprune_opt.cli import main
from attnprune_opt.errors import ArtifactError
from attnprune_opt.export.manifest import MANIFEST_NAME
from attnprune_opt.export.verify import verify_pruned_folder
from tiny_models import QK_ONLY, calibration, tiny_model


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """A tiny Llama pruned at 50% (q/k), saved dense and bitmask."""
    model = tiny_model("llama")
    pruner = AttentionPruner(**{**QK_ONLY, "attention": {"iterations": 3, "refit_iterations": 2}})
    pruner.prune_model(model, calibration=calibration(), progress=False)
    root = tmp_path_factory.mktemp("saved")
    pruner.save(model, root / "dense")
    pruner.save(model, root / "bitmask", format="bitmask")
    return root


@pytest.fixture(params=["dense", "bitmask"])
def folder(request, saved, tmp_path):
    copy = tmp_path / request.param
    shutil.copytree(saved / request.param, copy)
    return copy


def flip_byte(path, tensor: str, element: int = None) -> None:
    """Flip the lowest bit of one non-zero element of ``tensor`` in the safetensors file ``path``, in place."""
    data = bytearray(path.read_bytes())
    (header_size,) = struct.unpack("<Q", data[:8])
    header = json.loads(data[8:8 + header_size])
    begin, end = header[tensor]["data_offsets"]
    itemsize = {"F32": 4, "F16": 2, "BF16": 2}[header[tensor]["dtype"]]
    start = 8 + header_size + begin
    values = torch.frombuffer(bytearray(data[start:start + end - begin]), dtype=torch.float32 if itemsize == 4 else
                              torch.float16)
    index = int(values.nonzero()[0]) if element is None else element
    data[start + index * itemsize] ^= 1
    path.write_bytes(bytes(data))


def edit_manifest(folder, edit) -> None:
    manifest = json.loads((folder / MANIFEST_NAME).read_text())
    edit(manifest)
    (folder / MANIFEST_NAME).write_text(json.dumps(manifest))


def assert_named(folder, message: str, capsys) -> None:
    """load_pruned_model and `attnprune-opt verify` both refuse the folder, naming the problem in one line."""
    with pytest.raises(ArtifactError, match=message):
        load_pruned_model(folder)
    assert main(["verify", str(folder)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("error: "), err


def q_proj_tensor(folder) -> str:
    return "model.layers.0.self_attn.q_proj." + ("compressed" if folder.name == "bitmask" else "weight")


def test_intact_folders_verify(saved, capsys):
    for name in ("dense", "bitmask"):
        assert main(["verify", str(saved / name)]) == 0
        assert "verified: " in capsys.readouterr().out


def test_kept_value_byte(folder, capsys):
    flip_byte(folder / "model.safetensors", q_proj_tensor(folder))
    assert_named(folder, r"model.safetensors: SHA-256 \w+\.\.\. differs from the attnprune_manifest.json record", capsys)


def test_embedding_byte(folder, capsys):
    flip_byte(folder / "model.safetensors", "model.embed_tokens.weight", element=5)
    assert_named(folder, r"model.safetensors: SHA-256 \w+\.\.\. differs", capsys)


def test_manifest_summary(folder, capsys):
    edit_manifest(folder, lambda m: m["sparsity"].update(pruned_weights=0.9))
    assert_named(folder, r"sparsity: the summary \(pruned_weights 0.9, \d+ zeros of \d+\) is not what its modules "
                         r"add up to", capsys)


def test_module_sparsity(folder, capsys):
    edit_manifest(folder, lambda m: m["sparsity"]["modules"]["model.layers.1.self_attn.k_proj.weight"]
                  .update(sparsity=0.9))
    assert_named(folder, r"model.layers.1.self_attn.k_proj.weight: sparsity 0.9 is not zeros / numel", capsys)


def test_recorded_rules(folder, capsys):
    edit_manifest(folder, lambda m: m["config"]["rules"][0].update(sparsity=0.9))
    assert_named(folder, r"model.layers.0.self_attn.k_proj.weight records \('attention', 'unstructured', 0.5\), "
                         r"the rules say \('attention', 'unstructured', 0.9\)", capsys)


def test_other_manifest_edit(folder, capsys):
    edit_manifest(folder, lambda m: m["report"].update(seconds=0.0))
    assert_named(folder, "its digest does not match its content: the manifest was edited", capsys)


def test_recipe_edit(folder, capsys):
    recipe = folder / "recipe.yaml"
    recipe.write_text(recipe.read_text().replace("sparsity: 0.5", "sparsity: 0.6"))
    assert_named(folder, r"recipe.yaml: differs from the config recorded in attnprune_manifest.json", capsys)


def test_added_and_missing_files(folder, capsys):
    kept = (folder / "generation_config.json").read_bytes()
    (folder / "generation_config.json").unlink()
    assert_named(folder, r"generation_config.json: listed in attnprune_manifest.json but missing", capsys)
    (folder / "generation_config.json").write_bytes(kept)
    (folder / "notes.txt").write_text("x")
    with pytest.raises(ArtifactError, match=r"notes.txt: not listed in attnprune_manifest.json"):
        verify_pruned_folder(folder)


def test_opt_out_skips_only_the_hashes(folder):
    """verify_files=False: a changed kept value loads (documented); the manifest checks still run."""
    flip_byte(folder / "model.safetensors", "model.embed_tokens.weight", element=5)
    load_pruned_model(folder, verify_files=False)
    edit_manifest(folder, lambda m: m["sparsity"].update(pruned_weights=0.9))
    with pytest.raises(ArtifactError, match="is not what its modules add up to"):
        load_pruned_model(folder, verify_files=False)


def test_manifest_holds_no_absolute_path(saved):
    for name in ("dense", "bitmask"):
        text = (saved / name / MANIFEST_NAME).read_text()
        assert str(saved) not in text and "/tmp/" not in text and "/work/" not in text and "/root" not in text
        assert yaml.safe_load(text)["schema_version"] == 2
