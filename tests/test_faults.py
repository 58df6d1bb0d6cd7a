"""Nothing lost, nothing silently wrong: corrupted folders are named by ``load_pruned_model`` and ``verify``; a run
killed at any step of a save or an overwrite leaves the output path holding a complete model (old or new) and the
next run cleans up; a full disk and a read-only output are one-line errors that leave nothing behind."""

import ctypes
import json
import logging
import os
import shutil
import signal
import stat
import struct
import subprocess
import sys

import pytest
import torch
import yaml

from attnprune_opt import load_pruned_model
from attnprune_opt.atomic import atomic_output_dir, recover
from attnprune_opt.cli import main
from attnprune_opt.errors import ArtifactError, UnsupportedArchitectureError
from attnprune_opt.export.manifest import MANIFEST_NAME, SparsitySummary, read_manifest
from attnprune_opt.export.verify import verify_pruned_folder
from tiny_models import QK_ONLY, pruned_tiny_model, save_tiny_model_folder


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """A tiny Llama pruned at 50% (q/k), saved dense and bitmask."""
    model, pruner = pruned_tiny_model({**QK_ONLY, "attention": {"refit_iterations": 2}})
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


def test_recorded_role(folder, capsys):
    edit_manifest(folder, lambda m: m["sparsity"]["modules"]["model.layers.1.self_attn.k_proj.weight"]
                  .update(role="v_proj"))
    assert_named(folder, r"model.layers.1.self_attn.k_proj.weight \(v_proj of layer 1\) is not pruned by the "
                         r"recorded rules", capsys)


def test_role_swapped_in_a_resealed_manifest(folder):
    """A consistent manifest naming k_proj's matrix q_proj: only the model family's adapter can tell."""
    manifest = read_manifest(folder)
    name = "model.layers.1.self_attn.k_proj.weight"
    modules = {**manifest.sparsity.modules, name: manifest.sparsity.modules[name].model_copy(update={"role": "q_proj"})}
    manifest.model_copy(update={"sparsity": SparsitySummary.of(modules)}).write(folder)
    message = rf"{name}: k_proj of layer 1 in the model's layout, manifest says q_proj of layer 1"
    with pytest.raises(ArtifactError, match=message):
        verify_pruned_folder(folder, weights=True)
    with pytest.raises(ArtifactError, match=message):
        load_pruned_model(folder)


def test_older_schema(folder, capsys):
    edit_manifest(folder, lambda m: m.update(schema_version=2))
    assert_named(folder, r"attnprune_manifest.json: schema_version 2, expected 3 \(written by another version of "
                         r"attnprune-opt\)", capsys)


def test_config_json_the_adapter_cannot_read(folder):
    """Which matrices were pruned is read from config.json by the family's adapter: a bad one is named."""
    config = json.loads((folder / "config.json").read_text())
    for edit, error, message in (({"model_type": "gpt2"}, UnsupportedArchitectureError,
                                   r"config.json: model_type 'gpt2' is not supported; supported: .*llama"),
                                  ({"num_hidden_layers": "two"}, ArtifactError,
                                   r"config.json: not a valid llama config \(.*num_hidden_layers")):
        (folder / "config.json").write_text(json.dumps({**config, **edit}))
        with pytest.raises(error, match=message):
            verify_pruned_folder(folder, hashes=False, weights=True)


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
        assert yaml.safe_load(text)["schema_version"] == 3


# --- killed while writing: the output path holds a complete folder, old or new ------------------------------------

WRITER = r"""
import sys, time
from pathlib import Path
from attnprune_opt import atomic

out, step, go, mode = Path(sys.argv[1]), sys.argv[2], Path(sys.argv[3]), sys.argv[4]


def pause(name):
    if name == step:
        print(name, flush=True)
        while not go.exists():
            time.sleep(0.01)


make_temp, move, exchange, moves = atomic._make_temp, atomic._move, atomic._exchange, []


def make_temp_then_pause(path):
    tmp = make_temp(path)
    pause("temp")
    return tmp


def move_then_pause(source, target):
    move(source, target)
    moves.append(target)
    pause(f"move{len(moves)}")


def exchange_then_pause(first, second):
    if mode == "renames":
        return False
    assert exchange(first, second)
    pause("exchanged")
    return True


atomic._make_temp, atomic._move, atomic._exchange = make_temp_then_pause, move_then_pause, exchange_then_pause
with atomic.atomic_output_dir(out, overwrite=True) as tmp:
    (tmp / "weights").write_text("new" * 1000)
    pause("written")
    (tmp / "manifest").write_text("new")
print("done", flush=True)
"""
# Each step of writing a new output, and of replacing one by exchange or (where the OS has none) by two renames.
STEPS = [("new", "temp"), ("new", "written"), ("new", "move1"),
         ("exchange", "temp"), ("exchange", "written"), ("exchange", "exchanged"),
         ("renames", "written"), ("renames", "move1"), ("renames", "move2")]
