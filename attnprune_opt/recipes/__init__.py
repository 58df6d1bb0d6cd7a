"""The recipes shipped with the package, found by name (``smollm2_qk50``) wherever the package is installed."""

from __future__ import annotations

from pathlib import Path

from ..errors import RecipeError

RECIPES_DIR = Path(__file__).resolve().parent
DEFAULT_RECIPE = "smollm2_qk50"


def recipe_names() -> list[str]:
    return sorted(path.stem for path in RECIPES_DIR.glob("*.yaml"))


def recipe_path(name_or_path: str | Path) -> Path:
    """A recipe file: ``name_or_path`` itself if it is a file, else the packaged recipe of that name."""
    path = Path(name_or_path)
    if path.is_file():
        return path
    packaged = RECIPES_DIR / f"{path.name.removesuffix('.yaml')}.yaml"
    if path.parent == Path(".") and packaged.is_file():
        return packaged
    raise RecipeError(f"recipe {name_or_path} not found: neither a file nor a packaged recipe "
                      f"({', '.join(recipe_names())})")
