"""Scaling up: a random-weight model with Llama-2-7B's shapes, pruned with every decoder layer offloaded to disk.

Time and memory do not depend on the weights' values, and no model above 1B installs offline here, so the model is
written from its config with random weights, one tensor at a time into safetensors shards (never whole in memory).
Its vocabulary is the tokenizer's (SmolLM2's 49152 ids, the only Llama-style tokenizer at hand) instead of 32000;
every other shape is Llama-2-7B's. Each recipe then runs in its own child process (``attnprune-opt prune`` with a
device map that sends every decoder layer to disk), measured from outside: wall time in total and per layer (from
the run's report), peak resident memory of the process tree (sampled) and of the pruning process (its own
high-water mark), bytes read and written (the child's I/O accounting), the saved folder's size. The saved folder is
then checked in two more child processes: ``attnprune-opt verify`` (every file's SHA-256 and every pruned weight's
zeros against the manifest), and a load with every layer on disk followed by a forward pass with finite logits.
The sparsity of every pruned role is counted here, tensor by tensor, from the saved files.

Usage: python benchmarks/large_model.py --work DIR --out benchmarks/results/large_model [--layers 32]
           [--runs RECIPE[:layers=A+B][:refit=N][:samples=N] ...] [--keep] [--overwrite]
``--layers`` scales the depth down (tests/test_large_model.py runs two layers). A run may prune some layers only
(the shipped recipes' refits take minutes per layer at these shapes on this machine: their cost is measured on a
few layers and the full depth estimated from it, said so in the table). The work folder holds the model (13.8 GB at
full depth) and one pruned copy at a time, and is removed at the end unless ``--keep``.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import threading
import time
from collections import defaultdict
from pathlib import Path
from typing import Any

import psutil
import torch
from safetensors import safe_open

from attnprune_opt.atomic import atomic_output_dir, check_output_dir
from attnprune_opt.config import PrunerConfig
from attnprune_opt.export.manifest import MANIFEST_NAME
from attnprune_opt.export.save import shard_bytes

#: Llama-2-7B (config of meta-llama/Llama-2-7b-hf) but for the vocabulary, which is the tokenizer's.
LLAMA2_7B = {"hidden_size": 4096, "intermediate_size": 11008, "num_hidden_layers": 32, "num_attention_heads": 32,
             "num_key_value_heads": 32, "max_position_embeddings": 4096, "rms_norm_eps": 1e-5,
             "rope_theta": 10000.0, "tie_word_embeddings": False, "dtype": "bfloat16"}
INIT_STD = 0.02  # Llama's initializer_range
SHARD = "2GB"
ROLES = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
FORWARD_CHECK = """
import json, sys, torch
from attnprune_opt.export.load import load_pruned_model
model = load_pruned_model(sys.argv[1], device_map=json.loads(sys.argv[2]), offload_folder=sys.argv[3])
with torch.no_grad():
    logits = model(torch.arange(1, 17)[None]).logits
