"""Adapters by ``model_type``: every module in ``models/families/`` registers its adapter on import, so adding a
family is adding its file."""

from __future__ import annotations

import importlib
import pkgutil
from typing import Any

from torch import nn

from ..errors import UnsupportedArchitectureError
from . import families
from .base import DecoderAdapter

ADAPTERS: dict[str, type[DecoderAdapter]] = {}


def register(cls: type[DecoderAdapter]) -> type[DecoderAdapter]:
    """Class decorator: serve ``cls.model_types`` with ``cls``."""
    for model_type in cls.model_types:
        if model_type in ADAPTERS:
            raise ValueError(f"model_type {model_type!r} is registered twice")
        ADAPTERS[model_type] = cls
    return cls


def supported_model_types() -> tuple[str, ...]:
    _load_families()
    return tuple(sorted(ADAPTERS))


def adapter_for_config(config: Any) -> DecoderAdapter:
    """The adapter for a transformers config, or UnsupportedArchitectureError naming its model_type."""
    _load_families()
    model_type = getattr(config, "model_type", None)
    cls = ADAPTERS.get(model_type)
    if cls is None:
        raise UnsupportedArchitectureError(
            f"model_type {model_type!r} is not supported; supported: {', '.join(supported_model_types())}")
    return cls(config)


def get_adapter(model: nn.Module) -> DecoderAdapter:
    """The adapter for ``model``, or UnsupportedArchitectureError naming its model_type."""
    return adapter_for_config(getattr(model, "config", None))


def _load_families() -> None:
    for module in pkgutil.iter_modules(families.__path__):
        importlib.import_module(f"{families.__name__}.{module.name}")
