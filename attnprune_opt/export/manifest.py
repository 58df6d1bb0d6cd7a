"""The manifest of a pruned folder (``attnprune_manifest.json``): one typed record, read and written only here.

It holds what identifies the run (the config, the model and calibration data by name and SHA-256, versions), what
was measured on the written files (every pruned matrix's zeros, the sizes of both formats) and a SHA-256 of every
other file in the folder. Its summary figures are derived from its per-weight entries, and every entry must agree
with the recorded rules, so an edited figure is an :class:`ArtifactError`; ``digest`` (a SHA-256 of the rest of the
manifest) catches any other edit. No absolute local path is recorded: inputs are named by name, relative path and
hash (see :mod:`attnprune_opt.paths`).
"""

from __future__ import annotations

import hashlib
import json
import platform
from importlib import metadata
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_serializer, model_validator

from ..config import PrunerConfig
from ..errors import ArtifactError
from ..paths import file_sha256
from .folder import read_json

MANIFEST_NAME = "attnprune_manifest.json"
RECIPE_NAME = "recipe.yaml"
SCHEMA_VERSION = 3
FORMATS = ("dense", "bitmask")
_VERSIONED = ("attnprune-opt", "torch", "transformers", "accelerate", "safetensors", "gguf")


class _Record(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class WeightSparsity(_Record):
    """One pruned matrix as measured in the files: zeros of numel, under the rule that pruned it. ``layer`` and
    ``role`` (the recipes' name for the matrix, from the family's adapter) let the manifest be checked against its
    rules without the model; a fused tensor's matrices are separate entries."""

    layer: int = Field(ge=0)
    role: str
    method: str
    structure: str
    target_sparsity: float
    zeros: int = Field(ge=0)
    numel: int = Field(ge=0)
    sparsity: float
    file: str

    @model_validator(mode="after")
    def _derived(self) -> WeightSparsity:
        if self.zeros > self.numel or self.sparsity != _fraction(self.zeros, self.numel):
            raise ValueError(f"sparsity {self.sparsity!r} is not zeros / numel = {self.zeros} / {self.numel}")
        return self


class SparsitySummary(_Record):
    """The per-weight entries and their totals; the totals must be what the entries add up to."""

    pruned_weights: float
    zeros: int
    numel: int
    modules: dict[str, WeightSparsity]

    @classmethod
    def of(cls, modules: dict[str, WeightSparsity]) -> SparsitySummary:
        zeros, numel = sum(m.zeros for m in modules.values()), sum(m.numel for m in modules.values())
        return cls(pruned_weights=_fraction(zeros, numel), zeros=zeros, numel=numel, modules=modules)

    @model_validator(mode="after")
    def _derived(self) -> SparsitySummary:
        zeros, numel = sum(m.zeros for m in self.modules.values()), sum(m.numel for m in self.modules.values())
        if (self.zeros, self.numel, self.pruned_weights) != (zeros, numel, _fraction(zeros, numel)):
            raise ValueError(f"the summary (pruned_weights {self.pruned_weights!r}, {self.zeros} zeros of "
                             f"{self.numel}) is not what its modules add up to ({zeros} zeros of {numel})")
        return self


class Sizes(_Record):
    """The bytes of this folder's weight files, and the tensor payload of both formats."""

    format: Literal["dense", "bitmask"]
    weight_files_bytes: int = Field(ge=0)
    dense_bytes: int = Field(ge=0)
    bitmask_bytes: int = Field(ge=0)
    bitmask_layout: str


class Manifest(_Record):
    schema_version: int
    format: Literal["dense", "bitmask"]
    config: PrunerConfig
    sparsity: SparsitySummary
    sizes: Sizes
    files: dict[str, str]
    model: dict[str, Any] | None = None
    calibration: dict[str, Any] | None = None
    report: dict[str, Any] | None = None
    versions: dict[str, str | None]
    exported_from: dict[str, Any] | None = None
    digest: str = ""

    @field_serializer("config")
    def _config(self, config: PrunerConfig) -> dict[str, Any]:
        return config.to_dict()

    @model_validator(mode="after")
    def _consistent(self) -> Manifest:
        if self.schema_version != SCHEMA_VERSION:
            raise ValueError(f"schema_version {self.schema_version} is not {SCHEMA_VERSION}")
        if self.sizes.format != self.format:
            raise ValueError(f"sizes.format {self.sizes.format!r} is not the format {self.format!r}")
        for name, entry in self.sparsity.modules.items():
            rule = self.config.rule_for(entry.role)
            if rule is None or (self.config.layers is not None and entry.layer not in self.config.layers):
                raise ValueError(f"sparsity.modules: {name} ({entry.role} of layer {entry.layer}) is not pruned by "
                                 "the recorded rules")
            recorded = (entry.method, entry.structure, entry.target_sparsity)
            if recorded != (rule.method, rule.structure, rule.sparsity):
                raise ValueError(f"sparsity.modules: {name} records {recorded}, the rules say "
                                 f"{(rule.method, rule.structure, rule.sparsity)}")
        return self

    def sealed(self) -> Manifest:
        """This manifest with its ``digest`` set."""
        return self.model_copy(update={"digest": _digest(self._content())})

    def write(self, folder: Path) -> None:
        (folder / MANIFEST_NAME).write_text(json.dumps(self.sealed().model_dump(mode="json"), indent=2) + "\n",
                                            encoding="utf-8")

    def _content(self) -> dict[str, Any]:
        return self.model_dump(mode="json", exclude={"digest"})


def read_manifest(folder: str | Path) -> Manifest:
    """The folder's manifest, validated: schema, derived figures, rules, and its digest."""
    path = Path(folder) / MANIFEST_NAME
    if not path.is_file():
        raise ArtifactError(f"{folder} has no {MANIFEST_NAME}: it was not written by attnprune_opt")
    data = read_json(path)
    if data.get("schema_version") != SCHEMA_VERSION:
        raise ArtifactError(f"{path}: schema_version {data.get('schema_version')!r}, expected {SCHEMA_VERSION} "
                            "(written by another version of attnprune-opt)")
    try:
        manifest = Manifest.model_validate(data)
    except ValidationError as exc:
        problems = "; ".join(_where(e["loc"]) + e["msg"].removeprefix("Value error, ") for e in exc.errors())
        raise ArtifactError(f"{path}: {problems}") from None
    if manifest.digest != _digest(manifest._content()):
        raise ArtifactError(f"{path}: its digest does not match its content: the manifest was edited")
    return manifest


def hash_files(folder: Path) -> dict[str, str]:
    """SHA-256 of every file under ``folder`` but the manifest and hidden files, by relative POSIX path."""
    return {name: file_sha256(folder / name) for name in folder_files(folder)}


def folder_files(folder: Path) -> list[str]:
    return sorted(path.relative_to(folder).as_posix() for path in folder.rglob("*")
                  if path.is_file() and path.name != MANIFEST_NAME
                  and not any(part.startswith(".") for part in path.relative_to(folder).parts))


def describe_sizes(manifest: Manifest) -> str:
    """One line for the report: the weight files of this folder, and the payload of both formats."""
    sizes = manifest.sizes
    dense, compressed = sizes.dense_bytes, sizes.bitmask_bytes
    ratio = f" = {compressed / dense:.1%} of dense" if dense else ""
    return (f"weights on disk: {sizes.weight_files_bytes / 1e6:.1f} MB ({sizes.format} files); tensor bytes: "
            f"dense {dense / 1e6:.1f} MB, bitmask ({sizes.bitmask_layout}) {compressed / 1e6:.1f} MB{ratio}")


def versions() -> dict[str, str | None]:
    return {**{name: _version(name) for name in _VERSIONED}, "python": platform.python_version()}


def _version(package: str) -> str | None:
    try:
        return metadata.version(package)
    except metadata.PackageNotFoundError:
        return None


def _where(loc: tuple) -> str:
    """``sparsity.modules: `` for a validation error's location; nothing for the manifest as a whole."""
    return ".".join(map(str, loc)) + ": " if loc else ""


def _fraction(zeros: int, numel: int) -> float:
    return zeros / numel if numel else 0.0


def _digest(content: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(content, sort_keys=True, separators=(",", ":")).encode()).hexdigest()
