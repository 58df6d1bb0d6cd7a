"""The project's named errors: every bad input surfaces as one of these, with a message that names the problem."""


class AttnPruneError(Exception):
    """Base class of every error the project raises on purpose."""


class ConfigError(AttnPruneError, ValueError):
    """A pruning configuration value is out of range or inconsistent (e.g. sparsity outside [0, 1))."""


class RecipeError(ConfigError):
    """A recipe file or dict does not match the schema; the message names the key path."""


class UnsupportedArchitectureError(AttnPruneError):
    """The model's architecture has no adapter; the message names its model_type and the supported list."""


class CalibrationDataError(AttnPruneError):
    """Calibration data is missing, empty or too short."""


class NonFiniteWeightsError(AttnPruneError):
    """A weight to be pruned (or its calibration activations) contains NaN or infinity."""


class OutputExistsError(AttnPruneError, FileExistsError):
    """The output folder exists and overwrite was not requested."""


class ArtifactError(AttnPruneError):
    """A saved model folder is corrupt, truncated, or disagrees with its manifest."""


class OutputPathError(AttnPruneError):
    """The output path cannot be used: it contains the current directory, is not a folder, or is not writable."""


class Terminated(KeyboardInterrupt):
    """SIGTERM or SIGHUP arrived; raised like Ctrl-C so that temporary outputs are removed on the way out."""

    def __init__(self, signum: int):
        super().__init__(f"terminated by signal {signum}")
        self.signum = signum


class ModelSourceError(AttnPruneError):
    """A model path cannot be used: it does not exist, is not a model folder, or holds no safetensors weights."""


class DistributedError(AttnPruneError):
    """A data-parallel run lost a rank: a collective failed or timed out (attnprune_opt/distributed.py)."""
