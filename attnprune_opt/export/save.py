"""Saving a pruned model, dense or compressed, and converting a saved folder from one format to the other.

Both formats share one path: a temporary folder renamed into place at the end (:func:`~attnprune_opt.atomic.
atomic_output_dir`, so an existing output is replaced only with ``overwrite`` and only once the new one is
complete), the tokenizer, the recipe, and a manifest of what is measured *on disk*. Only the weight files differ:

``dense``
    ``save_pretrained``'s own safetensors; plain ``from_pretrained`` loads them, with or without this package.
``bitmask``
    every pruned weight in the compressed-tensors ``sparse-bitmask`` layout (``sparse-24-bitmask`` when every rule
    is 2:4), every other tensor dense, tied weights written once; sharded like ``save_pretrained`` and written
    shard by shard (:mod:`.sharded`), reading an offloaded module's weights only while it is written.
    ``from_pretrained`` decompresses it exactly once ``attnprune_opt`` is imported (:mod:`.quantizer`); without
    this package transformers refuses it.

The manifest records every pruned weight's measured zeros (read back from the files: the bitmask's popcount for a
compressed weight) and the size of both formats: the actual bytes of this folder's weight files, and the tensor
payload of each format, one read from the files and the other computed from them without writing it.
"""

from __future__ import annotations

import copy
import json
import platform
import re
import shutil
from collections.abc import Iterable, Iterator
from contextlib import ExitStack, contextmanager
from importlib import metadata
from itertools import groupby
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from torch import Tensor, nn

from ..atomic import atomic_output_dir
from ..config import PrunerConfig, PruneRule
from ..errors import ArtifactError, ConfigError, RecipeError, UnsupportedArchitectureError
from ..models.adapters import MODULE_PATHS
from ..models.offload import onloaded
from .bitmask import DECOMPRESSORS, SPARSE_24_BITMASK, SPARSE_BITMASK, TENSOR_NAMES
from .sharded import INDEX_NAME, QUANT_METHOD, quantization_config, verify_folder, write_compressed_safetensors

MANIFEST_NAME = "attnprune_manifest.json"
RECIPE_NAME = "recipe.yaml"
CONFIG_NAME = "config.json"
FORMATS = ("dense", "bitmask")
_VERSIONED = ("attnprune-opt", "torch", "transformers", "accelerate", "safetensors", "gguf")
_DTYPE_BYTES = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U8": 1, "BOOL": 1}


def save_pruned(model: nn.Module, out_dir: str | Path, *, config: PrunerConfig, report=None, tokenizer=None,
                overwrite: bool = False, format: str = "dense", max_shard_size: str | int = "2GB") -> Path:
    """Write ``model`` (weights in ``format``), ``tokenizer``, the recipe and the manifest into ``out_dir``."""
    _check_format(format)
    shard_bytes = _shard_bytes(max_shard_size)
    out_dir = Path(out_dir)
    with atomic_output_dir(out_dir, overwrite) as tmp:
        with plain_checkpoint(model):
            if format == "dense":
                model.save_pretrained(tmp, max_shard_size=max_shard_size)
            else:
                _save_compressed(model, tmp, config, shard_bytes)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        _write_recipe_and_manifest(tmp, config, build_manifest(tmp, config, report, format))
    return out_dir


