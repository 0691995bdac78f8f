"""Benchmarks: the accuracy bench runs through the sweep, resumes and feeds the report; the sweep
bench's phase arithmetic (no timing is asserted)."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from cmd_ray.config import from_dict
from cmd_ray.report import report
from cmd_ray.tools import bench, load
from cmd_ray.validation import validation_choice

from .conftest import tiny_config


def _bench_config(root, tmp_path, **values) -> Path:
    """A tiny grid for the accuracy bench as a YAML preset: fake data (its caches built here, so
    the command only reads them), W&B off, the sweep under tmp_path."""
    import yaml

    from cmd_ray.grid import check_grid, trial_config
    from cmd_ray.trainer import load_run_data

    base = {
        "epochs": 2,
        "batch_size": 100,
        "data": {"root": str(root), "test_subset": 100},
        "sweep": {"name": "bench", "storage_path": str(tmp_path / "sweeps"), "wandb": {"mode": "disabled"}},
    }
    for key, value in values.items():
        base[key] = {**base.get(key, {}), **value} if isinstance(value, dict) else value
    cfg = from_dict(base)
    for point in check_grid(cfg):
        load_run_data(trial_config(cfg.to_dict(), point))
    path = tmp_path / "bench.yaml"
    path.write_text(yaml.safe_dump(base))
    return path


def _bench_accuracy(preset: Path, folder: Path, *extra: str) -> subprocess.CompletedProcess:
    """`cmd-ray bench accuracy` in its own process (its own local Ray, as a user runs it)."""
    cmd = [sys.executable, "-m", "cmd_ray.cli", "bench", "accuracy", "--config", str(preset), "--folder", str(folder)]
    env = {k: v for k, v in os.environ.items() if not k.startswith(("RAY_", "WANDB_"))}
    proc = subprocess.run(cmd + list(extra), env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc


@pytest.mark.ray  # its own local Ray, in a subprocess
def test_accuracy_bench_runs_its_grid_through_cmd_ray_sweep_and_resumes_the_same_sweep(
    fake_fmnist_root, tmp_path, monkeypatch
):
    grid = {"noise": [{"type": "pairflip", "rate": 0.45}], "method": ["ce", "cmd-p"]}
    preset = _bench_config(fake_fmnist_root, tmp_path, sweep={"grid": grid})
    folder = tmp_path / "bench"
    proc = _bench_accuracy(preset, folder, "--last-epochs", "2")
    rows = pq.read_table(folder / "results.parquet").to_pylist()
    assert {(r["method"], r["noise.type"], r["noise.rate"]) for r in rows} == {
        ("ce", "pairflip", 0.45),
        ("cmd-p", "pairflip", 0.45),
    }
    assert len(rows) == 4 and all(r["status"] == "finished" for r in rows)
    # Through Ray Tune: the sweep folder holds Tune's experiment state, one folder per trial.
    sweep = tmp_path / "sweeps" / "bench"
    assert (sweep / "tune").is_dir() and len(list((sweep / "trials").iterdir())) == 2
    assert "sweep 'bench': 2 trials" in proc.stdout and "pairflip 0.45" in proc.stdout
    table, plots = report(folder, last_epochs=2)
    assert "pairflip 0.45" in table and len(plots) == 3
    # --resume continues the same sweep (run_sweep's resume) and rewrites the kept table from it:
    # checked in this process, the sweep's call recorded, not run again. That a resumed sweep
    # trains no finished trial again is pinned by test_sweep.py's
    # test_a_killed_sweep_resumes_and_a_ctrl_c_stops_it_says_so_and_its_printed_command_finishes_it.
    from cmd_ray import sweep as sweep_module
    from cmd_ray.cli import main

    calls = []
    monkeypatch.setattr(sweep_module, "run_sweep", lambda cfg, **kw: calls.append(kw) or str(sweep))
    (folder / "results.parquet").unlink()
    assert main(["bench", "accuracy", "--config", str(preset), "--folder", str(folder), "--resume"]) == 0
    assert [c["resume"] for c in calls] == [True] and "--resume" in calls[0]["resume_command"]
    assert pq.read_table(folder / "results.parquet").to_pylist() == rows


@pytest.mark.ray  # its own local Ray, in a subprocess
def test_validation_sweep_ranks_candidates_on_noisy_validation_accuracy_without_test_figures(
    fake_fmnist_root, tmp_path, capsys
):
    from cmd_ray.cli import main

    knowledge = [
        {"threshold_on": "certainty", "tau": 0.5, "tau_start": 0.3, "tau_end": 0.7},
        {"threshold_on": "quantile", "tau": 0.2, "tau_start": 0.0, "tau_end": 0.5},
    ]
    preset = _bench_config(
        fake_fmnist_root,
        tmp_path,
        data={"validation_fraction": 0.2},
        sweep={"grid": {"method": ["cmd-s", "cmd-p"], "knowledge": knowledge}},
    )
    folder = tmp_path / "validation"
    proc = _bench_accuracy(preset, folder, "--last-epochs", "2")
    assert "chosen for cmd-p on validation:" in proc.stdout
    table, best = validation_choice(pq.read_table(folder / "results.parquet").to_pylist(), last_epochs=2)
    assert set(best) == {"cmd-s", "cmd-p"}
    assert "tau=0.5" in table and "tau_start" not in best["cmd-s"] and "tau=" not in best["cmd-p"].replace("tau_", "")
    assert table.count("(chosen)") == 2 and "test" not in table
    assert main(["report", str(folder), "--validation", "--last-epochs", "2"]) == 0
    assert "chosen for cmd-p on validation:" in capsys.readouterr().out


def test_a_trials_phases_add_up_to_its_span_and_name_what_is_missing():
    marks = {
        "scheduled": 0.0,
        "trial_start": 2.0,
        "imported": 5.0,
        "data_loaded": 5.5,
        "first_step": 6.0,
        "report_seconds": 0.5,
        "trial_end": 20.0,
        "completed": 23.0,
    }
    history = [{"train_seconds": 5.0, "eval_seconds": 1.0}, {"train_seconds": 5.0, "eval_seconds": 1.0}]
    phases = bench.trial_breakdown(marks, history, "trial")
    assert phases["Tune: trial's actor ready -> trial function runs"] == 2.0
    assert phases["imports in the trial"] == 3.0 and phases["training steps"] == 10.0
    assert phases["whole trial (actor ready -> complete)"] == 23.0
    # 2 + 3 + 0.5 + 0.5 + 10 + 2 + 0.5 + 3 = 21.5 of 23 s explained
    assert phases["unexplained (between the phases above)"] == 1.5
    workers = bench.trial_breakdown(marks, history, "workers")
    assert "worker: data from the object store" not in workers  # no worker marks: left out, not zero


@contextmanager
def _child_until_released(code: str) -> Iterator[subprocess.Popen]:
    """A Python child that runs `code`, says so, and stays alive until the block ends."""
    script = code + "\nimport sys\nprint('ready', flush=True)\nsys.stdin.read()"
    child = subprocess.Popen([sys.executable, "-c", script], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert child.stdout.readline().strip() == "ready"
        yield child
    finally:
        child.communicate("")


def test_load_sampler_counts_the_memory_of_child_processes():
    import time

    sampler = load.LoadSampler(interval=0.1)
    sampler.start()
    # The child says when its memory is held and keeps it until told to go: the sampler gets
    # two looks at it however slow the machine (no fixed window).
    with _child_until_released("x = bytearray(300 * 1024 * 1024); x[::4096] = b'1' * len(x[::4096])"):
        seen = len(sampler.samples)
        deadline = time.time() + 120
        while len(sampler.samples) < seen + 2 and time.time() < deadline:
            time.sleep(0.05)
        samples = sampler.stop()
    assert samples and max(s["tree_pss"] for s in samples) > 300 * 1024 * 1024
    assert all(s["train_workers"] == 0 for s in samples)
    peak = max(samples, key=lambda s: s["tree_pss"])
    assert peak["by_kind"]["other"][1] >= 1 and peak["by_kind"]["driver"][1] == 1
    assert peak["by_kind"]["other"][0] > 300 * 1024 * 1024  # the child is "other": no Ray in its command line


def test_cpu_sampler_counts_the_cpu_time_of_a_child_started_after_it_by_kind():
    """`cmd-ray bench sweep`'s CPU figures: a child that burns a second of CPU counts about a
    second, under its kind; the sampler's own process ("driver") only what it used meanwhile."""
    sampler = load.CpuSampler(interval=0.1)
    sampler.start()
    with _child_until_released("import time\nt = time.process_time()\nwhile time.process_time() - t < 1.0: pass"):
        seconds = sampler.stop()  # the child still alive: its whole CPU time is seen
    assert 0.9 <= seconds["other"] < 2.0, seconds
    assert seconds.get("driver", 0.0) < 1.0, seconds


