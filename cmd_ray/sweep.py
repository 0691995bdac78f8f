"""Ray Tune sweeps: a grid over the run config, each trial one Ray Train run of P peers.

Layout of a sweep, `<sweep.storage_path>/<sweep.name>/` (a local folder or an object-storage
prefix such as s3://bucket/sweeps/<name>):
  tune/      Ray Tune's experiment state (what `--resume` restores)
  train/     each trial's Ray Train run (checkpoints), named by trial id
  wandb/     W&B runs (offline runs sync later with `wandb sync`); for a sweep on object
             storage they stay on the driver's disk, under ~/.cache/cmd-ray/wandb/<name>/
  results.parquet  one row per trial and epoch: config columns and metrics
  plots/     PNGs written by `cmd-ray report`

Resources: each trial holds one unit of the custom resource TRAIN_DRIVER (not a CPU), so
a trial's own slot never starves its Train workers of the CPUs/GPUs they reserve; the
number of concurrent trials is what the cluster's CPUs (or GPUs) hold.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Optional

import pyarrow as pa

from cmd_ray.config import Config, ConfigError
from cmd_ray.console import console
from cmd_ray.errors import SweepStopped
from cmd_ray.grid import VARIANT, check_grid, grid_point, trial_config, variant_label
from cmd_ray.identity import check_same_run, save_run_settings
from cmd_ray.metrics import is_metric
from cmd_ray.presets import set_path, with_absolute_paths
from cmd_ray.ray_internals import prefer_quiet_tune_console, quiet_checkpoint_logger
from cmd_ray.results import rows_table, trial_rows
from cmd_ray.stopping import StopSignals, stopped_message
from cmd_ray.storage import (
    StorageError,
    absolute,
    exists,
    is_uri,
    join,
    store_of,
    write_json_atomic,
    write_parquet_atomic,
)

DRIVER_RESOURCE = "TRAIN_DRIVER"
TIMELINE_FILE = "timeline.json"  # in each trial's folder: when it reached each phase


def sweep_dir(cfg: Config) -> str:
    """The sweep's folder or object-storage prefix: `<sweep.storage_path>/<sweep.name>`."""
    folder = join(cfg.sweep.storage_path, cfg.sweep.name)
    return absolute(folder)


def wandb_dir(cfg: Config, folder: str) -> Path:
    """Where W&B writes its runs: inside a local sweep folder, else on the driver's disk."""
    if is_uri(folder):
        return Path("~/.cache/cmd-ray/wandb").expanduser() / cfg.sweep.name
    return Path(folder) / "wandb"


# --------------------------------------------------------------------------------------
# W&B


def wandb_mode(cfg: Config) -> str:
    """online | offline | disabled. auto: online only when a key is configured (env or `wandb login`)."""
    if os.environ.get("WANDB_MODE") in ("online", "offline", "disabled"):
        return os.environ["WANDB_MODE"]
    if cfg.sweep.wandb.mode != "auto":
        return cfg.sweep.wandb.mode
    if os.environ.get("WANDB_API_KEY"):
        return "online"
    netrc = Path(os.environ.get("NETRC", "~/.netrc")).expanduser()
    try:
        if "api.wandb.ai" in netrc.read_text():
            return "online"
    except OSError:
        pass
    return "offline"


@contextmanager
def wandb_environment(cfg: Config, folder: Path) -> Iterator[Optional[Any]]:
    """Set the W&B environment (before ray.init, so every local Ray process inherits it) and yield
    the Tune callback, or None when disabled; on leaving, put back the W&B variables as they were,
    so that a second sweep in the same process (a notebook, a script, `cmd-ray bench sweep`) runs
    with its own mode, not the first's (`wandb_mode` lets the environment outrank the config). The
    key itself is never passed as configuration: Ray would store it in plain text in the
    experiment state (tuner.pkl)."""
    from cmd_ray.wandb_runs import SETTINGS

    saved = {name: os.environ.get(name) for name in SETTINGS}
    try:
        yield _set_wandb_environment(cfg, folder)
    finally:
        for name, value in saved.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value


