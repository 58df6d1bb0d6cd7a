"""Subcommands that connect ``attnprune-opt`` to the rest of the stack: ``data fetch`` (the data folder from the
hub), ``lm-eval`` (lm-eval's own command line with this package's format and tasks) and ``convert-gguf`` (a GGUF
model as a safetensors folder, which can be offloaded to disk)."""

from __future__ import annotations

import argparse
from pathlib import Path


def cmd_data_fetch(args: argparse.Namespace) -> int:
    from .data.fetch import fetch_data

    out = fetch_data(args.output, files=args.files, overwrite=args.overwrite, allow_mismatch=args.allow_mismatch,
                     progress=not args.quiet)
    print(f"data folder written to {out}; use it with ATTNPRUNE_DATA_DIR={out}")
    return 0


def cmd_lm_eval(args: argparse.Namespace) -> int:
    from .evaluation.lm_eval_cli import run_lm_eval_cli

    return run_lm_eval_cli(args.lm_eval_args)


def cmd_convert_gguf(args: argparse.Namespace) -> int:
    from .models.gguf import gguf_to_folder

    out = gguf_to_folder(args.gguf, args.output, dtype=args.dtype, max_shard_size=args.max_shard_size,
                         overwrite=args.overwrite)
    print(f"{args.gguf} written to {out} as safetensors; prune or evaluate {out}")
    return 0


def add_ext_commands(sub: argparse._SubParsersAction) -> None:
    data = sub.add_parser("data", help="the data folder of the benchmark protocol")
    data_sub = data.add_subparsers(dest="data_command", required=True)
    fetch = data_sub.add_parser("fetch", help="build the data folder from the Hugging Face hub (needs network), "
                                              "checking every file's SHA-256 against the reference copy")
    fetch.add_argument("--output", type=Path, required=True, help="the new data folder (written atomically)")
    fetch.add_argument("--files", nargs="+", help="only these files, relative to the folder (default: all)")
    fetch.add_argument("--overwrite", action="store_true", help="replace an existing output folder")
    fetch.add_argument("--allow-mismatch", action="store_true", help="keep a file whose SHA-256 differs from the "
                                                                     "reference copy (figures then do not compare)")
    fetch.add_argument("--quiet", action="store_true", help="no progress bars")
    fetch.set_defaults(func=cmd_data_fetch)

    # Everything after `lm-eval` goes to lm-eval untouched, options included: no option prefix is ours here.
    lm_eval = sub.add_parser("lm-eval", add_help=False, prefix_chars="\0",
                             help="lm-eval's own command line (e.g. run --model hf --model_args pretrained=FOLDER "
                                  "--tasks local_arc_easy), with this package's compressed format and local tasks")
    lm_eval.add_argument("lm_eval_args", nargs=argparse.REMAINDER, metavar="LM_EVAL_ARGS")
    lm_eval.set_defaults(func=cmd_lm_eval)

    convert = sub.add_parser("convert-gguf", help="write a GGUF model (dequantized) and its tokenizer as a safetensors "
                                                  "folder: loads faster, and can be offloaded to disk")
    convert.add_argument("gguf", metavar="MODEL", help="a .gguf file, or 'smollm2-135m' (the embedded default)")
    convert.add_argument("output", type=Path, metavar="OUT_DIR", help="output folder (written atomically)")
    convert.add_argument("--dtype", default="bfloat16", choices=("bfloat16", "float16", "float32"),
                         help="weight dtype of the folder (default: %(default)s)")
    convert.add_argument("--max-shard-size", default="2GB", help="largest weight file (default: %(default)s)")
    convert.add_argument("--overwrite", action="store_true", help="replace an existing output folder")
    convert.set_defaults(func=cmd_convert_gguf)
