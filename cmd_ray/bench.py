"""Benchmarks that print figures (never timed tests).

- `throughput`: the same P peers, model, batch size and data, stepped as Ray Train workers
  and in one process, side by side in one run: steady-state training samples/s of each,
  their ratio, the exchange's share of step time (transfer timed apart from waiting on
  the slower peer), and the time from start to the first step. Optionally P = 2, 3, 4.
- `accuracy`: methods x noise settings x seeds with the in-process trainer (the Ray path
  computes the same numbers, as the equivalence test shows), resumable, written as a
  sweep-style `results.parquet` so `cmd-ray report` makes the table and plots.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pyarrow as pa

from cmd_ray.config import Config, check_grid, trial_config
from cmd_ray.results import trial_rows, write_parquet_atomic


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


def accuracy(cfg: Config, folder: Path, log: Callable[[str], None] = print) -> Path:
    """Run every grid point of `cfg.sweep.grid` in-process; skip points already done (resume).

    Finished trials are appended to `<folder>/trials.jsonl` as they end, so an interrupted
    benchmark loses at most the trial in flight; results.parquet is rewritten after each.
    """
    from cmd_ray.trainer import train_in_process

    points = check_grid(cfg)
    folder.mkdir(parents=True, exist_ok=True)
    done_path = folder / "trials.jsonl"
    done = {}
    if done_path.is_file():
        for number, line in enumerate(done_path.read_text().splitlines(), 1):
            try:
                entry = json.loads(line)
            except json.JSONDecodeError:  # cut short by a crash or a full disk: that run reruns
                log(f"{done_path}:{number}: skipping an unfinished line; that run will be repeated")
                continue
            done[json.dumps(entry["point"], sort_keys=True)] = entry
    base = cfg.to_dict()
    for i, point in enumerate(points):
        key = json.dumps(point, sort_keys=True)
        if key in done:
            continue
        started = time.perf_counter()
        summary = train_in_process(trial_config(base, point), log=lambda _: None)
        entry = {"trial_id": f"bench_{i:05d}", "point": point, "history": summary["history"]}
        _append_line(done_path, json.dumps(entry))
        done[key] = entry
        last = summary["history"][-1]
        # A hyper-parameter sweep (validation split) shows only the validation figure.
        shown = ("noisy-validation", "val") if "mean/val_accuracy" in last else ("clean test", "test")
        log(
            f"[{len(done)}/{len(points)}] {key}: last-epoch {shown[0]} accuracy "
            f"{100 * last[f'mean/{shown[1]}_accuracy']:.2f}% (mean of peers) "
            f"({time.perf_counter() - started:.0f} s)"
        )
        _write_table(base, done.values(), folder)
    return _write_table(base, done.values(), folder)


def _append_line(path: Path, line: str) -> None:
    """Append one line; a line cut short by a crash is skipped on resume (and can be followed)."""
    text = path.read_text() if path.is_file() else ""
    prefix = "\n" if text and not text.endswith("\n") else ""
    with open(path, "a") as f:
        f.write(prefix + line + "\n")


def _write_table(base: dict[str, Any], entries, folder: Path) -> Path:
    rows = []
    for e in entries:
        rows += trial_rows(e["trial_id"], e["point"], base, e["history"], "finished", "")
    return write_parquet_atomic(folder / "results.parquet", pa.Table.from_pylist(rows))
