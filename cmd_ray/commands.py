"""What each `cmd-ray` sub-command does once its arguments are parsed (`cmd_ray.cli`): train,
sweep, report, bench, prepare, show-config, methods; and the checks they share, made before any
work (a writable output folder, the noise files, overrides nothing reads). Nothing here imports
torch or Ray at module level: `cmd-ray --help` stays fast.
"""

from __future__ import annotations

import argparse
import os
import re
import sys
from pathlib import Path
from typing import Optional

from cmd_ray.config import Config, ConfigError
from cmd_ray.presets import load_config
from cmd_ray.storage import join, to_json

# A Ray Train run's folder name under ray.storage_path (one path segment, portable).
RUN_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*")


def _check_writable(field_name: str, folder: str) -> None:
    """Refuse a folder or object-storage prefix that cannot be written, before any work."""
    from cmd_ray.storage import check_writable

    try:
        check_writable(field_name, folder)
    except ValueError as err:
        raise ConfigError(str(err)) from None


def _check_output_dir(cfg: Config, in_process: bool = False) -> None:
    _check_writable("output_dir", cfg.output_dir)
    if cfg.ray.storage_path and not in_process:
        _check_writable("ray.storage_path", cfg.ray.storage_path)


def _compact(summary: dict) -> dict:
    """The summary without per-epoch history, config and noise matrices, for the console."""
    out = {k: v for k, v in summary.items() if k not in ("history", "config")}
    out["noise"] = {k: v for k, v in summary["noise"].items() if not k.endswith("matrix")}
    return out


def _load(args: argparse.Namespace) -> Config:
    """The validated config: the preset, its --set overrides, then the command's own flags."""
    flags = {"ray.address": args.address} if getattr(args, "address", None) else {}
    cfg = load_config(resolve_config_path(args.config), args.overrides, flags)
    check_noise_files(cfg)
    for line in unread_overrides(cfg, args.overrides):
        print(f"cmd-ray: note: {line}", file=sys.stderr)
    return cfg


def check_noise_files(cfg: Config) -> None:
    """The files the run's noise reads are there and fit, before any work (NoiseError)."""
    if cfg.noise.type in ("matrix", "labels"):  # only these read a file: NumPy stays unloaded otherwise
        from cmd_ray.noise import check_noise_files as check

        check(cfg)


def unread_overrides(cfg: Config, overrides: list[str]) -> list[str]:
    """What a --set gave that no run of the command reads (e.g. coteaching.forget_rate with
    method ce, labels.mixture_threshold under labels.trust small_loss): one note each, not an
    error, since a preset's sections serve its other methods; a sweep's note only when none of
    its trials reads it (a grid key no trial reads is refused: `cmd_ray.grid.check_grid`)."""
    runs = [cfg]
    if cfg.sweep.grid:
        from cmd_ray.grid import grid_points, trial_config  # NumPy (noise files): only for a grid

        base = cfg.to_dict()
        try:
            runs = [trial_config(base, point) for point in grid_points(cfg.sweep.grid)]
        except ConfigError:
            return []  # a point that does not validate: check_grid names it
    notes = []
    for override in overrides:
        key = override.split("=", 1)[0].strip()
        reasons = [run.unread(key) for run in runs]
        if all(reasons):
            who = "no trial of the grid reads it" if cfg.sweep.grid else "the run does not read it"
            notes.append(f"{key} is set, but {who} ({reasons[0]})")
    return notes


