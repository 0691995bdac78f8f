"""CMD on Ray Train: one `TorchTrainer` whose workers are the peers (x replicas).

Driver side (`train_on_ray`): materialise the data cache, join or start Ray, check the
resources, run the trainer, and turn the last checkpoint's history into the run summary.
Worker side (`train_loop_per_worker`): build this worker's peer, resume from the latest
checkpoint, run the shared epoch loop with a collective logit exchange, evaluate, and
report one record (and a checkpoint every `ray.checkpoint_every` epochs) per epoch.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, Optional

import torch
import torch.distributed as dist

from cmd_ray.cluster import check_cluster_resources, init_ray, worker_resources
from cmd_ray.config import Config, from_dict
from cmd_ray.console import console
from cmd_ray.data import DataBundle, Split
from cmd_ray.errors import DataMismatchError
from cmd_ray.exchange import (
    Placement,
    Topology,
    all_gather_stack,
    all_reduce_sum,
    gather_placements,
    group_backend,
    make_groups,
    worker_peer,
    world_backend,
)
from cmd_ray.identity import check_same_run, save_run_settings
from cmd_ray.peer import (
    COUNT_KEYS,
    NonFiniteLossError,
    Peer,
    evaluate,
    test_probabilities,
)
from cmd_ray.ray_internals import quiet_report_logger
from cmd_ray.storage import absolute, exists, join, read_bytes, store_of, write_bytes, write_json_atomic
from cmd_ray.summary import epoch_record, progress_line, summarise
from cmd_ray.trainer import (
    HISTORY_FILE,
    EpochStats,
    StepTrace,
    describe_data,
    finish_record,
    load_run_data,
    read_checkpoint,
    train_epoch,
    write_checkpoint,
)

EPOCH_COUNT_KEYS = (*COUNT_KEYS, "tau_sum")
PLACEMENT_FILE = "placement.json"  # in the run folder: the node (and GPUs) of every worker
TIMELINE_FILE = "timeline.json"  # in the run folder: when rank 0 reached each phase (cmd-ray bench sweep)


# --------------------------------------------------------------------------------------
# Worker side


def labels_digest(data: DataBundle) -> str:
    """SHA-256 of what the peers learn from: sample ids and noisy labels of the training and
    validation splits. Workers compare it with the driver's before training."""
    digest = hashlib.sha256()
    for split in (data.train, data.validation):
        if split is not None:
            digest.update(split.index.numpy().tobytes())
            digest.update(split.noisy_labels.numpy().tobytes())
    return digest.hexdigest()


def _received_data(loop_config: dict[str, Any], topology: Topology) -> DataBundle:
    """The run's data from Ray's object store, checked against the driver's label digest."""
    import ray

    data = ray.get(loop_config["data"])
    if labels_digest(data) != loop_config["labels_digest"]:
        raise DataMismatchError(
            f"worker {topology.rank}: its noisy labels differ from the driver's (digest "
            f"{labels_digest(data)[:12]} vs {loop_config['labels_digest'][:12]}); refusing to train"
        )
    return data


def _placement(device: torch.device) -> Placement:
    """This worker's node and the GPUs Ray gave it (the same id twice when peers share a GPU)."""
    import ray

    devices = tuple(str(g) for g in ray.get_gpu_ids()) if device.type == "cuda" else ()
    return Placement(ray.get_runtime_context().get_node_id(), devices)


def _describe_backends(topology: Topology, placements: list[Placement]) -> str:
    exchange = {group_backend(placements, topology.exchange_ranks(r)) for r in range(topology.replicas)}
    line = f"logit exchange over {'/'.join(sorted(exchange))}"
    if topology.replicas > 1:
        ddp = {group_backend(placements, topology.peer_ranks(p)) for p in range(topology.peers)}
        line += f", DDP over {'/'.join(sorted(ddp))}"
    shared = len({(w.node, d) for w in placements for d in w.devices}) < sum(len(w.devices) for w in placements)
    return line + (" (peers share a GPU: NCCL cannot put two ranks on one device)" if shared else "")


