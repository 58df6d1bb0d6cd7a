"""Saving pruned models compressed (format="bitmask"), loading them back checked against the manifest, and converting
folders with ``attnprune-opt export``. The layouts and the shard writer themselves are tested in test_bitmask.py."""

import json
import os
import shutil
import subprocess
import sys

import pytest
import torch
from accelerate import cpu_offload
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM

from attnprune_opt import AttentionPruner, load_pruned_model
from attnprune_opt.cli import main
from attnprune_opt.config import PrunerConfig, PruneRule
from attnprune_opt.errors import ArtifactError, ConfigError, OutputExistsError
from attnprune_opt.export.convert import export_pruned
from attnprune_opt.export.manifest import MANIFEST_NAME, SparsitySummary, read_manifest
from attnprune_opt.export.pruned import MatrixZeros, PlannedMatrix, PrunePlan, count_zeros, kept_per_row
from attnprune_opt.export.save import save_pruned
from attnprune_opt.export.sharded import INDEX_NAME, WEIGHTS_NAME
from attnprune_opt.export.verify import verify_pruned_folder
from attnprune_opt.models.base import Prunable
from tiny_models import WHOLE_MODEL, pruned_tiny_model

ALL_LINEARS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
DTYPES = [torch.float32, torch.bfloat16, torch.float16]
IDS = torch.arange(3, 40).reshape(1, -1) % 96


def bits(t: torch.Tensor) -> torch.Tensor:
    return t.view({4: torch.int32, 2: torch.int16}[t.element_size()])


def files_of(folder) -> dict[str, torch.Tensor]:
    tensors = {}
    for file in sorted(folder.glob("*.safetensors")):
        tensors.update(load_file(file))
    return tensors


def logits(model) -> torch.Tensor:
    with torch.no_grad():
        return model(IDS).logits


def odd_llama(dtype: torch.dtype, structure: str) -> tuple[LlamaForCausalLM, PrunerConfig]:
    """One tied Llama layer with odd shapes (830x545 MLP), every linear pruned at 50% (or 2:4, on 836x548)."""
    hidden, inter, heads = (545, 830, 5) if structure == "unstructured" else (548, 836, 4)
    config = LlamaConfig(hidden_size=hidden, intermediate_size=inter, num_hidden_layers=1, num_attention_heads=heads,
                         num_key_value_heads=1, head_dim=26, vocab_size=96, max_position_embeddings=64,
                         tie_word_embeddings=True)
    torch.manual_seed(0)
    model = LlamaForCausalLM._from_config(config, attn_implementation="eager", dtype=dtype).eval()
    assert model.dtype == dtype
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, module in model.named_modules():
            if name.endswith(tuple(ALL_LINEARS)):
                w = module.weight
                if structure == "2:4":
                    groups = w.view(-1, 4)
                    drop = torch.zeros_like(groups, dtype=torch.bool).scatter_(
                        1, groups.abs().float().topk(2, dim=1, largest=False).indices, True)
                    groups.masked_fill_(drop, 0)
                else:
                    w.masked_fill_(torch.rand(w.shape, generator=gen) < 0.5, 0)
                w.add_(0.0)  # -0.0 (float16 init underflows) to +0.0: the one value the layout does not keep
    rule = {"modules": ALL_LINEARS, "method": "magnitude"}
    rule |= {"structure": "2:4"} if structure == "2:4" else {"sparsity": 0.5}
    return model, PrunerConfig.from_dict({"rules": [rule]})


