"""The epoch loop shared by both paths, and the in-process trainer built on it.

`train_epoch` steps the peers a process holds (all P in-process; one on a Ray worker) over
one epoch: same batches in the same order for every peer, every peer forwards before any
steps, then the logits are exchanged and each local peer runs `peer_step`. The exchange
is a function argument: an in-memory stack here, an all-gather in `cmd_ray.exchange`. A
method's epoch hook (`Plan.epoch_values`) runs before the epoch's first step and its values go
through the same exchange.
"""

from __future__ import annotations

import io
import json
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

import torch

from cmd_ray.batches import epoch_batches, shard
from cmd_ray.config import Config, check_models_fit
from cmd_ray.console import console
from cmd_ray.data import DataBundle, load_data
from cmd_ray.methods import EPOCH_VALUES, Plan
from cmd_ray.peer import (
    Batch,
    Peer,
    StepResult,
    StepSchedule,
    add_counts,
    augment_seed,
    build_peer,
    eval_logits,
    evaluate,
    forward,
    load_peer_state,
    make_batch,
    method_plan,
    peer_state,
    peer_step,
    run_augmentation,
    steps_per_epoch,
    test_probabilities,
)
from cmd_ray.storage import exists, is_uri, join, list_files, local, read_bytes, remove, write_bytes
from cmd_ray.summary import epoch_record, progress_line, summarise
from cmd_ray.user_data import UserSource, first_image_side

# exchange(local peers' logits with graph, batch) -> every peer's detached logits (P, B, C)
Exchange = Callable[[list[torch.Tensor], Batch], torch.Tensor]
# on_step(epoch, step, local peers, their step results, the batch they trained on)
StepHook = Callable[[int, int, list[Peer], list[StepResult], Batch], None]
# on_epoch(epochs done, peers, history so far): checkpoint and report after each epoch
EpochHook = Callable[[int, list[Peer], list[dict[str, Any]]], None]
# resume(peers) -> (epochs done, history so far), the peers' state loaded in place
Resume = Callable[[list[Peer]], tuple[int, list[dict[str, Any]]]]

HISTORY_FILE = "history.json"


def checkpoint_file(peer: int, replica: int = 0) -> str:
    """A peer's file in a checkpoint folder; the same layout on both paths (replica 0 in-process)."""
    return f"peer{peer}_replica{replica}.pt"


# One checkpoint format for both placements: a folder (local or object storage) holding each
# peer's state as peer<k>_replica<r>.pt (`peer_state`: weights, optimiser, schedule, random
# stream, method state) and the per-epoch records as history.json. Ray Train's workers each
# write their own peer's file into the same checkpoint; a trial placed in one process writes all.


def write_checkpoint(
    folder: str | Path, peers: list[Peer], done: int, history: Optional[list[dict[str, Any]]], replica: int = 0
) -> None:
    """Each local peer's state after `done` epochs, and the history (when given) as history.json."""
    for peer in peers:
        buffer = io.BytesIO()
        torch.save(peer_state(peer, done), buffer)
        write_bytes(join(folder, checkpoint_file(peer.index, replica)), buffer.getvalue())
    if history is not None:
        write_bytes(join(folder, HISTORY_FILE), json.dumps(history).encode())


def read_checkpoint(folder: str | Path, peers: list[Peer], replica: int = 0) -> tuple[int, list[dict[str, Any]]]:
    """Load each local peer's state from a checkpoint folder; (epochs done, history)."""
    done = 0
    for peer in peers:
        data = read_bytes(join(folder, checkpoint_file(peer.index, replica)))
        state = torch.load(io.BytesIO(data), map_location=peer.device, weights_only=True)
        done = load_peer_state(peer, state)
    return done, json.loads(read_bytes(join(folder, HISTORY_FILE)))


# In a folder that keeps only its latest checkpoint (a trial placed in one process): the name of
# that checkpoint's folder, replaced atomically once the folder is whole.
LATEST_CHECKPOINT = "latest_checkpoint.txt"


