"""In-process trainer: all P peers stepped in one process with an in-memory logit exchange.

This is the reference path: the Ray workers run the same `forward` / `peer_step` functions
and differ only in how logits travel between peers. Every peer sees identical batches in
identical order; all peers forward before any of them steps, exactly as on Ray.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any, Optional

import torch

from cmd_ray.config import Config
from cmd_ray.data import DataBundle, epoch_batches, load_data
from cmd_ray.noise import NoiseSpec
from cmd_ray.peer import (
    Peer,
    StepSchedule,
    add_counts,
    augment_seed,
    build_peer,
    evaluate,
    forward,
    make_batch,
    peer_step,
    steps_per_epoch,
    test_probabilities,
)
from cmd_ray.summary import epoch_record, progress_line, summarise


def load_run_data(cfg: Config) -> DataBundle:
    """The noisy train split and clean test split a config asks for (cached as Parquet)."""
    spec = NoiseSpec(cfg.noise.type, cfg.noise.rate, cfg.noise.matrix)
    return load_data(cfg.data.name, cfg.data.root, spec, cfg.seed, cfg.data.train_subset, cfg.data.test_subset)


def resolve_device(cfg: Config) -> torch.device:
    return torch.device("cuda") if cfg.use_gpu else torch.device("cpu")


StepHook = Callable[[int, int, list[dict[str, float]]], None]


def train_epoch(
    cfg: Config,
    peers: list[Peer],
    data: DataBundle,
    epoch: int,
    on_step: Optional[StepHook] = None,
) -> tuple[list[dict[str, float]], float, float]:
    """One epoch of all peers; returns (summed counts per peer, train seconds, exchange seconds).

    `on_step(epoch, step, per-peer counts)` sees every step (tests compare it with the Ray path).
    """
    per_epoch = steps_per_epoch(cfg, data)
    total_steps = per_epoch * cfg.epochs
    counts: list[dict[str, float]] = [{} for _ in peers]
    exchange_seconds = 0.0
    start = time.perf_counter()
    device = peers[0].device
    for step, positions in enumerate(epoch_batches(len(data.train), cfg.batch_size, cfg.seed, epoch)):
        batch = make_batch(data.train, positions, data.info, device, augment_seed(cfg, epoch, step))
        logits = [forward(peer, batch.images) for peer in peers]
        t0 = time.perf_counter()
        peer_logits = torch.stack([z.detach() for z in logits])  # the in-process "exchange"
        exchange_seconds += time.perf_counter() - t0
        when = StepSchedule(epoch * per_epoch + step, total_steps, per_epoch)
        step_counts = [peer_step(cfg, peer, z, peer_logits, batch, when) for peer, z in zip(peers, logits)]
        for total, c in zip(counts, step_counts):
            add_counts(total, c)
        if on_step is not None:
            on_step(epoch, step, step_counts)
    return counts, time.perf_counter() - start, exchange_seconds


def train_in_process(
    cfg: Config,
    data: Optional[DataBundle] = None,
    log: Callable[[str], None] = print,
    on_step: Optional[StepHook] = None,
) -> dict[str, Any]:
    """Train P peers in this process; return the run summary (see `cmd_ray.summary.summarise`)."""
    started = time.perf_counter()
    torch.manual_seed(cfg.seed)
    data = data if data is not None else load_run_data(cfg)
    device = resolve_device(cfg)
    total_steps = steps_per_epoch(cfg, data) * cfg.epochs
    peers = [build_peer(cfg, k, data.info, total_steps, device) for k in range(cfg.peers)]
    log(
        f"[cmd-ray] in-process: {cfg.method} with {cfg.peers} peers on {cfg.data.name}, "
        f"{len(data.train)} train / {len(data.test)} test, noise {cfg.noise.type} {cfg.noise.rate:g} "
        f"(realised {data.noise['subset_realised_rate']:.3f}), {cfg.epochs} epochs, device {device}"
    )
    history = []
    for epoch in range(cfg.epochs):
        counts, train_seconds, exchange_seconds = train_epoch(cfg, peers, data, epoch, on_step)
        accuracy = evaluate([test_probabilities(p, data.test, data.info) for p in peers], data.test)
        record = epoch_record(epoch, counts, accuracy, train_seconds, exchange_seconds)
        record.update(train_samples=len(data.train), test_samples=len(data.test))
        history.append(record)
        log(progress_line(record, cfg.peers, cfg.epochs))
    return summarise(cfg, history, data.noise, {"path": "in-process", "wall_seconds": time.perf_counter() - started})
