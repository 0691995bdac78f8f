"""The collective logit exchange over torch.distributed (gloo), without Ray."""

from __future__ import annotations

import os

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from cmd_ray.exchange import CollectiveExchange, ExchangeMisalignedError, Topology, free_port, make_groups
from cmd_ray.peer import Batch

from .conftest import assert_same_steps, method_formulations, tiny_config


def _batch(index: torch.Tensor) -> Batch:
    n = len(index)
    return Batch(torch.zeros(n, 1), torch.zeros(n, dtype=torch.long), torch.zeros(n, dtype=torch.long), index)


def _exchanged(topology: Topology, groups, index: torch.Tensor, rank: int):
    """What this rank gets back from the exchange (first logit of each peer), or the error's text."""
    try:
        gathered = CollectiveExchange(topology, groups.exchange)([torch.full((4, 3), float(rank))], _batch(index))
        return gathered[:, 0, 0].tolist()
    except ExchangeMisalignedError as err:
        return str(err)


def _four_ranks(rank: int, world: int, port: int, results) -> None:
    """Four gloo processes, several layouts in turn (one start-up for all of this module's checks)."""
    from cmd_ray.exchange import Placement, gather_placements

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        peers = Topology(world, 1, rank)  # four peers, one replica each
        groups = make_groups(peers)
        results[("peers", rank)] = _exchanged(peers, groups, torch.arange(4), rank)
        misaligned = torch.arange(4).flip(0) if rank == 1 else torch.arange(4)
        results[("misaligned", rank)] = _exchanged(peers, groups, misaligned, rank)
        replicas = Topology(world // 2, 2, rank)  # peer0 = ranks {0, 1}, peer1 = ranks {2, 3}
        results[("replicas", rank)] = _exchanged(
            replicas, make_groups(replicas), torch.arange(4) + 10 * replicas.replica, rank
        )
        # Every rank "shares GPU 0": the backend decision must come out gloo on every rank alike.
        placements = gather_placements(Placement("node-a", ("0",)))
        shared = make_groups(peers, placements)
        results[("placed", rank)] = (
            len(placements),
            dist.get_backend(shared.exchange),
            _exchanged(peers, shared, torch.arange(4), rank),
        )
    finally:
        dist.destroy_process_group()


@pytest.fixture(scope="module")
def four_ranks() -> dict:
    with mp.Manager() as manager:
        results = manager.dict()
        mp.spawn(_four_ranks, args=(4, free_port(), results), nprocs=4, join=True)
        return dict(results)


def test_exchange_gathers_every_peers_logits_in_peer_order(four_ranks):
    assert {r: four_ranks[("peers", r)] for r in range(4)} == {r: [0, 1, 2, 3] for r in range(4)}


def test_exchange_groups_hold_the_same_replica_of_each_peer(four_ranks):
    # replica 0 exchanges between ranks 0 and 2, replica 1 between ranks 1 and 3.
    assert {r: four_ranks[("replicas", r)] for r in range(4)} == {0: [0, 2], 1: [1, 3], 2: [0, 2], 3: [1, 3]}


def test_misaligned_batches_are_an_error_never_silent(four_ranks):
    for rank in range(4):
        assert isinstance(four_ranks[("misaligned", rank)], str)
        assert "sent logits for other samples" in four_ranks[("misaligned", rank)]


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


def test_placements_are_gathered_and_groups_built_from_them_on_every_rank(four_ranks):
    assert {r: four_ranks[("placed", r)] for r in range(4)} == {r: (4, "gloo", [0, 1, 2, 3]) for r in range(4)}


def _method_worker(rank: int, world: int, port: int, configs: dict[str, dict], root: str, traces: str) -> None:
    """One peer per process, as a Ray Train worker holds it (one thread, `worker_peer`, its own
    batches, `train_epoch` over its exchange), for every formulation in turn."""
    from pathlib import Path

    import cmd_ray.datasets.fashion_mnist as fashion_mnist
    from cmd_ray.config import from_dict
    from cmd_ray.exchange import worker_peer
    from cmd_ray.trainer import StepTrace, load_run_data, train_epoch

    fashion_mnist.DEBIAN_FOLDER = Path(root) / "no-debian"  # the fake data set, as in the parent
    torch.set_num_threads(1)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        for name, values in configs.items():
            cfg = from_dict(values)
            topology = Topology(cfg.peers, cfg.replicas, rank)
            data = load_run_data(cfg)
            peer, exchange, plan = worker_peer(cfg, topology, data, torch.device("cpu"), make_groups(topology).exchange)
            trace = StepTrace(Path(traces) / name, topology.replica)
            for epoch in range(cfg.epochs):
                train_epoch(cfg, [peer], data, epoch, exchange, topology.replica, trace, plan)
    finally:
        dist.destroy_process_group()


def test_every_method_steps_on_two_gloo_workers_exactly_as_in_the_in_process_trainer(fake_fmnist_root, tmp_path):
    """Every registered method (and CMD-P's label correction), each peer in its own process
    exchanging logits over gloo as on Ray workers: the same batches, selections and losses as
    the in-process trainer at every step. The Ray Train wiring around these same calls is pinned
    for two of them by test_ray_train.py::test_peer_workers_match_the_in_process_trainer_step_for_step."""
    from cmd_ray.trainer import train_in_process

    configs = {}
    for name, formulation in method_formulations().items():
        overrides = dict(formulation, epochs=1, data__train_subset=320, data__test_subset=64,
                         data__validation_fraction=0.1)  # fmt: skip
        cfg = tiny_config(fake_fmnist_root, **overrides, testing__trace_dir=str(tmp_path / "ref" / name))
        threads = torch.get_num_threads()
        torch.set_num_threads(1)  # as each worker: the same float reductions
        try:
            train_in_process(cfg, log=lambda _: None)  # also builds the data cache the workers read
        finally:
            torch.set_num_threads(threads)
        configs[name] = tiny_config(fake_fmnist_root, **overrides).to_dict()
    mp.spawn(_method_worker, args=(2, free_port(), configs, str(fake_fmnist_root), str(tmp_path / "workers")),
             nprocs=2, join=True)  # fmt: skip
    for name in configs:
        assert_same_steps(tmp_path / "workers" / name, tmp_path / "ref" / name, peers=2, steps=5)  # 288 / 64
