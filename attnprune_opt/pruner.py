"""AttentionPruner: the public entry point, shaped like optimum's GPTQQuantizer.

    pruner = AttentionPruner.from_recipe("smollm2_qk50")   # a packaged recipe or a file; or AttentionPruner(**config)
    model = pruner.prune_model(model, tokenizer)                          # in place, layer by layer
    pruner.save(model, "out/qk50")                                        # atomic; refuses to clobber
    model = load_pruned_model("out/qk50", device_map="auto")
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from .config import PrunerConfig
from .data import CalibrationSet, CalibrationSpec, load_calibration
from .errors import CalibrationDataError, ConfigError
from .distributed import current_world
from .models.registry import get_adapter
from .models.loading import SOURCE_ATTR
from .models.offload import evaluating
from .pipeline.capture import capture_layer_inputs
from .pipeline.layerwise import check_config_fits, peak_rss_mb, prune_layers
from .report import PruneReport

Calibration = CalibrationSet | Sequence[str] | Sequence[Tensor] | Sequence[Sequence[int]]


class AttentionPruner:
    """Prunes attention (and, by recipe, other linear) weights of a causal LM in place.

    ``config`` follows :class:`~attnprune_opt.config.PrunerConfig`; it is validated on construction (a bad key
    or value raises RecipeError naming it) and never mutated.
    """

    def __init__(self, **config: Any) -> None:
        self.config = PrunerConfig.from_dict(config)
        self.report: PruneReport | None = None
        self.tokenizer = None

    @classmethod
    def from_recipe(cls, path: str | Path) -> AttentionPruner:
        return cls.from_dict(PrunerConfig.from_yaml(path).to_dict())

    @classmethod
    def from_dict(cls, config: dict[str, Any]) -> AttentionPruner:
        return cls(**config)

    def to_dict(self) -> dict[str, Any]:
        return self.config.to_dict()

    def prune_model(self, model: nn.Module, tokenizer=None, calibration: Calibration | None = None,
                    progress: bool = True) -> nn.Module:
        """Prune ``model`` in place and return it; ``self.report`` then holds per-layer figures.

        Calibration comes from ``calibration`` (a CalibrationSet, texts, or token id sequences) or, if None, from
        the config's calibration source tokenized with ``tokenizer``.
        """
        start, start_cpu = time.perf_counter(), time.process_time()
        adapter = get_adapter(model)
        world = current_world()
        check_config_fits(self.config, adapter, model)
        calib = self._calibration(model, tokenizer, calibration)
        check_positions(self.config, model, max(len(s) for s in calib.sequences))
        with evaluating(model), torch.no_grad():
            inputs = capture_layer_inputs(model, adapter.layers(model), world.shard(calib.sequences))
            layers = prune_layers(adapter, model, inputs, self.config, progress=progress and world.is_main,
                                  world=world, catalog=world.catalog([len(s) for s in calib.sequences]))
        self.tokenizer = tokenizer if tokenizer is not None else self.tokenizer
        self.report = PruneReport(
            model={**(getattr(model, SOURCE_ATTR, None) or {"source": None, "name": type(model).__name__}),
                   "model_type": model.config.model_type, "num_layers": adapter.num_layers},
            calibration=calib.provenance(), layers=layers, world_size=world.size,
            communicated_bytes=dict(world.sent),
            seconds=time.perf_counter() - start,
            cpu_seconds=time.process_time() - start_cpu,
            peak_rss_mb=peak_rss_mb())
        return model

    def save(self, model: nn.Module, out_dir: str | Path, overwrite: bool = False, tokenizer=None,
             format: str = "dense", max_shard_size: str | int = "2GB") -> Path:
        """Write the pruned model, its tokenizer, the recipe and a manifest of measured sparsity; atomically.
        Under torchrun rank 0 writes and the others wait for it."""
        from .export.save import save_pruned

        world = current_world()
        if world.is_main:
            save_pruned(model, out_dir, config=self.config, report=self.report,
                        tokenizer=tokenizer if tokenizer is not None else self.tokenizer,
                        overwrite=overwrite, format=format, max_shard_size=max_shard_size)
        world.barrier()
        return Path(out_dir)

    def calibration_spec(self) -> CalibrationSpec:
        """The configured calibration source, as :func:`~attnprune_opt.data.load_calibration` takes it."""
        settings = self.config.calibration
        return CalibrationSpec(source=settings.source, num_samples=settings.num_samples, seq_len=settings.seq_len,
                               seed=self.config.seed, sampling=settings.sampling, rows=settings.rows)

    def _calibration(self, model: nn.Module, tokenizer, calibration: Calibration | None) -> CalibrationSet:
        settings = self.config.calibration
        spec = self.calibration_spec()
        if calibration is None:
            if tokenizer is None:
                raise CalibrationDataError("no calibration data and no tokenizer to load the configured source")
            return load_calibration(spec, tokenizer, model)
        if isinstance(calibration, CalibrationSet):
            return _checked(calibration)
        items = list(calibration)
        if not items:
            raise CalibrationDataError("calibration data is empty")
        if all(isinstance(item, str) for item in items):
            if tokenizer is None:
                raise CalibrationDataError("calibration texts need a tokenizer")
            sequences = [torch.tensor(tokenizer(text)["input_ids"][: settings.seq_len], dtype=torch.long)
                         for text in items]
            description = f"{len(items)} texts given by the caller, truncated to {settings.seq_len} tokens"
        else:
            sequences = [torch.as_tensor(item, dtype=torch.long).reshape(-1)[: settings.seq_len] for item in items]
            description = f"{len(items)} token sequences given by the caller, truncated to {settings.seq_len}"
        return _checked(CalibrationSet(sequences=sequences, spec=spec, description=description))


def check_positions(config: PrunerConfig, model: nn.Module, longest: int) -> None:
    """Calibration sequences may not be longer than the positions the model was trained for."""
    positions = getattr(model.config, "max_position_embeddings", None)
    if positions is not None and longest > positions:
        raise ConfigError(f"calibration.seq_len {config.calibration.seq_len}: calibration sequences of {longest} "
                          f"tokens exceed the model's max_position_embeddings {positions}; set seq_len <= {positions}")


def _checked(calibration: CalibrationSet) -> CalibrationSet:
    if not calibration.sequences:
        raise CalibrationDataError("calibration data is empty")
    short = [i for i, s in enumerate(calibration.sequences) if len(s) < 2]
    if short:
        raise CalibrationDataError(f"calibration sequences {short} have fewer than 2 tokens")
    return calibration