def _restore(peer: Peer, topology: Topology) -> tuple[int, list[dict[str, Any]]]:
    """Resume from Ray Train's latest checkpoint, if any: (epochs done, history so far)."""
    import ray.train

    checkpoint = ray.train.get_checkpoint()
    if checkpoint is None:
        return 0, []
    with checkpoint.as_directory() as folder:
        return read_checkpoint(Path(folder), [peer], topology.replica)


def _evaluate_across_workers(cfg: Config, topology: Topology, peer: Peer, data: DataBundle, exchange_group):
    """Every peer's and the ensemble's accuracy (collectives): each replica scores its shard of a
    split, the exchange group stacks the peers' softmax outputs so the ensemble can be scored,
    and the correct counts of peer 0's workers are summed over every worker."""

    def probabilities_of(split: Split, labels: torch.Tensor) -> tuple[list[torch.Tensor], torch.Tensor]:
        positions = torch.arange(len(split)).tensor_split(cfg.replicas)[topology.replica]
        probs = test_probabilities(peer, split.subset(positions), data.info).to(peer.device)
        return list(all_gather_stack(probs, cfg.peers, exchange_group).cpu()), labels[positions]

    def sum_over_workers(correct: torch.Tensor) -> torch.Tensor:
        if topology.peer != 0:
            correct = torch.zeros_like(correct)
        return all_reduce_sum(correct.to(peer.device, torch.float64)).cpu()

    return evaluate(data, probabilities_of, sum_over_workers)


def _epoch_record_across_workers(
    cfg: Config,
    topology: Topology,
    peer: Peer,
    data: DataBundle,
    epoch: int,
    stats: EpochStats,
    wait_seconds: float,
    exchange_group,
) -> dict[str, Any]:
    """Sum every peer's counts over its replicas and evaluate on the clean test set (collectives)."""
    evaluated = time.perf_counter()
    table = torch.zeros(cfg.peers, len(EPOCH_COUNT_KEYS), dtype=torch.float64, device=peer.device)
    (counts,) = stats.counts
    table[topology.peer] = torch.tensor([counts.get(k, 0.0) for k in EPOCH_COUNT_KEYS], dtype=torch.float64)
    all_reduce_sum(table)
    peer_counts = [dict(zip(EPOCH_COUNT_KEYS, row.tolist())) for row in table.cpu()]

    accuracy = _evaluate_across_workers(cfg, topology, peer, data, exchange_group)

    # Exchange time without the waiting on the slower peer (measured apart when
    # testing.measure_wait is on); waiting reported on its own.
    timing = torch.tensor(
        [stats.train_seconds, stats.exchange_seconds - wait_seconds, wait_seconds], dtype=torch.float64
    )
    train_seconds, exchange_seconds, wait_seconds = (
        all_reduce_sum(timing.to(peer.device)).cpu() / dist.get_world_size()
    ).tolist()
    record = epoch_record(epoch, peer_counts, accuracy, train_seconds, exchange_seconds)
    record.update(wait_seconds=wait_seconds, wait_fraction=wait_seconds / train_seconds if train_seconds else 0.0)
    record["eval_seconds"] = time.perf_counter() - evaluated
    return record


def _crash_hook(cfg: Config, rank: int, marker: str) -> Optional[Callable]:
    """Test hook: kill (or stop, `testing.crash_mode`) this worker process once, mid-epoch, to
    exercise fault tolerance; the marker file says it happened."""
    t = cfg.testing
    if t.crash_epoch is None or rank != t.crash_rank:
        return None

    def maybe_crash(epoch: int, step: int, *_):
        if epoch == t.crash_epoch and step == t.crash_step and not exists(marker):
            write_bytes(marker, f"{t.crash_mode} rank {rank} at epoch {epoch} step {step}\n".encode())
            if t.crash_mode == "hang":
                console(f"[cmd-ray] testing.crash_epoch: worker rank {rank} stops at epoch {epoch}, step {step}")
                while True:
                    time.sleep(60)
            console(f"[cmd-ray] testing.crash_epoch: killing worker rank {rank} at epoch {epoch}, step {step}")
            os._exit(1)

    return maybe_crash