def test_cpu_sampler_keeps_a_process_kind_when_its_command_line_empties_as_it_ends(monkeypatch):
    """An ending process's /proc command line reads empty: its CPU time stays with the kind it
    was seen as (a finished trial counted as "other" before)."""
    me = os.getpid()
    with _child_until_released("pass") as child:
        command_lines = iter(["ray::ImplicitFunc.train", ""])
        monkeypatch.setattr(
            load, "_process_table", lambda memory: {me: (1, 0, "driver"), child.pid: (me, 0, next(command_lines))}
        )
        sampler = load.CpuSampler()
        sampler._look()
        sampler._look()
    assert sampler._last[child.pid][1] == "trial driver"


def test_process_kinds_name_ray_and_wandb_processes_by_their_command_lines():
    assert load.process_kind("ray::RayTrainWorker.run_train_fn") == "Train worker"
    assert load.process_kind("ray::_WandbLoggingActor.run") == "W&B logging actor"
    assert load.process_kind("ray::ImplicitFunc.train") == "trial driver"
    assert load.process_kind("/x/ray/core/src/ray/raylet/raylet --node") == "raylet"
    assert load.process_kind("/x/wandb/bin/wandb-core --port-filename f") == "W&B service"
    assert load.process_kind("ray::DashboardAgent") == "Ray dashboard and agents"
    assert load.process_kind("/x/python -u /x/ray/_private/runtime_env/agent/main.py --x") == "Ray dashboard and agents"
    assert load.process_kind("/x/wandb/bin/wandb-symon --portfile f") == "W&B service"
    assert load.process_kind("/x/python -u /x/ray/_private/log_monitor.py --x") == "Ray log and autoscaler monitors"
    assert load.process_kind("python -c pass") == "other"


