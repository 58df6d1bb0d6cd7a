"""Data-parallel pruning under torchrun: the calibration sequences are split across ranks and every sum over them
(input statistics, the attention loss and its gradient, the attention error) is all-reduced, so each rank computes
the same pruned q/k; the per-matrix methods' matrices are shared out (each rank prunes every N-th and broadcasts
it); rank 0 alone writes the output.

The result does not depend on the world size (up to float64 rounding; on SmolLM2-135M and in
tests/test_distributed.py it is bit for bit the single process's). Float32 sums over differently split sequences
round differently, near-ties in a pattern flip, and each pruned layer's outputs feed the next, so a difference of
one float32 ulp grows layer by layer. Hence every sum over sequences is built from each sequence's own terms,
computed alone and so identically whatever the split (layers and attention run one sequence at a time), in
float32; they are added in float64, where float32 terms of similar magnitude add exactly, all-reduced in float64,
and cast to the working dtype only after the sum (core.InputStatistics, core.objective.FactoredAttentionObjective).
Sampled refit steps draw from a catalogue of all sequences (core.objective.SequenceCatalog), so every rank draws
the single process's sample. Matrix products must round alike on every rank: run one thread per rank, as the
single process it is compared with.

A single process (no torchrun, no process group) uses :data:`SINGLE`, whose operations do nothing: torch.distributed
is imported only when a launcher set ``WORLD_SIZE`` > 1 or the caller initialised a process group itself.
With NCCL each rank computes on its own GPU (``cuda:LOCAL_RANK``, :func:`rank_device_map`), and whatever is
exchanged is staged on it, since NCCL only moves GPU tensors.
"""

from __future__ import annotations

import datetime
import os
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import TypeVar

import torch
from torch import Tensor

from .core.objective import SequenceCatalog
from .errors import ConfigError, DistributedError

T = TypeVar("T")
#: How long a rank waits for the others in a collective before the run fails (seconds; ATTNPRUNE_DIST_TIMEOUT).
DEFAULT_TIMEOUT = 600


@dataclass(frozen=True)
class World:
    """This process's place among the ranks; with ``size`` 1 every operation is the identity."""

    rank: int = 0
    size: int = 1
    sent: dict[str, int] = field(default_factory=dict, compare=False)  # bytes passed to each kind of collective
    device: str = "cpu"  # where the backend exchanges tensors: cpu for gloo, this rank's GPU for NCCL

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def shard(self, items: Sequence[T]) -> list[T]:
        """This rank's share of ``items`` (every size-th item from its rank), never empty."""
        if len(items) < self.size:
            raise ConfigError(f"{len(items)} calibration sequences cannot be shared by {self.size} ranks; use at least "
                              f"as many sequences as ranks")
        return list(items[self.rank::self.size])

    def catalog(self, lengths: Sequence[int]) -> SequenceCatalog | None:
        """Where this rank's share of sequences of these ``lengths`` sits among all (None in a single process)."""
        return None if self.size == 1 else SequenceCatalog.of(lengths, range(self.rank, len(lengths), self.size))

    def sum(self, tensor: Tensor) -> Tensor:
        """The sum of ``tensor`` over ranks (in place, and returned)."""
        if self.size > 1:
            import torch.distributed as dist

            with self._staged(tensor) as staged:
                self._collective("all_reduce", lambda: dist.all_reduce(staged, op=dist.ReduceOp.SUM), staged)
        return tensor

    def total(self, value: float) -> float:
        """The sum of a number over ranks."""
        if self.size == 1:
            return value
        return float(self.sum(torch.tensor([value], dtype=torch.float64, device=self.device)))

    def broadcast(self, tensor: Tensor, source: int = 0) -> Tensor:
        """Rank ``source``'s ``tensor`` on every rank (in place, and returned)."""
        if self.size > 1:
            import torch.distributed as dist

            with self._staged(tensor) as staged:
                self._collective("broadcast", lambda: dist.broadcast(staged, src=source), staged)
        return tensor

    @contextmanager
    def _staged(self, tensor: Tensor) -> Iterator[Tensor]:
        """``tensor`` on the backend's device for a collective, its result copied back in place after."""
        if tensor.device == torch.device(self.device):
            yield tensor
            return
        staged = tensor.to(self.device)
        yield staged
        tensor.copy_(staged)

    def barrier(self) -> None:
        if self.size > 1:
            import torch.distributed as dist

            self._collective("barrier", dist.barrier)

    def _collective(self, name: str, run, tensor: Tensor | None = None) -> None:
        """Run a collective; a lost or stuck peer becomes one :class:`DistributedError` on every surviving rank."""
        if tensor is not None:
            self.sent[name] = self.sent.get(name, 0) + tensor.numel() * tensor.element_size()
        try:
            run()
        except RuntimeError as exc:
            reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            raise DistributedError(f"rank {self.rank} of {self.size}: {name} with the other ranks failed "
                                   f"({reason}); another rank stopped or did not answer within the timeout "
                                   f"(ATTNPRUNE_DIST_TIMEOUT); no output was written") from None


SINGLE = World()


def current_world() -> World:
    """The process group's world if one is initialised; else, under torchrun (WORLD_SIZE > 1), a gloo group is
    initialised here with the timeout of ATTNPRUNE_DIST_TIMEOUT; else :data:`SINGLE`."""
    size = int(os.environ.get("WORLD_SIZE", "1"))
    if size <= 1:
        import sys

        if "torch.distributed" not in sys.modules:
            return SINGLE
    import torch.distributed as dist

    if not dist.is_available():
        return SINGLE
    if not dist.is_initialized():
        if size <= 1:
            return SINGLE
        timeout = datetime.timedelta(seconds=float(os.environ.get("ATTNPRUNE_DIST_TIMEOUT", DEFAULT_TIMEOUT)))
        backend = os.environ.get("ATTNPRUNE_DIST_BACKEND", "gloo")
        if backend == "nccl":
            torch.cuda.set_device(local_device())
        dist.init_process_group(backend=backend, timeout=timeout)
    device = local_device() if dist.get_backend() == "nccl" else "cpu"
    return World(dist.get_rank(), dist.get_world_size(), device=device)


def local_device() -> str:
    """This rank's GPU under a launcher: ``cuda:LOCAL_RANK``."""
    return f"cuda:{int(os.environ.get('LOCAL_RANK', '0'))}"


def rank_device_map(device_map: str | dict | None) -> str | dict | None:
    """The device map a rank loads its model with. Under NCCL every rank holds its own copy on its own GPU, so no
    map or ``auto`` (which would spread every rank's copy over all GPUs) becomes that GPU; under gloo, and in a
    single process, the map is used as given (cpu or disk offload as without ranks)."""
    launched = int(os.environ.get("WORLD_SIZE", "1")) > 1
    nccl = os.environ.get("ATTNPRUNE_DIST_BACKEND", "gloo") == "nccl"
    if launched and nccl and device_map in (None, "auto"):
        return {"": local_device()}
    return device_map