# Written into the run folder when a loss goes NaN/inf. Ray Train V2 restarts the worker group
# on any worker error and offers no non-retryable one; a numerical fault would replay
# identically from the last checkpoint, so the restarted loop sees this file and returns
# at once, and the driver turns it back into a NonFiniteLossError.
NONFINITE_MARKER = "stopped-nonfinite.txt"


def _record_nonfinite(run_dir: str, err: NonFiniteLossError) -> None:
    marker = join(run_dir, NONFINITE_MARKER)
    if not exists(marker):  # the first rank to fail names the fault
        write_bytes(marker, (str(err) + "\n").encode())


def nonfinite_stop(run_dir: str | Path) -> Optional[str]:
    """The message of the numerical fault that stopped this run, if one did."""
    marker = join(run_dir, NONFINITE_MARKER)
    return read_bytes(marker).decode().strip() if exists(marker) else None


def fit(trainer, run_dir: str | Path):
    """`trainer.fit()`, but a run stopped by a NaN/inf loss raises NonFiniteLossError naming
    the peer, epoch and step (its last good checkpoint stays in `run_dir`)."""
    try:
        result = trainer.fit()
    except Exception:
        stopped = nonfinite_stop(run_dir)
        if stopped is None:
            raise
        result = None
    stopped = nonfinite_stop(run_dir)
    if stopped is not None:
        raise NonFiniteLossError(
            f"{stopped} (last good checkpoint kept in {run_dir}; delete {join(run_dir, NONFINITE_MARKER)} "
            "to resume this run with other settings)"
        )
    return result


def _combine(*hooks: Optional[Callable]) -> Optional[Callable]:
    hooks = tuple(h for h in hooks if h is not None)
    if not hooks:
        return None

    def call_all(*args):
        for hook in hooks:
            hook(*args)

    return call_all


class WorkerHooks:
    """What a worker does beside training, in one place: the timeline of its phases (rank 0
    writes it for `cmd-ray bench sweep`), the placement record, the progress line, the
    non-finite-loss marker, and the per-step test hooks (step trace, injected crash)."""

    def __init__(self, cfg: Config, topology: Topology, run_dir: str):
        self.cfg, self.topology, self.run_dir = cfg, topology, run_dir
        self.timeline: dict[str, float] = {"loop_start": time.time()}
        self.on_step = _combine(
            StepTrace(cfg.testing.trace_dir, topology.replica) if cfg.testing.trace_dir else None,
            _crash_hook(cfg, topology.rank, join(run_dir, ".crash-injected")),
        )

    @property
    def lead(self) -> bool:
        """Rank 0 speaks for the run (console lines, run-folder files)."""
        return self.topology.rank == 0

    def stamp(self, phase: str) -> None:
        self.timeline[phase] = time.time()

    def stopped_before(self) -> bool:
        """A numerical fault replays identically: a restarted worker group does not retry it."""
        stopped = nonfinite_stop(self.run_dir)
        if stopped is not None and self.lead:
            console(f"[cmd-ray] not retrying after a non-finite loss: {stopped}")
        return stopped is not None

    def placed(self, placements: list[Placement]) -> None:
        """Which node and GPU each worker got (this attempt's; a restart rewrites it)."""
        self.stamp("groups_ready")
        if self.lead:
            placement = [{"rank": r, "node": w.node, "devices": list(w.devices)} for r, w in enumerate(placements)]
            write_json_atomic(join(self.run_dir, PLACEMENT_FILE), {"workers": placement})
            if self.cfg.use_gpu:
                console(f"[cmd-ray] {_describe_backends(self.topology, placements)}")

    def resumed(self, start_epoch: int) -> None:
        self.stamp("peer_ready")
        if self.lead and start_epoch:
            console(f"[cmd-ray] resumed from the checkpoint after epoch {start_epoch}")

    def nonfinite(self, err: NonFiniteLossError) -> None:
        _record_nonfinite(self.run_dir, err)

    def epoch_done(self, record: dict[str, Any], stats: EpochStats, label: str) -> None:
        self.timeline.setdefault("first_step", stats.first_step_at)
        if self.lead:
            console(progress_line(record, self.cfg.peers, self.cfg.epochs, label))

    def reported(self, seconds: float) -> None:
        self.timeline["report_seconds"] = self.timeline.get("report_seconds", 0.0) + seconds

    def finished(self) -> None:
        if self.lead:
            self.stamp("loop_end")
            write_json_atomic(join(self.run_dir, TIMELINE_FILE), self.timeline)


