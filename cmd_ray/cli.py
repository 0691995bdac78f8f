"""The `cmd-ray` command line: its arguments, and the one place errors become exit statuses.

Sub-commands (train, sweep, report, bench, prepare, show-config, methods) run in
`cmd_ray.commands`. Bad input exits with status 2 and one line `cmd-ray: error: <field>: ...`
before any work.
"""

from __future__ import annotations

import argparse
import sys
from typing import Optional

from cmd_ray.commands import COMMANDS, is_ray_failure
from cmd_ray.config import ConfigError
from cmd_ray.console import keep_every_log_line, ray_noise_kept_off_the_console
from cmd_ray.errors import DataError, NoiseError, NonFiniteLossError, RayStartError, StorageError, SweepStopped


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
    acc.add_argument(
        "--last-epochs",
        type=int,
        default=None,
        help="final accuracy = mean of the last N epochs (default: 5, or every epoch of a shorter run)",
    )
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
        if is_ray_failure(err):
            # Ray already printed each worker's traceback above; end with the cause in one line.
            cause = [line for line in str(err).strip().splitlines() if line.strip()]
            print(f"cmd-ray: training failed: {cause[-1] if cause else type(err).__name__}", file=sys.stderr)
            return 1
        raise


if __name__ == "__main__":
    sys.exit(main())