def write_latest_checkpoint(folder: str, peers: list[Peer], done: int, history: list[dict[str, Any]]) -> str:
    """The checkpoint after `done` epochs as `folder`/checkpoint_<done>/ (the format above); only
    once it is whole does the pointer name it, and then the older folders go, so a process killed
    at any moment leaves the pointer naming a whole checkpoint. Returns its folder."""
    name = f"checkpoint_{done:06d}"
    write_checkpoint(join(folder, name), peers, done, history)
    write_bytes(join(folder, LATEST_CHECKPOINT), name.encode())
    for path in list_files(folder):  # a checkpoint folder holds files only: its name is their parent's
        parent = path.split("/")[-2]
        if parent.startswith("checkpoint_") and parent != name:
            remove(path)
    if not is_uri(folder):  # object storage has no folders to remove
        for old in local(folder).glob("checkpoint_*"):
            if old.name != name and old.is_dir() and not any(old.iterdir()):
                old.rmdir()
    return join(folder, name)


def read_latest_checkpoint(folder: str, peers: list[Peer]) -> tuple[int, list[dict[str, Any]]]:
    """Load the checkpoint `write_latest_checkpoint` last wrote into the peers; (0, []) if none."""
    pointer = join(folder, LATEST_CHECKPOINT)
    if not exists(pointer):
        return 0, []
    return read_checkpoint(join(folder, read_bytes(pointer).decode().strip()), peers)


def check_models_fit_before_import(cfg: Config) -> None:
    """Refuse a user's data set whose images no peer architecture takes, from its first image's
    header, before anything is imported or written (data.image_size resizes at import and is
    checked with the config)."""
    source = UserSource.of(cfg.data)
    if source is not None and cfg.data.image_size is None:
        side = first_image_side(source)
        if side is not None:
            check_models_fit(cfg, side, cfg.data.path)


def load_run_data(cfg: Config, check_models: bool = True) -> DataBundle:
    """The noisy train split and the test split a config asks for (cached as Parquet). With
    `check_models`, a user's images that no peer architecture can take are refused: before the
    import where one image's header tells (an image folder), else once imported; never after
    training started. `cmd-ray prepare` builds the cache whatever the model."""
    d = cfg.data
    spec, source = cfg.noise, UserSource.of(cfg.data)
    if check_models:
        check_models_fit_before_import(cfg)
    data = load_data(d.name, d.root, spec, cfg.seed, d.train_subset, d.test_subset, d.validation_fraction, source)
    if check_models:
        check_models_fit(cfg, data.info.shape[0], d.path or d.name)  # images are square once imported
    return data


def realised_rate(data: DataBundle) -> Optional[float]:
    """The share of wrong labels among the images trained on (None without clean labels)."""
    rate = data.noise["subset_realised_rate"]
    return data.noise["realised_rate"] if rate is None else rate


def describe_data(cfg: Config, data: DataBundle) -> str:
    """'3000 train / 10000 test, noise symmetric 0.5 (realised 0.497)' for the start-up line."""
    test = f"{len(data.test)} test" if data.test is not None else f"no test split, {len(data.validation)} validation"
    rate = realised_rate(data)
    noise = {"none": "noise none", "labels": f"noisy labels from {cfg.noise.labels}"}.get(
        cfg.noise.type, f"noise {cfg.noise.type} {cfg.noise.rate:g}"
    )
    realised = f"realised {rate:.3f}" if rate is not None else "no clean labels: noise rate unknown"
    left_out = data.noise.get("left_out")
    realised += f"; {left_out} images the file does not name left out" if left_out else ""
    return f"{len(data.train)} train / {test}, {noise} ({realised})"


def in_process_exchange(logits: list[torch.Tensor], batch: Batch) -> torch.Tensor:
    """All peers live here: the exchange is a stack of their detached logits."""
    return torch.stack([z.detach() for z in logits])