def export_pruned(in_dir: str | Path, out_dir: str | Path, format: str, *, overwrite: bool = False,
                  max_shard_size: str | int = "2GB") -> Path:
    """Convert the pruned folder ``in_dir`` (dense or bitmask) to ``format`` in ``out_dir``.

    Tensor by tensor, one output shard in memory at a time; tokenizer files and the recipe are copied, the manifest
    carried over with its format, measured sparsity and sizes re-measured from the new files. The new files must
    hold exactly the zeros the source manifest records (else :class:`ArtifactError`, and nothing is written).
    """
    _check_format(format)
    shard_bytes = _shard_bytes(max_shard_size)
    in_dir, out_dir = Path(in_dir), Path(out_dir)
    source = read_manifest(in_dir)
    config = manifest_config(source, in_dir)
    weight_map = verify_folder(in_dir)
    quant = _folder_quantization(in_dir)
    layout = compressed_layout(config)
    with atomic_output_dir(out_dir, overwrite) as tmp:
        with _Files(in_dir, weight_map) as files:
            names = _logical_names(weight_map, quant)
            targets = [name.removesuffix(".weight") for name in names if pruned_rule(name, config)]
            compress = (lambda name: pruned_rule(name, config) is not None) if format == "bitmask" else _never
            write_compressed_safetensors(_folder_tensors(names, quant, files), compress, tmp, shard_bytes,
                                         layout=layout)
        model_config = _read_json(in_dir / CONFIG_NAME)
        model_config.pop("quantization_config", None)
        if format == "bitmask":
            model_config["quantization_config"] = quantization_config(layout, targets)
        (tmp / CONFIG_NAME).write_text(json.dumps(model_config, indent=2, sort_keys=True) + "\n")
        for path in in_dir.iterdir():
            if not _is_weight_or_manifest(path.name):
                (shutil.copytree if path.is_dir() else shutil.copy2)(path, tmp / path.name)
        modules, sizes = measure_folder(tmp, config, format)
        _check_same_zeros(source, modules, in_dir)
        manifest = {**source, "format": format, "sparsity": _sparsity_summary(modules), "sizes": sizes,
                    "size_on_disk_bytes": sizes["weight_files_bytes"],
                    "exported_from": {"format": source.get("format"), "versions": _versions()}}
        _write_recipe_and_manifest(tmp, config, manifest, recipe=not (in_dir / RECIPE_NAME).is_file())
    return out_dir


@contextmanager
def plain_checkpoint(model: nn.Module) -> Iterator[None]:
    """Make ``save_pretrained`` write plain, complete weights, then restore the model as it was.

    * A GGUF-loaded model was dequantized on load, but its GGUF quantizer marks it unserializable and would write
      a gguf quantization_config; both are set aside while saving.
    * transformers reloads offloaded (``meta``) weights while saving only when ``hf_device_map`` says so; a model
      offloaded by accelerate directly (``cpu_offload``, ``dispatch_model``) gets such a map for the duration.
    """
    quantizer = getattr(model, "hf_quantizer", None)
    if quantizer is not None:
        method = str(getattr(quantizer.quantization_config, "quant_method", "")).lower()
        if "gguf" not in method:
            raise UnsupportedArchitectureError(f"cannot save a model quantized with {method!r} as plain weights")
    quant_config = model.config.__dict__.pop("quantization_config", None) if quantizer is not None else None
    device_map = getattr(model, "hf_device_map", None)
    offloaded = any(p.device.type == "meta" for p in model.parameters())
    if offloaded and not (device_map and {"cpu", "disk"} & set(device_map.values())):
        model.hf_device_map = {"": "cpu"}
    model.hf_quantizer = None
    try:
        yield
    finally:
        model.hf_quantizer = quantizer
        if quant_config is not None:
            model.config.quantization_config = quant_config
        if device_map is None:
            model.__dict__.pop("hf_device_map", None)
        else:
            model.hf_device_map = device_map


# --- which weights are pruned, and how they are compressed ---------------------------------------------------------


def pruned_rule(name: str, config: PrunerConfig) -> PruneRule | None:
    """The rule that pruned the tensor ``name`` (``model.layers.3.self_attn.q_proj.weight``), None if untouched."""
    parts = name.split(".")
    if parts[-1] != "weight" or "layers" not in parts:
        return None
    index = parts.index("layers") + 1
    if index >= len(parts) or not parts[index].isdigit():
        return None
    if config.layers is not None and int(parts[index]) not in config.layers:
        return None
    path = ".".join(parts[index + 1:-1])
    module = next((m for m, p in MODULE_PATHS.items() if p == path), None)
    return config.rule_for(module) if module else None


