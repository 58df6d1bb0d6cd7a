"""A name -> class registry filled by the modules of one package: adding an entry is adding a file.

Used for model families (models/families/) and pruning methods (methods/), as lm-evaluation-harness does for its
models and tasks.
"""

from __future__ import annotations

import importlib
import pkgutil
from collections.abc import Callable, Iterable
from types import ModuleType
from typing import Generic, TypeVar

T = TypeVar("T")


class Registry(Generic[T]):
    """Entries registered by the modules of ``package``, which are imported on first lookup."""

    def __init__(self, package: ModuleType, kind: str) -> None:
        self.package, self.kind = package, kind
        self._entries: dict[str, T] = {}
        self._loaded = False

    def register(self, names: Iterable[str]) -> Callable[[T], T]:
        """Decorator: serve each of ``names`` with the decorated entry."""
        def add(entry: T) -> T:
            for name in names:
                if name in self._entries:
                    raise ValueError(f"{self.kind} {name!r} is registered twice")
                self._entries[name] = entry
            return entry
        return add

    def get(self, name: str) -> T | None:
        self._load()
        return self._entries.get(name)

    def names(self) -> tuple[str, ...]:
        self._load()
        return tuple(sorted(self._entries))

    def items(self) -> list[tuple[str, T]]:
        self._load()
        return sorted(self._entries.items())

    def _load(self) -> None:
        if not self._loaded:
            self._loaded = True
            for module in pkgutil.iter_modules(self.package.__path__):
                importlib.import_module(f"{self.package.__name__}.{module.name}")