def share_epoch_values(plan: Plan, peers: list[Peer], data: DataBundle, epoch: int, exchange: Exchange) -> None:
    """Run the method's epoch hook on each local peer over the whole training split and put
    every peer's values (P, N, K), gathered through the run's exchange, into each local peer's
    method state; nothing when the method does not want it before this epoch."""
    if not plan.wants_epoch_values(epoch):
        return
    train = data.train
    values = []
    for peer in peers:
        logits = eval_logits(peer, train, data.info)
        own = plan.epoch_values(peer.index, logits, train.noisy_labels, epoch)
        values.append(own.reshape(len(train), -1).float().to(peer.device))
    device = peers[0].device
    whole_split = Batch(torch.empty(0), train.noisy_labels, None, train.index.to(device), torch.arange(len(train)))
    shared = exchange(values, whole_split)
    for peer in peers:
        peer.method_state[EPOCH_VALUES] = shared.to(peer.device)


@dataclass
class EpochStats:
    """What one epoch of the local peers did."""

    counts: list[dict[str, float]]  # summed step counts per local peer
    train_seconds: float
    exchange_seconds: float  # inside the exchange call (transfer and any waiting)
    first_step_at: float  # wall-clock time the first step started


def train_epoch(
    cfg: Config,
    peers: list[Peer],
    data: DataBundle,
    epoch: int,
    exchange: Exchange = in_process_exchange,
    replica: int = 0,
    on_step: Optional[StepHook] = None,
    plan: Optional[Plan] = None,
) -> EpochStats:
    """One epoch of the local `peers` on replica `replica`'s shard of every global batch.

    `on_step(epoch, step, peers, results, batch)` sees every step (used for step traces). `plan`: the
    run's method as `method_plan` fixes it (built here when not given; callers build it once a run).
    """
    per_epoch = steps_per_epoch(cfg, data)
    total_steps = per_epoch * cfg.epochs
    plan = plan or method_plan(cfg, data.info.num_classes)
    counts: list[dict[str, float]] = [{} for _ in peers]
    exchange_seconds = 0.0
    first_step_at = time.time()
    start = time.perf_counter()
    device = peers[0].device
    policy = run_augmentation(cfg, data.info)
    share_epoch_values(plan, peers, data, epoch, exchange)
    for step, global_positions in enumerate(epoch_batches(len(data.train), cfg.batch_size, cfg.seed, epoch)):
        positions = shard(global_positions, replica, cfg.replicas)
        seed = augment_seed(cfg, epoch, step) + replica
        batch = make_batch(data.train, positions, data.info, device, seed, policy)
        logits = [forward(peer, batch.images) for peer in peers]
        if cfg.testing.nan_step == epoch * per_epoch + step:  # test hook: a numerical fault
            logits = [z * float("nan") if p.index == cfg.testing.nan_peer else z for p, z in zip(peers, logits)]
        t0 = time.perf_counter()
        peer_logits = exchange(logits, batch)
        exchange_seconds += time.perf_counter() - t0
        when = StepSchedule(epoch * per_epoch + step, total_steps, per_epoch)
        results = [peer_step(plan, peer, z, peer_logits, batch, when, seed) for peer, z in zip(peers, logits)]
        for total, result in zip(counts, results):
            add_counts(total, result.counts)
        if on_step is not None:
            on_step(epoch, step, peers, results, batch)
        if cfg.testing.step_sleep:
            time.sleep(cfg.testing.step_sleep)
    return EpochStats(counts, time.perf_counter() - start, exchange_seconds, first_step_at)


def finish_record(
    record: dict[str, Any], data: DataBundle, stats: EpochStats, started_at: Optional[float]
) -> dict[str, Any]:
    """The bookkeeping both paths add to an epoch's record: data sizes, torch's CPU thread count
    and vector unit, and for a run's first epoch (`started_at` = when the run started) the time
    from start to the first step."""
    record.update(train_samples=len(data.train), test_samples=len(data.test) if data.test is not None else 0)
    record["realised_noise_rate"] = realised_rate(data)
    # CPU float reductions differ in their last bits with the thread count and the vector unit
    # (AVX512, AVX2, ...), and at heavy noise a last-bit difference can move a 60-epoch run by
    # points: a run repeats bit for bit only on the same pair, so every record says which it had.
    record["torch_threads"] = torch.get_num_threads()
    record["cpu_capability"] = torch.backends.cpu.get_cpu_capability()
    if started_at is not None:
        record["startup_seconds"] = stats.first_step_at - started_at
    return record