def compressed_layout(config: PrunerConfig) -> str:
    """``sparse-24-bitmask`` when every rule is 2:4 (a little denser: no row offsets), else ``sparse-bitmask``."""
    return SPARSE_24_BITMASK if all(rule.structure == "2:4" for rule in config.rules) else SPARSE_BITMASK


def _save_compressed(model: nn.Module, folder: Path, config: PrunerConfig, shard_bytes: int) -> None:
    layout = compressed_layout(config)
    state, names = _unique_state(model)
    targets = [name.removesuffix(".weight") for name in names if pruned_rule(name, config)]
    compress = lambda name: pruned_rule(name, config) is not None  # noqa: E731
    write_compressed_safetensors(_model_tensors(model, state, names), compress, folder, shard_bytes, layout=layout)
    # What save_pretrained writes besides the weights, with our quantization_config.
    model_config = copy.deepcopy(model.config)
    model_config.dtype = str(model.dtype).removeprefix("torch.")
    model_config.architectures = [type(model).__name__]
    model_config.quantization_config = quantization_config(layout, targets)
    model_config.save_pretrained(folder)
    if model.can_generate() and getattr(model, "generation_config", None) is not None:
        model.generation_config.save_pretrained(folder)


def _unique_state(model: nn.Module) -> tuple[dict[str, Tensor], list[str]]:
    """The state dict (parameters as themselves, ``meta`` if offloaded) and its names, a tied weight named once.

    A tie is the very same parameter under two names; the first name in ``state_dict`` order is kept, as
    ``save_pretrained`` keeps the embedding rather than ``lm_head``."""
    state = model.state_dict(keep_vars=True)
    seen: set[int] = set()
    names = []
    for name, tensor in state.items():
        if id(tensor) not in seen:
            seen.add(id(tensor))
            names.append(name)
    return state, names


def _model_tensors(model: nn.Module, state: dict[str, Tensor], names: list[str]) -> Iterator[tuple[str, Tensor]]:
    """``(name, tensor)`` in ``state_dict`` order; an offloaded module is brought back one module at a time."""
    for prefix, group in groupby(names, key=lambda name: name.rpartition(".")[0]):
        group = list(group)
        if not any(state[name].device.type == "meta" for name in group):
            for name in group:
                yield name, state[name].detach()
            continue
        module = model.get_submodule(prefix)
        with onloaded(module):
            for name in group:
                tensor = getattr(module, name.rpartition(".")[2])
                if tensor.device.type == "meta":
                    raise ConfigError(f"{name} is offloaded and could not be read back (no accelerate offload hook)")
                yield name, tensor.detach().cpu()


def _never(name: str) -> bool:
    return False


# --- reading a saved folder -----------------------------------------------------------------------------------------


def read_manifest(folder: str | Path) -> dict[str, Any]:
    path = Path(folder) / MANIFEST_NAME
    if not path.is_file():
        raise ArtifactError(f"{folder} has no {MANIFEST_NAME}: it was not written by attnprune_opt")
    try:
        manifest = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ArtifactError(f"{path} is not valid JSON: {exc}") from None
    modules = manifest.get("sparsity", {}).get("modules") if isinstance(manifest, dict) else None
    if not isinstance(modules, dict) or manifest.get("format") not in FORMATS:
        raise ArtifactError(f"{path}: expected a 'format' in {list(FORMATS)} and 'sparsity.modules'")
    for name, entry in modules.items():
        if not (isinstance(entry, dict) and all(isinstance(entry.get(k), int) for k in ("zeros", "numel"))):
            raise ArtifactError(f"{path}: sparsity entry {name!r} lacks integer 'zeros' and 'numel'")
    return manifest


def manifest_config(manifest: dict[str, Any], folder: Path) -> PrunerConfig:
    try:
        return PrunerConfig.from_dict(manifest.get("config"))
    except RecipeError as exc:
        raise ArtifactError(f"{folder / MANIFEST_NAME}: its 'config' is not a valid pruning config: {exc}") from None