print(json.dumps({"finite": bool(torch.isfinite(logits).all()), "shape": list(logits.shape)}))
"""


def model_config(num_layers: int, vocab_size: int):
    from transformers import LlamaConfig

    return LlamaConfig(**{**LLAMA2_7B, "num_hidden_layers": num_layers, "vocab_size": vocab_size})


def shard_plan(shapes: dict[str, tuple[int, ...]], limit: int, element_size: int) -> list[list[str]]:
    """Tensor names grouped in file order into shards of at most ``limit`` bytes (a larger tensor alone)."""
    shards: list[list[str]] = [[]]
    size = 0
    for name, shape in shapes.items():
        nbytes = element_size * int(torch.Size(shape).numel())
        if shards[-1] and size + nbytes > limit:
            shards.append([])
            size = 0
        shards[-1].append(name)
        size += nbytes
    return shards


def write_random_model(folder: Path, num_layers: int, seed: int = 0) -> dict[str, Any]:
    """A Llama-2-7B-shaped model with random weights as a sharded safetensors folder, one tensor in memory at a time.

    Norm weights are ones and every matrix is N(0, INIT_STD^2), each drawn from its own generator (seeded by its
    position), so a shard's content does not depend on the shard size.
    """
    from safetensors.torch import save_file
    from transformers import AutoModelForCausalLM

    from attnprune_opt.models.loading import load_tokenizer

    tokenizer = load_tokenizer()
    config = model_config(num_layers, len(tokenizer))
    with torch.device("meta"):
        skeleton = AutoModelForCausalLM.from_config(config)
    shapes = {name: tuple(t.shape) for name, t in skeleton.state_dict().items()}
    dtype = torch.bfloat16
    shards = shard_plan(shapes, shard_bytes(SHARD), dtype.itemsize)
    positions = {name: i for i, name in enumerate(shapes)}
    weight_map, total = {}, 0
    with atomic_output_dir(folder, overwrite=True) as tmp:
        for number, names in enumerate(shards, 1):
            file = f"model-{number:05d}-of-{len(shards):05d}.safetensors"
            tensors = {}
            for name in names:
                if len(shapes[name]) == 1:
                    tensors[name] = torch.ones(shapes[name], dtype=dtype)
                else:
                    generator = torch.Generator().manual_seed(seed * 1_000_003 + positions[name])
                    tensors[name] = (torch.randn(shapes[name], generator=generator) * INIT_STD).to(dtype)
                weight_map[name] = file
                total += tensors[name].numel() * dtype.itemsize
            save_file(tensors, str(tmp / file), metadata={"format": "pt"})
            del tensors
        (tmp / "model.safetensors.index.json").write_text(
            json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=1))
        config.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
    return {"parameters": sum(int(torch.Size(s).numel()) for s in shapes.values()), "bytes": total,
            "shards": len(shards), "vocab_size": config.vocab_size}


def disk_device_map(num_layers: int) -> dict[str, str]:
    """Every decoder layer on disk; embeddings, final norm and head in RAM."""
    layers = {f"model.layers.{i}": "disk" for i in range(num_layers)}
    return {"model.embed_tokens": "cpu", **layers, "model.norm": "cpu", "model.rotary_emb": "cpu", "lm_head": "cpu"}


def _own_io() -> dict[str, int]:
    """This process's I/O counters, which include those of its reaped children."""
    counters = {}
    for line in Path("/proc/self/io").read_text().splitlines():
        key, value = line.split(":")
        counters[key] = int(value)
    return counters


class TreeMemory:
    """Samples the summed RSS of a process and its descendants until stopped; keeps the peak."""

    def __init__(self, pid: int, interval: float = 0.2) -> None:
        self.process, self.interval, self.peak = psutil.Process(pid), interval, 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                members = [self.process, *self.process.children(recursive=True)]
                self.peak = max(self.peak, sum(m.memory_info().rss for m in members if m.is_running()))
            except psutil.Error:
                pass
            self._stop.wait(self.interval)

    def stop(self) -> int:
        self._stop.set()
        self._thread.join()
        return self.peak


def run_measured(args: list[str], log: Path) -> dict[str, Any]:
    """Run a command; its wall and CPU time, exit status, peak tree RSS and I/O. stdout and stderr go to ``log``."""
    before = _own_io()
    start = time.perf_counter()
    with log.open("w") as out:
        process = subprocess.Popen(args, stdout=out, stderr=subprocess.STDOUT)
        memory = TreeMemory(process.pid)
        _, status, usage = os.wait4(process.pid, 0)
    seconds = time.perf_counter() - start
    peak = memory.stop()
    after = _own_io()
    return {"status": os.waitstatus_to_exitcode(status), "seconds": seconds,
            "cpu_seconds": usage.ru_utime + usage.ru_stime, "peak_tree_rss_mb": peak / 2**20,
            "read_bytes": after["read_bytes"] - before["read_bytes"],
            "written_bytes": after["write_bytes"] - before["write_bytes"],
            "read_chars": after["rchar"] - before["rchar"], "written_chars": after["wchar"] - before["wchar"]}


def role_sparsity(folder: Path, layers: list[int]) -> dict[str, float]:
    """Zero share of each prunable role over these layers, read one tensor at a time from the saved shards."""
    prefixes = tuple(f"model.layers.{i}." for i in layers)
    zeros: dict[str, int] = defaultdict(int)
    numel: dict[str, int] = defaultdict(int)
    for file in sorted(folder.glob("*.safetensors")):
        with safe_open(str(file), "pt") as tensors:
            for name in tensors.keys():
                role = next((r for r in ROLES if f".{r}." in name), None)
                if role is None or not name.endswith(".weight") or not name.startswith(prefixes):
                    continue
                weight = tensors.get_tensor(name)
                zeros[role] += int((weight == 0).sum())
                numel[role] += weight.numel()
    return {role: zeros[role] / numel[role] for role in ROLES if numel[role]}


def folder_bytes(folder: Path) -> int:
    return sum(f.stat().st_size for f in folder.rglob("*") if f.is_file())


