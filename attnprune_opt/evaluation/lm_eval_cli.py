"""``attnprune-opt lm-eval ARGS``: lm-eval's own command line, unchanged, run in a process where this package's
compressed format is registered (importing ``attnprune_opt`` registers its transformers quantizer, so
``--model hf --model_args pretrained=<bitmask folder>`` loads) and with the local task definitions on lm-eval's
include path (so ``--tasks local_arc_easy`` runs offline from the data folder). ``--model attnprune`` loads a
folder this package wrote with its manifest checked (:mod:`attnprune_opt.evaluation.lm_eval_model`)."""

from __future__ import annotations

import sys
from collections.abc import Sequence

import attnprune_opt  # noqa: F401  (registers the compressed format with transformers)
from attnprune_opt.evaluation import lm_eval_model  # noqa: F401  (registers --model attnprune with lm-eval)
from attnprune_opt.evaluation.lm_eval_tasks import tasks_dir

INCLUDE_PATH = "--include_path"
_HELP = {"-h", "--help"}


def with_local_tasks(args: Sequence[str]) -> list[str]:
    """``args`` with the local task folder added to lm-eval's include path (lm-eval reads several folders joined
    by ':'); a bare help request is passed on as it is."""
    args = list(args)
    if not args or (len(args) <= 2 and _HELP & set(args)):
        return args
    local = str(tasks_dir())
    for index, arg in enumerate(args):
        if arg == INCLUDE_PATH and index + 1 < len(args):
            args[index + 1] = f"{args[index + 1]}:{local}"
            return args
        if arg.startswith(f"{INCLUDE_PATH}="):
            args[index] = f"{arg}:{local}"
            return args
    return [*args, INCLUDE_PATH, local]


def run_lm_eval_cli(args: Sequence[str]) -> int:
    """Run lm-eval's console entry point on ``args``; its exit status is returned, not raised."""
    from lm_eval.__main__ import cli_evaluate

    saved = sys.argv
    sys.argv = ["lm-eval", *with_local_tasks(args)]
    try:
        cli_evaluate()
    except SystemExit as exc:  # argparse errors and --help end this way
        return exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
    finally:
        sys.argv = saved
    return 0
