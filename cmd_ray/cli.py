"""The `cmd-ray` command line: train, sweep, report, prepare (data cache), show-config, methods.

Bad input exits with status 2 and one line `cmd-ray: error: <field>: ...` before any work.
"""

from __future__ import annotations

import argparse
import os
import re
import sys
from pathlib import Path
from typing import Optional

from cmd_ray.config import Config, ConfigError
from cmd_ray.console import keep_every_log_line, ray_noise_kept_off_the_console
from cmd_ray.errors import DataError, NoiseError, NonFiniteLossError, RayStartError, StorageError, SweepStopped
from cmd_ray.presets import load_config
from cmd_ray.storage import join, to_json

# A Ray Train run's folder name under ray.storage_path (one path segment, portable).
RUN_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*")


def _add_config_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", help="YAML preset, e.g. launch/configs/fmnist.yaml")
    parser.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override one config key, e.g. --set noise.rate=0.2 (repeatable)",
    )


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="cmd-ray", description="CMD: confident knowledge selection + mutual distillation"
    )
    sub = parser.add_subparsers(dest="command", required=True)
    _add_train_parser(sub)
    sweep = sub.add_parser("sweep", help="run a Ray Tune grid (sweep.grid) of Ray Train runs, logged to W&B")
    _add_config_args(sweep)
    sweep.add_argument("--resume", action="store_true", help="continue the sweep of this sweep.name")
    sweep.add_argument("--address", help="Ray cluster to join (e.g. auto); default: $RAY_ADDRESS or a local Ray")
    _add_report_parser(sub)
    _add_bench_parser(sub)
    prepare = sub.add_parser("prepare", help="build the Parquet data cache for a config and report the noise")
    _add_config_args(prepare)
    show = sub.add_parser("show-config", help="print the validated config as YAML")
    _add_config_args(show)
    sub.add_parser("methods", help="list the registered methods and the config sections each reads")
    return parser


def _add_train_parser(sub: argparse._SubParsersAction) -> None:
    train = sub.add_parser("train", help="train P peers on noisy labels and print a JSON summary")
    _add_config_args(train)
    train.add_argument("--output-json", help="also write the summary JSON here")
    train.add_argument(
        "--address", help="Ray cluster to join (e.g. auto); default: $RAY_ADDRESS or a local embedded Ray"
    )
    train.add_argument(
        "--run-name",
        help="name of the Ray Train run under ray.storage_path (default: <method>-<time>); running "
        "again with the same name resumes that run from its latest checkpoint",
    )
    train.add_argument(
        "--in-process",
        action="store_true",
        help="step all peers in this process (the reference path) instead of Ray workers",
    )


def _add_report_parser(sub: argparse._SubParsersAction) -> None:
    report = sub.add_parser("report", help="print a sweep's method x noise table and write its plots")
    report.add_argument("folder", help="the sweep folder (holds results.parquet)")
    report.add_argument("--last-epochs", type=int, default=1, help="final accuracy = mean of the last N epochs")
    report.add_argument(
        "--plots",
        metavar="DIR",
        help="where to write the plots (default: FOLDER/plots; give another to keep a committed folder as measured)",
    )
    report.add_argument(
        "--compare", metavar="FOLDER", help="also compare with another sweep of the same cells (e.g. an earlier run)"
    )
    report.add_argument(
        "--with",
        dest="joined",
        metavar="FOLDER",
        action="append",
        default=[],
        help="join another sweep's rows into the table and plots (same settings, other cells or candidates; "
        "repeatable)",
    )
    report.add_argument(
        "--validation",
        action="store_true",
        help="rank each method's swept knowledge/distill settings by noisy-validation accuracy (no test figures)",
    )


def _add_bench_parser(sub: argparse._SubParsersAction) -> None:
    bench = sub.add_parser("bench", help="benchmarks that print figures: throughput, load, accuracy, sweep, import")
    bench_sub = bench.add_subparsers(dest="bench", required=True)
    tp = bench_sub.add_parser("throughput", help="Ray workers vs in-process peers, side by side")
    _add_config_args(tp)
    tp.add_argument("--peers", type=int, nargs="+", default=[2], help="peer counts to measure, e.g. 2 3 4")
    tp.add_argument("--output-json", help="also write the figures here")
    ld = bench_sub.add_parser("load", help="a 16+ trial sweep on this machine: peak memory and concurrency")
    _add_config_args(ld)
    ld.add_argument("--output-json", help="also write the figures (and the memory samples) here")
    ld.add_argument("--plot", help="also plot memory and live Train workers over time to this PNG")
    acc = bench_sub.add_parser(
        "accuracy", help="methods x noise x seeds through `cmd-ray sweep`; table and plots kept in --folder"
    )
    _add_config_args(acc)
    acc.add_argument(
        "--folder", required=True, help="where results.parquet and plots/ are kept, e.g. runs/bench/accuracy"
    )
    acc.add_argument("--resume", action="store_true", help="continue the sweep of this sweep.name")
    acc.add_argument("--last-epochs", type=int, default=5, help="final accuracy = mean of the last N epochs")
    _add_bench_sweep_parser(bench_sub)
    imp = bench_sub.add_parser("import", help="import a generated image folder into the cache: images per second")
    imp.add_argument("--images", type=int, default=10000, help="how many PNG images to generate and import")
    imp.add_argument("--size", type=int, default=32, help="their side in pixels")
    imp.add_argument("--grey", action="store_true", help="grey images (default: RGB)")
    imp.add_argument("--folder", help="where to write the images and the cache (default: a temporary folder)")