def test_a_reference_variant_is_ranked_beside_the_candidates_but_never_chosen():
    def rows(variant, reference, noise_rate, accuracy):
        return [
            {
                "trial_id": f"{variant}-{noise_rate}",
                "status": "finished",
                "method": "cmd-p",
                "variant": variant,
                "reference": reference,
                "noise.type": "symmetric",
                "noise.rate": noise_rate,
                "epoch": epoch,
                "mean/val_accuracy": accuracy,
            }
            for epoch in range(3)
        ]

    table_rows = []
    for rate in (0.2, 0.5):
        table_rows += rows("A", False, rate, 0.5) + rows("B", False, rate, 0.6) + rows("all knowledge", True, rate, 0.7)
    table, best = validation_choice(table_rows, last_epochs=2)
    assert best == {"cmd-p": "B"}
    assert "| cmd-p | B **(chosen)** | 60.00 | 60.00 | 60.00 |" in table
    assert "| cmd-p | all knowledge (reference) | 70.00 | 70.00 | 70.00 |" in table


def test_each_sweep_the_sweep_bench_times_runs_the_whole_grid():
    """`cmd-ray bench sweep` times the grid through `cmd-ray sweep` in each placement: each
    timed sweep's config keeps the grid (a trial's own config carries none)."""
    grid = {"noise.rate": [0.2, 0.5], "method": ["ce", "cmd-p"]}
    cfg = from_dict({"sweep": {"name": "b", "grid": grid}})
    timed = bench.sweep_run_config(cfg, "trial", "disabled", "20261203")
    assert timed.sweep.grid == grid and timed.sweep.placement == "trial" and timed.sweep.wandb.mode == "disabled"
    assert timed.sweep.name == "b-trial-disabled-20261203"


def test_the_sweep_bench_times_an_in_process_run_in_the_phases_a_trial_reports(fake_fmnist_root):
    """The in-process side of `cmd-ray bench sweep` gives its training steps and evaluation
    apart, so a sweep's trial is compared with a plain run phase by phase."""
    cfg = tiny_config(fake_fmnist_root, epochs=1, data__train_subset=128, data__test_subset=64)
    run = bench._in_process_point(cfg.to_dict(), {"method": "ce"}, threads=1)
    assert set(run) == {"seconds", "training steps", "evaluation (test set each epoch)"}
    assert 0 < run["training steps"] and 0 < run["evaluation (test set each epoch)"]
    assert run["training steps"] + run["evaluation (test set each epoch)"] < run["seconds"]


