"""The transformers side: ``quant_method: "attnprune-sparse"`` loads a compressed folder into a dense model.

Hook (transformers 5.24): a quantization method of our own in the two registries of
``transformers.quantizers.auto`` (``register_quantization_config`` and ``register_quantizer``). For a config.json
whose ``quantization_config`` names it, ``get_hf_quantizer`` builds :class:`SparseHfQuantizer`, and the loader asks
it for weight conversions (``HfQuantizer.get_weight_conversions``). It returns one ``WeightConverter``, the mechanism
transformers' own FP8 and compressed-tensors dequantisation use: while ``convert_and_load_state_dict_in_model``
streams the checkpoint, every key ending in ``.compressed``, ``.bitmask``, ``.shape``, ``.row_offsets`` or
``.weight`` is renamed to ``<module>.weight`` and grouped per parameter, and :class:`SparseDecompress` turns each
group into the dense tensor (a plain dense weight just passes through; the zero-element ``.weight`` guard written
by :mod:`.sharded` is dropped). This runs before a tensor is placed, so dtype casting, ``device_map`` placement and
disk offload (a converted tensor is re-saved to ``offload_folder``) behave as for any dense checkpoint, and a
decompressed tensor of the wrong shape is the usual hard size-mismatch error.

Nothing else is needed: no module is replaced (``_process_model_before_weight_loading`` is left alone, unlike
quantizers that keep compressed weights at run time), and as ``dequantize`` is set, ``postprocess_model`` removes
the quantization config, so the loaded model is an ordinary dense one and ``save_pretrained`` writes it densely.
A decompression error is recorded by the loader and raised as its ``RuntimeError`` after the load report, which
shows our :class:`ArtifactError` message; a target layer that was never decompressed is an :class:`ArtifactError`.

This module imports transformers: ``attnprune_opt.export.register`` defers it until transformers loads its
quantizer registry.
"""

from __future__ import annotations

from typing import Any

import torch
from transformers.core_model_loading import ConversionOps, WeightConverter
from transformers.quantizers.auto import (
    AUTO_QUANTIZATION_CONFIG_MAPPING,
    AUTO_QUANTIZER_MAPPING,
    register_quantization_config,
    register_quantizer,
)
from transformers.quantizers.base import HfQuantizer
from transformers.utils.quantization_config import QuantizationConfigMixin

from ..errors import ArtifactError
from .bitmask import DECOMPRESSORS, SPARSE_BITMASK, TENSOR_NAMES
from .sharded import QUANT_METHOD


class SparseConfig(QuantizationConfigMixin):
    """The ``quantization_config`` of a compressed folder: its layout and the modules stored compressed."""

    def __init__(
        self,
        format: str = SPARSE_BITMASK,
        targets: list[str] | None = None,
        quant_method: str = QUANT_METHOD,
        dequantize: bool = True,
        **unknown: Any,
    ):
        if quant_method != QUANT_METHOD or format not in TENSOR_NAMES or not dequantize or unknown:
            raise ArtifactError(
                f"quantization_config: expected quant_method {QUANT_METHOD!r}, a format in {sorted(TENSOR_NAMES)}, "
                f"dequantize true and no other keys; got {quant_method!r}, {format!r}, {dequantize!r}, "
                f"{sorted(unknown)}"
            )
        self.quant_method = QUANT_METHOD
        self.format = format
        self.targets = list(targets or [])
        # Read by HfQuantizer.postprocess_model: drop the quantization config once the weights are dense.
        self.dequantize = True


class SparseDecompress(ConversionOps):
    """Turns one parameter's checkpoint tensors into its dense weight, and notes which modules it decompressed."""

    def __init__(self, layout: str, decompressed: set[str]):
        self.layout = layout
        self.decompressed = decompressed

    def __deepcopy__(self, memo: dict) -> SparseDecompress:
        # The loader deep-copies the converter for every parameter; sharing the op keeps one `decompressed` record.
        return self

    def convert(self, input_dict: dict[str, Any], full_layer_name: str, **kwargs: Any) -> dict[str, torch.Tensor]:
        prefix = full_layer_name.removesuffix(".weight")
        tensors = {suffix: _single(f"{prefix}.{suffix}", value) for suffix, value in input_dict.items()}
        weight = tensors.pop("weight", None)
        if not tensors:
            if weight is None or weight.numel() == 0:
                raise ArtifactError(f"{full_layer_name}: a compressed-weight guard without its compressed tensors")
            return {full_layer_name: weight}
        if weight is not None and weight.numel():
            raise ArtifactError(f"{full_layer_name}: stored both dense and compressed")
        dense = DECOMPRESSORS[self.layout](tensors, name=prefix)
        self.decompressed.add(prefix)
        return {full_layer_name: dense}


class SparseHfQuantizer(HfQuantizer):
    """Decompresses at load time; refuses to be used for compressing on the fly (``requires_calibration``)."""

    requires_calibration = True
    quantization_config: SparseConfig

    def __init__(self, quantization_config: SparseConfig, **kwargs: Any):
        super().__init__(quantization_config, **kwargs)
        self.decompressed: set[str] = set()

    def get_weight_conversions(self) -> list[WeightConverter]:
        layout = self.quantization_config.format
        sources = ["weight", *TENSOR_NAMES[layout]]
        return [WeightConverter(sources, "weight", [SparseDecompress(layout, self.decompressed)])]

    def _process_model_after_weight_loading(self, model: Any, **kwargs: Any) -> Any:
        base = f"{model.base_model_prefix}."
        done = {name.removeprefix(base) for name in self.decompressed}
        missing = sorted(t for t in self.quantization_config.targets if t.removeprefix(base) not in done)
        if missing:
            raise ArtifactError(f"compressed weights never reached the model (left randomly initialised): {missing}")
        return model

    def is_serializable(self) -> bool:
        return True  # the loaded model is dense

    @property
    def is_trainable(self) -> bool:
        return True


def register() -> None:
    """Add the method to transformers' two registries; a second call is a no-op."""
    registered = AUTO_QUANTIZER_MAPPING.get(QUANT_METHOD), AUTO_QUANTIZATION_CONFIG_MAPPING.get(QUANT_METHOD)
    if registered == (SparseHfQuantizer, SparseConfig):
        return
    register_quantization_config(QUANT_METHOD)(SparseConfig)
    register_quantizer(QUANT_METHOD)(SparseHfQuantizer)


def _single(key: str, value: torch.Tensor | list[torch.Tensor]) -> torch.Tensor:
    if not isinstance(value, list):
        return value
    if len(value) != 1:
        raise ArtifactError(f"{key}: {len(value)} checkpoint tensors map to it, expected one")
    return value[0]
