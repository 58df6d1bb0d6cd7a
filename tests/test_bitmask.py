"""The compressed-tensors sparse layouts, the sharded folder writer and loading it back through plain transformers."""

import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

import attnprune_opt
from attnprune_opt.errors import ArtifactError, ConfigError
from attnprune_opt.export.bitmask import (
    SPARSE_24_BITMASK,
    SPARSE_BITMASK,
    compress_bitmask,
    compress_sparse24,
    decompress_bitmask,
    decompress_sparse24,
)
from attnprune_opt.export.sharded import (
    INDEX_NAME,
    WEIGHTS_NAME,
    quantization_config,
    verify_folder,
    write_compressed_safetensors,
)

DTYPES = [torch.float32, torch.bfloat16, torch.float16]
PRUNED = ("q_proj", "k_proj")
OFFLINE_ENV = {**os.environ, "HF_HUB_OFFLINE": "1"}


def bits(t: torch.Tensor) -> torch.Tensor:
    """The raw bit patterns, so NaN payloads and signed zeros are compared exactly."""
    return t.view({4: torch.int32, 2: torch.int16}[t.element_size()])


def sparse(shape: tuple[int, int], dtype: torch.dtype, density: float, gen: torch.Generator) -> torch.Tensor:
    w = torch.randn(shape, generator=gen).to(dtype)
    return w.masked_fill(torch.rand(shape, generator=gen) >= density, 0)


def sparse24(shape: tuple[int, int], dtype: torch.dtype, gen: torch.Generator) -> torch.Tensor:
    groups = torch.randn(shape, generator=gen).to(dtype).reshape(-1, 4)
    drop = torch.rand(groups.shape, generator=gen).argsort(dim=1)[:, :2]
    groups.scatter_(1, drop, 0)
    groups[::3, :3] = 0  # some groups with fewer than two non-zeros: the layout then stores zeros
    return groups.reshape(shape)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize(
    ("shape", "density"),
    [((830, 545), 0.5), ((7, 9), 0.0), ((7, 9), 1.0), ((1, 1), 1.0), ((0, 7), 0.5), ((5, 0), 0.5), ((3, 16), 0.3)],
)
def test_bitmask_round_trip_is_bit_exact(dtype, shape, density, gen):
    w = sparse(shape, dtype, density, gen)
    specials = torch.tensor([float("inf"), float("nan"), -torch.finfo(dtype).smallest_normal / 4]).to(dtype)
    w.view(-1)[:3] = specials[: min(3, w.numel())]  # infinity, NaN and a subnormal survive too
    parts = compress_bitmask(w)
    assert parts["compressed"].numel() == int((w != 0).sum())
    assert torch.equal(bits(decompress_bitmask(parts)), bits(w))


def test_negative_zero_is_not_stored():
    """As in the reference, `!= 0` decides what is stored: -0.0 comes back as +0.0 (the only non-bit-exact value)."""
    w = torch.tensor([[-0.0, 1.0, 0.0, -2.0]])
    parts = compress_bitmask(w)
    assert parts["compressed"].tolist() == [1.0, -2.0]
    assert torch.equal(bits(decompress_bitmask(parts)), bits(torch.tensor([[0.0, 1.0, 0.0, -2.0]])))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(830, 544), (4, 4), (0, 8), (7, 12)])
