"""The one pruning configuration schema, shared by the constructor, YAML recipes and the saved manifest.

Unknown keys are refused at every level; every validation problem becomes a :class:`RecipeError` whose message
names the key path (``rules.0.sparsity``) and, for a misspelt key, the nearest valid one.
"""

from __future__ import annotations

import difflib
import re
import types
import typing
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, create_model, field_validator, model_validator

from .errors import RecipeError
from .methods.base import METHODS, MethodSettings, settings_blocks
from .models.base import ATTENTION_ROLES, ROLES

ModuleName = Literal[ROLES]
_N_M = re.compile(r"^(\d+):(\d+)$")


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class PruneRule(_Strict):
    """Prune ``modules`` of every decoder layer with ``method`` to ``sparsity`` (or an N:M ``structure``)."""

    modules: tuple[ModuleName, ...] = Field(min_length=1)
    method: str
    sparsity: float | None = Field(default=None, ge=0.0, lt=1.0, allow_inf_nan=False)
    structure: str = "unstructured"

    @field_validator("modules")
    @classmethod
    def _unique(cls, modules: tuple[str, ...]) -> tuple[str, ...]:
        if len(set(modules)) != len(modules):
            raise ValueError(f"modules listed twice: {list(modules)}")
        return modules

    @field_validator("method")
    @classmethod
    def _known_method(cls, method: str) -> str:
        if METHODS.get(method) is None:
            raise ValueError(f"unknown method {method!r}; known: {', '.join(METHODS.names())}")
        return method

    @field_validator("structure")
    @classmethod
    def _structure(cls, structure: str) -> str:
        if structure == "unstructured":
            return structure
        match = _N_M.match(structure)
        if not match or not 0 < int(match[1]) < int(match[2]):
            raise ValueError(f"structure must be 'unstructured' or 'N:M' with 0 < N < M, got {structure!r}")
        return structure

    @model_validator(mode="after")
    def _consistent(self) -> PruneRule:
        """Unstructured rules need a sparsity; N:M implies one (1 - N/M), which a given value must match."""
        roles = METHODS.get(self.method).roles
        if roles is not None and set(self.modules) - set(roles):
            raise ValueError(f"method {self.method!r} prunes {'/'.join(roles)} only, got {list(self.modules)}")
        if self.n_m is None:
            if self.sparsity is None:
                raise ValueError("sparsity is required for unstructured pruning")
            return self
        n, m = self.n_m
        if self.sparsity is not None and abs(self.sparsity - (1 - n / m)) > 1e-9:
            raise ValueError(f"structure {n}:{m} keeps {n} of {m}, so sparsity must be {1 - n / m:g}, "
                             f"got {self.sparsity:g}")
        object.__setattr__(self, "sparsity", 1 - n / m)
        return self

    @property
    def n_m(self) -> tuple[int, int] | None:
        match = _N_M.match(self.structure)
        return (int(match[1]), int(match[2])) if match else None


class CalibrationSettings(_Strict):
    """Where calibration text comes from: ``c4``, ``wikitext2``, a .txt/.jsonl/.parquet file, or
    ``hf:<name>[:config][:split]``; ``first`` takes the pool's first rows (C4 rows 0-7 by default), ``random``
    samples them by the config's seed; ``rows`` is a [start, stop) pool for document sources."""

    source: str = "c4"
    num_samples: int = Field(default=8, ge=1)
    seq_len: int = Field(default=512, ge=2)
    sampling: Literal["first", "random"] = "first"
    rows: tuple[int, int] | None = None