@pytest.mark.parametrize("structure", ["unstructured", "2:4"])
@pytest.mark.parametrize("dtype", DTYPES)
def test_bitmask_save_and_load_are_bit_exact(dtype, structure, tmp_path):
    model, config = odd_llama(dtype, structure)
    save_pruned(model, tmp_path / "dense", config=config)
    save_pruned(model, tmp_path / "bitmask", config=config, format="bitmask")

    stored = files_of(tmp_path / "bitmask")
    layout = "sparse-24-bitmask" if structure == "2:4" else "sparse-bitmask"
    quant = json.loads((tmp_path / "bitmask" / "config.json").read_text())["quantization_config"]
    assert quant["format"] == layout and len(quant["targets"]) == len(ALL_LINEARS)
    assert stored["model.layers.0.mlp.down_proj.compressed"].dtype == dtype
    assert stored["model.layers.0.mlp.down_proj.weight"].numel() == 0  # the guard
    assert torch.equal(stored["model.embed_tokens.weight"], model.model.embed_tokens.weight)  # untouched: dense
    assert "lm_head.weight" not in stored  # tied: written once

    dense_logits = logits(AutoModelForCausalLM.from_pretrained(tmp_path / "dense", attn_implementation="eager"))
    assert torch.equal(dense_logits, logits(model))
    for loaded in (AutoModelForCausalLM.from_pretrained(tmp_path / "bitmask", attn_implementation="eager"),
                   load_pruned_model(tmp_path / "bitmask", attn_implementation="eager")):
        assert loaded.dtype == dtype
        for name, tensor in model.state_dict().items():
            assert torch.equal(bits(loaded.state_dict()[name]), bits(tensor)), name
        assert loaded.lm_head.weight.data_ptr() == loaded.model.embed_tokens.weight.data_ptr()  # still tied
        assert torch.equal(logits(loaded), logits(model))

    dense, compressed = (read_manifest(tmp_path / f).model_dump() for f in ("dense", "bitmask"))
    assert compressed["format"] == "bitmask" and dense["format"] == "dense"
    assert compressed["sparsity"] == {**dense["sparsity"], "modules": {
        name: {**entry, "file": compressed["sparsity"]["modules"][name]["file"]}
        for name, entry in dense["sparsity"]["modules"].items()}}
    assert compressed["sparsity"]["pruned_weights"] == pytest.approx(0.5, abs=0.01)
    # Each folder measures its own format and computes the other's: the figures agree across the two folders.
    for manifest in (dense, compressed):
        assert manifest["sizes"]["dense_bytes"] == sum(t.nbytes for t in files_of(tmp_path / "dense").values())
        assert manifest["sizes"]["bitmask_bytes"] == sum(t.nbytes for t in stored.values())
    written = (tmp_path / "bitmask").glob("*.safetensors")
    assert compressed["sizes"]["weight_files_bytes"] == sum(f.stat().st_size for f in written)
    assert compressed["sizes"]["weight_files_bytes"] < 0.75 * dense["sizes"]["weight_files_bytes"]


def test_a_rule_that_does_not_hold_leaves_no_output(tmp_path):
    model, config = odd_llama(torch.float32, "unstructured")
    config = PrunerConfig.from_dict({"rules": [{"modules": ["gate_proj"], "method": "magnitude", "structure": "2:4"}]})
    with pytest.raises(ConfigError, match="2:4 layout needs a column count divisible by 4"):
        save_pruned(model, tmp_path / "out", config=config, format="bitmask")
    assert list(tmp_path.iterdir()) == []


def test_stacked_expert_weights_are_measured_per_expert_and_refused_by_the_bitmask_format():
    rule = PruneRule(modules=["up_proj"], method="magnitude", sparsity=0.5)
    up = Prunable("up_proj", "mlp.experts", rows=((4, 8),), parameter="gate_up_proj", expert=1)
    part = PlannedMatrix("model.layers.0.mlp.experts.gate_up_proj[1.up_proj]", 0, "model.layers.0", up, rule)
    weight = torch.zeros(2, 8, 3)
    weight[1, 4:] = 1.0
    weight[1, 5, 2] = 0.0
    weight[0] = 1.0  # another expert's rows: not this matrix's
    assert count_zeros((part,), kept_per_row(weight), 3) == {part.name: MatrixZeros(0, "up_proj", 1, 12)}
    with pytest.raises(ConfigError, match=r"stores 2-D '.weight' tensors only, not "
                                          r"model.layers.0.mlp.experts.gate_up_proj \(.*\); save it with format"):
        PrunePlan((part,)).targets()


# --- a tiny Llama pruned by the pipeline, end to end ---------------------------------------------------------------


@pytest.fixture(scope="module")
def pruned(tmp_path_factory):
    """Pruned whole-model at 50%, saved dense, and bitmask in several shards."""
    model, pruner = pruned_tiny_model({**WHOLE_MODEL, "attention": {"refit_iterations": 3}})
    root = tmp_path_factory.mktemp("pruned")
    pruner.save(model, root / "dense")
    pruner.save(model, root / "bitmask", format="bitmask", max_shard_size=60_000)
    return model, pruner, root