def test_sparse24_round_trip_is_bit_exact(dtype, shape, gen):
    w = sparse24(shape, dtype, gen)
    parts = compress_sparse24(w)
    assert parts["compressed"].shape == (shape[0], shape[1] // 2)
    assert torch.equal(bits(decompress_sparse24(parts)), bits(w))


def test_sparse24_rejects_what_it_cannot_store():
    with pytest.raises(ConfigError, match=r"1 groups of 4 have more than 2 non-zeros, first at row 1, columns 4..7"):
        compress_sparse24(torch.tensor([[1.0, 0, 0, 2, 0, 0, 0, 0], [0, 0, 0, 0, 1, 2, 3, 0]]))
    with pytest.raises(ConfigError, match="divisible by 4"):
        compress_sparse24(torch.zeros(2, 6))
    with pytest.raises(ConfigError, match="2-D floating-point"):
        compress_bitmask(torch.zeros(2, 2, 2))


def test_bitmask_layout_matches_hand_worked_reference():
    """Worked by hand from compressed-tensors 0.14.0.1 `bitmask_compress` (numpy packbits, bitorder little)."""
    w = torch.tensor([[1.0, 0, 0, 2, 0, 0, 0, 0, 0, 3], [0, 0, 0, 0, 0, 0, 0, 0, 4, 0]])
    parts = compress_bitmask(w)
    assert parts["shape"].dtype == torch.int64 and parts["shape"].tolist() == [2, 10]
    assert parts["compressed"].tolist() == [1.0, 2.0, 3.0, 4.0]
    # row 0: columns 0 and 3 -> 0b00001001 = 9, column 9 -> bit 1 of byte 1 = 2; row 1: column 8 -> bit 0 = 1
    assert parts["bitmask"].dtype == torch.uint8 and parts["bitmask"].tolist() == [[9, 2], [0, 1]]
    assert parts["row_offsets"].dtype == torch.int64 and parts["row_offsets"].tolist() == [0, 3]


def test_sparse24_layout_matches_hand_worked_reference():
    """Worked by hand from compressed-tensors 0.14.0.1 `sparse24_bitmask_compress`."""
    w = torch.tensor([[0.0, 5, 0, -6, 7, 0, 0, 8], [1, 2, 0, 0, 0, 0, 3, 4]])
    parts = compress_sparse24(w)
    assert parts["shape"].dtype == torch.int64 and parts["shape"].tolist() == [[2], [8]]
    assert parts["compressed"].tolist() == [[5.0, -6.0, 7.0, 8.0], [1.0, 2.0, 3.0, 4.0]]
    # row 0: columns 1, 3, 4, 7 -> 2 + 8 + 16 + 128; row 1: columns 0, 1, 6, 7 -> 1 + 2 + 64 + 128
    assert parts["bitmask"].tolist() == [[154], [195]]


@pytest.mark.parametrize("cols", [1, 7, 8, 9, 545])
def test_packing_equals_numpy_packbits_little(cols, gen):
    mask = torch.rand(13, cols, generator=gen) < 0.5
    expected = np.packbits(mask.numpy(), axis=-1, bitorder="little")
    assert np.array_equal(compress_bitmask(mask.float())["bitmask"].numpy(), expected)


@pytest.mark.parametrize(
    ("key", "bad", "message"),
    [
        ("bitmask", lambda t: t[:, :-1], r"layer\.bitmask: expected uint8 of shape \(6, 2\)"),
        ("bitmask", lambda t: t | 0x80, r"layer\.bitmask: padding bits past column 10 are set"),
        ("compressed", lambda t: t[:-1], r"layer\.compressed: expected \d+ values"),
        ("row_offsets", lambda t: t + 1, r"layer\.row_offsets: does not match"),
        ("shape", lambda t: t[:1], r"layer\.shape: expected two non-negative integers"),
        ("row_offsets", None, r"missing \['layer\.row_offsets'\]"),
    ],
)
def test_decompress_names_the_inconsistent_tensor(key, bad, message, gen):
    parts = compress_bitmask(sparse((6, 10), torch.float32, 0.5, gen))
    if bad is None:
        del parts[key]
    else:
        parts[key] = bad(parts[key])
    with pytest.raises(ArtifactError, match=message):
        decompress_bitmask(parts, name="layer")


def test_decompress_sparse24_checks_groups(gen):
    parts = compress_sparse24(sparse24((4, 8), torch.float32, gen))
    parts["bitmask"][0, 0] = 0b111
    with pytest.raises(ArtifactError, match=r"q\.bitmask: not exactly 2 set bits"):
        decompress_sparse24(parts, name="q")


# --- the folder: a tiny Llama with half of every q/k weight pruned -----------------------------------------------


def tiny_pruned_llama(layout: str):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=128,
        tie_word_embeddings=True,
    )
    model = LlamaForCausalLM(config).eval()
    targets = []
    with torch.no_grad():
        for name, module in model.named_modules():
            if name.endswith(PRUNED):
                groups = module.weight.view(-1, 4) if layout == SPARSE_24_BITMASK else module.weight.view(1, -1)
                smallest = groups.abs().topk(groups.shape[1] // 2, dim=1, largest=False).indices
                groups.scatter_(1, smallest, 0.0)
                targets.append(name)
    return model, targets


def save_compressed(model, targets, folder, layout=SPARSE_BITMASK, max_shard_size=40_000):
    index = write_compressed_safetensors(
        model.state_dict().items(), lambda name: name.removesuffix(".weight") in targets, folder, max_shard_size,
        layout=layout,
    )
    config = model.config.to_dict()
    config["quantization_config"] = quantization_config(layout, targets)
    (folder / "config.json").write_text(json.dumps(config))
    return index


@pytest.fixture(scope="module")
def pruned():
    return tiny_pruned_llama(SPARSE_BITMASK)


@pytest.fixture(scope="module")
def folder(pruned, tmp_path_factory):
    path = tmp_path_factory.mktemp("compressed")
    save_compressed(*pruned, path)
    return path


@pytest.fixture(scope="module", autouse=True)
def fresh_interpreters(folder):
    """The checks that need an interpreter of their own, started first so they overlap with the other tests."""
    plain = (  # transformers without this package must refuse the folder
        "import sys\n"
        "from transformers import AutoModelForCausalLM\n"
        "assert 'attnprune_opt' not in sys.modules\n"
        f"AutoModelForCausalLM.from_pretrained({str(folder)!r})\n"
    )
    lazy = (  # importing the package loads neither torch nor transformers, and registers once they come
        "import sys\n"
        "import attnprune_opt\n"
        "print('transformers' in sys.modules or 'torch' in sys.modules)\n"
        "from transformers.quantizers.auto import AUTO_QUANTIZER_MAPPING\n"
        "print(AUTO_QUANTIZER_MAPPING['attnprune-sparse'].__name__)\n"
    )
    runs = {
        name: subprocess.Popen(
            [sys.executable, "-c", code], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=OFFLINE_ENV
        )
        for name, code in [("plain", plain), ("lazy", lazy)]
    }
    yield runs
    for run in runs.values():
        run.kill()
        run.communicate()


def assert_same_model(loaded, model):
    for name, expected in model.state_dict().items():
        actual = loaded.state_dict()[name]
        if actual.device.type == "meta":  # offloaded to disk
            from transformers.integrations.accelerate import load_offloaded_parameter

            actual = load_offloaded_parameter(loaded, name)
        assert actual.dtype == expected.dtype and torch.equal(bits(actual), bits(expected)), name
    ids = torch.arange(24).reshape(2, 12)
    with torch.no_grad():
        assert torch.equal(loaded(ids).logits, model(ids).logits)
    assert getattr(loaded.config, "quantization_config", None) is None and not loaded.is_quantized


def test_writer_shards_like_save_pretrained(pruned, folder):
    model, targets = pruned
    index = json.loads((folder / INDEX_NAME).read_text())
    files = sorted(set(index["weight_map"].values()))
    assert files == [f"model-{i:05d}-of-{len(files):05d}.safetensors" for i in range(1, len(files) + 1)]
    assert len(files) > 1 and not (folder / WEIGHTS_NAME).exists()
    assert "lm_head.weight" not in index["weight_map"]  # tied to embed_tokens, written once
    assert index["metadata"]["total_parameters"] == model.num_parameters()
    for target in targets:
        assert {f"{target}.{s}" for s in ("shape", "compressed", "bitmask", "row_offsets", "weight")} <= set(
            index["weight_map"]
        )
    assert verify_folder(folder) == index["weight_map"]


def test_single_shard_replaces_a_sharded_save(pruned, tmp_path):
    model, targets = pruned
    save_compressed(model, targets, tmp_path)
    index = save_compressed(model, targets, tmp_path, max_shard_size=10**9)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["config.json", WEIGHTS_NAME]
    assert set(index["weight_map"].values()) == {WEIGHTS_NAME}
    verify_folder(tmp_path)


@pytest.mark.parametrize("layout", [SPARSE_BITMASK, SPARSE_24_BITMASK])
def test_from_pretrained_returns_the_saved_weights(layout, tmp_path):
    from transformers import AutoModelForCausalLM

    model, targets = tiny_pruned_llama(layout)
    save_compressed(model, targets, tmp_path, layout)
    assert_same_model(AutoModelForCausalLM.from_pretrained(tmp_path, device_map="cpu"), model)


def test_from_pretrained_with_a_layer_offloaded_to_disk(pruned, folder, tmp_path):
    from transformers import AutoModelForCausalLM

    device_map = {"model.embed_tokens": "cpu", "model.layers.0": "cpu", "model.layers.1": "disk"}
    device_map |= {"model.norm": "cpu", "model.rotary_emb": "cpu", "lm_head": "cpu"}
    loaded = AutoModelForCausalLM.from_pretrained(folder, device_map=device_map, offload_folder=tmp_path)
    assert loaded.state_dict()["model.layers.1.self_attn.q_proj.weight"].device.type == "meta"
    assert_same_model(loaded, pruned[0])


def test_a_target_that_never_lands_is_an_error(pruned, folder, tmp_path):
    from transformers import AutoModelForCausalLM

    shutil.copytree(folder, tmp_path, dirs_exist_ok=True)
    config = json.loads((tmp_path / "config.json").read_text())
    config["quantization_config"]["targets"].append("model.layers.0.self_attn.v_proj")
    (tmp_path / "config.json").write_text(json.dumps(config))
    with pytest.raises(ArtifactError, match=r"never reached the model.*v_proj"):
        AutoModelForCausalLM.from_pretrained(tmp_path)


def test_plain_transformers_refuses_the_folder(fresh_interpreters):
    result = fresh_interpreters["plain"]
    out, err = result.communicate(timeout=300)
    assert result.returncode != 0, out
    assert "RuntimeError: You set `ignore_mismatched_sizes` to `False`, thus raising an error" in err
    assert "Unknown quantization type, got attnprune-sparse" in err


def test_registration_waits_for_transformers_and_is_idempotent(fresh_interpreters):
    result = fresh_interpreters["lazy"]
    out, err = result.communicate(timeout=300)
    assert result.returncode == 0, err
    assert out.split() == ["False", "SparseHfQuantizer"]
    from transformers.quantizers.auto import AUTO_QUANTIZER_MAPPING

    attnprune_opt.register()
    attnprune_opt.register()
    assert AUTO_QUANTIZER_MAPPING["attnprune-sparse"].__name__ == "SparseHfQuantizer"


def shards(folder):
    return sorted(folder.glob("model-*.safetensors"))


def test_verify_folder_names_a_truncated_shard(folder, tmp_path):
    shutil.copytree(folder, tmp_path, dirs_exist_ok=True)
    victim = shards(tmp_path)[1]
    victim.write_bytes(victim.read_bytes()[:-10])
    with pytest.raises(ArtifactError, match=rf"{victim.name}: unreadable safetensors file"):
        verify_folder(tmp_path)


def test_verify_folder_names_a_shard_missing_a_listed_tensor(folder, tmp_path):
    shutil.copytree(folder, tmp_path, dirs_exist_ok=True)
    victim = shards(tmp_path)[0]
    tensors = load_file(victim)
    dropped = sorted(tensors)[0]
    del tensors[dropped]
    save_file(tensors, victim, metadata={"format": "pt"})
    with pytest.raises(ArtifactError, match=rf"{victim.name}: lacks tensor '{dropped}'"):
        verify_folder(tmp_path)
