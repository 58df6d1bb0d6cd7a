"""The compressed-tensors sparse layouts, tensor for tensor: ``sparse-bitmask`` and ``sparse-24-bitmask``.

compressed-tensors >= 0.15 dropped its sparse compressors and the last release that has them (0.14.0.1) needs
transformers < 5, so the layouts are reproduced here in plain torch (no numpy, no file I/O). The reference is
``compressed_tensors/compressors/sparse_compressors/sparse_bitmask.py`` (``bitmask_compress``) and
``sparse_24_bitmask.py`` (``sparse24_bitmask_compress``) of compressed-tensors 0.14.0.1, with ``pack_bitmasks`` from
``utils/helpers.py``. A weight of shape ``(R, C)`` is stored as, under the suffixes the reference appends to the
module name (``<module>.compressed`` ...):

``sparse-bitmask``
    ``shape`` int64 ``[R, C]``; ``compressed`` the non-zero values, 1-D, row-major; ``bitmask`` uint8
    ``(R, ceil(C / 8))``, bit ``c % 8`` of byte ``c // 8`` set when column ``c`` is stored (numpy ``packbits`` with
    ``bitorder="little"`` along each row, zero padding bits); ``row_offsets`` int64 ``(R,)``, where each row starts
    in ``compressed``.
``sparse-24-bitmask``
    ``shape`` int64 ``(2, 1)``; ``compressed`` ``(R, C / 2)``, exactly two values per group of four columns (the two
    largest magnitudes, so a group with fewer non-zeros also stores zeros); ``bitmask`` as above.

"Non-zero" is ``value != 0`` as in the reference, so ``-0.0`` is not stored and comes back as ``+0.0``: every other
value, NaN payloads included, round-trips bit for bit.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping

import torch
from torch import Tensor

from ..errors import ArtifactError, ConfigError

SPARSE_BITMASK = "sparse-bitmask"
SPARSE_24_BITMASK = "sparse-24-bitmask"

# The tensors each layout stores per weight, in the reference's naming.
TENSOR_NAMES: dict[str, tuple[str, ...]] = {
    SPARSE_BITMASK: ("shape", "compressed", "bitmask", "row_offsets"),
    SPARSE_24_BITMASK: ("shape", "compressed", "bitmask"),
}

_BIT_WEIGHTS = torch.tensor([1 << bit for bit in range(8)], dtype=torch.uint8)


def compress_bitmask(weight: Tensor) -> dict[str, Tensor]:
    """Unstructured layout: the non-zero values, a packed bitmask of where they go and each row's first index."""
    _check_weight(weight)
    mask = weight != 0
    row_counts = mask.sum(dim=-1)
    return {
        "shape": torch.tensor(list(weight.shape)),
        "compressed": weight[mask],
        "bitmask": _pack(mask),
        "row_offsets": torch.cumsum(row_counts, 0) - row_counts,
    }


def decompress_bitmask(tensors: Mapping[str, Tensor], *, name: str = "") -> Tensor:
    """Inverse of :func:`compress_bitmask`; checks the tensors agree with each other (``name`` prefixes errors)."""
    shape, values, mask = _unpack_common(tensors, SPARSE_BITMASK, name)
    row_counts = mask.sum(dim=-1)
    if values.dim() != 1 or values.numel() != int(row_counts.sum()):
        raise ArtifactError(
            f"{_key(name, 'compressed')}: expected {int(row_counts.sum())} values (the bitmask's set bits), "
            f"got shape {tuple(values.shape)}"
        )
    offsets = tensors["row_offsets"]
    if offsets.shape != (shape[0],) or not torch.equal(offsets.cpu(), (torch.cumsum(row_counts, 0) - row_counts).cpu()):
        raise ArtifactError(f"{_key(name, 'row_offsets')}: does not match the bitmask's per-row counts")
    return _scatter(shape, values, mask)