def measure_folder(folder: Path, config: PrunerConfig, format: str) -> tuple[dict[str, dict[str, Any]], dict]:
    """Zeros of every pruned weight as stored in ``folder``, and the size of both formats; checks the files first.

    A compressed weight's zeros come from its bitmask (``sparse-bitmask``: the popcount) or its stored values
    (``sparse-24-bitmask``, which also stores zeros), never from a decompressed copy; a dense one's are counted.
    """
    weight_map = verify_folder(folder)
    quant = _folder_quantization(folder)
    if (quant is not None) != (format == "bitmask"):
        raise ArtifactError(f"{folder / CONFIG_NAME}: its quantization_config does not match format {format!r}")
    layout = quant["format"] if quant else compressed_layout(config)
    modules: dict[str, dict[str, Any]] = {}
    dense_bytes = bitmask_bytes = 0
    with _Files(folder, weight_map) as files:
        for key in sorted(weight_map, key=_natural):
            prefix, _, suffix = key.rpartition(".")
            if _compressed_part(key, quant):
                bitmask_bytes += files.nbytes(key)
                if suffix != "bitmask":
                    continue
                rows, cols = (int(v) for v in files.tensor(f"{prefix}.shape").flatten().tolist())
                values = f"{prefix}.compressed"
                if layout == SPARSE_BITMASK:
                    stored = _popcount(files.tensor(key))
                else:
                    stored = int(files.tensor(values).count_nonzero())
                numel = rows * cols
                dense_bytes += numel * files.itemsize(values)
                name, zeros = f"{prefix}.weight", numel - stored
            else:
                size = files.nbytes(key)
                dense_bytes += size
                if pruned_rule(key, config) is None:
                    bitmask_bytes += size
                    continue
                tensor = files.tensor(key)
                bitmask_bytes += _compressed_nbytes(tensor, layout)
                name, zeros, numel = key, int((tensor == 0).sum()), tensor.numel()
            rule = pruned_rule(name, config)
            modules[name] = {"method": rule and rule.method, "structure": rule and rule.structure,
                             "target_sparsity": rule and rule.sparsity, "zeros": zeros, "numel": numel,
                             "sparsity": zeros / numel if numel else 0.0, "file": weight_map[key]}
    sizes = {"format": format, "weight_files_bytes": sum((folder / f).stat().st_size for f in set(weight_map.values())),
             "dense_bytes": dense_bytes, "bitmask_bytes": bitmask_bytes, "bitmask_layout": layout}
    return dict(sorted(modules.items(), key=lambda item: _natural(item[0]))), sizes


def build_manifest(folder: Path, config: PrunerConfig, report, format: str) -> dict[str, Any]:
    modules, sizes = measure_folder(folder, config, format)
    return {
        "format": format,
        "config": config.to_dict(),
        "seed": config.seed,
        "versions": _versions(),
        "calibration": report.calibration if report is not None else None,
        "model": report.model if report is not None else None,
        "sparsity": _sparsity_summary(modules),
        "sizes": sizes,
        "size_on_disk_bytes": sizes["weight_files_bytes"],
        "report": report.to_dict() if report is not None else None,
    }


def describe_sizes(manifest: dict[str, Any]) -> str:
    """One line for the report: the weight files of this folder, and the payload of both formats."""
    sizes = manifest.get("sizes")
    if not sizes:
        return f"weights on disk: {manifest.get('size_on_disk_bytes', 0) / 1e6:.1f} MB"
    dense, compressed = sizes["dense_bytes"], sizes["bitmask_bytes"]
    ratio = f" = {compressed / dense:.1%} of dense" if dense else ""
    return (f"weights on disk: {sizes['weight_files_bytes'] / 1e6:.1f} MB ({sizes['format']} files); tensor bytes: "
            f"dense {dense / 1e6:.1f} MB, bitmask ({sizes['bitmask_layout']}) {compressed / 1e6:.1f} MB{ratio}")


