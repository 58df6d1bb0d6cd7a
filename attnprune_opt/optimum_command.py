"""``optimum-cli attnprune``: every ``attnprune-opt`` subcommand under optimum's command line.

The subcommands and their options are the ones :func:`attnprune_opt.cli.add_commands` defines, added to optimum's
parser as they are, so a command added to ``cli.py`` appears in both. optimum runs a command by calling the parsed
``func`` and then ``.run()`` on what it returns; each subcommand's handler is wrapped accordingly (by the parser
class), and runs through
the same error boundary as ``attnprune-opt`` (:func:`attnprune_opt.cli.run`).
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable

from optimum.commands.base import BaseOptimumCLICommand, CommandInfo

from attnprune_opt import cli


class _Run:
    """What optimum calls ``.run()`` on: one ``attnprune-opt`` handler with its parsed arguments."""

    def __init__(self, handler: Callable[[argparse.Namespace], int], args: argparse.Namespace) -> None:
        self.handler, self.args = handler, args

    def run(self) -> None:
        self.args.func = self.handler
        status = cli.run(self.args)
        if status:
            sys.exit(status)


class _OptimumParser(argparse.ArgumentParser):
    """Every command parser below ``attnprune`` (argparse makes nested subparsers of the same class): a handler set
    as ``func`` becomes a factory of :class:`_Run`, which is what optimum calls."""

    def set_defaults(self, **kwargs) -> None:
        handler = kwargs.get("func")
        if handler is not None:
            kwargs["func"] = lambda args: _Run(handler, args)
        super().set_defaults(**kwargs)


class AttnPruneCommand(BaseOptimumCLICommand):
    COMMAND = CommandInfo(name="attnprune", help="prune attention weights by optimising the softmax attention "
                                                 "matrix (attnprune-opt)")

    @staticmethod
    def parse_args(parser: argparse.ArgumentParser) -> None:
        cli.add_commands(parser.add_subparsers(dest="command", required=True, parser_class=_OptimumParser))