def compress_sparse24(weight: Tensor) -> dict[str, Tensor]:
    """2:4 layout; the weight must already be 2:4 sparse (at most two non-zeros per group of four columns)."""
    _check_weight(weight)
    rows, cols = weight.shape
    if cols % 4:
        raise ConfigError(f"2:4 layout needs a column count divisible by 4, got shape {tuple(weight.shape)}")
    groups = weight.reshape(-1, 4)
    too_dense = ((groups != 0).sum(dim=1) > 2).nonzero()
    if too_dense.numel():
        first = int(too_dense[0])
        row, col = divmod(first * 4, cols)
        raise ConfigError(
            f"2:4 layout: {too_dense.numel()} groups of 4 have more than 2 non-zeros, "
            f"first at row {row}, columns {col}..{col + 3}"
        )
    # Same selection as the reference (top-2 magnitudes per group), so ties among zeros resolve identically.
    keep = torch.zeros_like(groups, dtype=torch.bool).scatter_(1, groups.abs().topk(2, dim=1).indices, True)
    mask = keep.reshape(rows, cols)
    return {
        "shape": torch.tensor([rows, cols]).reshape(-1, 1),
        "compressed": weight[mask].reshape(rows, cols // 2),
        "bitmask": _pack(mask),
    }


def decompress_sparse24(tensors: Mapping[str, Tensor], *, name: str = "") -> Tensor:
    """Inverse of :func:`compress_sparse24`, with the same consistency checks as :func:`decompress_bitmask`."""
    shape, values, mask = _unpack_common(tensors, SPARSE_24_BITMASK, name)
    rows, cols = shape
    if cols % 4 or not bool((mask.reshape(-1, 4).sum(dim=1) == 2).all()):
        raise ArtifactError(f"{_key(name, 'bitmask')}: not exactly 2 set bits in every group of 4 columns")
    if tuple(values.shape) != (rows, cols // 2):
        raise ArtifactError(
            f"{_key(name, 'compressed')}: expected shape {(rows, cols // 2)}, got {tuple(values.shape)}"
        )
    return _scatter(shape, values, mask)


COMPRESSORS: dict[str, Callable[[Tensor], dict[str, Tensor]]] = {
    SPARSE_BITMASK: compress_bitmask,
    SPARSE_24_BITMASK: compress_sparse24,
}
DECOMPRESSORS: dict[str, Callable[..., Tensor]] = {
    SPARSE_BITMASK: decompress_bitmask,
    SPARSE_24_BITMASK: decompress_sparse24,
}


def _check_weight(weight: Tensor) -> None:
    if weight.dim() != 2 or not weight.is_floating_point():
        raise ConfigError(
            f"only 2-D floating-point weights can be compressed, got {weight.dtype} {tuple(weight.shape)}"
        )


def _key(name: str, suffix: str) -> str:
    return f"{name}.{suffix}" if name else suffix


def _pack(mask: Tensor) -> Tensor:
    """``numpy.packbits(mask, axis=-1, bitorder="little")`` in torch."""
    rows, cols = mask.shape
    padded = torch.nn.functional.pad(mask.to(torch.uint8), (0, -cols % 8))
    bits = padded.reshape(rows, padded.shape[1] // 8, 8)
    return (bits * _BIT_WEIGHTS.to(mask.device)).sum(dim=-1, dtype=torch.uint8)


def _unpack(packed: Tensor) -> Tensor:
    """Inverse of :func:`_pack`, keeping the padding bits: ``(R, B)`` uint8 to ``(R, 8 * B)`` bool."""
    bits = packed.unsqueeze(-1).bitwise_and(_BIT_WEIGHTS.to(packed.device)).ne(0)
    return bits.reshape(packed.shape[0], packed.shape[1] * 8)


def _unpack_common(tensors: Mapping[str, Tensor], layout: str, name: str) -> tuple[tuple[int, int], Tensor, Tensor]:
    """Check the key set, ``shape`` and ``bitmask`` (shared by both layouts); return the shape, values and bool mask."""
    expected = set(TENSOR_NAMES[layout])
    if set(tensors) != expected:
        missing = sorted(expected - set(tensors))
        extra = sorted(set(tensors) - expected)
        raise ArtifactError(
            f"{name or 'compressed weight'} ({layout}): missing {[_key(name, k) for k in missing]}, "
            f"unexpected {[_key(name, k) for k in extra]}"
        )
    shape_tensor = tensors["shape"]
    if shape_tensor.numel() != 2 or shape_tensor.is_floating_point() or bool((shape_tensor < 0).any()):
        raise ArtifactError(f"{_key(name, 'shape')}: expected two non-negative integers, got {shape_tensor.tolist()}")
    rows, cols = (int(v) for v in shape_tensor.flatten().tolist())
    packed = tensors["bitmask"]
    if packed.dtype != torch.uint8 or tuple(packed.shape) != (rows, (cols + 7) // 8):
        raise ArtifactError(
            f"{_key(name, 'bitmask')}: expected uint8 of shape {(rows, (cols + 7) // 8)} for a {rows}x{cols} weight, "
            f"got {packed.dtype} {tuple(packed.shape)}"
        )
    bits = _unpack(packed)
    if bool(bits[:, cols:].any()):
        raise ArtifactError(f"{_key(name, 'bitmask')}: padding bits past column {cols} are set")
    values = tensors["compressed"]
    if not values.is_floating_point():
        raise ArtifactError(f"{_key(name, 'compressed')}: expected floating-point values, got {values.dtype}")
    return (rows, cols), values, bits[:, :cols]


def _scatter(shape: tuple[int, int], values: Tensor, mask: Tensor) -> Tensor:
    dense = torch.zeros(shape, dtype=values.dtype, device=values.device)
    dense[mask.to(values.device)] = values.flatten()
    return dense