def _set_wandb_environment(cfg: Config, folder: Path) -> Optional[Any]:
    mode = wandb_mode(cfg)
    if mode == "disabled":
        return None
    from cmd_ray.wandb_runs import SweepWandbCallback

    folder.mkdir(parents=True, exist_ok=True)
    os.environ["WANDB_MODE"] = mode
    os.environ["WANDB_DIR"] = str(folder)
    os.environ.setdefault("WANDB_SILENT", "true")
    # A W&B service that cannot be reached must not hold a trial: give up on init quickly.
    os.environ.setdefault("WANDB_INIT_TIMEOUT", "60")
    return SweepWandbCallback(cfg.sweep.wandb.project, cfg.sweep.name, cfg.sweep.wandb.entity, cfg.joins_cluster())


# --------------------------------------------------------------------------------------
# Trials


def run_trial(params: dict[str, Any]) -> None:
    """Tune function trainable: one grid point, its peers placed as `sweep.placement` says.

    params: "point" (the grid point: dotted keys -> values, as `cmd_ray.grid` expanded it),
    "base" (the sweep's config as nested dicts) and "folder" (the sweep folder). Either way the
    trial reports one record per epoch and checkpoints so that a restored sweep resumes it;
    `<folder>/trials/<trial id>/timeline.json` records when it reached each phase (read by `cmd-ray bench sweep`).
    """
    timeline = {"trial_start": time.time()}
    from ray import tune

    from cmd_ray.trainer import load_run_data

    base, folder = params["base"], params["folder"]
    trial_id = tune.get_context().get_trial_id()
    point = grid_point(params)
    cfg = trial_config(set_path(base, "output_dir", join(folder, "trials", trial_id)), point)
    label = " ".join(variant_label(point) if k == VARIANT else f"{k}={v}" for k, v in point.items())
    timeline["imported"] = time.time()
    data = load_run_data(cfg)  # the cache the sweep driver built (under data.root)
    timeline["data_loaded"] = time.time()
    try:
        if cfg.placement == "trial":
            _train_in_trial(cfg, data, label, timeline)
        else:
            _train_on_workers(cfg, data, label, trial_id, join(folder, "train"), timeline)
    finally:
        timeline["trial_end"] = time.time()
        write_json_atomic(join(cfg.output_dir, TIMELINE_FILE), timeline)


def _train_on_workers(cfg: Config, data, label: str, trial_id: str, train: str, timeline: dict[str, float]) -> None:
    """Placement `workers`: one Ray Train run, each peer its own worker. The Train run is named
    by the trial id, which survives a sweep restore: a restored trial resumes its Train run from
    the latest checkpoint."""
    from ray.tune.integration.ray_train import TuneReportCallback

    from cmd_ray.ray_train import TIMELINE_FILE as WORKER_TIMELINE
    from cmd_ray.ray_train import build_trainer, fit
    from cmd_ray.storage import read_bytes

    trainer = build_trainer(cfg, trial_id, train, data, [TuneReportCallback()], label)
    timeline["fit_start"] = time.time()
    try:
        fit(trainer, join(train, trial_id))
    finally:
        timeline["fit_end"] = time.time()
        workers = join(train, trial_id, WORKER_TIMELINE)
        if exists(workers):
            timeline.update({f"worker_{k}": v for k, v in json.loads(read_bytes(workers)).items()})


