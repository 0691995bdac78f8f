"""The logit exchange between peer workers over torch.distributed (gloo on CPU, NCCL on GPU).

World rank = peer * D + replica for P peers x D replicas. Two kinds of process groups:
- peer group of peer p: its D replicas (DDP all-reduces gradients inside it);
- exchange group of replica r: the P workers holding shard r of each global batch; they
  all-gather (logits, sample ids) every step.
Each group's backend follows where its members actually run (`group_backend`): NCCL only
when every member has a GPU of its own; gloo when members share a GPU (NCCL refuses two
ranks on one device) or run on CPU. Gloo collectives on CUDA tensors go through host memory
(b x C floats a step: cheap). No Ray here: the same code runs under any launcher that sets
up torch.distributed.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Optional

import torch
import torch.distributed as dist

from cmd_ray.config import Config
from cmd_ray.data import DataBundle
from cmd_ray.errors import ExchangeMisalignedError
from cmd_ray.methods import Plan
from cmd_ray.peer import Batch, Peer, build_peer, method_plan, steps_per_epoch

# torch >= 2.10 names it all_gather_single; older releases all_gather_into_tensor.
_gather_single = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor


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


@dataclass(frozen=True)
class Placement:
    """Where a worker runs: its node and the accelerator devices it was given (empty on CPU)."""

    node: str
    devices: tuple[str, ...] = ()


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port on `host` that nothing listens on now (for a process group or a dashboard)."""
    import socket

    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def world_backend(use_gpu: bool, gpus_per_worker: float) -> str:
    """Backend of the default (world) group, chosen before placement is known: NCCL only when
    every worker reserves whole GPUs, which no two workers can then share."""
    return "nccl" if use_gpu and gpus_per_worker >= 1 else "gloo"


def group_backend(placements: list[Placement], ranks: list[int]) -> str:
    """nccl when every member of the group has at least one device and no two members share a
    (node, device); gloo otherwise (CPU workers, or peers packed onto one GPU)."""
    seen: set[tuple[str, str]] = set()
    for rank in ranks:
        where = placements[rank]
        if not where.devices:
            return "gloo"
        for device in where.devices:
            if (where.node, device) in seen:
                return "gloo"
            seen.add((where.node, device))
    return "nccl"


def gather_placements(own: Placement) -> list[Placement]:
    """Every worker's placement, in rank order (a collective on the world group, once at start-up)."""
    out: list = [None] * dist.get_world_size()
    dist.all_gather_object(out, own)
    return out


@dataclass
class Groups:
    """This worker's process groups (None = the default world group)."""

    peer: Optional[dist.ProcessGroup]
    exchange: Optional[dist.ProcessGroup]


def make_groups(topology: Topology, placements: Optional[list[Placement]] = None) -> Groups:
    """Create every peer and exchange group, in the same order on every rank (a collective).

    With `placements` (every rank's, from `gather_placements`) each group gets the backend
    `group_backend` chooses; without, groups use the world group's backend. A group that
    would be the whole world with the world's backend is the world group itself (None).
    """

    def new_group(ranks: list[int]) -> Optional[dist.ProcessGroup]:
        backend = group_backend(placements, ranks) if placements is not None else None
        if len(ranks) == dist.get_world_size() and backend in (None, dist.get_backend()):
            return None
        return dist.new_group(ranks, backend=backend)

    mine = Groups(peer=None, exchange=None)
    if topology.replicas > 1:  # DDP inside each peer's replicas
        for p in range(topology.peers):
            group = new_group(topology.peer_ranks(p))
            if p == topology.peer:
                mine.peer = group
    for r in range(topology.replicas):
        group = new_group(topology.exchange_ranks(r))
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


def _through_host(tensor: torch.Tensor, group: Optional[dist.ProcessGroup]) -> bool:
    """Gloo groups get CUDA tensors as host copies (its CUDA support is partial)."""
    return tensor.device.type != "cpu" and dist.get_backend(group) == "gloo"


def all_reduce_sum(tensor: torch.Tensor, group: Optional[dist.ProcessGroup] = None) -> torch.Tensor:
    """Sum a tensor over a group and return the sum (in place, except through host memory)."""
    if _through_host(tensor, group):
        host = tensor.cpu()
        dist.all_reduce(host, op=dist.ReduceOp.SUM, group=group)
        return tensor.copy_(host)
    dist.all_reduce(tensor, op=dist.ReduceOp.SUM, group=group)
    return tensor


def all_gather_stack(tensor: torch.Tensor, size: int, group: Optional[dist.ProcessGroup]) -> torch.Tensor:
    """Stack (size, *shape) of a same-shaped tensor from every member of `group`, on its device."""
    device = tensor.device
    if _through_host(tensor, group):
        tensor = tensor.cpu()
    out = torch.empty((size * tensor.shape[0], *tensor.shape[1:]), dtype=tensor.dtype, device=tensor.device)
    _gather_single(out, tensor.contiguous(), group=group)  # gloo takes the concatenated form only
    return out.view(size, *tensor.shape).to(device)


def worker_peer(
    cfg: Config, topology: Topology, data: DataBundle, device: torch.device, group: Optional[dist.ProcessGroup]
) -> tuple[Peer, CollectiveExchange, Plan]:
    """What a worker holding one peer trains with: its peer (seeded by `cfg.seed`, its learning
    rate scheduled over the whole run), the exchange over `group` and the method's plan. Ray
    Train's workers and the tests' gloo processes build it here, so the two cannot drift."""
    torch.manual_seed(cfg.seed)
    peer = build_peer(cfg, topology.peer, data.info, steps_per_epoch(cfg, data) * cfg.epochs, device)
    exchange = CollectiveExchange(topology, group, measure_wait=cfg.testing.measure_wait)
    return peer, exchange, method_plan(cfg, data.info.num_classes)