def cmd_train(args: argparse.Namespace) -> int:
    cfg = _load(args)
    if args.run_name is not None and (args.in_process or not RUN_NAME.fullmatch(args.run_name)):
        allowed = "only with the Ray path" if args.in_process else "letters, digits, '.', '_' and '-'"
        raise ConfigError(f"--run-name: got {args.run_name!r}; allowed: {allowed}")
    if cfg.use_gpu and (args.in_process or not cfg.joins_cluster()):
        import torch

        if not torch.cuda.is_available():
            raise ConfigError("use_gpu: got true, but this machine has no CUDA GPU; allowed here: false")
    from cmd_ray.trainer import check_models_fit_before_import

    check_models_fit_before_import(cfg)
    _check_output_dir(cfg, args.in_process)
    from cmd_ray.storage import write_json_atomic

    if args.in_process:
        from cmd_ray.trainer import train_in_process

        summary = train_in_process(cfg)
    else:
        from cmd_ray.ray_train import default_run_name, train_on_ray

        run_name = args.run_name or default_run_name(cfg)
        try:
            summary = train_on_ray(cfg, run_name=run_name)
        except Exception as err:
            if is_ray_failure(err):  # not a NaN stop: that would happen again at the same step
                print(f"cmd-ray: resume from the last checkpoint: the same command with --run-name {run_name}",
                      file=sys.stderr)  # fmt: skip
            raise
    # Printed before writing, so a full disk cannot take the figures with it.
    print(to_json(_compact(summary)))
    write_json_atomic(join(cfg.output_dir, "summary.json"), summary)
    if args.output_json:
        write_json_atomic(args.output_json, summary)
    return 0


def resolve_config_path(path: Optional[str]) -> Optional[str]:
    """A preset path as given, else relative to the project's launch/configs (for `ray submit`,
    which runs the script from the home folder on the head node)."""
    if not path or Path(path).expanduser().exists():
        return path
    project = Path(__file__).resolve().parents[1]
    for candidate in (project / path, project / "launch" / "configs" / Path(path).name):
        if candidate.is_file():
            return str(candidate)
    return path


# Written by `ray start` on a node where a cluster is up (the head, as `ray submit` uses it).
CURRENT_CLUSTER = Path("/tmp/ray/ray_current_cluster")


def head_node_args(args: list[str], current_cluster: Path = CURRENT_CLUSTER) -> list[str]:
    """launch/tune.py's arguments: `ray submit` runs it on the head, where a cluster is up, so
    join that cluster (`--address auto`) unless an address is given; elsewhere start a local Ray."""
    if "--address" in args or os.environ.get("RAY_ADDRESS") or not current_cluster.exists():
        return list(args)
    return [*args, "--address", "auto"]


def cmd_sweep(args: argparse.Namespace) -> int:
    from cmd_ray.grid import check_grid

    cfg = _load(args)
    check_grid(cfg)
    if not args.resume:
        _check_writable("sweep.storage_path", cfg.sweep.storage_path)
    from cmd_ray.report import report
    from cmd_ray.sweep import run_sweep, wandb_dir, wandb_mode

    folder = run_sweep(cfg, resume=args.resume, resume_command=resume_command(args))
    _, plots = report(folder)
    print(f"results: {join(folder, 'results.parquet')}")
    print("plots:   " + ", ".join(str(p) for p in plots))
    mode = wandb_mode(cfg)
    runs = wandb_dir(cfg, folder)
    if mode == "offline":
        print(f"W&B:     offline runs in {runs}; upload with `wandb sync {runs}/wandb/offline-run-*`")
    elif mode == "online":
        print(f"W&B:     project {cfg.sweep.wandb.project!r}, group {cfg.sweep.name!r}")
    return 0


def resume_command(args: argparse.Namespace, command: tuple[str, ...] = ("sweep",)) -> str:
    """The command that continues this sweep: the same config and --set values, with --resume."""
    import shlex

    words = ["cmd-ray", *command, *(["--config", args.config] if args.config else [])]
    for override in args.overrides:
        words += ["--set", override]
    words += [*(["--address", args.address] if getattr(args, "address", None) else []), "--resume"]
    return shlex.join(words)


def _print_validation_choice(
    folder: str | Path, last_epochs: int, joined: Optional[list[str]] = None, plots_dir: Optional[str] = None
) -> int:
    from cmd_ray.report import write_plots
    from cmd_ray.results import read_joined
    from cmd_ray.validation import validation_choice

    rows = read_joined(folder, joined or [])
    table, best = validation_choice(rows, last_epochs)
    print(table)
    for method, candidate in best.items():
        print(f"chosen for {method} on validation: {candidate}")
    plots = write_plots(rows, plots_dir or join(folder, "plots"), last_epochs, validation=True)
    print("plots: " + ", ".join(str(p) for p in plots))
    return 0


