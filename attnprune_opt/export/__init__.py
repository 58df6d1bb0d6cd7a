"""Writing pruned models to disk and loading them back, including the compressed sparse layouts.

Importing this package is free (neither torch nor transformers): ``attnprune_opt`` imports it to call
:func:`register` at import time.
"""

from __future__ import annotations

import importlib.util
import sys
from importlib.machinery import ModuleSpec
from types import ModuleType

_REGISTRY_MODULE = "transformers.quantizers.auto"


def register() -> None:
    """Teach transformers the ``attnprune-sparse`` quantization method, without importing transformers now.

    Importing transformers' quantizer registry costs seconds, so unless it is already imported the registration waits
    for it: a one-shot import hook registers right after that module has run, before anything can look a method up.
    Idempotent.
    """
    if _REGISTRY_MODULE in sys.modules:
        from .quantizer import register as register_now

        register_now()
    elif not any(isinstance(finder, _RegisterAfterImport) for finder in sys.meta_path):
        sys.meta_path.insert(0, _RegisterAfterImport())


class _RegisterAfterImport:
    """A ``sys.meta_path`` finder (duck-typed: importing importlib.abc or typing would cost more than the rest).

    Finds the registry module through the other finders and wraps its loader so registration follows its import."""

    def find_spec(self, fullname: str, path: object, target: ModuleType | None = None) -> ModuleSpec | None:
        if fullname != _REGISTRY_MODULE:
            return None
        sys.meta_path.remove(self)
        spec = importlib.util.find_spec(fullname)
        if spec is not None and spec.loader is not None:
            spec.loader = _RegisteringLoader(spec.loader)
        return spec


class _RegisteringLoader:
    def __init__(self, loader: object):
        self._loader = loader

    def create_module(self, spec: ModuleSpec) -> ModuleType | None:
        return self._loader.create_module(spec)

    def exec_module(self, module: ModuleType) -> None:
        self._loader.exec_module(module)
        register()

    def __getattr__(self, name: str) -> object:
        # get_source, get_code... for tracebacks and inspect
        return getattr(self._loader, name)
