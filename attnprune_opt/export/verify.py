"""Checking a pruned folder against its manifest without loading a model (``attnprune-opt verify``, and the first
half of :func:`~attnprune_opt.export.load.load_pruned_model`)."""

from __future__ import annotations

from pathlib import Path

from ..config import PrunerConfig
from ..errors import ArtifactError, RecipeError
from .folder import folder_quantization
from ..paths import file_sha256
from .manifest import MANIFEST_NAME, RECIPE_NAME, Manifest, folder_files, read_manifest
from .measure import check_same_zeros, measure_folder
from .sharded import verify_folder


def verify_pruned_folder(folder: str | Path, *, hashes: bool = True, weights: bool = False) -> Manifest:
    """The folder's manifest, once the folder is shown to be what it records; else an :class:`ArtifactError`.

    Always: the manifest's schema, figures and digest; every weight file opens and matches the index and
    config.json; the format; the recipe. ``hashes``: every file's SHA-256 (reads every byte: about a second per
    GB). ``weights``: every pruned weight's zeros counted in the files.
    """
    folder = Path(folder)
    manifest = read_manifest(folder)
    verify_folder(folder)
    quant = folder_quantization(folder)
    if (quant is not None) != (manifest.format == "bitmask"):
        raise ArtifactError(f"{folder}: {MANIFEST_NAME} says format {manifest.format!r} but config.json "
                            f"{'has' if quant else 'has no'} attnprune-sparse quantization_config")
    _check_recipe(folder, manifest)
    if hashes:
        check_hashes(folder, manifest)
    if weights:
        check_same_zeros(manifest.sparsity.modules, measure_folder(folder, manifest.config, manifest.format)[0],
                         folder)
    return manifest


def check_hashes(folder: Path, manifest: Manifest) -> None:
    """Every file the manifest lists is present with its SHA-256, and no other file is."""
    present = folder_files(folder)
    for name in sorted(set(manifest.files) - set(present)):
        raise ArtifactError(f"{folder / name}: listed in {MANIFEST_NAME} but missing")
    for name in present:
        if name not in manifest.files:
            raise ArtifactError(f"{folder / name}: not listed in {MANIFEST_NAME} (added after the folder was written)")
        actual = file_sha256(folder / name)
        if actual != manifest.files[name]:
            raise ArtifactError(f"{folder / name}: SHA-256 {actual[:16]}... differs from the {MANIFEST_NAME} record "
                                f"{manifest.files[name][:16]}...: the file changed after it was written")


def _check_recipe(folder: Path, manifest: Manifest) -> None:
    path = folder / RECIPE_NAME
    if not path.is_file():
        return  # a missing file is reported by check_hashes, as it is listed there
    try:
        recipe = PrunerConfig.from_yaml(path)
    except RecipeError as exc:
        raise ArtifactError(str(exc)) from None
    if recipe != manifest.config:
        raise ArtifactError(f"{path}: differs from the config recorded in {MANIFEST_NAME}")