def cmd_report(args: argparse.Namespace) -> int:
    from cmd_ray.report import report

    if args.last_epochs < 1:
        raise ConfigError(f"--last-epochs: got {args.last_epochs}; allowed: an integer >= 1")
    try:
        if args.validation:
            return _print_validation_choice(args.folder, args.last_epochs, args.joined, args.plots)
        if args.compare:
            from cmd_ray.results import compare_table, read_results

            comparison = compare_table(read_results(args.folder), read_results(args.compare), args.last_epochs)
        _, plots = report(args.folder, args.last_epochs, plots_dir=args.plots, joined=args.joined)
    except FileNotFoundError as err:
        raise ConfigError(f"{'--compare' if args.compare and args.compare in str(err) else 'folder'}: {err}") from None
    except ConfigError:
        raise  # names its own field (--last-epochs)
    except ValueError as err:
        joining = args.joined and (" repeats " in str(err) or "joined table" in str(err))
        field = "--with" if joining else "--validation" if args.validation else "folder"
        raise ConfigError(f"{field}: {err}") from None
    if args.compare:
        print("\nCompared with " + args.compare + " (final, %):\n" + comparison)
    print("plots: " + ", ".join(str(p) for p in plots))
    return 0


def bench_throughput(args: argparse.Namespace) -> int:
    from cmd_ray.storage import write_json_atomic
    from cmd_ray.tools import bench

    cfg = _load(args)
    for peers in args.peers:
        if peers < 2:
            raise ConfigError(f"--peers: got {peers}; allowed: integers >= 2")
    rows = bench.throughput(cfg, args.peers)
    if args.output_json:
        write_json_atomic(args.output_json, {"rows": rows, "config": cfg.to_dict()})
    return 0


def bench_load(args: argparse.Namespace) -> int:
    from cmd_ray.grid import check_grid
    from cmd_ray.storage import write_json_atomic
    from cmd_ray.tools import load

    cfg = _load(args)
    check_grid(cfg)
    _check_writable("sweep.storage_path", cfg.sweep.storage_path)
    figures = load.load(cfg)
    if args.output_json:
        write_json_atomic(args.output_json, {**figures, "config": cfg.to_dict()})
    if args.plot:
        print(f"plot: {load.plot_load(figures, Path(args.plot))}")
    return 0 if figures["finished"] == figures["trials"] else 1


def bench_accuracy(args: argparse.Namespace) -> int:
    from cmd_ray.grid import check_grid, trial_config
    from cmd_ray.report import report
    from cmd_ray.tools import bench

    cfg = _load(args)
    points = check_grid(cfg)
    shortest = min(trial_config(cfg.to_dict(), point).epochs for point in points)
    last_epochs = min(5, shortest) if args.last_epochs is None else args.last_epochs
    if not 1 <= last_epochs <= shortest:
        raise ConfigError(
            f"--last-epochs: got {last_epochs}; allowed: an integer in [1, {shortest}] (the grid's shortest run)"
        )
    if not args.resume:
        _check_writable("sweep.storage_path", cfg.sweep.storage_path)
    _check_writable("--folder", args.folder)
    folder = Path(args.folder)
    bench.accuracy(
        cfg,
        folder,
        resume=args.resume,
        resume_command=resume_command(args, ("bench", "accuracy", "--folder", args.folder)),
    )
    if cfg.data.validation_fraction > 0:  # a hyper-parameter sweep: rank on validation only
        return _print_validation_choice(folder, last_epochs=last_epochs)
    _, plots = report(folder, last_epochs=last_epochs)
    print("plots: " + ", ".join(str(p) for p in plots))
    return 0


