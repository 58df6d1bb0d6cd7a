"""Adapters by ``model_type``: every module in ``models/families/`` registers its adapter on import, so adding a
family is adding its file."""

from __future__ import annotations

from typing import Any

from torch import nn

from ..errors import UnsupportedArchitectureError
from ..registry import Registry
from . import families
from .base import DecoderAdapter

ADAPTERS: Registry[type[DecoderAdapter]] = Registry(families, "model_type")


def register(cls: type[DecoderAdapter]) -> type[DecoderAdapter]:
    """Class decorator: serve ``cls.model_types`` with ``cls``."""
    return ADAPTERS.register(cls.model_types)(cls)


def supported_model_types() -> tuple[str, ...]:
    return ADAPTERS.names()


def adapter_for_config(config: Any) -> DecoderAdapter:
    """The adapter for a transformers config, or UnsupportedArchitectureError naming its model_type."""
    model_type = getattr(config, "model_type", None)
    cls = ADAPTERS.get(model_type)
    if cls is None:
        raise UnsupportedArchitectureError(
            f"model_type {model_type!r} is not supported; supported: {', '.join(supported_model_types())}")
    return cls(config)


def get_adapter(model: nn.Module) -> DecoderAdapter:
    """The adapter for ``model``, or UnsupportedArchitectureError naming its model_type."""
    return adapter_for_config(getattr(model, "config", None))