MOVED = {"move1", "move2", "exchanged"}  # SIGTERM is held during the moves: the new folder is in place


def write_folder(path, content: str) -> None:
    path.mkdir()
    (path / "weights").write_text(content * 1000)
    (path / "manifest").write_text(content)


def folder_content(path) -> str | None:
    """"old" or "new" for a complete folder, None for no folder; anything else fails."""
    if not path.exists():
        return None
    content = (path / "manifest").read_text()
    assert (path / "weights").read_text() == content * 1000 and sorted(p.name for p in path.iterdir()) == [
        "manifest", "weights"]
    return content


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGKILL], ids=["SIGTERM", "SIGKILL"])
@pytest.mark.parametrize("mode,step", STEPS)
def test_killed_at_each_step(mode, step, signum, tmp_path):
    root = tmp_path / "outputs"
    root.mkdir()
    out, go = root / "out", tmp_path / "go"
    if mode != "new":
        write_folder(out, "old")
    child = subprocess.Popen([sys.executable, "-c", WRITER, str(out), step, str(go), mode],
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    assert child.stdout.readline().strip() == step
    os.kill(child.pid, signum)
    go.touch()
    stdout, stderr = child.communicate(timeout=60)
    assert child.returncode != 0 and "done" not in stdout

    finished = step in MOVED and signum == signal.SIGTERM
    before = folder_content(out)
    if signum == signal.SIGTERM:  # cleaned up on the way out
        assert [p.name for p in root.iterdir()] == (["out"] if before else [])
        assert before == ("new" if finished else None if mode == "new" else "old")
    elif (mode, step) != ("renames", "move1"):
        assert before in (("new",) if step in MOVED else (None,) if mode == "new" else ("old",))

    cleaned = recover(out)  # what the next run on the same output does first
    assert bool(cleaned) == (signum == signal.SIGKILL and (mode, step) != ("new", "move1")), cleaned
    after = folder_content(out)
    assert [p.name for p in root.iterdir()] == (["out"] if after else [])
    if mode != "new":
        assert after in ("old", "new")  # never lost
    assert after == before or (mode, step) == ("renames", "move1") and after == "old"  # rolled back


def test_output_folder_permissions_follow_the_umask(tmp_path):
    previous = os.umask(0o027)
    try:
        with atomic_output_dir(tmp_path / "out") as tmp:
            (tmp / "f").write_text("x")
    finally:
        os.umask(previous)
    assert stat.S_IMODE((tmp_path / "out").stat().st_mode) == 0o750


def test_output_containing_the_current_directory_is_refused(tmp_path, monkeypatch, capsys):
    (tmp_path / "sub").mkdir()
    monkeypatch.chdir(tmp_path / "sub")
    for output in (".", "..", str(tmp_path)):
        assert main(["prune", "--output", output, "--overwrite"]) == 2
        err = capsys.readouterr().err
        assert err == f"error: output {output} contains the current directory; name a folder of its own, such as " \
                      "out/NAME\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["sub"] and not any((tmp_path / "sub").iterdir())


# --- the same through the command line, on a real (tiny) model --------------------------------------------------------

PRUNE_RECIPE = {"rules": [{"modules": ["q_proj", "k_proj"], "method": "attention", "sparsity": 0.5}],
                "attention": {"refit_iterations": 0},
                "calibration": {"source": "c4", "num_samples": 2, "seq_len": 32}}
PAUSED_PRUNE = r"""
import sys, time
from pathlib import Path
from attnprune_opt.cli import main
from attnprune_opt.export import save

go, write_manifest = Path(sys.argv[1]), save.write_manifest


def pause_then_write(*args, **kwargs):
    print("weights written", flush=True)
    while not go.exists():
        time.sleep(0.01)
    return write_manifest(*args, **kwargs)


save.write_manifest = pause_then_write
sys.exit(main(sys.argv[2:]))
"""


@pytest.fixture(scope="module")
def cli_model(tmp_path_factory):
    root = tmp_path_factory.mktemp("cli")
    save_tiny_model_folder(root / "model")
    (root / "recipe.yaml").write_text(yaml.safe_dump(PRUNE_RECIPE))
    return root


def prune_args(cli_model, out, *extra) -> list[str]:
    return ["prune", "--recipe", str(cli_model / "recipe.yaml"), "--model", str(cli_model / "model"), "--output",
            str(out), "--quiet", *extra]


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGKILL], ids=["SIGTERM", "SIGKILL"])
def test_prune_killed_while_saving(cli_model, signum, tmp_path, caplog):
    out, go = tmp_path / "outputs" / "pruned", tmp_path / "go"
    out.parent.mkdir()
    assert main(prune_args(cli_model, out)) == 0
    old = (out / MANIFEST_NAME).read_bytes()
    child = subprocess.Popen([sys.executable, "-c", PAUSED_PRUNE, str(go), *prune_args(cli_model, out, "--overwrite")],
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    assert child.stdout.readline().strip() == "weights written"
    os.kill(child.pid, signum)
    go.touch()
    _, err = child.communicate(timeout=120)
    assert (out / MANIFEST_NAME).read_bytes() == old  # the old output, intact
    verify_pruned_folder(out)
    if signum == signal.SIGTERM:
        assert child.returncode == 128 + signal.SIGTERM
        assert err.strip().splitlines()[-1] == "error: stopped by SIGTERM; no output was written"
        assert [p.name for p in out.parent.iterdir()] == ["pruned"]
    else:
        assert len(list(out.parent.iterdir())) == 2  # and the dead run's partial folder
        with caplog.at_level(logging.WARNING, logger="attnprune_opt.atomic"):
            assert main(prune_args(cli_model, out, "--overwrite")) == 0  # the next run on the same output
        assert f"left by an interrupted run (process {child.pid})" in caplog.text
        assert [p.name for p in out.parent.iterdir()] == ["pruned"]


def test_disk_full_while_saving(cli_model, tmp_path):
    """A file-size limit (RLIMIT_FSIZE) stands in for a full disk: writing the weights fails with EFBIG."""
    import resource

    def limit_file_size():
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # else the kernel kills the process instead of failing write
        resource.setrlimit(resource.RLIMIT_FSIZE, (1 << 20, 1 << 20))

    out = tmp_path / "outputs" / "pruned"
    out.parent.mkdir()
    run = subprocess.run([sys.executable, "-m", "attnprune_opt.cli", *prune_args(cli_model, out)],
                         preexec_fn=limit_file_size, capture_output=True, text=True, timeout=300)
    assert run.returncode == 2, run.stderr
    assert run.stderr.strip().splitlines()[-1] == f"error: cannot write output {out}: File too large"
    assert list(out.parent.iterdir()) == []


def test_read_only_output_is_refused_before_loading(tmp_path):
    """Checked before any model is loaded. Root may write anywhere, so as root the run drops that capability."""
    parent = tmp_path / "read-only"
    parent.mkdir(mode=0o555)
    run = subprocess.run([sys.executable, "-m", "attnprune_opt.cli", "prune", "--output", str(parent / "pruned")],
                         preexec_fn=without_root_override if os.getuid() == 0 else None, capture_output=True,
                         text=True, timeout=300)
    assert run.returncode == 2 and run.stderr == f"error: cannot write in {parent}: Permission denied\n"
    assert list(parent.iterdir()) == []


def without_root_override() -> None:
    """Drop CAP_DAC_OVERRIDE and CAP_DAC_READ_SEARCH from the bounding set: after exec, root obeys permissions."""
    libc = ctypes.CDLL(None, use_errno=True)
    for capability in (1, 2):
        if libc.prctl(24, capability, 0, 0, 0) != 0:  # PR_CAPBSET_DROP
            raise OSError(ctypes.get_errno(), "prctl(PR_CAPBSET_DROP)")
