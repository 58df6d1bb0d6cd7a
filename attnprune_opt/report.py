"""What a pruning run reports: per-layer figures, totals, and where the calibration data came from."""

from __future__ import annotations

import statistics
from dataclasses import asdict, dataclass, field
from typing import Any

from .pipeline.layerwise import LayerReport


@dataclass
class PruneReport:
    model: dict[str, Any]
    calibration: dict[str, Any]
    layers: list[LayerReport] = field(default_factory=list)
    world_size: int = 1  # processes that shared the calibration sequences (torchrun)
    communicated_bytes: dict[str, int] = field(default_factory=dict)  # per collective, sent by this rank
    seconds: float = 0.0
    cpu_seconds: float = 0.0  # all threads of the process: on a shared machine, steadier than wall time
    peak_rss_mb: float = 0.0

    def module_sparsity(self) -> dict[str, dict[str, float]]:
        """Measured sparsity per module kind (q_proj, ...) over all pruned layers."""
        totals: dict[str, list[int]] = {}
        for layer in self.layers:
            for name, module in layer.modules.items():
                zeros, numel = totals.setdefault(name, [0, 0])
                totals[name] = [zeros + module.zeros, numel + module.numel]
        return {name: {"sparsity": z / n, "zeros": z, "numel": n} for name, (z, n) in totals.items()}

    def attention_errors(self) -> dict[str, float] | None:
        """Mean relative attention error on calibration data: the chosen pattern, and final."""
        found = [layer.attention for layer in self.layers if layer.attention is not None]
        if not found:
            return None
        return {"mask": statistics.fmean(a.error_mask for a in found),
                "final": statistics.fmean(a.error_final for a in found)}

    def to_dict(self) -> dict[str, Any]:
        return {"model": self.model, "calibration": self.calibration, "world_size": self.world_size,
                "communicated_bytes": self.communicated_bytes,
                "seconds": self.seconds,
                "cpu_seconds": self.cpu_seconds,
                "peak_rss_mb": self.peak_rss_mb, "module_sparsity": self.module_sparsity(),
                "attention_error": self.attention_errors(), "layers": [asdict(layer) for layer in self.layers]}

    def to_markdown(self) -> str:
        lines = [f"Pruned {self.model.get('name', '?')} ({self.model.get('model_type', '?')}): "
                 f"{len(self.layers)} layers in {self.seconds:.1f} s ({self.cpu_seconds:.1f} CPU s), "
                 f"peak RSS {self.peak_rss_mb:.0f} MB" + (f", {self.world_size} ranks" if self.world_size > 1 else ""),
                 f"Calibration: {self.calibration.get('description', '?')}"]
        if self.calibration.get("self_generated"):
            lines.append("NOTE: calibrated on text the model generated itself (calibration.source: self-generated).")
        lines += ["", "| layer | attention error: pattern / final | "
                  + " | ".join(self._module_names()) + " | seconds |",
                  "|---|---|" + "---|" * len(self._module_names()) + "---|"]
        for layer in self.layers:
            attn = layer.attention
            error = (f"{attn.error_mask:.4f} / {attn.error_final:.4f}"
                     if attn else "–")
            sparsities = " | ".join(f"{layer.modules[m].sparsity:.3f}" if m in layer.modules else "–"
                                    for m in self._module_names())
            lines.append(f"| {layer.index} | {error} | {sparsities} | {layer.seconds:.1f} |")
        uncalibrated = [f"{layer.index}:{label}" for layer in self.layers for label in layer.uncalibrated]
        if uncalibrated:
            lines += ["", "Pruned by magnitude, no calibration token routed to them: " + ", ".join(uncalibrated)]
        errors = self.attention_errors()
        if errors:
            lines += ["", f"Mean attention error on calibration data: pattern {errors['mask']:.4f}, "
                          f"final {errors['final']:.4f}"]
        return "\n".join(lines)

    def _module_names(self) -> list[str]:
        return list(dict.fromkeys(name for layer in self.layers for name in layer.modules))