def bench_sweep(args: argparse.Namespace) -> int:
    from cmd_ray.grid import check_grid
    from cmd_ray.storage import write_json_atomic
    from cmd_ray.tools import bench

    cfg = _load(args)
    check_grid(cfg)
    if args.jobs < 1:
        raise ConfigError(f"--jobs: got {args.jobs}; allowed: an integer >= 1")
    _check_writable("sweep.storage_path", cfg.sweep.storage_path)
    runs = tuple(label for label, placement, _ in bench.SWEEP_RUNS if placement in args.placements)
    figures = bench.sweep_overhead(cfg, args.jobs, runs)
    if args.output_json:
        write_json_atomic(args.output_json, {**figures, "config": cfg.to_dict()})
    return 0


def bench_import(args: argparse.Namespace) -> int:
    import tempfile

    from cmd_ray.tools import bench

    for name, value in (("--images", args.images), ("--size", args.size)):
        if value < 1:
            raise ConfigError(f"{name}: got {value}; allowed: an integer >= 1")
    if args.folder:
        bench.import_speed(Path(args.folder), args.images, args.size, not args.grey)
        return 0
    with tempfile.TemporaryDirectory(prefix="cmd-ray-import-") as folder:
        bench.import_speed(Path(folder), args.images, args.size, not args.grey)
    return 0


BENCHMARKS = {
    "throughput": bench_throughput,
    "load": bench_load,
    "accuracy": bench_accuracy,
    "sweep": bench_sweep,
    "import": bench_import,
}


def cmd_bench(args: argparse.Namespace) -> int:
    return BENCHMARKS[args.bench](args)


# What `prepare` sets aside: the cache depends on data.*, noise.* and seed only, so the method's
# and the model's requirements (a noise-rate estimate, an image size) are not asked for there.
PREPARE_NEUTRAL = {"method": "ce", "model.name": "mlp", "model.per_peer": None}


def cmd_prepare(args: argparse.Namespace) -> int:
    cfg = load_config(resolve_config_path(args.config), args.overrides, PREPARE_NEUTRAL)
    check_noise_files(cfg)
    from cmd_ray.trainer import load_run_data

    data = load_run_data(cfg, check_models=False)
    noise = data.noise
    print(
        to_json(
            {
                "dataset": cfg.data.name,
                "classes": data.train.meta.get("classes"),
                "shape": data.train.meta.get("shape"),
                "source": data.train.meta.get("source"),
                "train_samples": len(data.train),
                "test_samples": len(data.test) if data.test is not None else 0,
                "validation_samples": len(data.validation) if data.validation is not None else 0,
                "clean_labels": data.train.clean_labels is not None,
                "noise": noise["noise"],
                "realised_rate": noise["realised_rate"],
                "subset_realised_rate": noise["subset_realised_rate"],
                "realised_matrix": noise["realised_matrix"],
                **({"left_out": noise["left_out"]} if "left_out" in noise else {}),
            }
        )
    )
    return 0


def cmd_show_config(args: argparse.Namespace) -> int:
    import yaml

    cfg = _load(args)
    print(yaml.safe_dump(cfg.to_used_dict(), sort_keys=False), end="")
    return 0


def cmd_methods(args: argparse.Namespace) -> int:
    from cmd_ray import methods

    width = max(len(name) for name in methods.NAMES)
    for name, method in methods.REGISTRY.items():
        reads = f"  [{', '.join(method.reads)}]" if method.reads else ""
        print(f"{name:<{width}}  {method.summary}{reads}")
    return 0


COMMANDS = {
    "train": cmd_train,
    "sweep": cmd_sweep,
    "report": cmd_report,
    "bench": cmd_bench,
    "prepare": cmd_prepare,
    "show-config": cmd_show_config,
    "methods": cmd_methods,
}


def is_ray_failure(err: Exception) -> bool:
    """A run that Ray gave up on (workers failed past ray.max_failures, the controller failed)."""
    return type(err).__name__ in ("WorkerGroupError", "ControllerError", "TrainingFailedError", "TuneError")
