"""Benchmarks that print figures (never timed tests).

- `throughput`: the same P peers, model, batch size and data, stepped as Ray Train workers
  and in one process, side by side in one run: steady-state training samples/s of each,
  their ratio, the exchange's share of step time (transfer timed apart from waiting on
  the slower peer), and the time from start to the first step. Optionally P = 2, 3, 4.
- `sweep`: a grid as plain in-process runs (a pool, what a user would script) and as
  `cmd-ray sweep` with each trial placement, one after the other: wall times, their ratios,
  and where a sweep's and a trial's time goes (from each trial's timeline.json and a Tune
  callback on the driver), and the CPU time each kind of process used (trials, driver, Ray's
  daemons, W&B) from /proc.
- `load` (`cmd_ray.tools.load`): a sweep of 16+ Tune-over-Train trials on this machine, with
  the resident memory of its processes sampled from /proc.
- `accuracy`: methods x noise settings x seeds through `cmd-ray sweep` (the product's path),
  resumable, its results.parquet kept where the docs read it, for `cmd-ray report`.
- `import`: a generated folder of N PNG images imported into the Parquet cache (decoding,
  resizing, the content hash), then read back: images per second of each.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, Optional

from cmd_ray.config import Config, from_dict
from cmd_ray.grid import check_grid, trial_config
from cmd_ray.presets import set_path
from cmd_ray.storage import join, write_parquet_atomic


def _steady(history: list[dict[str, Any]], key: str) -> float:
    rows = history[1:] if len(history) > 1 else history
    return sum(r[key] for r in rows) / len(rows)


def throughput(cfg: Config, peer_counts: list[int], log: Callable[[str], None] = print) -> list[dict[str, Any]]:
    """Ray workers vs in-process for each P in `peer_counts`; returns one row per P."""
    import torch

    from cmd_ray.ray_train import train_on_ray
    from cmd_ray.trainer import load_run_data, train_in_process

    rows = []
    for peers in peer_counts:
        c = trial_config(cfg.to_dict(), {"peers": peers, "testing.measure_wait": True})
        data = load_run_data(c)
        # Same cores: the in-process trainer uses all of this machine's threads, the Ray
        # workers one process each with an even share of them.
        local = train_in_process(c, data, log=lambda _: None)
        on_ray = train_on_ray(c, log=lambda _: None)
        row = {
            "peers": peers,
            "in_process_samples_per_s": _steady(local["history"], "samples_per_second"),
            "ray_samples_per_s": _steady(on_ray["history"], "samples_per_second"),
            "ray_exchange_share": _steady(on_ray["history"], "exchange_fraction"),
            "ray_wait_share": _steady(on_ray["history"], "wait_fraction"),
            "in_process_startup_s": local["history"][0]["startup_seconds"],
            "ray_startup_s": on_ray["history"][0]["startup_seconds"],
        }
        row["ratio_ray_over_in_process"] = row["ray_samples_per_s"] / row["in_process_samples_per_s"]
        rows.append(row)
        log(
            f"P={peers}: in-process {row['in_process_samples_per_s']:.0f} samples/s, "
            f"Ray {row['ray_samples_per_s']:.0f} samples/s, ratio {row['ratio_ray_over_in_process']:.3f}; "
            f"exchange {100 * row['ray_exchange_share']:.2f}% of step time "
            f"(+{100 * row['ray_wait_share']:.2f}% waiting on the slower peer); "
            f"start-up to first step: in-process {row['in_process_startup_s']:.1f} s, "
            f"Ray {row['ray_startup_s']:.1f} s; "
            f"{torch.get_num_threads()} threads in-process"
        )
    return rows


def accuracy(
    cfg: Config, folder: Path, resume: bool = False, log: Callable[[str], None] = print, resume_command: str = ""
) -> Path:
    """Run the grid through `cmd-ray sweep` (Ray Tune, the product's path) and copy its
    results.parquet into `folder`, where the table and plots are kept; return the copy.

    The sweep itself lives in `<sweep.storage_path>/<sweep.name>` (checkpoints, W&B runs);
    `resume` continues it after an interruption, keeping the trials that had finished.
    """
    from cmd_ray.storage import read_parquet
    from cmd_ray.sweep import run_sweep

    swept = run_sweep(cfg, resume=resume, log=log, **({"resume_command": resume_command} if resume_command else {}))
    folder.mkdir(parents=True, exist_ok=True)
    return Path(write_parquet_atomic(folder / "results.parquet", read_parquet(join(swept, "results.parquet"))))


# --------------------------------------------------------------------------------------
# Sweep: where a trial's wall time goes, each placement beside plain in-process runs


def _in_process_point(base: dict[str, Any], point: dict[str, Any], threads: int) -> dict[str, float]:
    """Train one grid point in this (pool) process with `threads` torch threads: its whole
    seconds, and the seconds of its training steps and its evaluation (the phases a sweep's
    trial reports too, so the two are compared phase by phase)."""
    import torch

    from cmd_ray.trainer import train_in_process

    torch.set_num_threads(threads)
    history: list[dict[str, Any]] = []

    def keep_history(_done: int, _peers: list, so_far: list[dict[str, Any]]) -> None:
        history[:] = so_far

    started = time.perf_counter()
    train_in_process(trial_config(base, point), log=lambda _: None, on_epoch=keep_history)
    return {
        "seconds": time.perf_counter() - started,
        "training steps": sum(r["train_seconds"] for r in history),
        "evaluation (test set each epoch)": sum(r["eval_seconds"] for r in history),
    }


def _in_process_pool(cfg: Config, points: list[dict[str, Any]], jobs: int) -> tuple[float, dict[str, float]]:
    """Wall seconds of the grid as in-process runs, `jobs` at a time (what a user would script),
    and the mean of each run's figures (see `_in_process_point`)."""
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor

    from cmd_ray.trainer import load_run_data

    base = cfg.to_dict()
    for point in points:  # the data caches exist before the clock starts, as for the sweeps
        load_run_data(trial_config(base, point))
    threads = max(1, (os.cpu_count() or 1) // jobs)
    started = time.perf_counter()
    with ProcessPoolExecutor(jobs, mp_context=multiprocessing.get_context("spawn")) as pool:
        runs = list(pool.map(_in_process_point, [base] * len(points), points, [threads] * len(points)))
    wall = time.perf_counter() - started
    return wall, {name: sum(run[name] for run in runs) / len(runs) for name in runs[0]}


def _trial_clock():
    """A Tune callback recording, on the driver, when each trial started and completed."""
    from ray import tune

    class TrialClock(tune.Callback):
        def __init__(self):
            self.tune_started = 0.0
            self.started: dict[str, float] = {}
            self.completed: dict[str, float] = {}

        def setup(self, **info):
            self.tune_started = time.time()

        def on_trial_start(self, iteration, trials, trial, **info):
            self.started.setdefault(trial.trial_id, time.time())

        def on_trial_complete(self, iteration, trials, trial, **info):
            self.completed[trial.trial_id] = time.time()

    return TrialClock()


# Phases of a trial, from the driver's Tune callback and the trial's timeline.json: (name,
# start mark, end mark); "sum:<key>" sums a per-epoch record key instead.
TRIAL_PHASES = {
    "trial": (
        ("Tune: trial's actor ready -> trial function runs", "scheduled", "trial_start"),
        ("imports in the trial", "trial_start", "imported"),
        ("data from the Parquet cache", "imported", "data_loaded"),
        ("peers built -> first step", "data_loaded", "first_step"),
        ("training steps", "sum:train_seconds", None),
        ("evaluation (test set each epoch)", "sum:eval_seconds", None),
        ("checkpoint + report to Tune", "report_seconds", None),
        ("trial returns -> Tune marks it complete (W&B run closed)", "trial_end", "completed"),
    ),
    "workers": (
        ("Tune: trial's actor ready -> trial function runs", "scheduled", "trial_start"),
        ("imports in the trial", "trial_start", "imported"),
        ("data from the Parquet cache", "imported", "data_loaded"),
        ("TorchTrainer built, data into the object store", "data_loaded", "fit_start"),
        ("Train controller + placement group + worker group + process group", "fit_start", "worker_loop_start"),
        ("worker: data from the object store", "worker_loop_start", "worker_data_received"),
        ("worker: peer groups (placements gathered)", "worker_data_received", "worker_groups_ready"),
        ("worker: peer built -> first step", "worker_groups_ready", "worker_first_step"),
        ("training steps", "sum:train_seconds", None),
        ("evaluation (test set each epoch)", "sum:eval_seconds", None),
        ("checkpoint + report (Train -> Tune)", "worker_report_seconds", None),
        ("worker loop ends -> fit() returns (Train teardown)", "worker_loop_end", "fit_end"),
        ("trial returns -> Tune marks it complete (W&B run closed)", "trial_end", "completed"),
    ),
}


def trial_breakdown(marks: dict[str, float], history: list[dict[str, Any]], placement: str) -> dict[str, float]:
    """Seconds of each phase of one trial (see TRIAL_PHASES), plus its whole span and what the
    phases leave unexplained; a phase whose marks are missing is left out."""
    out: dict[str, float] = {}
    for name, start, end in TRIAL_PHASES[placement]:
        if start.startswith("sum:"):
            out[name] = sum(r.get(start[4:], 0.0) for r in history)
        elif end is None:
            if start in marks:
                out[name] = marks[start]
        elif start in marks and end in marks:
            out[name] = marks[end] - marks[start]
    if "scheduled" in marks and "completed" in marks:
        explained = sum(out.values())
        out["whole trial (actor ready -> complete)"] = marks["completed"] - marks["scheduled"]
        out["unexplained (between the phases above)"] = out["whole trial (actor ready -> complete)"] - explained
    return out


def _sweep_breakdown(folder: str, clock, placement: str) -> dict[str, float]:
    """Mean seconds of each phase over a finished sweep's trials."""
    from cmd_ray.results import read_results
    from cmd_ray.storage import read_bytes
    from cmd_ray.sweep import TIMELINE_FILE

    rows = read_results(folder)
    per_trial = []
    for trial_id in sorted({r["trial_id"] for r in rows}):
        marks = json.loads(read_bytes(join(folder, "trials", trial_id, TIMELINE_FILE)))
        marks.update(scheduled=clock.started.get(trial_id), completed=clock.completed.get(trial_id))
        marks = {k: v for k, v in marks.items() if v is not None}
        history = [r for r in rows if r["trial_id"] == trial_id]
        per_trial.append(trial_breakdown(marks, history, placement))
    names = list(dict.fromkeys(name for trial in per_trial for name in trial))
    return {name: sum(t.get(name, 0.0) for t in per_trial) / len(per_trial) for name in names}


def _sweep_phases(started: float, finished: float, clock, folder: str) -> dict[str, float]:
    """Where a whole sweep's wall time goes outside its trials (seconds)."""
    from cmd_ray.storage import read_bytes
    from cmd_ray.sweep import TIMELINE_FILE

    trial_starts = [
        json.loads(read_bytes(join(folder, "trials", trial_id, TIMELINE_FILE)))["trial_start"]
        for trial_id in clock.completed
    ]
    return {
        "before Tune: Ray start, data caches, W&B set-up": clock.tune_started - started,
        "Tune start -> first trial function runs (trial processes start)": min(trial_starts) - clock.tune_started,
        "first trial runs -> last trial complete": max(clock.completed.values()) - min(trial_starts),
        "after the last trial: results table": finished - max(clock.completed.values()),
    }


SWEEP_RUNS = (  # (label, placement, W&B mode or None for the config's)
    ("placement trial", "trial", None),
    ("placement trial, W&B disabled", "trial", "disabled"),
    ("placement workers", "workers", None),
)


def sweep_run_config(cfg: Config, placement: str, mode: Optional[str], stamp: str) -> Config:
    """The sweep `cmd-ray bench sweep` times for one placement (and W&B mode): `cfg`, grid and all,
    under a sweep name of its own."""
    values = set_path(cfg.to_dict(), "sweep.placement", placement)
    values = set_path(values, "sweep.name", f"{cfg.sweep.name}-{placement}-{mode or 'wandb'}-{stamp}")
    if mode is not None:
        values = set_path(values, "sweep.wandb.mode", mode)
    return from_dict(values)


def _timed_sweep(cfg: Config, placement: str, log: Callable[[str], None]) -> dict[str, Any]:
    """Run the sweep `cfg` (made by `sweep_run_config`) with the clocks on: its wall time, where
    its time went outside its trials, the mean breakdown of a trial's time and the CPU seconds
    its processes used by kind."""
    import ray

    from cmd_ray.sweep import run_sweep
    from cmd_ray.tools.load import CpuSampler

    clock = _trial_clock()
    cpu = CpuSampler()
    cpu.start()
    started = time.time()
    folder = run_sweep(cfg, log=log, callbacks=[clock])
    finished = time.time()
    cpu_seconds = cpu.stop()  # before Ray's shutdown ends its processes
    ray.shutdown()
    return {
        "placement": placement,
        "wall_seconds": finished - started,
        "folder": folder,
        "sweep_seconds": _sweep_phases(started, finished, clock, folder),
        "mean_trial_seconds": _sweep_breakdown(folder, clock, placement),
        "cpu_seconds_by_process_kind": cpu_seconds,
    }


def _log_timed_sweep(label: str, timed: dict[str, Any], trials: int, log: Callable[[str], None]) -> None:
    """Print one timed sweep's figures (see `_timed_sweep`): wall time and ratio, the sweep's and a
    trial's phases, CPU seconds by kind of process."""
    wall = timed["wall_seconds"]
    log(f"[bench sweep] cmd-ray sweep, {label}: {wall:.0f} s, {timed['ratio_to_in_process']:.2f}x the in-process runs")
    for name, seconds in timed["sweep_seconds"].items():
        log(f"    {seconds:7.1f} s  {name}")
    log(f"  a trial's time (mean of {trials}):")
    for name, seconds in timed["mean_trial_seconds"].items():
        log(f"    {seconds:7.1f} s  {name}")
    cores = os.cpu_count() or 1
    log(f"  CPU time of the sweep's processes ({cores} cores x {wall:.0f} s = {cores * wall:.0f} CPU-s):")
    for kind, seconds in timed["cpu_seconds_by_process_kind"].items():
        log(f"    {seconds:7.1f} s  {kind} ({100 * seconds / wall:.1f}% of a core)")


def sweep_overhead(
    cfg: Config,
    jobs: int = 2,
    runs: tuple[str, ...] = tuple(r[0] for r in SWEEP_RUNS),
    log: Callable[[str], None] = print,
) -> dict[str, Any]:
    """The grid of `cfg` several ways, one after the other on the same machine: as in-process runs
    `jobs` at a time, then `cmd-ray sweep` with placement trial (with the config's W&B mode and
    with W&B disabled) and with placement workers. Logs and returns each one's wall time, its
    ratio to the in-process runs, where the sweep's time went outside its trials, the mean
    breakdown of a trial's time, and the CPU seconds its processes used by kind. `runs`: which
    of SWEEP_RUNS' labels to run (all by default)."""
    from cmd_ray.sweep import wandb_mode

    points = check_grid(cfg)
    stamp = time.strftime("%Y%m%d-%H%M%S")
    log(f"[bench sweep] {len(points)} grid points as in-process runs, {jobs} at a time ...")
    pool, per_run = _in_process_pool(cfg, points, jobs)
    figures: dict[str, Any] = {
        "trials": len(points),
        "jobs": jobs,
        "in_process_seconds": pool,
        "mean_in_process_run_seconds": per_run,
        "sweeps": {},
    }
    log(f"[bench sweep] in-process: {pool:.0f} s; a run's time (mean of {len(points)}):")
    for name, seconds in per_run.items():
        log(f"    {seconds:7.1f} s  {'whole run' if name == 'seconds' else name}")
    for _, placement, mode in (r for r in SWEEP_RUNS if r[0] in runs):
        c = sweep_run_config(cfg, placement, mode, stamp)
        label = f"placement {placement} (W&B {wandb_mode(c)})"  # the mode it runs with, whatever was asked
        label += ", again" if label in figures["sweeps"] else ""  # e.g. WANDB_MODE set for both
        timed = _timed_sweep(c, placement, log)
        timed["ratio_to_in_process"] = timed["wall_seconds"] / pool
        figures["sweeps"][label] = timed
        _log_timed_sweep(label, timed, len(points), log)
    return figures


def import_speed(folder: Path, images: int, size: int, colour: bool, log: Callable[[str], None] = print) -> dict:
    """Write `images` random PNGs (10 classes) under `folder/images`, import them into a fresh
    cache under `folder/cache`, read the cache back; log and return the seconds of each."""
    import numpy as np
    from PIL import Image

    from cmd_ray.data import load_data
    from cmd_ray.noise import NoiseSpec
    from cmd_ray.user_data import UserSource

    rng = np.random.default_rng(0)
    shape = (size, size, 3) if colour else (size, size)
    started = time.perf_counter()
    for i in range(images):
        class_dir = folder / "images" / f"class{i % 10}"
        class_dir.mkdir(parents=True, exist_ok=True)
        Image.fromarray(rng.integers(0, 256, shape, dtype=np.uint8)).save(class_dir / f"{i:06d}.png")
    written = time.perf_counter() - started
    source = UserSource("image_folder", str(folder / "images"))
    args = ("image_folder", folder / "cache", NoiseSpec("symmetric", 0.4), 0)
    started = time.perf_counter()
    load_data(*args, validation_fraction=0.1, source=source)
    imported = time.perf_counter() - started
    started = time.perf_counter()
    load_data(*args, validation_fraction=0.1, source=source)
    cached = time.perf_counter() - started
    kind = f"{size}x{size} {'RGB' if colour else 'grey'}"
    log(
        f"[import] {images} {kind} PNGs (written in {written:.1f} s): first import {imported:.1f} s "
        f"({images / imported:.0f} images/s); later runs read the cache in {cached:.2f} s"
    )
    return {"images": images, "size": size, "colour": colour, "import_seconds": imported, "cached_seconds": cached}