def _add_bench_sweep_parser(bench_sub: argparse._SubParsersAction) -> None:
    sw = bench_sub.add_parser(
        "sweep", help="a grid as in-process runs and as `cmd-ray sweep` (each placement): wall times, a trial's phases"
    )
    _add_config_args(sw)
    sw.add_argument("--jobs", type=int, default=2, help="in-process runs at once (an even share of the cores each)")
    sw.add_argument("--output-json", help="also write the figures here")
    sw.add_argument(
        "--placements",
        nargs="+",
        choices=["trial", "workers"],
        default=["trial", "workers"],
        help="which placements to time beside the in-process runs (trial also runs with W&B disabled)",
    )


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
    """What a --set gave that the run's method never reads (e.g. coteaching.forget_rate with
    method ce): one note each, not an error, since a preset's sections serve its other methods
    and a grid over `method` reads them in some trials."""
    from cmd_ray import methods

    if "method" in cfg.sweep.grid:
        return []
    reads = methods.get(cfg.method).reads
    notes = []
    for override in overrides:
        key = override.split("=", 1)[0].strip()
        section = key.split(".", 1)[0]
        if section in methods.SECTIONS and section not in reads:
            users = [name for name, m in methods.REGISTRY.items() if section in m.reads]
            notes.append(f"{key} is set, but method {cfg.method!r} does not read it (read by {', '.join(users)})")
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
            if _is_ray_failure(err):  # not a NaN stop: that would happen again at the same step
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
    except ValueError as err:
        field = "--with" if args.joined and " repeats " in str(err) else "--validation" if args.validation else "folder"
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
    from cmd_ray.grid import check_grid
    from cmd_ray.report import report
    from cmd_ray.tools import bench

    cfg = _load(args)
    check_grid(cfg)
    if args.last_epochs < 1:
        raise ConfigError(f"--last-epochs: got {args.last_epochs}; allowed: an integer >= 1")
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
        return _print_validation_choice(folder, last_epochs=args.last_epochs)
    _, plots = report(folder, last_epochs=args.last_epochs)
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


def _is_ray_failure(err: Exception) -> bool:
    """A run that Ray gave up on (workers failed past ray.max_failures, the controller failed)."""
    return type(err).__name__ in ("WorkerGroupError", "ControllerError", "TrainingFailedError", "TuneError")


def main(argv: Optional[list[str]] = None) -> int:
    keep_every_log_line()
    parser = build_parser()
    args = parser.parse_args(argv)
    ray_before = _ray_running()
    with ray_noise_kept_off_the_console():
        try:
            return _run(args)
        finally:
            # Ray's processes end (with their exit noise, which the filter keeps off the console)
            # before the filter is taken down; a Ray running before the command is left alone.
            if _ray_running() and not ray_before:
                sys.modules["ray"].shutdown()


def _ray_running() -> bool:
    ray = sys.modules.get("ray")
    return ray is not None and ray.is_initialized()


def _run(args: argparse.Namespace) -> int:
    try:
        return COMMANDS[args.command](args)
    except (ConfigError, NoiseError, DataError) as err:
        print(f"cmd-ray: error: {err}", file=sys.stderr)
        return 2
    except NonFiniteLossError as err:
        print(f"cmd-ray: training stopped: {err}", file=sys.stderr)
        return 1
    except SweepStopped as err:
        print(f"cmd-ray: {err}", file=sys.stderr)
        return err.exit_status
    except RayStartError as err:
        print(f"cmd-ray: error: {err}", file=sys.stderr)
        return 1
    except StorageError as err:
        print(f"cmd-ray: error: {err.strerror}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("cmd-ray: interrupted", file=sys.stderr)
        return 130
    except Exception as err:
        if _is_ray_failure(err):
            # Ray already printed each worker's traceback above; end with the cause in one line.
            cause = [line for line in str(err).strip().splitlines() if line.strip()]
            print(f"cmd-ray: training failed: {cause[-1] if cause else type(err).__name__}", file=sys.stderr)
            return 1
        raise


if __name__ == "__main__":
    sys.exit(main())