def _train_in_trial(cfg: Config, data, label: str, timeline: dict[str, float]) -> None:
    """Placement `trial`: every peer in this Tune trial process, stepped by the in-process
    trainer (the same peer step as Ray workers run).

    The trial keeps its own checkpoint in its folder (local or object storage), in the format of
    Ray Train's, behind a pointer (`cmd_ray.trainer.write_latest_checkpoint`), and resumes from
    it whenever the trial starts again; history.json beside it holds every epoch's record so
    far (the name Train checkpoints use). A restored sweep whose driver
    died resumes from the last epoch written, not the last one Tune's own experiment state
    happened to record. Tune gets the metrics only.
    """
    import torch
    from ray import tune

    from cmd_ray.storage import write_bytes
    from cmd_ray.trainer import HISTORY_FILE, read_latest_checkpoint, train_in_process, write_latest_checkpoint

    quiet_checkpoint_logger()  # Ray's INFO line per saved checkpoint is noise on a sweep's console
    if not cfg.use_gpu:  # the CPUs Tune reserved for this trial, and no more
        torch.set_num_threads(max(1, int(cfg.sweep.cpus_per_trial)))

    resumed_at = 0  # the epoch of the checkpoint this start read: the latest already

    def resume(peers) -> tuple[int, list[dict[str, Any]]]:
        nonlocal resumed_at
        done, history = read_latest_checkpoint(cfg.output_dir, peers)
        if not done:
            return 0, []
        console(f"[cmd-ray] {label}: resumed from the checkpoint after epoch {done}")
        resumed_at = done
        return done, history

    def report(done: int, peers, history: list[dict[str, Any]]) -> None:
        timeline.setdefault("first_epoch_end", time.time())
        reporting = time.perf_counter()
        if (done % cfg.ray.checkpoint_every == 0 or done == cfg.epochs) and done != resumed_at:
            write_latest_checkpoint(cfg.output_dir, peers, done, history)
        write_bytes(join(cfg.output_dir, HISTORY_FILE), json.dumps(history).encode())
        tune.report(history[-1])
        timeline["report_seconds"] = timeline.get("report_seconds", 0.0) + time.perf_counter() - reporting

    timeline["fit_start"] = time.time()
    summary = train_in_process(
        cfg, data, log=console, resume=resume, on_epoch=report, label=label, started_at=timeline["trial_start"]
    )
    timeline["fit_end"] = time.time()
    first = summary["history"][0]
    if "startup_seconds" in first:  # absent when the trial resumed after its first epoch
        timeline["first_step"] = timeline["trial_start"] + first["startup_seconds"]


def _trial_history(result, folder: str) -> list[dict[str, Any]]:
    """A trial's per-epoch records: from its last Train checkpoint (complete across restores),
    else from the rows Tune saw."""
    from cmd_ray.ray_train import read_history
    from cmd_ray.trainer import HISTORY_FILE

    own = join(folder, "trials", _trial_id(result))
    if exists(join(own, HISTORY_FILE)):  # placement trial
        return read_history(own)
    path = (result.metrics or {}).get("checkpoint_path")
    if path:  # Ray reports the path on the store's own file system (an object's without its scheme)
        path = store_of(folder).uri(path)
    if path and exists(join(path, HISTORY_FILE)):
        return read_history(path)
    frame = result.metrics_dataframe
    if frame is None or "epoch" not in frame:
        return []
    rows = frame.drop_duplicates("epoch", keep="last").sort_values("epoch").to_dict("records")
    return [{k: v for k, v in row.items() if is_metric(k) or k in ("epoch", "samples_per_second")} for row in rows]


def _trial_id(result) -> str:
    """Tune's id of a result's trial (its folder under `trials/` and its Train run's name)."""
    trial_id = (result.metrics or {}).get("trial_id")
    if trial_id:
        return trial_id
    # A trial that failed before its first report: Tune's folder name is
    # run_trial_<experiment id>_<number>_<index>_<parameters>_<date>.
    return "_".join(Path(str(result.path)).name.split("_")[2:4])


def trial_status(error: Any, history: list[dict[str, Any]], epochs: int) -> str:
    """failed (an error), finished (every epoch recorded), else interrupted (stopped, or never
    started): a trial is never `finished` without the metrics of its last epoch."""
    if error is not None:
        return "failed"
    return "finished" if len(history) >= epochs else "interrupted"


def collect_results(grid) -> pa.Table:
    """One table from a Tune ResultGrid of `cmd_ray.sweep.run_trial` trials."""
    rows: list[dict[str, Any]] = []
    for result in grid:
        params = result.config
        if params is None:  # Tune holds no result of it: not started, or stopped before its first report
            continue  # no rows; `run_sweep` counts it among the trials that did not finish
        trial_id = _trial_id(result)
        error = "" if result.error is None else str(result.error).strip().splitlines()[-1][:500]
        history = _trial_history(result, params["folder"])
        epochs = trial_config(params["base"], grid_point(params)).epochs
        status = trial_status(result.error, history, epochs)
        rows += trial_rows(trial_id, grid_point(params), params["base"], history, status, error)
    return rows_table(rows)