@pytest.fixture(scope="module", autouse=True)
def plain_transformers(pruned):
    """transformers without this package, on a folder save_pruned wrote; started first to overlap other tests."""
    code = ("import sys\nfrom transformers import AutoModelForCausalLM\n"
            f"AutoModelForCausalLM.from_pretrained({str(pruned[2] / 'bitmask')!r})\n"
            "print('attnprune_opt' in sys.modules)\n")
    run = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                           env={**os.environ, "HF_HUB_OFFLINE": "1"})
    yield run
    run.kill()
    run.communicate()


def test_pruned_llama_loads_with_the_same_logits(pruned):
    model, pruner, root = pruned
    index = json.loads((root / "bitmask" / INDEX_NAME).read_text())
    assert len(set(index["weight_map"].values())) > 1
    expected = logits(model)
    for folder in ("dense", "bitmask"):
        plain = AutoModelForCausalLM.from_pretrained(root / folder, attn_implementation="eager")
        checked = load_pruned_model(root / folder, attn_implementation="eager")
        for loaded in (plain, checked):
            assert torch.equal(logits(loaded), expected), folder
            # torch.equal: values are exact; a -0.0 left by `weight * mask` comes back as 0.0 from the bitmask
            for name, tensor in model.state_dict().items():
                assert torch.equal(loaded.state_dict()[name], tensor), (folder, name)
    manifest = read_manifest(root / "bitmask")
    assert len(manifest.sparsity.modules) == 2 * len(ALL_LINEARS)
    assert all(m.sparsity == 0.5 for m in manifest.sparsity.modules.values())


def test_plain_transformers_refuses_a_compressed_folder(plain_transformers):
    out, err = plain_transformers.communicate(timeout=300)
    assert plain_transformers.returncode != 0, out
    assert "Unknown quantization type, got attnprune-sparse" in err
    assert "RuntimeError: You set `ignore_mismatched_sizes` to `False`" in err


@pytest.mark.parametrize("offload", ["disk", "cpu_offload"])
def test_offloaded_model_saves_and_loads_the_same_files(pruned, offload, tmp_path):
    model, pruner, root = pruned
    if offload == "disk":
        device_map = {"model.embed_tokens": "cpu", "model.layers.0": "disk", "model.layers.1": "disk",
                      "model.norm": "cpu", "model.rotary_emb": "cpu", "lm_head": "disk"}
        offloaded = load_pruned_model(root / "dense", device_map=device_map, offload_folder=tmp_path / "offload",
                                      attn_implementation="eager")
    else:
        offloaded = AutoModelForCausalLM.from_pretrained(root / "dense", attn_implementation="eager")
        cpu_offload(offloaded, execution_device=torch.device("cpu"))
    assert offloaded.model.layers[1].mlp.down_proj.weight.device.type == "meta"
    pruner.save(offloaded, tmp_path / "out", format="bitmask", max_shard_size=60_000)
    assert offloaded.model.layers[1].mlp.down_proj.weight.device.type == "meta"  # put back
    expected = files_of(root / "bitmask")
    actual = files_of(tmp_path / "out")
    assert actual.keys() == expected.keys()
    assert all(torch.equal(actual[key], tensor) for key, tensor in expected.items())
    assert (tmp_path / "out" / INDEX_NAME).read_text() == (root / "bitmask" / INDEX_NAME).read_text()

    reloaded = load_pruned_model(tmp_path / "out", device_map=device_map if offload == "disk" else "cpu",
                                 offload_folder=tmp_path / "offload2", attn_implementation="eager")
    assert torch.equal(logits(reloaded), logits(model))


