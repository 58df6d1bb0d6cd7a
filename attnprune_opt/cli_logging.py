"""What the command line shows of the library's logging. The library only logs (``logging.getLogger(__name__)``
under ``attnprune_opt``) and never configures handlers; the CLI shows its records on stderr, INFO and up, or
warnings only with ``--quiet``; other libraries' records from WARNING up."""

from __future__ import annotations

import logging

LIBRARY_LOGGER = "attnprune_opt"
# Import-time warnings that say nothing to a user of this tool on a CPU machine: torchao's about GPU kernels (CUDA
# libraries, Triton) and torch's about the enums torchao registers.
SILENCED = ("torchao", "torch.utils._pytree")


class _CliFormatter(logging.Formatter):
    """Progress notes as plain lines; warnings and errors prefixed by their level."""

    def format(self, record: logging.LogRecord) -> str:
        message = record.getMessage()
        return message if record.levelno < logging.WARNING else f"{record.levelname.lower()}: {message}"


def show_library_logs(quiet: bool = False) -> None:
    """A stderr handler on the root logger unless the process already has one (an application's, pytest's), and the
    library's level: INFO, or WARNING when ``quiet``."""
    handler = logging.StreamHandler()
    handler.setFormatter(_CliFormatter())
    logging.basicConfig(handlers=[handler])  # does nothing when the root logger is already configured
    logging.getLogger(LIBRARY_LOGGER).setLevel(logging.WARNING if quiet else logging.INFO)
    for name in SILENCED:
        logging.getLogger(name).setLevel(logging.ERROR)