def _worker_device(cfg: Config) -> torch.device:
    import ray.train.torch

    device = ray.train.torch.get_device() if cfg.use_gpu else torch.device("cpu")
    if device.type == "cuda":
        torch.cuda.set_device(device)
    return device


def _report(cfg: Config, record: dict[str, Any], peer: Peer, history: list[dict[str, Any]], done: int,
            topology: Topology) -> None:  # fmt: skip
    """One report per epoch to Ray Train, with a checkpoint every `ray.checkpoint_every` epochs
    and after the last (each worker writes its peer's shard; rank 0 the history)."""
    import ray.train

    if done % cfg.ray.checkpoint_every == 0 or done == cfg.epochs:
        with tempfile.TemporaryDirectory() as folder:
            write_checkpoint(Path(folder), [peer], done, history if topology.rank == 0 else None, topology.replica)
            ray.train.report(record, checkpoint=ray.train.Checkpoint.from_directory(folder))
    else:
        ray.train.report(record)


def train_loop_per_worker(loop_config: dict[str, Any]) -> None:
    """Ray Train entry point: this worker trains peer rank // D on shard rank % D of each batch."""
    import ray.train

    cfg = from_dict(loop_config["config"])
    quiet_report_logger(cfg.ray.log_level)
    topology = Topology(cfg.peers, cfg.replicas, ray.train.get_context().get_world_rank())
    hooks = WorkerHooks(cfg, topology, loop_config["run_dir"])
    if hooks.stopped_before():
        return
    data = _received_data(loop_config, topology)
    hooks.stamp("data_received")
    device = _worker_device(cfg)
    placements = gather_placements(_placement(device))
    groups = make_groups(topology, placements)
    hooks.placed(placements)
    peer, exchange, plan = worker_peer(cfg, topology, data, device, groups.exchange)
    start_epoch, history = _restore(peer, topology)
    hooks.resumed(start_epoch)
    if cfg.replicas > 1:
        peer.model = torch.nn.parallel.DistributedDataParallel(
            peer.model, process_group=groups.peer, device_ids=[device.index] if device.type == "cuda" else None
        )
    for epoch in range(start_epoch, cfg.epochs):
        exchange.wait_seconds = 0.0
        try:
            stats = train_epoch(cfg, [peer], data, epoch, exchange, topology.replica, hooks.on_step, plan)
        except NonFiniteLossError as err:
            hooks.nonfinite(err)
            raise
        record = _epoch_record_across_workers(
            cfg, topology, peer, data, epoch, stats, exchange.wait_seconds, groups.exchange
        )
        first = epoch == 0  # a resumed run's start-up was counted before the restart
        history.append(finish_record(record, data, stats, loop_config.get("started_at") if first else None))
        hooks.epoch_done(record, stats, loop_config.get("label", ""))
        reporting = time.perf_counter()
        _report(cfg, record, peer, history, epoch + 1, topology)
        hooks.reported(time.perf_counter() - reporting)
    if start_epoch == cfg.epochs:
        # Resumed after its last epoch (a sweep's driver killed as the trial ended): report the last
        # record again, or a sweep's Tune trial has no result and never reads as finished.
        _report(cfg, history[-1], peer, history, cfg.epochs, topology)
    hooks.finished()


# --------------------------------------------------------------------------------------
# Driver side