def test_export_converts_both_ways_and_keeps_the_rest(pruned, tmp_path):
    model, pruner, root = pruned
    export_pruned(root / "bitmask", tmp_path / "dense", "dense")
    export_pruned(tmp_path / "dense", tmp_path / "bitmask", "bitmask", max_shard_size=60_000)
    dense = files_of(tmp_path / "dense")
    assert dense.keys() == files_of(root / "dense").keys()
    assert all(torch.equal(dense[key], tensor) for key, tensor in files_of(root / "dense").items())
    assert sorted(p.name for p in (tmp_path / "dense").iterdir()) == sorted(p.name for p in (root / "dense").iterdir())
    again = files_of(tmp_path / "bitmask")
    assert all(torch.equal(again[key], tensor) for key, tensor in files_of(root / "bitmask").items())
    assert (tmp_path / "bitmask" / "recipe.yaml").read_text() == (root / "bitmask" / "recipe.yaml").read_text()
    for name in ("dense", "bitmask"):
        manifest, source = read_manifest(tmp_path / name), read_manifest(root / name)
        assert manifest.format == name and manifest.exported_from["format"] != name
        assert manifest.sizes.model_dump(exclude={"weight_files_bytes"}) == \
            source.sizes.model_dump(exclude={"weight_files_bytes"})
        assert manifest.report == source.report and manifest.calibration == source.calibration
    assert torch.equal(logits(load_pruned_model(tmp_path / "bitmask", attn_implementation="eager")), logits(model))