class _PrunerConfig(_Strict):
    """Everything a pruning run depends on; ``to_dict``/``from_dict`` round-trip it exactly.

    Besides the fields below, each registered method with settings has a block of its name (``attention``,
    ``sparsegpt``), validated by the method's settings model; a block no rule's method reads, or a setting the
    chosen configuration never reads, is an error. ``to_dict`` writes every setting that is read, defaults included,
    so a saved recipe says everything the run used.
    """

    rules: tuple[PruneRule, ...] = (PruneRule(modules=ATTENTION_ROLES, method="attention", sparsity=0.5),)
    calibration: CalibrationSettings = CalibrationSettings()
    propagate: Literal["pruned", "dense"] = "pruned"
    layers: tuple[int, ...] | None = None
    seed: int = 0
    model: str | None = None

    @field_validator("layers")
    @classmethod
    def _layers(cls, layers: tuple[int, ...] | None) -> tuple[int, ...] | None:
        if layers is not None and not layers:
            raise ValueError("must name at least one decoder layer (leave it out to prune every layer)")
        if layers and min(layers) < 0:
            raise ValueError(f"layer indices must be >= 0, got {list(layers)}")
        return layers

    @model_validator(mode="after")
    def _settings_read(self) -> _PrunerConfig:
        read = self.settings_in_use()
        for name in settings_blocks():
            if name in self.model_fields_set and name not in read:
                raise ValueError(f"{name}: settings of method {name!r}, which no rule uses")
        for name in read:
            block: MethodSettings = getattr(self, name)
            for key, why in block.unused().items():
                if key in block.model_fields_set:
                    raise ValueError(f"{name}.{key}: not used: {why}")
        return self

    def settings_in_use(self) -> tuple[str, ...]:
        """The method blocks this configuration reads."""
        read = dict.fromkeys(rule.method for rule in self.rules if rule.method in settings_blocks())
        for name in list(read):
            read.update(dict.fromkeys(getattr(self, name).reads_settings_of()))
        return tuple(read)

    @model_validator(mode="after")
    def _each_module_once(self) -> _PrunerConfig:
        if not self.rules:
            raise ValueError("rules must name at least one module to prune")
        seen: dict[str, int] = {}
        for i, rule in enumerate(self.rules):
            for module in rule.modules:
                if module in seen:
                    raise ValueError(f"{module} is targeted by rules {seen[module]} and {i}")
                seen[module] = i
        return self

    def rule_for(self, module: str) -> PruneRule | None:
        return next((rule for rule in self.rules if module in rule.modules), None)

    def to_dict(self) -> dict[str, Any]:
        data = self.model_dump(mode="json", exclude=set(settings_blocks()))
        for name in self.settings_in_use():
            block: MethodSettings = getattr(self, name)
            data[name] = block.model_dump(mode="json", exclude=set(block.unused()))
        return data

    def with_changes(self, **changes: Any) -> PrunerConfig:
        """This config with fields or method settings changed (``attention={"refit_iterations": 0}``); settings
        that the change leaves unread are dropped."""
        data = self.to_dict()
        for key, value in changes.items():
            if key in settings_blocks():
                block: MethodSettings = getattr(self, key).model_copy(update=value)
                data[key] = block.model_dump(mode="json", exclude=set(block.unused()))
            else:
                data[key] = value
        return PrunerConfig.from_dict(data)

    @classmethod
    def from_dict(cls, data: Any) -> PrunerConfig:
        if not isinstance(data, dict):
            raise RecipeError(f"a pruning config must be a mapping, got {type(data).__name__}")
        try:
            return cls.model_validate(data)
        except ValidationError as exc:
            raise RecipeError(_describe(exc)) from None

    @classmethod
    def from_yaml(cls, path: str | Path) -> PrunerConfig:
        """A recipe file, or a packaged recipe by name (``smollm2_qk50``)."""
        from .recipes import recipe_path

        path = recipe_path(path)
        try:
            data = yaml.safe_load(path.read_text())
        except OSError as exc:
            raise RecipeError(f"cannot read recipe {path}: {exc.strerror or exc}") from None
        except yaml.YAMLError as exc:
            raise RecipeError(f"recipe {path} is not valid YAML: {exc}") from None
        try:
            return cls.from_dict(data)
        except RecipeError as exc:
            raise RecipeError(f"recipe {path}: {exc}") from None

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=False)


PrunerConfig = create_model(
    "PrunerConfig", __base__=_PrunerConfig, __doc__=_PrunerConfig.__doc__,
    **{name: (settings, settings()) for name, settings in settings_blocks().items()})


def _describe(exc: ValidationError) -> str:
    """One line per problem: the key path, what is wrong, and for an unknown key the nearest valid one."""
    lines = []
    for error in exc.errors():
        loc = tuple(error["loc"])
        path = ".".join(str(part) for part in loc) or "config"
        if error["type"] == "extra_forbidden":
            known = _fields_at(loc[:-1])
            near = difflib.get_close_matches(str(loc[-1]), known, n=1)
            hint = f"; did you mean {near[0]!r}?" if near else f"; valid keys here: {', '.join(known)}"
            lines.append(f"unknown key {path!r}{hint}")
        else:
            message = error["msg"].removeprefix("Value error, ")
            value = error.get("input")
            got = "" if isinstance(value, (dict, list, tuple)) else f" (got {value!r})"
            lines.append(f"{path}: {message}{got}" if loc else message)
    return "; ".join(lines)


def _fields_at(loc: tuple) -> list[str]:
    """The field names of the schema model found by following ``loc`` from PrunerConfig."""
    model: Any = PrunerConfig
    for part in loc:
        if isinstance(part, int) or model is None:
            continue
        field = model.model_fields.get(part)
        model = _model_in(field.annotation) if field else None
    return sorted(model.model_fields) if model else []


def _model_in(annotation: Any) -> type[BaseModel] | None:
    """The schema model inside an annotation such as ``tuple[PruneRule, ...]`` or ``X | None``."""
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation
    if typing.get_origin(annotation) in (tuple, list, typing.Union, types.UnionType):
        for arg in typing.get_args(annotation):
            found = _model_in(arg)
            if found:
                return found
    return None