def test_the_sweep_bench_runs_each_sweep_with_the_wandb_mode_it_names(tmp_path, monkeypatch):
    """A sweep sets W&B's environment (WANDB_MODE, for its Ray's processes); the bench's next sweep,
    meant to run with W&B disabled, inherited WANDB_MODE=offline and ran with W&B on under the
    label "W&B disabled". `run_sweep` now puts W&B's environment back (pinned without the bench by
    `tests/test_launch.py::test_a_sweep_puts_back_the_wandb_environment_it_set_so_the_next_sweep_in_the_process_runs_with_its_own_mode`),
    and each label names the mode its sweep ran with."""
    from cmd_ray import sweep as sweep_module

    seen = []

    def fake_sweep(cfg, log, callbacks):
        seen.append(sweep_module.wandb_mode(cfg))
        with sweep_module.wandb_environment(cfg, tmp_path / "wandb"):  # what run_sweep does around Ray
            return str(tmp_path)

    monkeypatch.delenv("WANDB_MODE", raising=False)
    monkeypatch.setattr(sweep_module, "run_sweep", fake_sweep)
    monkeypatch.setattr(bench, "_in_process_pool", lambda cfg, points, jobs: (10.0, {"seconds": 10.0}))
    monkeypatch.setattr(bench, "_sweep_phases", lambda *args: {})
    monkeypatch.setattr(bench, "_sweep_breakdown", lambda *args: {})
    cfg = from_dict({"sweep": {"name": "b", "grid": {"method": ["ce"]}, "wandb": {"mode": "offline"}}})
    figures = bench.sweep_overhead(cfg, runs=("placement trial", "placement trial, W&B disabled"), log=lambda _: None)
    assert seen == ["offline", "disabled"]
    assert list(figures["sweeps"]) == ["placement trial (W&B offline)", "placement trial (W&B disabled)"]
    assert "WANDB_MODE" not in os.environ


def test_candidates_measured_in_two_sweeps_are_ranked_as_one_validation_table(tmp_path, capsys):
    """`cmd-ray report A --validation --with B`: a candidate swept later (B) is ranked beside
    A's on the same noisy-validation rule; a candidate both sweeps ran is refused, naming --with."""
    import pyarrow as pa

    from cmd_ray.cli import main

    def write(folder: Path, accuracy_by_variant: dict[str, float]) -> None:
        rows = [
            {"trial_id": f"{variant}-{rate}", "status": "finished", "method": "cmd-p", "variant": variant,
             "noise.type": "symmetric", "noise.rate": rate, "seed": 0, "epoch": epoch, "mean/val_accuracy": accuracy}
            for variant, accuracy in accuracy_by_variant.items()
            for rate in (0.2, 0.5)
            for epoch in range(3)
        ]  # fmt: skip
        folder.mkdir()
        pq.write_table(pa.Table.from_pylist(rows), folder / "results.parquet")

    write(tmp_path / "first", {"defaults": 0.5, "warm-up": 0.45})
    write(tmp_path / "later", {"lambda 8, warm-up": 0.55})
    write(tmp_path / "again", {"defaults": 0.6})
    plots = tmp_path / "joined-plots"  # the measured folder's own plots stay as they were
    command = ["report", str(tmp_path / "first"), "--validation", "--with", str(tmp_path / "later")]
    assert main([*command, "--plots", str(plots)]) == 0
    assert (plots / "validation_vs_epoch.png").is_file() and not (tmp_path / "first" / "plots").exists()
    out = capsys.readouterr().out
    assert "| cmd-p | lambda 8, warm-up **(chosen)** | 55.00 | 55.00 | 55.00 |" in out
    assert "| cmd-p | defaults | 50.00 | 50.00 | 50.00 |" in out and "| cmd-p | warm-up |" in out
    assert main(["report", str(tmp_path / "first"), "--validation", "--with", str(tmp_path / "again")]) == 2
    assert capsys.readouterr().err.startswith("cmd-ray: error: --with: ")