def parse_run(spec: str) -> dict[str, Any]:
    """``RECIPE[:layers=A+B+...][:refit=N][:samples=N]``: a recipe (file or packaged name) and what to change."""
    recipe, *options = spec.split(":")
    run: dict[str, Any] = {"recipe": recipe}
    for option in options:
        key, _, value = option.partition("=")
        if key not in ("layers", "refit", "samples") or not value:
            raise SystemExit(f"run {spec!r}: {option!r} is not layers=A+B, refit=N or samples=N")
        run[key] = [int(v) for v in value.split("+")] if key == "layers" else int(value)
    return run


def recipe_as_run(run: dict[str, Any]) -> dict[str, Any]:
    """The run's recipe with its changes: the layers to prune, the calibration sequences, the refit steps of
    whichever refit the recipe's methods read."""
    config = PrunerConfig.from_yaml(run["recipe"])
    changes: dict[str, Any] = {}
    if "layers" in run:
        changes["layers"] = run["layers"]
    if "samples" in run:
        changes["calibration"] = {**config.to_dict()["calibration"], "num_samples": run["samples"]}
    if "refit" in run:  # with_changes drops the settings that no refit reads any more
        changes.update({block: {"refit_iterations": run["refit"]} for block in ("attention", "layer")
                        if "refit_iterations" in config.to_dict().get(block, {})})
    return config.with_changes(**changes).to_dict()


def prune_and_check(model: Path, spec: str, work: Path, num_layers: int) -> dict[str, Any]:
    """One run: prune with every layer on disk, then verify and load the result; the figures of each step."""
    run = parse_run(spec)
    name = Path(run["recipe"]).stem
    out, offload, recipe_file = work / f"pruned-{name}", work / "offload", work / f"{name}.yaml"
    config = recipe_as_run(run)
    recipe_file.write_text(PrunerConfig.from_dict(config).to_yaml())
    device_map = json.dumps(disk_device_map(num_layers))
    command = [sys.executable, "-m", "attnprune_opt.cli", "prune", "--model", str(model), "--recipe",
               str(recipe_file), "--output", str(out), "--overwrite", "--quiet", "--device-map", device_map,
               "--offload-folder", str(offload)]
    result: dict[str, Any] = {"run": spec, "recipe": name, "config": config,
                              "prune": run_measured(command, work / f"{out.name}.prune.log")}
    shutil.rmtree(offload, ignore_errors=True)
    if result["prune"]["status"] != 0:
        raise SystemExit(f"pruning with {spec} failed; see {work / f'{out.name}.prune.log'}")
    report = json.loads((out / MANIFEST_NAME).read_text())["report"]
    result["report"] = {"seconds": report["seconds"], "cpu_seconds": report["cpu_seconds"],
                        "peak_rss_mb": report["peak_rss_mb"],
                        "layer_seconds": [layer["seconds"] for layer in report["layers"]],
                        "layer_peak_rss_mb": [layer["peak_rss_mb"] for layer in report["layers"]]}
    result["saved_bytes"] = folder_bytes(out)
    pruned_layers = config["layers"] if config.get("layers") is not None else list(range(num_layers))
    result["sparsity"] = role_sparsity(out, pruned_layers)
    result["verify"] = run_measured([sys.executable, "-m", "attnprune_opt.cli", "verify", str(out)],
                                    work / f"{out.name}.verify.log")
    load = run_measured([sys.executable, "-c", FORWARD_CHECK, str(out), device_map, str(offload)],
                        work / f"{out.name}.load.log")
    lines = (work / f"{out.name}.load.log").read_text().strip().splitlines()
    load["forward"] = json.loads(lines[-1]) if load["status"] == 0 and lines else None
    result["load"] = load
    shutil.rmtree(offload, ignore_errors=True)
    shutil.rmtree(out)  # one pruned copy on disk at a time
    return result


