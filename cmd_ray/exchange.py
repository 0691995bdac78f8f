"""The logit exchange between peer workers over torch.distributed (gloo on CPU, NCCL on GPU).

World rank = peer * D + replica for P peers x D replicas. Two kinds of process groups:
- peer group of peer p: its D replicas (DDP all-reduces gradients inside it);
- exchange group of replica r: the P workers holding shard r of each global batch; they
  all-gather (logits, sample ids) every step.
No Ray here: the same code runs under any launcher that sets up torch.distributed.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Optional

import torch
import torch.distributed as dist

from cmd_ray.peer import Batch

# torch >= 2.10 names it all_gather_single; older releases all_gather_into_tensor.
_gather_single = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor


class ExchangeMisalignedError(RuntimeError):
    """Peers disagree on which samples a batch holds: never train on misaligned logits."""


@dataclass
class Topology:
    """Where this worker sits among P peers x D replicas."""

    peers: int
    replicas: int
    rank: int

    @property
    def peer(self) -> int:
        return self.rank // self.replicas

    @property
    def replica(self) -> int:
        return self.rank % self.replicas

    def peer_ranks(self, peer: int) -> list[int]:
        return [peer * self.replicas + r for r in range(self.replicas)]

    def exchange_ranks(self, replica: int) -> list[int]:
        return [p * self.replicas + replica for p in range(self.peers)]


@dataclass
class Groups:
    """This worker's process groups (None = the default world group)."""

    peer: Optional[dist.ProcessGroup]
    exchange: Optional[dist.ProcessGroup]


def make_groups(topology: Topology) -> Groups:
    """Create every peer and exchange group, in the same order on every rank (a collective)."""
    if topology.replicas == 1:
        return Groups(peer=None, exchange=None)  # exchange among all ranks; no DDP
    mine = Groups(peer=None, exchange=None)
    for p in range(topology.peers):
        group = dist.new_group(topology.peer_ranks(p))
        if p == topology.peer:
            mine.peer = group
    for r in range(topology.replicas):
        group = dist.new_group(topology.exchange_ranks(r))
        if r == topology.replica:
            mine.exchange = group
    return mine


class CollectiveExchange:
    """Exchange for a worker holding one peer: all-gather (logits | sample ids) in one collective."""

    def __init__(self, topology: Topology, group: Optional[dist.ProcessGroup], measure_wait: bool = False):
        self.topology = topology
        self.group = group
        # With measure_wait, a barrier before the gather separates waiting on the slower peer
        # (accumulated in wait_seconds) from the transfer itself; it costs one more collective.
        self.measure_wait = measure_wait
        self.wait_seconds = 0.0

    def __call__(self, logits: list[torch.Tensor], batch: Batch) -> torch.Tensor:
        (own,) = logits
        if self.measure_wait:
            t0 = time.perf_counter()
            dist.barrier(group=self.group)
            self.wait_seconds += time.perf_counter() - t0
        # Sample ids ride in the last column: one collective instead of two. Ids < 2**24 are
        # exact in float32; larger data sets use float64 for the packed tensor.
        dtype = torch.float32 if len(batch.index) == 0 or int(batch.index.max()) < 2**24 else torch.float64
        packed = torch.cat([own.detach().to(dtype), batch.index.to(dtype)[:, None]], dim=1).contiguous()
        gathered = all_gather_stack(packed, self.topology.peers, self.group)
        ids = gathered[:, :, -1]
        if not torch.equal(ids, ids[self.topology.peer].expand_as(ids)):
            bad = (ids != ids[self.topology.peer]).any(1).nonzero().flatten().tolist()
            raise ExchangeMisalignedError(
                f"peer {self.topology.peer}: peers {bad} sent logits for other samples in this batch; "
                "every peer must see identical batches in identical order"
            )
        return gathered[:, :, :-1].to(own.dtype)


def all_reduce_sum(tensor: torch.Tensor, group: Optional[dist.ProcessGroup] = None) -> torch.Tensor:
    """Sum a tensor over a group (in place) and return it."""
    dist.all_reduce(tensor, op=dist.ReduceOp.SUM, group=group)
    return tensor


def all_gather_stack(tensor: torch.Tensor, size: int, group: Optional[dist.ProcessGroup]) -> torch.Tensor:
    """Stack (size, *shape) of a same-shaped tensor from every member of `group`."""
    out = torch.empty((size * tensor.shape[0], *tensor.shape[1:]), dtype=tensor.dtype, device=tensor.device)
    _gather_single(out, tensor.contiguous(), group=group)  # gloo takes the concatenated form only
    return out.view(size, *tensor.shape)