def storage_path(cfg: Config) -> str:
    """Where Ray Train keeps this run's state: ray.storage_path, else <output_dir>/ray; a local
    folder (made absolute) or an object-storage URI."""
    path = cfg.ray.storage_path or join(cfg.output_dir, "ray")
    return absolute(path)


def build_trainer(
    cfg: Config,
    run_name: str,
    storage: str,
    data: DataBundle,
    callbacks: Optional[list] = None,
    label: str = "",
):
    """The TorchTrainer of one CMD run: P x D workers, gloo/NCCL, checkpoints, fault tolerance.

    `data` travels to the workers through Ray's object store (no node needs a data folder), with
    the digest of its noisy labels for the workers to check. Re-running a trainer with the same
    `run_name` and `storage` resumes that run from its latest checkpoint instead of starting
    over (how Tune restores a trial).
    """
    import ray
    from ray.train import CheckpointConfig, FailureConfig, LoggingConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    return TorchTrainer(
        train_loop_per_worker,
        train_loop_config={
            "config": cfg.to_dict(),
            "run_dir": join(storage, run_name),
            "label": label,
            "started_at": time.time(),
            "data": ray.put(data),
            "labels_digest": labels_digest(data),
        },
        scaling_config=ScalingConfig(
            num_workers=cfg.workers,
            use_gpu=cfg.use_gpu,
            resources_per_worker=worker_resources(cfg),
            placement_strategy="SPREAD",
        ),
        torch_config=TorchConfig(backend=world_backend(cfg.use_gpu, cfg.ray.gpus_per_worker)),
        run_config=RunConfig(
            name=run_name,
            **store_of(storage).for_ray(storage),
            failure_config=FailureConfig(max_failures=cfg.ray.max_failures),
            checkpoint_config=CheckpointConfig(num_to_keep=cfg.ray.checkpoints_to_keep),
            logging_config=LoggingConfig(log_level=cfg.ray.log_level),
            callbacks=callbacks or [],
        ),
    )


def read_history(checkpoint_path: str | Path) -> list[dict[str, Any]]:
    """Per-epoch records stored with a run's checkpoint (a local folder or a URI)."""
    return json.loads(read_bytes(join(checkpoint_path, HISTORY_FILE)))


def default_run_name(cfg: Config) -> str:
    """`<method>-<date>-<time>`: a new run folder each time."""
    return f"{cfg.method}-{time.strftime('%Y%m%d-%H%M%S')}"


def train_on_ray(cfg: Config, log: Callable[[str], None] = console, run_name: Optional[str] = None) -> dict[str, Any]:
    """Run one CMD training as a Ray Train TorchTrainer; return the run summary.

    Re-running with the same `run_name` (and storage) resumes that run from its latest
    checkpoint instead of starting over, with the settings it started with only (ConfigError
    naming the keys that differ, before any work).
    """
    started = time.perf_counter()
    run_name = run_name or default_run_name(cfg)
    storage = storage_path(cfg)
    resumed = check_same_run(join(storage, run_name), cfg, "--run-name", "another --run-name")
    data = load_run_data(cfg)  # builds the Parquet cache once, here, and checks the data
    init_ray(cfg)
    check_cluster_resources(cfg)
    if not resumed:
        save_run_settings(join(storage, run_name), cfg)
    workers = cfg.workers
    log(
        f"[cmd-ray] Ray Train: {cfg.method} with {cfg.peers} peers x {cfg.replicas} replicas = {workers} workers "
        f"({'GPU' if cfg.use_gpu else 'CPU'}), {cfg.data.name} {describe_data(cfg, data)}, "
        f"{cfg.epochs} epochs; run {join(storage, run_name)}"
    )
    result = fit(build_trainer(cfg, run_name, storage, data), join(storage, run_name))
    with result.checkpoint.as_directory() as folder:
        history = read_history(folder)
    extra = {
        "path": "ray",
        "workers": workers,
        "run_dir": join(storage, run_name),
        "checkpoint": result.checkpoint.path,
        "wall_seconds": time.perf_counter() - started,
    }
    return summarise(cfg, history, data.noise, extra)
