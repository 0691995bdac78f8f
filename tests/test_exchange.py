"""The collective logit exchange over torch.distributed (gloo), without Ray."""

from __future__ import annotations

import os

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from cmd_ray.exchange import CollectiveExchange, ExchangeMisalignedError, Topology, free_port, make_groups
from cmd_ray.peer import Batch


def _worker(rank: int, world: int, port: int, replicas: int, misalign: bool, results) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        topology = Topology(world // replicas, replicas, rank)
        groups = make_groups(topology)
        index = torch.arange(4) + 10 * topology.replica
        if misalign and rank == 1:
            index = index.flip(0)
        batch = Batch(torch.zeros(4, 1), torch.zeros(4, dtype=torch.long), torch.zeros(4, dtype=torch.long), index)
        logits = torch.full((4, 3), float(rank))
        try:
            gathered = CollectiveExchange(topology, groups.exchange)([logits], batch)
            results[rank] = gathered[:, 0, 0].tolist()
        except ExchangeMisalignedError as err:
            results[rank] = str(err)
    finally:
        dist.destroy_process_group()


def _run(world: int, replicas: int, misalign: bool) -> dict:
    with mp.Manager() as manager:
        results = manager.dict()
        mp.spawn(_worker, args=(world, free_port(), replicas, misalign, results), nprocs=world, join=True)
        return dict(results)


def test_exchange_gathers_every_peers_logits_in_peer_order():
    assert _run(world=3, replicas=1, misalign=False) == {0: [0, 1, 2], 1: [0, 1, 2], 2: [0, 1, 2]}


def test_exchange_groups_hold_the_same_replica_of_each_peer():
    # ranks: peer0 = {0, 1}, peer1 = {2, 3}; replica 0 exchanges between ranks 0 and 2.
    assert _run(world=4, replicas=2, misalign=False) == {0: [0, 2], 1: [1, 3], 2: [0, 2], 3: [1, 3]}


def test_misaligned_batches_are_an_error_never_silent():
    results = _run(world=2, replicas=1, misalign=True)
    for rank in (0, 1):
        assert isinstance(results[rank], str)
        assert "sent logits for other samples" in results[rank]


@pytest.mark.parametrize("rank,peer,replica", [(0, 0, 0), (3, 1, 1), (5, 2, 1)])
def test_topology_maps_rank_to_peer_and_replica(rank, peer, replica):
    t = Topology(peers=3, replicas=2, rank=rank)
    assert (t.peer, t.replica) == (peer, replica)
    assert t.exchange_ranks(1) == [1, 3, 5] and t.peer_ranks(2) == [4, 5]


def test_backend_is_nccl_only_when_every_member_has_a_gpu_of_its_own():
    from cmd_ray.exchange import Placement, group_backend, world_backend

    own_gpus = [Placement("node-a", ("0",)), Placement("node-a", ("1",)), Placement("node-b", ("0",))]
    assert group_backend(own_gpus, [0, 1, 2]) == "nccl"  # GPU 0 on two nodes is two devices
    shared = [Placement("node-a", ("0",)), Placement("node-a", ("0",)), Placement("node-a", ("1",))]
    assert group_backend(shared, [0, 1]) == "gloo"  # gpus_per_worker 0.5: two peers on one GPU
    assert group_backend(shared, [0, 2]) == "nccl"  # a group decides from its own members only
    cpu = [Placement("node-a"), Placement("node-a", ("0",))]
    assert group_backend(cpu, [0, 1]) == "gloo"
    assert world_backend(use_gpu=True, gpus_per_worker=1) == "nccl"
    assert world_backend(use_gpu=True, gpus_per_worker=2) == "nccl"
    assert world_backend(use_gpu=True, gpus_per_worker=0.5) == "gloo"
    assert world_backend(use_gpu=False, gpus_per_worker=1) == "gloo"


def _placed_worker(rank: int, world: int, port: int, results) -> None:
    from cmd_ray.exchange import Placement, gather_placements

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        # Peers 0 and 1 "share GPU 0"; the decision must come out gloo on every rank alike.
        placements = gather_placements(Placement("node-a", ("0",)))
        topology = Topology(peers=world, replicas=1, rank=rank)
        groups = make_groups(topology, placements)
        index = torch.arange(4)
        batch = Batch(torch.zeros(4, 1), torch.zeros(4, dtype=torch.long), torch.zeros(4, dtype=torch.long), index)
        gathered = CollectiveExchange(topology, groups.exchange)([torch.full((4, 3), float(rank))], batch)
        results[rank] = (len(placements), dist.get_backend(groups.exchange), gathered[:, 0, 0].tolist())
    finally:
        dist.destroy_process_group()


def test_placements_are_gathered_and_groups_built_from_them_on_every_rank():
    with mp.Manager() as manager:
        results = manager.dict()
        mp.spawn(_placed_worker, args=(2, free_port(), results), nprocs=2, join=True)
        assert dict(results) == {0: (2, "gloo", [0.0, 1.0]), 1: (2, "gloo", [0.0, 1.0])}
