"""``optimum-cli attnprune ...``: optimum finds this file in its ``optimum.commands.register`` namespace.

Kept import-light, as optimum asks: the command classes live in :mod:`attnprune_opt.optimum_command`, which imports
nothing heavy until a command runs.
"""

from attnprune_opt.optimum_command import AttnPruneCommand

REGISTER_COMMANDS = [AttnPruneCommand]