def test_export_command(pruned, tmp_path, capsys):
    model, pruner, root = pruned
    out = tmp_path / "bitmask"
    assert main(["export", str(root / "dense"), str(out), "--format", "bitmask"]) == 0
    printed = capsys.readouterr().out
    assert f"exported to {out}" in printed and "MB (bitmask files); tensor bytes: dense" in printed
    assert (out / WEIGHTS_NAME).is_file()
    before = sorted(p.name for p in out.iterdir())
    assert main(["export", str(root / "dense"), str(out), "--format", "dense"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "already exists" in err and "--overwrite" in err
    assert sorted(p.name for p in out.iterdir()) == before
    assert main(["export", str(root / "bitmask"), str(out), "--format", "dense", "--overwrite"]) == 0
    assert read_manifest(out).format == "dense" and not (out / INDEX_NAME).exists()
    assert main(["export", str(tmp_path / "nowhere"), str(tmp_path / "x"), "--format", "dense"]) == 2
    assert "has no attnprune_manifest.json" in capsys.readouterr().err


def test_bitmask_save_refuses_to_clobber_and_overwrites(pruned, tmp_path):
    model, pruner, root = pruned
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "keep.txt").write_text("user data")
    with pytest.raises(OutputExistsError):
        pruner.save(model, tmp_path / "out", format="bitmask")
    assert (tmp_path / "out" / "keep.txt").read_text() == "user data"
    pruner.save(model, tmp_path / "out", format="bitmask", overwrite=True)
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == sorted(
        ["attnprune_manifest.json", "config.json", "generation_config.json", "model.safetensors", "recipe.yaml"])
    assert [p.name for p in tmp_path.iterdir()] == ["out"]


# --- damaged folders are named errors --------------------------------------------------------------------------------


@pytest.fixture(params=["dense", "bitmask"])
def damaged(request, pruned, tmp_path):
    folder = tmp_path / request.param
    shutil.copytree(pruned[2] / request.param, folder)
    return folder


def shard_holding(folder, key):
    index = folder / INDEX_NAME
    name = json.loads(index.read_text())["weight_map"][key] if index.exists() else WEIGHTS_NAME
    return folder / name


def rewrite(path, edit):
    tensors = load_file(path)
    edit(tensors)
    save_file(tensors, path, metadata={"format": "pt"})


def test_truncated_shard_is_named(damaged):
    victim = sorted(damaged.glob("*.safetensors"))[-1]
    victim.write_bytes(victim.read_bytes()[:-100])
    with pytest.raises(ArtifactError, match=rf"{victim.name}: unreadable safetensors file"):
        load_pruned_model(damaged)
    with pytest.raises(ArtifactError, match=rf"{victim.name}: unreadable"):
        export_pruned(damaged, damaged.parent / "out", "dense" if damaged.name == "bitmask" else "bitmask")
    assert not (damaged.parent / "out").exists()


def test_manifest_that_disagrees_with_the_weights_is_named(damaged):
    """A consistent, re-sealed manifest whose count is not the files': only counting the weights can notice."""
    manifest = read_manifest(damaged)
    name = "model.layers.1.self_attn.k_proj.weight"
    entry = manifest.sparsity.modules[name]
    fake = entry.model_copy(update={"zeros": entry.zeros - 1, "sparsity": (entry.zeros - 1) / entry.numel})
    summary = SparsitySummary.of({**manifest.sparsity.modules, name: fake})
    manifest.model_copy(update={"sparsity": summary}).write(damaged)
    message = rf"{name}: {entry.zeros} zeros of {entry.numel} .*manifest says {fake.zeros} of"
    with pytest.raises(ArtifactError, match=message):
        load_pruned_model(damaged)
    with pytest.raises(ArtifactError, match=message):
        verify_pruned_folder(damaged, weights=True)
    with pytest.raises(ArtifactError, match=message):
        export_pruned(damaged, damaged.parent / "out", "dense")
    assert not (damaged.parent / "out").exists()


def test_edited_weights_are_named(damaged):
    """A file edited into another valid file: one more pruned entry, which only the manifest check can notice."""
    name = "model.layers.0.mlp.up_proj.weight"
    if damaged.name == "dense":
        def edit(tensors):
            weight = tensors[name]
            weight.view(-1)[(weight.view(-1) != 0).nonzero()[0]] = 0
    else:
        def edit(tensors):
            tensors[name.replace(".weight", ".compressed")][0] = 0
    shard = shard_holding(damaged, name.replace(".weight", ".compressed") if damaged.name == "bitmask" else name)
    rewrite(shard, edit)
    with pytest.raises(ArtifactError, match=rf"{shard.name}: SHA-256 .* differs from the {MANIFEST_NAME} record"):
        load_pruned_model(damaged)
    with pytest.raises(ArtifactError, match=rf"disagree with {MANIFEST_NAME}: {name}: (\d+) zeros .*manifest says"):
        load_pruned_model(damaged, verify_files=False)


def test_inconsistent_compressed_tensors_are_named(pruned, tmp_path):
    folder = tmp_path / "bitmask"
    shutil.copytree(pruned[2] / "bitmask", folder)
    key = "model.layers.1.self_attn.q_proj.bitmask"

    def edit(tensors):
        tensors[key][0, 0] ^= 1
    rewrite(shard_holding(folder, key), edit)
    message = r"do not decompress: model.layers.1.self_attn.q_proj.compressed: expected \d+ values"
    with pytest.raises(ArtifactError, match=message):
        load_pruned_model(folder, verify_files=False)  # past the SHA-256 check, which would stop it first


def test_manifest_format_must_match_the_folder(pruned, tmp_path):
    folder = tmp_path / "bitmask"
    shutil.copytree(pruned[2] / "bitmask", folder)
    manifest = read_manifest(folder)
    manifest.model_copy(update={"format": "dense", "sizes": manifest.sizes.model_copy(update={"format": "dense"})}
                        ).write(folder)
    with pytest.raises(ArtifactError, match="says format 'dense' but config.json has"):
        load_pruned_model(folder)
    (folder / MANIFEST_NAME).write_text("{not json")
    with pytest.raises(ArtifactError, match="attnprune_manifest.json: unreadable"):
        load_pruned_model(folder)


# --- the real model --------------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_smollm2_bitmask_folder_gives_the_dense_folders_logits(tmp_path, all_threads):
    from attnprune_opt.models.loading import load_model, load_tokenizer

    model, tokenizer = load_model(attn_implementation="eager").eval(), load_tokenizer()
    pruner = AttentionPruner(layers=[0, 1], rules=[
        {"modules": ["q_proj", "k_proj"], "method": "attention", "sparsity": 0.5},
        {"modules": ["v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"], "method": "wanda", "sparsity": 0.5}],
        attention={"refit_iterations": 2}, calibration={"source": "c4", "num_samples": 2, "seq_len": 64})
    pruner.prune_model(model, tokenizer, progress=False)
    pruner.save(model, tmp_path / "dense")
    pruner.save(model, tmp_path / "bitmask", format="bitmask")
    ids = torch.tensor(tokenizer("Pruning attention weights")["input_ids"])[None]
    with torch.no_grad():
        dense = AutoModelForCausalLM.from_pretrained(tmp_path / "dense", attn_implementation="eager")(ids).logits
        compressed = AutoModelForCausalLM.from_pretrained(tmp_path / "bitmask", attn_implementation="eager")
        assert torch.equal(compressed(ids).logits, dense)
        assert torch.equal(load_pruned_model(tmp_path / "bitmask", attn_implementation="eager")(ids).logits, dense)
    sizes = read_manifest(tmp_path / "bitmask").sizes
    assert sizes.bitmask_bytes < sizes.dense_bytes == read_manifest(tmp_path / "dense").sizes.dense_bytes