def table(model: dict[str, Any], runs: list[dict[str, Any]]) -> str:
    gb = 1e9
    lines = [f"Model: Llama-2-7B shapes, {model['layers']} layers, vocabulary {model['vocab_size']}: "
             f"{model['parameters'] / 1e9:.2f} B parameters, {model['bytes'] / gb:.1f} GB of bfloat16 in "
             f"{model['shards']} shards (written in {model['seconds']:.0f} s); every decoder layer offloaded to disk.",
             "",
             "| recipe | layers pruned | calibration | refit steps | wall s | CPU s | s / pruned layer "
             f"| all {model['layers']} layers, h (est.) | peak RSS tree / pruner (MB) | read GB | written GB "
             "| saved GB | sparsity of pruned layers (q k v o gate up down) | verify | load + forward |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for run in runs:
        prune, report, config = run["prune"], run["report"], run["config"]
        layer_seconds = report["layer_seconds"]
        per_layer = sum(layer_seconds) / len(layer_seconds)
        full_depth = prune["seconds"] - sum(layer_seconds) + model["layers"] * per_layer
        pruned = "all" if config.get("layers") is None else "+".join(map(str, config["layers"]))
        calibration = config["calibration"]
        refit = next((config[b]["refit_iterations"] for b in ("attention", "layer") if b in config), "-")
        sparsity = " ".join(f"{run['sparsity'].get(r, 0.0):.3f}" for r in ROLES)
        forward = run["load"]["forward"]
        loaded = "ok" if forward and forward["finite"] else "FAILED"
        lines.append(
            f"| {run['recipe']} | {pruned} | {calibration['num_samples']} x {calibration['seq_len']} | {refit} "
            f"| {prune['seconds']:.0f} | {prune['cpu_seconds']:.0f} | {per_layer:.1f} | {full_depth / 3600:.2f} "
            f"| {prune['peak_tree_rss_mb']:.0f} / {report['peak_rss_mb']:.0f} | {prune['read_bytes'] / gb:.1f} "
            f"| {prune['written_bytes'] / gb:.1f} | {run['saved_bytes'] / gb:.1f} | {sparsity} "
            f"| {'ok' if run['verify']['status'] == 0 else 'FAILED'} "
            f"| {loaded} ({run['load']['seconds']:.0f} s, {run['load']['peak_tree_rss_mb']:.0f} MB) |")
    return "\n".join(lines)


def write_results(out: Path, model: dict[str, Any], runs: list[dict[str, Any]]) -> None:
    with atomic_output_dir(out, overwrite=True) as tmp:
        (tmp / "large_model.json").write_text(json.dumps({"model": model, "runs": runs}, indent=1))
        (tmp / "large_model.md").write_text(f"# Pruning a 7B-shaped model with disk offload\n\n{table(model, runs)}\n")


#: Every layer with the q/k method's pattern and the whole-layer method's pattern (no refit: the pipeline at full
#: depth, saving every layer rewritten), then each recipe as shipped on layer 0 (its per-layer cost; the loop stops
#: after the last pruned layer).
DEFAULT_RUNS = ["smollm2_qk50:refit=0", "smollm2_whole50_layer:refit=0", "smollm2_qk50:layers=0",
                "smollm2_whole50_layer:layers=0"]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--work", type=Path, required=True, help="folder for the model and the pruned copies")
    parser.add_argument("--out", type=Path, required=True, help="results folder (large_model.json, .md)")
    parser.add_argument("--layers", type=int, default=LLAMA2_7B["num_hidden_layers"], help="the model's depth")
    parser.add_argument("--runs", nargs="+", default=DEFAULT_RUNS,
                        help="RECIPE[:layers=A+B][:refit=N][:samples=N] (default: %(default)s)")
    parser.add_argument("--keep", action="store_true", help="keep the work folder (the random model)")
    parser.add_argument("--overwrite", action="store_true")
    args = parser.parse_args(argv)
    check_output_dir(args.out, args.overwrite)
    check_output_dir(args.work, args.overwrite)
    for spec in args.runs:  # bad runs fail before the model is written
        run = parse_run(spec)
        config = recipe_as_run(run)
        if any(not 0 <= i < args.layers for i in config.get("layers") or []):
            raise SystemExit(f"run {spec!r}: the model has layers 0-{args.layers - 1}")
    model_dir = args.work / "model"
    args.work.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    model = {"layers": args.layers, **write_random_model(model_dir, args.layers)}
    model["seconds"] = time.perf_counter() - start
    print(f"wrote {model['parameters'] / 1e9:.2f} B parameters in {model['seconds']:.0f} s", file=sys.stderr)
    runs = []
    for spec in args.runs:  # the results so far are written after each run, so a later failure loses none
        runs.append(prune_and_check(model_dir, spec, args.work, args.layers))
        write_results(args.out, model, runs)
        print(table(model, runs), file=sys.stderr, flush=True)
    text = table(model, runs)
    if not args.keep:
        shutil.rmtree(args.work)
    print(text)
    failed = [r["run"] for r in runs if r["verify"]["status"] != 0 or not (r["load"]["forward"] or {}).get("finite")]
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