class StepTrace:
    """Appends each peer's per-step loss, selection mask and sample ids (replica 0's shard) to
    `<folder>/peer<k>.jsonl` (tests)."""

    def __init__(self, folder: str | Path, replica: int = 0):
        self.folder = Path(folder)
        self.folder.mkdir(parents=True, exist_ok=True)
        self.replica = replica

    def __call__(self, epoch: int, step: int, peers: list[Peer], results: list[StepResult], batch: Batch) -> None:
        if self.replica != 0:
            return
        samples = batch.index.tolist()
        for peer, result in zip(peers, results):
            selected = result.selected.int().tolist()
            line = {"epoch": epoch, "step": step, "loss": result.loss, "selected": selected, "samples": samples}
            with open(self.folder / f"peer{peer.index}.jsonl", "a") as f:
                f.write(json.dumps(line) + "\n")


def _evaluate_in_process(peers: list[Peer], data: DataBundle) -> dict[str, float]:
    """Every peer's and the ensemble's accuracy, each peer on the whole of every scored split."""
    return evaluate(data, lambda split, labels: ([test_probabilities(p, split, data.info) for p in peers], labels))


def train_in_process(
    cfg: Config,
    data: Optional[DataBundle] = None,
    log: Callable[[str], None] = console,
    on_step: Optional[StepHook] = None,
    *,
    resume: Optional[Resume] = None,
    on_epoch: Optional[EpochHook] = None,
    label: str = "",
    started_at: Optional[float] = None,
) -> dict[str, Any]:
    """Train P peers in this process; return the run summary (see `cmd_ray.summary.summarise`).

    `resume` loads a checkpoint into the freshly built peers (a Tune trial restarting);
    `on_epoch` checkpoints and reports after each epoch (and once, with the last epoch's record,
    when resumed after it); `label` prefixes progress lines;
    `started_at` (wall clock) is when the run started, for its start-up time.
    """
    started, started_at = time.perf_counter(), started_at or time.time()
    data = data if data is not None else load_run_data(cfg)
    device = torch.device("cuda") if cfg.use_gpu else torch.device("cpu")
    total_steps = steps_per_epoch(cfg, data) * cfg.epochs
    peers = [build_peer(cfg, k, data.info, total_steps, device) for k in range(cfg.peers)]
    start_epoch, history = resume(peers) if resume is not None else (0, [])
    if on_step is None and cfg.testing.trace_dir:
        on_step = StepTrace(cfg.testing.trace_dir)
    log(
        f"[cmd-ray] in-process: {cfg.method} with {cfg.peers} peers on {cfg.data.name}, "
        f"{describe_data(cfg, data)}, {cfg.epochs} epochs, device {device}"
        + (f"; resumed after epoch {start_epoch}" if start_epoch else "")
    )
    plan = method_plan(cfg, data.info.num_classes)
    for epoch in range(start_epoch, cfg.epochs):
        stats = train_epoch(cfg, peers, data, epoch, on_step=on_step, plan=plan)
        evaluated = time.perf_counter()
        accuracy = _evaluate_in_process(peers, data)
        record = epoch_record(epoch, stats.counts, accuracy, stats.train_seconds, stats.exchange_seconds)
        record["eval_seconds"] = time.perf_counter() - evaluated
        history.append(finish_record(record, data, stats, started_at if epoch == 0 else None))
        log(progress_line(record, cfg.peers, cfg.epochs, label))
        if on_epoch is not None:
            on_epoch(epoch + 1, peers, history)
    if start_epoch == cfg.epochs and on_epoch is not None:
        # Resumed after its last epoch (a sweep's driver killed as the trial ended): report the last
        # record again, or a sweep's Tune trial has no result and never reads as finished (as
        # `cmd_ray.ray_train.train_loop_per_worker` does).
        on_epoch(cfg.epochs, peers, history)
    extra = {"path": "in-process", "wall_seconds": time.perf_counter() - started}
    return summarise(cfg, history, data.noise, extra)
