"""`cmd-ray bench load`: a sweep of 16+ Tune-over-Train trials on this machine, with the resident
memory of the driver and its Ray processes, the machine's memory in use and the live Train
workers sampled from /proc (Linux) every half second; figures printed and plotted. Also the CPU
time a sweep's processes use, by kind (`CpuSampler`, for `cmd-ray bench sweep`).
"""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from cmd_ray.config import Config
from cmd_ray.grid import check_grid


def _proportional_rss(pid_dir: str) -> int:
    """PSS in bytes: resident memory with each shared page split among the processes sharing
    it, so summing over processes does not count torch's libraries or Ray's object store twice."""
    for line in Path(pid_dir, "smaps_rollup").read_text().splitlines():
        if line.startswith("Pss:"):
            return int(line.split()[1]) * 1024
    return 0


def _process_table(memory: bool = True) -> dict[int, tuple[int, int, str]]:
    """pid -> (parent pid, proportional resident bytes, command line) for every readable process
    (the bytes 0 without `memory`: reading every process's page summary is the costly part)."""
    table = {}
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        try:
            stat = Path(entry.path, "stat").read_text()
            cmdline = Path(entry.path, "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
            resident = _proportional_rss(entry.path) if memory else 0
        except OSError:  # the process ended while we looked
            continue
        ppid = int(stat.rsplit(")", 1)[1].split()[1])
        table[int(entry.name)] = (ppid, resident, cmdline)
    return table


def _descendants(table: dict[int, tuple[int, int, str]], root: int) -> list[int]:
    children: dict[int, list[int]] = {}
    for pid, (ppid, _, _) in table.items():
        children.setdefault(ppid, []).append(pid)
    out, todo = [], [root]
    while todo:
        pid = todo.pop()
        out.append(pid)
        todo += children.get(pid, [])
    return out


def _used_memory() -> int:
    """Machine-wide memory in use (MemTotal - MemAvailable), bytes."""
    info = dict(line.split(":", 1) for line in Path("/proc/meminfo").read_text().splitlines())
    return (int(info["MemTotal"].split()[0]) - int(info["MemAvailable"].split()[0])) * 1024


# What each Ray / W&B process is, from its command line (Ray names actor processes ray::<Class>).
PROCESS_KINDS = (
    ("Train worker", "RayTrainWorker"),
    ("Train controller", "TrainController"),
    ("trial driver", "ImplicitFunc"),
    ("W&B logging actor", "WandbRuns"),
    ("W&B logging actor", "WandbLoggingActor"),
    ("W&B service", "wandb-core"),
    ("W&B service", "wandb-symon"),  # W&B's system-metrics sampler
    ("idle Ray worker", "ray::IDLE"),
    ("Ray dashboard and agents", "ray::DashboardAgent"),
    ("Ray dashboard and agents", "ray::RuntimeEnvAgent"),
    ("other Ray actor", "ray::"),
    ("Ray log and autoscaler monitors", "monitor.py"),
    ("Ray dashboard and agents", "runtime_env/agent"),  # before Ray renames it ray::RuntimeEnvAgent
    ("Ray GCS", "gcs_server"),
    ("raylet", "raylet"),
    ("Ray dashboard and agents", "dashboard"),
)


def process_kind(cmdline: str) -> str:
    """The kind of a process of the sweep, by the first PROCESS_KINDS pattern its command line holds."""
    return next((kind for kind, pattern in PROCESS_KINDS if pattern in cmdline), "other")


class LoadSampler(threading.Thread):
    """Every `interval` s: proportional resident memory (PSS) of this process and all its descendants (the
    embedded Ray: GCS, raylet, Tune and Train actors), the machine's used memory, and how many
    Ray Train workers and trial drivers are alive."""

    def __init__(self, interval: float = 0.5):
        super().__init__(daemon=True)
        self.interval = interval
        self.samples: list[dict[str, float]] = []
        self._stop_event = threading.Event()
        self._t0 = time.perf_counter()

    def run(self) -> None:
        me = os.getpid()
        while not self._stop_event.wait(self.interval):
            table = _process_table()
            tree = [table[p] for p in _descendants(table, me) if p in table]
            by_kind: dict[str, list[float]] = {}
            for pid in _descendants(table, me):
                if pid in table:
                    kind = "driver" if pid == me else process_kind(table[pid][2])
                    total, count = by_kind.get(kind, [0.0, 0.0])
                    by_kind[kind] = [total + table[pid][1], count + 1]
            self.samples.append(
                {
                    "t": time.perf_counter() - self._t0,
                    "tree_pss": float(sum(rss for _, rss, _ in tree)),
                    "used": float(_used_memory()),
                    "train_workers": float(sum("RayTrainWorker" in cmd for _, _, cmd in tree)),
                    "trial_drivers": float(sum("ImplicitFunc" in cmd or "run_trial" in cmd for _, _, cmd in tree)),
                    "by_kind": by_kind,  # kind -> [PSS bytes, processes]
                }
            )

    def stop(self) -> list[dict[str, float]]:
        self._stop_event.set()
        self.join()
        return self.samples


def load(cfg: Config, log: Callable[[str], None] = print) -> dict[str, Any]:
    """Run the sweep `cfg` describes (16+ trials) while sampling memory and concurrency; return figures."""
    import ray

    from cmd_ray.storage import join, read_parquet
    from cmd_ray.sweep import concurrency, run_sweep

    points = check_grid(cfg)
    before = _used_memory()
    sampler = LoadSampler()
    sampler.start()
    started = time.perf_counter()
    try:
        folder = run_sweep(cfg, log=log)
    finally:
        samples = sampler.stop()
    rows = read_parquet(join(folder, "results.parquet")).to_pylist()
    status = {r["trial_id"]: r["status"] for r in rows}
    figures = {
        "trials": len(points),
        "finished": sum(s == "finished" for s in status.values()),
        "failed": sum(s == "failed" for s in status.values()),
        "wall_seconds": time.perf_counter() - started,
        "concurrency_bound_trials": concurrency(cfg, ray.cluster_resources()),
        "workers_per_trial": cfg.workers,
        "folder": str(folder),
        **_memory_figures(samples, before),
    }
    _log_load(figures, log)
    return figures


def _memory_figures(samples: list[dict[str, Any]], before: int) -> dict[str, Any]:
    """Peaks of the sampled memory and concurrency; who held the memory at the peak; the first
    and second half's peaks (memory should not creep up over a sweep)."""
    gib = 1024**3
    figures: dict[str, Any] = {
        "peak_train_workers": max((s["train_workers"] for s in samples), default=0),
        "peak_trial_drivers": max((s["trial_drivers"] for s in samples), default=0),
        "peak_tree_pss_gib": max((s["tree_pss"] for s in samples), default=0) / gib,
        "used_before_gib": before / gib,
        "peak_used_gib": max((s["used"] for s in samples), default=before) / gib,
        "samples": samples,
    }
    if samples:
        peak = max(samples, key=lambda s: s["tree_pss"])
        figures["at_peak_by_kind"] = {
            kind: {"gib": total / gib, "processes": int(count)}
            for kind, (total, count) in sorted(peak["by_kind"].items(), key=lambda kv: -kv[1][0])
        }
    for sample in samples:  # the breakdown at the peak is kept; per sample it would bloat the JSON
        sample.pop("by_kind", None)
    half = len(samples) // 2
    if half:
        figures["peak_tree_pss_first_half_gib"] = max(s["tree_pss"] for s in samples[:half]) / gib
        figures["peak_tree_pss_second_half_gib"] = max(s["tree_pss"] for s in samples[half:]) / gib
    return figures


def _log_load(figures: dict[str, Any], log: Callable[[str], None]) -> None:
    log(
        f"[cmd-ray] load: {figures['finished']}/{figures['trials']} trials finished ({figures['failed']} failed) "
        f"in {figures['wall_seconds']:.0f} s; at most {figures['concurrency_bound_trials']} trials x "
        f"{figures['workers_per_trial']} workers at once (peak seen: {figures['peak_train_workers']:.0f} Train "
        f"workers, {figures['peak_trial_drivers']:.0f} trial drivers); peak memory (PSS) of the driver and its Ray "
        f"processes {figures['peak_tree_pss_gib']:.2f} GiB (first half "
        f"{figures.get('peak_tree_pss_first_half_gib', 0):.2f}, second half "
        f"{figures.get('peak_tree_pss_second_half_gib', 0):.2f}); machine memory in use "
        f"{figures['used_before_gib']:.2f} GiB before, {figures['peak_used_gib']:.2f} GiB at peak"
    )
    if "at_peak_by_kind" in figures:
        log(
            "[cmd-ray] load: at the peak, "
            + "; ".join(
                f"{kind} {v['gib']:.2f} GiB ({v['processes']} process{'es' if v['processes'] != 1 else ''})"
                for kind, v in figures["at_peak_by_kind"].items()
            )
        )


def plot_load(figures: dict[str, Any], path: Path) -> Path:
    """Memory and live Train workers over the sweep's time."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from cmd_ray.storage import save_figure

    samples = figures["samples"]
    t = [s["t"] for s in samples]
    fig, ax = plt.subplots(figsize=(8, 3.4))
    ax.plot(t, [s["tree_pss"] / 1024**3 for s in samples], label="driver + Ray processes, PSS (GiB)")
    ax.plot(t, [s["used"] / 1024**3 for s in samples], label="machine memory in use (GiB)")
    ax.set_xlabel("seconds")
    ax.set_ylabel("GiB")
    ax.grid(alpha=0.3)
    right = ax.twinx()
    right.step(t, [s["train_workers"] for s in samples], color="C2", where="post", label="live Train workers")
    right.set_ylabel("Train workers")
    lines = ax.get_legend_handles_labels()[0] + right.get_legend_handles_labels()[0]
    labels = ax.get_legend_handles_labels()[1] + right.get_legend_handles_labels()[1]
    ax.legend(lines, labels, fontsize=8, loc="upper left")
    ax.set_title(f"{figures['trials']}-trial sweep on this machine")
    fig.tight_layout()
    return save_figure(fig, path)


def _cpu_ticks(pid_dir: str) -> int:
    """User + system CPU time of one process so far, in clock ticks."""
    fields = Path(pid_dir, "stat").read_text().rsplit(")", 1)[1].split()
    return int(fields[11]) + int(fields[12])


class CpuSampler(threading.Thread):
    """Every `interval` s: the CPU time each process of this process's tree has used so far. A
    process's last look before it ends is what it counts (up to `interval` of its CPU time is
    missed), under the kind it was seen as before (not "other" once its command line empties as
    it ends). `stop()` gives CPU seconds by kind (`process_kind`; this process is "driver"), over
    the time the sampler ran, for processes started after it as well."""

    def __init__(self, interval: float = 0.5):
        super().__init__(daemon=True)
        self.interval = interval
        self._stop_event = threading.Event()
        self._start: dict[int, int] = {}  # CPU ticks each process had used before the sampler began
        self._last: dict[int, tuple[int, str]] = {}  # pid -> (ticks at the last look, kind)

    def _look(self) -> None:
        me = os.getpid()
        table = _process_table(memory=False)
        for pid in _descendants(table, me):
            try:
                ticks = _cpu_ticks(f"/proc/{pid}")
            except OSError:  # it ended while we looked
                continue
            kind = "driver" if pid == me else process_kind(table[pid][2])
            if kind == "other" and pid in self._last:  # an ending process's command line reads empty
                kind = self._last[pid][1]
            self._last[pid] = (ticks, kind)

    def run(self) -> None:
        self._look()
        self._start = {pid: ticks for pid, (ticks, _) in self._last.items()}
        while not self._stop_event.wait(self.interval):
            self._look()

    def stop(self) -> dict[str, float]:
        self._stop_event.set()
        self.join()
        self._look()
        per_second = os.sysconf("SC_CLK_TCK")
        seconds: dict[str, float] = {}
        for pid, (ticks, kind) in self._last.items():
            seconds[kind] = seconds.get(kind, 0.0) + (ticks - self._start.get(pid, 0)) / per_second
        return dict(sorted(seconds.items(), key=lambda item: -item[1]))
