"""Calibration data for pruning: local C4 / WikiText-2, text files, hub data sets, or self-generated text."""

from attnprune_opt.data.calibration import (
    CalibrationSet,
    CalibrationSpec,
    data_file_sha256,
    load_calibration,
)

__all__ = ["CalibrationSet", "CalibrationSpec", "data_file_sha256", "load_calibration"]