def _sparsity_summary(modules: dict[str, dict[str, Any]]) -> dict[str, Any]:
    zeros = sum(m["zeros"] for m in modules.values())
    numel = sum(m["numel"] for m in modules.values())
    return {"pruned_weights": numel and zeros / numel, "zeros": zeros, "numel": numel, "modules": modules}


def _compressed_nbytes(tensor: Tensor, layout: str) -> int:
    """What :func:`.bitmask.compress_bitmask` / ``compress_sparse24`` would store for ``tensor``, without doing it."""
    rows, cols = tensor.shape
    mask_bytes, shape_bytes = rows * ((cols + 7) // 8), 2 * 8
    if layout == SPARSE_24_BITMASK:
        return rows * (cols // 2) * tensor.element_size() + mask_bytes + shape_bytes
    return int(tensor.count_nonzero()) * tensor.element_size() + mask_bytes + rows * 8 + shape_bytes


def _check_same_zeros(source: dict[str, Any], modules: dict[str, dict[str, Any]], in_dir: Path) -> None:
    expected = source["sparsity"]["modules"]
    problems = [f"{name}: {modules[name]['zeros'] if name in modules else 'no'} zeros of "
                f"{modules[name]['numel'] if name in modules else '?'} in the weights, manifest says "
                f"{expected[name]['zeros']} of {expected[name]['numel']}"
                for name in expected if (modules.get(name, {}).get("zeros"), modules.get(name, {}).get("numel"))
                != (expected[name]["zeros"], expected[name]["numel"])]
    problems += [f"{name}: pruned weight missing from the manifest" for name in modules if name not in expected]
    if problems:
        raise ArtifactError(f"{in_dir}: weights disagree with {MANIFEST_NAME}: " + "; ".join(problems[:5])
                            + (f"; and {len(problems) - 5} more" if len(problems) > 5 else ""))


def _logical_names(weight_map: dict[str, str], quant: dict[str, Any] | None) -> list[str]:
    """The model's tensor names in a folder: a compressed weight's tensors count as its one ``.weight``."""
    names = {f"{key.rpartition('.')[0]}.weight" if _compressed_part(key, quant) else key for key in weight_map}
    return sorted(names, key=_natural)


def _compressed_part(key: str, quant: dict[str, Any] | None) -> bool:
    """Whether ``key`` is one of a compressed weight's tensors (its guard ``.weight`` included; not its bias)."""
    if quant is None:
        return False
    prefix, _, suffix = key.rpartition(".")
    return prefix in quant["targets"] and suffix in (*TENSOR_NAMES[quant["format"]], "weight")


def _popcount(packed: Tensor) -> int:
    """Set bits of a uint8 tensor, in uint8 arithmetic (no wider copy of a large bitmask)."""
    x = packed - ((packed >> 1) & 0x55)
    x = (x & 0x33) + ((x >> 2) & 0x33)
    return int(((x + (x >> 4)) & 0x0F).sum(dtype=torch.int64))


def _folder_tensors(names: Iterable[str], quant: dict[str, Any] | None, files: _Files) -> Iterator[tuple[str, Tensor]]:
    """The dense tensors of a saved folder, one at a time; compressed weights are decompressed as they come."""
    targets = set(quant["targets"]) if quant else set()
    for name in names:
        prefix = name.removesuffix(".weight")
        if not (name.endswith(".weight") and prefix in targets):
            yield name, files.tensor(name)
            continue
        layout = quant["format"]
        parts = {suffix: files.tensor(f"{prefix}.{suffix}") for suffix in TENSOR_NAMES[layout]}
        if files.tensor(name).numel():
            raise ArtifactError(f"{files.folder}: {name} is stored both dense and compressed")
        yield name, DECOMPRESSORS[layout](parts, name=prefix)


def _folder_quantization(folder: Path) -> dict[str, Any] | None:
    """The folder's own ``quantization_config`` (checked), or None for a dense folder."""
    quant = _read_json(folder / CONFIG_NAME).get("quantization_config")
    if quant is None:
        return None
    if not isinstance(quant, dict) or quant.get("quant_method") != QUANT_METHOD:
        raise ArtifactError(f"{folder / CONFIG_NAME}: quantization_config is not {QUANT_METHOD!r}: {quant!r}")
    if quant.get("format") not in TENSOR_NAMES or not isinstance(quant.get("targets"), list):
        raise ArtifactError(f"{folder / CONFIG_NAME}: quantization_config needs a known format and a targets list")
    return quant


class _Files:
    """Open safetensors files of a folder by tensor name; errors reading them name the file."""

    def __init__(self, folder: Path, weight_map: dict[str, str]):
        self.folder, self.weight_map = folder, weight_map
        self.stack = ExitStack()
        self.handles: dict[str, Any] = {}

    def __enter__(self) -> _Files:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stack.close()

    def _handle(self, key: str) -> Any:
        file = self.weight_map.get(key)
        if file is None:
            raise ArtifactError(f"{self.folder}: tensor {key!r} is missing")
        if file not in self.handles:
            try:
                self.handles[file] = self.stack.enter_context(safe_open(self.folder / file, framework="pt"))
            except (SafetensorError, OSError) as err:
                raise ArtifactError(f"{self.folder / file}: unreadable safetensors file ({err})") from err
        return self.handles[file]

    def tensor(self, key: str) -> Tensor:
        try:
            return self._handle(key).get_tensor(key)
        except (SafetensorError, OSError) as err:
            raise ArtifactError(f"{self.folder / self.weight_map[key]}: cannot read {key!r} ({err})") from err

    def itemsize(self, key: str) -> int:
        dtype = self._handle(key).get_slice(key).get_dtype()
        return _DTYPE_BYTES[dtype] if dtype in _DTYPE_BYTES else self.tensor(key).element_size()

    def nbytes(self, key: str) -> int:
        numel = 1
        for dim in self._handle(key).get_slice(key).get_shape():
            numel *= dim
        return numel * self.itemsize(key)


def _write_recipe_and_manifest(folder: Path, config: PrunerConfig, manifest: dict[str, Any],
                               recipe: bool = True) -> None:
    if recipe:
        (folder / RECIPE_NAME).write_text(config.to_yaml())
    (folder / MANIFEST_NAME).write_text(json.dumps(manifest, indent=2))


def _is_weight_or_manifest(name: str) -> bool:
    return (name.endswith(".safetensors") or name in (INDEX_NAME, CONFIG_NAME, MANIFEST_NAME)
            or name.startswith("."))


def _read_json(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as err:
        raise ArtifactError(f"{path}: unreadable ({err})") from err
    if not isinstance(data, dict):
        raise ArtifactError(f"{path}: expected a JSON object")
    return data


def _natural(name: str) -> tuple:
    """Sort key putting ``layers.2`` before ``layers.10``."""
    return tuple(int(part) if part.isdigit() else part for part in re.split(r"(\d+)", name))


def _check_format(format: str) -> None:
    if format not in FORMATS:
        raise ConfigError(f"unknown save format {format!r}; expected one of {', '.join(FORMATS)}")


def _shard_bytes(max_shard_size: str | int) -> int:
    from transformers.utils.hub import convert_file_size_to_int

    try:
        size = convert_file_size_to_int(max_shard_size)
    except (ValueError, TypeError):
        raise ConfigError(f"max_shard_size must be bytes or a size such as '2GB', got {max_shard_size!r}") from None
    if size <= 0:
        raise ConfigError(f"max_shard_size must be positive, got {max_shard_size!r}")
    return size


def _versions() -> dict[str, str | None]:
    return {**{name: _version(name) for name in _VERSIONED}, "python": platform.python_version()}


def _version(package: str) -> str | None:
    try:
        return metadata.version(package)
    except metadata.PackageNotFoundError:
        return None