def concurrency(cfg: Config, total: dict[str, float]) -> int:
    """Trials that fit at once: limited by the trials' (or their workers') CPUs or GPUs and by
    sweep.max_concurrent_trials."""
    from cmd_ray.cluster import cpus_per_worker

    workers = cfg.workers
    if cfg.placement == "trial":
        per_trial = trial_resources(cfg, total)
        fit = min(total.get(kind, 0) // amount for kind, amount in per_trial.items())
    elif cfg.use_gpu:
        fit = total.get("GPU", 0) // (workers * cfg.ray.gpus_per_worker)
    else:
        fit = total.get("CPU", 0) // max(workers * cpus_per_worker(cfg), 1e-9)
    fit = max(1, int(fit))
    return min(fit, cfg.sweep.max_concurrent_trials) if cfg.sweep.max_concurrent_trials else fit


def prepare_data(cfg: Config, points: list[dict[str, Any]]) -> None:
    """Build and check every Parquet cache the grid needs on the driver, so bad data (or images
    no peer can take) fail before Tune starts."""
    from cmd_ray.trainer import load_run_data

    base = cfg.to_dict()
    seen = set()
    for point in points:
        c = trial_config(base, point)
        key = repr((c.data, c.noise, c.seed, c.peer_models()))
        if key not in seen:
            seen.add(key)
            load_run_data(c)


def init_ray_for_sweep(cfg: Config, slots: int) -> None:
    """Local: start Ray with `slots` TRAIN_DRIVER units, and its dashboard only for placement
    workers (Ray Train asks the State API; a trial that holds its peers runs no Ray Train).
    Cluster: join it (its head advertises the slots)."""
    import ray

    from cmd_ray.cluster import init_ray

    if ray.is_initialized():
        return
    init_ray(cfg, extra_resources={DRIVER_RESOURCE: slots}, dashboard=cfg.placement == "workers")


def trial_resources(cfg: Config, total: dict[str, float]) -> dict[str, float]:
    """What one trial process reserves. Placement trial: the CPUs (and GPU share) its peers train
    on. Placement workers: a TRAIN_DRIVER unit, its Train workers reserving their own CPUs/GPUs."""
    if cfg.placement == "trial":
        resources = {"CPU": cfg.sweep.cpus_per_trial}
        if cfg.use_gpu:
            resources["GPU"] = cfg.sweep.gpus_per_trial
        return resources
    if total.get(DRIVER_RESOURCE, 0) > 0:
        return {DRIVER_RESOURCE: 1}
    # A cluster without the custom resource: a sliver of CPU keeps the trial schedulable.
    return {"CPU": 0.01}


def build_tuner(cfg: Config, folder: str, resume: bool, callbacks: list[Any], points: list[dict[str, Any]]):
    """A new Tuner over the grid's `points` (expanded and checked by `cmd_ray.grid.check_grid`;
    Tune runs them as given, expanding nothing), or (resume) the one saved in `<folder>/tune`."""
    import ray

    prefer_quiet_tune_console()
    from ray import tune

    total = ray.cluster_resources()
    trainable = tune.with_resources(run_trial, trial_resources(cfg, total))
    experiment = join(folder, "tune")
    if resume:
        return tune.Tuner.restore(experiment, trainable, resume_unfinished=True, resume_errored=False)
    param_space = {"point": tune.grid_search(points), "base": cfg.to_dict(), "folder": folder}
    return tune.Tuner(
        trainable,
        param_space=param_space,
        # Placement trial: a finished trial's process (torch imported, threads set) takes the next.
        tune_config=tune.TuneConfig(
            max_concurrent_trials=concurrency(cfg, total), reuse_actors=cfg.placement == "trial"
        ),
        run_config=tune.RunConfig(
            name="tune",
            **store_of(folder).for_ray(folder),
            callbacks=callbacks,
            failure_config=tune.FailureConfig(max_failures=0),
            verbose=0,
        ),
    )


def check_resume(cfg: Config, folder: str, resume: bool) -> None:
    """--resume needs a saved sweep; a new sweep must not overwrite one."""
    from ray.tune import Tuner

    saved = Tuner.can_restore(join(folder, "tune"))
    if resume and not saved:
        raise ConfigError(f"--resume: no sweep to resume at {join(folder, 'tune')}; run without --resume to start it")
    if not resume and saved:
        raise ConfigError(
            f"sweep.name: a sweep named {cfg.sweep.name!r} already exists at {folder}; "
            "pass --resume to continue it, or choose another sweep.name"
        )


def run_sweep(
    cfg: Config,
    resume: bool = False,
    log: Callable[[str], None] = console,
    callbacks: Optional[list[Any]] = None,
    resume_command: str = "cmd-ray sweep ... --resume",
) -> str:
    """Run (or resume) the sweep's grid; write results.parquet; return the sweep folder (or URI).
    `callbacks`: more Tune callbacks (e.g. the benchmark's trial clock). Stopped by SIGINT or
    SIGTERM (or with a trial that did not finish), it writes the rows so far and raises
    SweepStopped, whose message names the trials that finished and `resume_command`."""
    cfg = with_absolute_paths(cfg)  # trials run in folders of their own
    points = check_grid(cfg)
    folder = sweep_dir(cfg)
    check_resume(cfg, folder, resume)
    known = resume and check_same_run(folder, cfg, "--resume", "another sweep.name", sweep=True)
    prepare_data(cfg, points)
    if not known:
        save_run_settings(folder, cfg, sweep=True)
    with wandb_environment(cfg, wandb_dir(cfg, folder)) as callback:  # set before Ray starts
        extra = ([callback] if callback else []) + list(callbacks or [])
        return _fit_grid(cfg, folder, points, resume, extra, log, resume_command)


def _fit_grid(
    cfg: Config,
    folder: str,
    points: list[dict[str, Any]],
    resume: bool,
    callbacks: list[Any],
    log: Callable[[str], None],
    resume_command: str,
) -> str:
    """Start (or join) Ray, fit the grid's trials, write results.parquet and report (`run_sweep`)."""
    init_ray_for_sweep(cfg, slots=len(points))
    import ray

    where = "all peers in each trial's process" if cfg.placement == "trial" else "each peer a Ray Train worker"
    log(
        f"[cmd-ray] sweep {cfg.sweep.name!r}: {len(points)} trials, up to "
        f"{concurrency(cfg, ray.cluster_resources())} at once, {where}; W&B {wandb_mode(cfg)}; folder {folder}"
    )
    started = time.perf_counter()
    tuner = build_tuner(cfg, folder, resume, callbacks, points)
    with StopSignals(resume_command) as stop:
        grid = tuner.fit()
    table = collect_results(grid)
    try:
        path = write_parquet_atomic(join(folder, "results.parquet"), table)
    except StorageError as err:  # every trial is in Tune's state and its checkpoints
        raise StorageError(
            err.errno, f"{err.strerror}; the trials are kept: --resume writes it without training"
        ) from None
    kept = table.select(["trial_id", "status"]).to_pylist() if table.num_rows else []
    status = {row["trial_id"]: row for row in kept}
    counts = {kind: sum(r["status"] == kind for r in status.values()) for kind in ("finished", "failed", "interrupted")}
    seconds = time.perf_counter() - started
    if stop.signal is not None or counts["interrupted"] or sum(counts.values()) < len(points):
        message = stopped_message(stop.signal, table, counts, len(points), seconds, path, resume_command)
        raise SweepStopped(message, stop.exit_status)
    log(
        f"[cmd-ray] sweep done in {seconds:.0f} s: {counts['finished']} trials finished, "
        f"{counts['failed']} failed; results {path}"
    )
    for result in grid:
        if result.error is not None:
            log(f"[cmd-ray] trial {_trial_id(result)} failed: {str(result.error).splitlines()[0]}")
    return folder
