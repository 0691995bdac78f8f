"""Ray Tune sweeps: grids, the results table and report, W&B offline runs and key hygiene,
resuming a sweep whose driver was killed. Sweeps run as `cmd-ray sweep` subprocesses."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from cmd_ray.config import ConfigError, from_dict
from cmd_ray.console import RAY_LINE
from cmd_ray.data import materialise
from cmd_ray.grid import check_grid
from cmd_ray.noise import NoiseSpec
from cmd_ray.results import images_evaluated, report_table, trial_rows

from .conftest import kill_the_ray_of, ray_sessions_of, ray_sessions_started_since

FAKE_KEY = "fa4e0000000000000000000000000000deadbeef"  # 40 hex chars, the shape of a W&B key


def test_grid_is_the_cartesian_product_in_order():
    cfg = from_dict({"sweep": {"grid": {"noise.rate": [0.2, 0.5], "method": ["ce", "cmd-p"], "seed": [0, 1]}}})
    points = check_grid(cfg)
    assert len(points) == 8
    assert points[0] == {"noise.rate": 0.2, "method": "ce", "seed": 0}
    assert points[-1] == {"noise.rate": 0.5, "method": "cmd-p", "seed": 1}


@pytest.mark.parametrize(
    "grid,match",
    [
        ({"noise.rate": [0.2, 1.5]}, r"^sweep\.grid: the point noise\.rate=1\.5 is refused: noise\.rate: got 1\.5"),
        ({"knowledge.tau": ["high"]}, r"^sweep\.grid: the point knowledge\.tau='high' is refused"),
        ({"noise.colour": [1]}, r"noise\.colour: unknown key"),
        ({"ray.max_failures": [1]}, r"^sweep\.grid\.ray\.max_failures: not sweepable"),
        ({"seed": 3}, r"^sweep\.grid\.seed: got 3; allowed: a non-empty list of values$"),
    ],
)
def test_bad_grid_is_refused_before_any_work(grid, match):
    with pytest.raises(ConfigError, match=match):
        check_grid(from_dict({"sweep": {"grid": grid}}))


def test_report_table_gives_mean_and_std_over_seeds():
    base = from_dict({}).to_dict()
    rows = []
    for seed, accs in ((0, [0.5, 0.7]), (1, [0.6, 0.9])):
        history = [{"epoch": e, "mean/test_accuracy": a} for e, a in enumerate(accs)]
        rows += trial_rows(f"t{seed}", {"seed": seed, "method": "cmd-p"}, base, history, "finished", "")
    rows += trial_rows("t9", {"seed": 2, "method": "cmd-p"}, base, [], "failed", "boom")
    table = report_table(rows)
    assert "cmd-p" in table and "symmetric 0.4" in table
    assert "80.00±14.14 / 80.00±14.14 (n=2)" in table  # finals 0.7 and 0.9
    assert "failed trials: t9" in table


def test_a_rerun_is_compared_cell_by_cell_and_seed_by_seed_with_the_table_it_replaces():
    from cmd_ray.results import compare_table

    base = from_dict({}).to_dict()

    def sweep(finals: dict[int, float]) -> list[dict]:
        rows = []
        for seed, final in finals.items():
            history = [{"epoch": 0, "mean/test_accuracy": final}]
            rows += trial_rows(f"t{seed}", {"seed": seed, "method": "ce"}, base, history, "finished", "")
        return rows

    table = compare_table(sweep({0: 0.80, 1: 0.70}), sweep({0: 0.80, 1: 0.60, 2: 0.9}))
    lines = table.splitlines()
    assert len(lines) == 5, table
    assert lines[2].startswith("| ce | symmetric 0.4 | 75.00±7.07 (seeds 0, 1) | 76.67±15.28 (seeds 0, 1, 2) |")
    assert lines[2].endswith("| -1.67 | +10.00 |")  # seed 1 differs by 10 points; seed 2 has no pair
    assert lines[4] == "The two hold other seeds at: ce, symmetric 0.4 (their difference is of means over other seeds)."
    same = compare_table(sweep({0: 0.80, 1: 0.70}), sweep({0: 0.80, 1: 0.60})).splitlines()
    assert len(same) == 3 and same[2] == "| ce | symmetric 0.4 | 75.00±7.07 | 70.00±14.14 | +5.00 | +10.00 |"


def test_rows_added_by_a_later_sweep_join_the_table_once_and_a_repeated_run_or_another_budget_is_refused(
    tmp_path, capsys
):
    import pyarrow as pa

    from cmd_ray.cli import main

    base = from_dict({}).to_dict()

    def write(folder: Path, method: str, seeds: list[int]) -> None:
        rows = []
        for seed in seeds:
            history = [{"epoch": 0, "mean/test_accuracy": 0.5 + seed / 10}]
            rows += trial_rows(f"t{seed}", {"seed": seed, "method": method}, base, history, "finished", "")
        folder.mkdir()
        pq.write_table(pa.Table.from_pylist(rows), folder / "results.parquet")

    write(tmp_path / "first", "cmd-p", [0, 1])
    write(tmp_path / "later", "jocor", [0, 1])  # the same trial ids t0, t1: kept apart
    write(tmp_path / "again", "cmd-p", [1])
    plots = tmp_path / "joined-plots"
    assert main(["report", str(tmp_path / "first"), "--with", str(tmp_path / "later"), "--plots", str(plots)]) == 0
    assert (plots / "accuracy_vs_epoch.png").is_file() and not (tmp_path / "first" / "plots").exists()
    table = capsys.readouterr().out
    assert "jocor " in table and "cmd-p " in table and table.count("(n=2)") == 2
    assert table.index("jocor ") < table.index("cmd-p ")  # the registry's order: rivals before CMD
    assert main(["report", str(tmp_path / "first"), "--with", str(tmp_path / "again")]) == 2
    assert "--with: " in capsys.readouterr().err
    # A sweep run under another budget (or data, model, optimiser) does not join the table.
    base = from_dict({"epochs": 40}).to_dict()
    write(tmp_path / "longer", "jocor", [2])
    assert main(["report", str(tmp_path / "first"), "--with", str(tmp_path / "longer")]) == 2
    assert capsys.readouterr().err.strip() == (
        f"cmd-ray: error: --with: {tmp_path / 'longer'} ran with epochs 40, {tmp_path / 'first'} with 5: "
        "the sweeps of a joined table share their runs' budget, data, model and optimiser"
    )


def _sweep_cmd(root: Path, folder: Path, name: str, *extra: str) -> list[str]:
    return [
        sys.executable, "-m", "cmd_ray.cli", "sweep",
        "--set", f"data.root={root}",
        "--set", "data.train_subset=null",
        "--set", "epochs=2",
        "--set", "batch_size=100",
        "--set", f"sweep.storage_path={folder}",
        "--set", f"sweep.name={name}",
        "--set", "sweep.grid={noise.rate: [0.2, 0.5], method: [ce, cmd-p]}",
        "--set", "ray.num_cpus=2",
        *extra,
    ]  # fmt: skip


@pytest.fixture
def sweep_env(fake_fmnist_root, tmp_path):
    """Subprocess environment: fake data pre-cached (Debian's copy hidden), fake W&B key."""
    for rate in (0.2, 0.5):  # the subprocess only reads this cache, never raw files
        materialise("fashion-mnist", fake_fmnist_root, NoiseSpec("symmetric", rate), 0)
    env = {k: v for k, v in os.environ.items() if not k.startswith(("RAY_", "WANDB_"))}
    env.update(WANDB_API_KEY=FAKE_KEY, WANDB_MODE="offline", RAY_TRAIN_ENABLE_PREEMPTION_WATCHER="0")
    env["HOME"] = str(tmp_path / "home")  # no ~/.netrc, nothing shared with the user's W&B
    # Tune warns of a callback slower than 0.5 s, which a loaded 2-core machine can reach by
    # scheduling alone; that our callback never waits is pinned without a clock
    # (test_the_wandb_callback_never_waits_on_wandb_while_trials_run), a blocking one still shows.
    env["TUNE_WARN_THRESHOLD_S"] = "5"
    return env


def tracebacks_in(output: str) -> list[str]:
    """Every traceback in a sweep's console output, each with the "(name pid=N)" prefix Ray puts
    on its process's lines (or "(driver)"). None is passed over: Ray's own harmless noise is kept
    off the console by cmd-ray (console.RayNoiseFilter), so any traceback here reached a user."""
    by_process: dict[str, list[str]] = {}
    for line in output.splitlines():
        match = RAY_LINE.match(line)
        process = match["process"] if match else "driver"
        by_process.setdefault(process, []).append(match["text"] if match else line)
    return [
        f"({process}) {block.strip()}"
        for process, lines in by_process.items()
        for block in "\n".join(lines).split("Traceback (most recent call last):")[1:]
    ]


def test_ray_noise_stays_off_the_console_and_everything_else_reaches_it():
    """Blocks Ray prints and itself calls harmless (a SIGTERM raced at a process's exit, a
    resource request that timed out on a loaded machine) are dropped; any other traceback, and
    every other line, passes in order, whatever process printed it."""
    import io

    from cmd_ray.console import RayNoiseFilter

    sigterm_race = (
        "\x1b[36m(_QueueActor pid=2898)\x1b[0m Exception ignored in: <module 'threading'>\n"
        "\x1b[36m(_QueueActor pid=2898)\x1b[0m Traceback (most recent call last):\n"
        '\x1b[36m(_QueueActor pid=2898)\x1b[0m   File "ray/_private/worker.py", line 1063, in sigterm_handler\n'
        "\x1b[36m(_QueueActor pid=2898)\x1b[0m SystemExit: 1\n"
    )
    overloaded = (
        "(TrainController pid=5) Failed to send resource request for x. If this only happens transiently "
        "during network partition or CPU being overloaded, it's safe to ignore this error. If this error "
        "persists, file a GitHub issue.\n"
        "(TrainController pid=5) Traceback (most recent call last):\n"
        '(TrainController pid=5)   File "ray/train/v2/_internal/autoscaling_coordinator_client.py", line 58, in send\n'
        "(TrainController pid=5) ray.exceptions.GetTimeoutError: Get timed out: some object(s) not ready.\n"
    )
    wandb_fault = (
        "(_WandbLoggingActor pid=77) Traceback (most recent call last):\n"
        '(_WandbLoggingActor pid=77)   File "wandb/sdk/lib/sock_client.py", line 1, in _read\n'
        "(_WandbLoggingActor pid=77) ConnectionResetError: Connection lost\n"
    )
    progress = "(RayTrainWorker pid=3) [ce] epoch   1/3  test acc % [ 74.4  75.7]\n"
    console = io.StringIO()
    noise_filter = RayNoiseFilter(console)
    for text in ("[cmd-ray] sweep 'x': 4 trials\n", sigterm_race[:40], sigterm_race[40:], progress, overloaded,
                 "(TrainController pid=5) Failed to send resource request, without a traceback\n", wandb_fault,
                 progress, "Traceback (most recent call last):\nKeyError: 'x'\n"):  # fmt: skip
        noise_filter.write(text)
    noise_filter.close_blocks()
    shown = console.getvalue()
    assert noise_filter.dropped == 2
    assert shown.count(progress) == 2 and shown.startswith("[cmd-ray] sweep 'x': 4 trials\n")
    assert "without a traceback" in shown and "sigterm_handler" not in shown and "GetTimeoutError" not in shown
    found = tracebacks_in(shown)
    assert len(found) == 2 and "ConnectionResetError" in found[1] and found[0] == "(driver) KeyError: 'x'"


def _files_containing(folder: Path, needle: bytes) -> list[Path]:
    hits = []
    for path in folder.rglob("*"):
        if path.is_file() and not path.is_symlink():
            try:
                if needle in path.read_bytes():
                    hits.append(path)
            except OSError:
                pass
    return hits


@pytest.mark.slow
def test_smoke_sweep_writes_table_plots_offline_wandb_and_never_the_key(
    fake_fmnist_root, tmp_path, sweep_env, local_ray
):
    """Placement trial (two trials at once) on the whole smoke grid. Placement workers (a Ray Train
    run per trial) is checked for the same by the load bench's sweep,
    test_load_bench_bounds_concurrency_by_resources_and_reports_peak_memory.

    Also: the sweep starts its own Ray while this test process holds another local Ray (the
    local_ray fixture), and Ray Train's helpers in the sweep (the placement-group cleaner asks the
    State API) talk to their own (this replaced a test of two sweeps at once: the same two local
    Rays on one machine, at the cost of one Ray start instead of two sweeps)."""
    folder = tmp_path / "sweeps"
    cmd = _sweep_cmd(fake_fmnist_root, folder, "smoke", "--set", "sweep.placement=trial")
    started = time.time()
    proc = subprocess.run(cmd, env=sweep_env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "multiple active Ray instances" not in proc.stdout + proc.stderr
    table = pq.read_table(folder / "smoke" / "results.parquet").to_pylist()
    assert all(r["mean/test_accuracy"] > 0.3 for r in table)
    _a_user_sees_the_whole_sweep_and_never_the_key(proc, folder / "smoke", started, epochs=2)


def _a_user_sees_the_whole_sweep_and_never_the_key(
    proc: subprocess.CompletedProcess,
    sweep: Path,
    started: float,
    epochs: int,
    reported: bool = True,
    rates: tuple[float, ...] = (0.2, 0.5),
) -> None:
    """What a finished sweep of _sweep_cmd's grid (ce and cmd-p at symmetric `rates`) must
    show: every trial's epochs in the table, one offline W&B run per trial; the W&B key in no
    file, line or Ray log; no traceback and none of the console noise a user would have to learn
    to ignore. `reported` (`cmd-ray sweep`, not the load bench): also the table and the finding in
    words on the console, the plots and the `wandb sync` hint (written from the results table
    whatever the placement)."""
    table = pq.read_table(sweep / "results.parquet").to_pylist()
    trials = 2 * len(rates)
    assert len({r["trial_id"] for r in table}) == trials and len(table) == epochs * trials
    assert {(r["method"], r["noise.rate"]) for r in table} == {(m, rate) for m in ("ce", "cmd-p") for rate in rates}
    assert all(r["status"] == "finished" for r in table)
    assert {r["train_samples"] for r in table} == {600}  # the fake data set, not a real one
    runs = list((sweep / "wandb").rglob("offline-run-*"))
    assert len(runs) == trials, runs
    if reported:
        assert "symmetric 0.5 final / best" in proc.stdout and "cmd-p" in proc.stdout
        assert re.search(r"^symmetric 0\.5: (ce|cmd-p) ends best, ", proc.stdout, re.M)  # the finding in words
        for png in ("accuracy_vs_epoch.png", "accuracy_vs_noise.png", "selection_vs_epoch.png"):
            assert (sweep / "plots" / png).stat().st_size > 5000
        assert "wandb sync" in proc.stdout
    # The key is in the environment only: no file the sweep wrote may hold it.
    assert _files_containing(sweep, FAKE_KEY.encode()) == []
    assert FAKE_KEY not in proc.stdout + proc.stderr
    # ... nor any log or record of the Ray the sweep started (the key was in the environment
    # before that Ray started; Ray's W&B callback used to put it in a runtime environment,
    # which Ray's runtime-env agent logs in plain text).
    sessions = ray_sessions_started_since(started)
    assert sessions, "the sweep's Ray session folder was not found"
    for session in sessions:
        assert _files_containing(Path("/tmp/ray") / session, FAKE_KEY.encode()) == []
    # W&B's logging actors end quietly (no teardown traceback when Ray removes them).
    assert "ConnectionResetError" not in proc.stdout + proc.stderr
    assert tracebacks_in(proc.stdout + "\n" + proc.stderr) == [], proc.stderr[-3000:]
    # No console noise a user must learn to ignore: Tune's slow-callback warning (the W&B
    # callback used to wait on each trial's queue actor), Ray's restart warning for the W&B
    # logging actor, a spread printed for a single seed, Ray's token-authentication notice.
    # Nor a progress line of one trial folded into another's ("[repeated 2x across cluster]").
    quiet = ("may be a performance bottleneck", "has constructor arguments in the object store", "±0.00", "[repeated")
    for noise in (*quiet, "Token authentication is enabled"):
        assert noise not in proc.stdout + proc.stderr, noise


def _trial_histories(sweep: Path) -> dict[str, list[dict]]:
    """Each trial's history in the checkpoint a resume would start from: for placement workers
    the latest one Ray Train registered, for placement trial the one its pointer names."""
    out = {}
    for run in (sweep / "train").iterdir() if (sweep / "train").is_dir() else ():
        try:
            snapshot = json.loads((run / "checkpoint_manager_snapshot.json").read_text())
            latest = snapshot["latest_checkpoint_result"]["checkpoint_dir_name"]
            out[run.name] = json.loads((run / latest / "history.json").read_text())
        except (OSError, TypeError, KeyError, ValueError):
            continue  # nothing registered yet, or caught mid-write
    for trial in (sweep / "trials").iterdir() if (sweep / "trials").is_dir() else ():
        try:  # placement trial: the checkpoint its pointer names, in Ray Train's format
            latest = (trial / "latest_checkpoint.txt").read_text().strip()
            out[trial.name] = json.loads((trial / latest / "history.json").read_text())
        except (OSError, ValueError):
            continue
    return out


def _wait_for_histories(sweep: Path, ready: Callable[[dict[str, list[dict]]], bool], driver) -> None:
    """Poll the trials' kept histories until `ready` says so (the sweep's driver still running)."""
    deadline = time.time() + 600
    while time.time() < deadline:
        time.sleep(0.2)
        if ready(_trial_histories(sweep)):
            return
        if driver.poll() is not None:
            pytest.fail("the sweep ended first: " + (driver.communicate()[0] or "")[-3000:])
    driver.kill()
    pytest.fail("the sweep never got there")


def _finished_at(histories: dict[str, list[dict]]) -> dict[str, list]:
    return {trial: [r["finished_at"] for r in history] for trial, history in histories.items()}


@pytest.mark.slow
def test_a_killed_sweep_resumes_and_a_ctrl_c_stops_it_says_so_and_its_printed_command_finishes_it(
    fake_fmnist_root, tmp_path, sweep_env
):
    """One sweep (placement trial, two trials one at a time, 5 epochs each) stopped twice:
    1. its driver and local Ray killed at once (SIGKILL) when one trial is complete and the other
       has kept its first epoch; the same command without --resume is refused in one line and
       touches nothing;
    2. `--resume` goes on from the interrupted trial's checkpoint, saying so; Ctrl-C (SIGINT to the
       process group, as a terminal sends it) once it has kept one more epoch stops the sweep: exit 130, one
       line naming what finished and the command that resumes it, rows so far with no trial
       recorded finished without every epoch, no traceback or crash dump on the console;
    3. the printed command finishes the sweep: no finished trial trained again, no epoch kept
       before either stop trained again.
    Placement workers (each trial a Ray Train run, resumed from Train's checkpoints) after its
    driver is killed is pinned on a cluster with object storage,
    test_multinode.py::test_a_sweep_on_the_cluster_keeps_everything_on_s3_and_resumes_after_its_driver_dies."""
    import shlex

    folder = tmp_path / "sweeps"
    sweep = folder / "resume"
    # A short sleep per step keeps an epoch long enough to stop the driver mid-trial. The kill is
    # sent once the second trial has kept 1 epoch (it may keep a 2nd before the kill lands), Ctrl-C
    # once it has kept one more: at least two epochs (over a second) are left at each stop, so it
    # lands mid-trial however loaded the machine.
    cmd = _sweep_cmd(fake_fmnist_root, folder, "resume", "--set", "epochs=5", "--set", "sweep.placement=trial",
                     "--set", "sweep.cpus_per_trial=2", "--set", "testing.step_sleep=0.1",
                     "--set", "sweep.grid={noise.rate: [0.5], method: [ce, cmd-p]}")  # fmt: skip
    popen = dict(env=sweep_env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)

    # 1. Killed.
    driver = subprocess.Popen(cmd, **popen)
    _wait_for_histories(
        sweep, lambda h: any(len(x) == 5 for x in h.values()) and any(len(x) == 1 for x in h.values()), driver
    )
    os.killpg(driver.pid, signal.SIGKILL)  # the driver and the Ray it started, at once
    driver.wait(timeout=60)
    kill_the_ray_of(driver.pid)  # stragglers of the killed driver's own local Ray, if any
    killed = _trial_histories(sweep)
    finished = {t: h for t, h in killed.items() if len(h) == 5}
    (interrupted,) = [t for t, h in killed.items() if len(h) < 5]
    kept = len(killed[interrupted])
    assert len(finished) == 1

    refused = subprocess.run(cmd, env=sweep_env, capture_output=True, text=True, timeout=300)
    assert refused.returncode == 2, refused.stderr[-3000:]
    assert refused.stderr.strip().splitlines() == [
        f"cmd-ray: error: sweep.name: a sweep named 'resume' already exists at {sweep}; "
        "pass --resume to continue it, or choose another sweep.name"
    ]
    assert _finished_at(_trial_histories(sweep)) == _finished_at(killed)  # nothing trained, nothing overwritten

    # 2. Resumed, then stopped by Ctrl-C.
    driver = subprocess.Popen(cmd + ["--resume"], **popen)
    _wait_for_histories(sweep, lambda h: len(h.get(interrupted, [])) == kept + 1, driver)
    os.killpg(driver.pid, signal.SIGINT)
    output = driver.communicate(timeout=300)[0]
    assert driver.returncode == 130, output[-3000:]
    assert f"resumed from the checkpoint after epoch {kept}" in output, output[-3000:]
    ours = [line for line in output.splitlines() if line.startswith("cmd-ray:")]
    assert len(ours) == 1 and ours[0].startswith("cmd-ray: sweep stopped by Ctrl-C (SIGINT) after "), output[-3000:]
    assert re.search(
        r": 1 of 2 trials finished \((ce|cmd-p), symmetric 0\.5, seed 0\), 1 stopped before their last epoch "
        r"\(not recorded as finished\), 0 failed, 0 not started; rows so far in ",
        ours[0],
    ), ours[0]
    resume = ours[0].split("resume with: ", 1)[1]
    assert resume.endswith(" --resume") and "Tuner.restore" not in output
    assert tracebacks_in(output) == [] and "Fatal Python error" not in output, output[-3000:]
    rows = pq.read_table(sweep / "results.parquet").to_pylist()
    statuses = {r["trial_id"]: r["status"] for r in rows}
    assert statuses == {**dict.fromkeys(finished, "finished"), interrupted: "interrupted"}
    assert len([r for r in rows if r["status"] == "finished"]) == 5 and all(
        r["mean/test_accuracy"] is not None for r in rows if r["status"] == "finished"
    )
    stopped = _trial_histories(sweep)

    # 3. The printed command finishes it.
    words = shlex.split(resume)
    assert words[:2] == ["cmd-ray", "sweep"]
    proc = subprocess.run([sys.executable, "-m", "cmd_ray.cli", *words[1:]], env=sweep_env, capture_output=True,
                          text=True, timeout=900)  # fmt: skip
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert f"resumed from the checkpoint after epoch {len(stopped[interrupted])}" in proc.stdout + proc.stderr
    after = _finished_at(_trial_histories(sweep))
    assert len(after) == 2 and all(len(h) == 5 for h in after.values())
    assert {t: after[t] for t in finished} == _finished_at(finished), "re-ran a finished trial"
    for before in (killed, stopped):  # epochs kept before each stop were not trained again
        assert all(after[t][: len(h)] == [r["finished_at"] for r in h] for t, h in before.items())
    table = pq.read_table(sweep / "results.parquet").to_pylist()
    assert len(table) == 10 and all(r["status"] == "finished" for r in table)


@pytest.mark.slow
def test_load_bench_bounds_concurrency_by_resources_and_reports_peak_memory(fake_fmnist_root, tmp_path, sweep_env):
    """Its sweep is also the smoke test of placement workers (each trial a Ray Train run): what a
    user sees of it is checked as for test_smoke_sweep_writes_table_plots_offline_wandb_and_never_the_key
    but the printed report and plots, which the bench does not write (they come from the results
    table whatever the placement; the smoke test pins them)."""
    folder = tmp_path / "sweeps"
    out = tmp_path / "load.json"
    # Two trials, both at once (the bound below): what a trial of its own would not show.
    cmd = _sweep_cmd(fake_fmnist_root, folder, "load", "--set", "epochs=1", "--set", "ray.cpus_per_worker=0.5",
                     "--set", "sweep.placement=workers",
                     "--set", "sweep.grid={noise.rate: [0.5], method: [ce, cmd-p]}")  # fmt: skip
    cmd[cmd.index("sweep")] = "bench"
    cmd.insert(cmd.index("bench") + 1, "load")
    started = time.time()
    proc = subprocess.run(cmd + ["--output-json", str(out)], env=sweep_env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    sweep = folder / "load"
    _a_user_sees_the_whole_sweep_and_never_the_key(proc, sweep, started, epochs=1, reported=False, rates=(0.5,))
    figures = json.loads(out.read_text())
    assert figures["trials"] == figures["finished"] == 2 and figures["failed"] == 0
    assert figures["concurrency_bound_trials"] == 2  # 2 CPUs / (2 workers x 0.5 CPU)
    assert 2 <= figures["peak_train_workers"] <= 4 and figures["peak_trial_drivers"] <= 2
    assert 0.1 < figures["peak_tree_pss_gib"] < 64
    assert "[cmd-ray] load: 2/2 trials finished" in proc.stdout


def test_a_results_table_keeps_every_column_any_trial_has():
    from cmd_ray.results import rows_table

    table = rows_table([{"trial_id": "a", "method": "ce"}, {"trial_id": "b", "method": "ce", "testing.nan_step": 8}])
    assert table.column_names == ["trial_id", "method", "testing.nan_step"]
    assert table.column("testing.nan_step").to_pylist() == [None, 8]


def test_a_trial_placed_in_its_own_process_steps_exactly_as_the_in_process_trainer(
    fake_fmnist_root, tmp_path, local_ray
):
    import torch

    from cmd_ray.results import read_results
    from cmd_ray.sweep import run_sweep
    from cmd_ray.trainer import train_in_process

    from .conftest import assert_same_steps, tiny_config

    def config(trace: str):
        return tiny_config(
            fake_fmnist_root,
            testing__trace_dir=str(tmp_path / trace),
            sweep__name="same",
            sweep__storage_path=str(tmp_path / "sweeps"),
            sweep__placement="trial",
            sweep__grid={"labels.trust": ["small_loss"]},
            sweep__wandb={"mode": "disabled"},
        )

    folder = run_sweep(config("trial"), log=lambda _: None)
    rows = read_results(folder)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as the trial (sweep.cpus_per_trial = 1): the same float reductions
    try:
        ref = train_in_process(config("ref"), log=lambda _: None)["history"]
    finally:
        torch.set_num_threads(threads)
    # 2 epochs x 512 samples / 64 per batch
    assert_same_steps(tmp_path / "trial", tmp_path / "ref", peers=2, steps=16, rel=1e-6, abs=1e-7)
    assert [r["epoch"] for r in rows] == [0, 1]
    for row, expected in zip(rows, ref):
        for key in ("peer0/test_accuracy", "peer1/test_accuracy", "ensemble/test_accuracy", "mean/selected_fraction"):
            assert row[key] == pytest.approx(expected[key], abs=1e-9), key


def test_the_wandb_callback_never_waits_on_wandb_while_trials_run(monkeypatch):
    """Tune's loop calls the callback on every result; W&B's work happens in its own actor,
    and the callback only sends to it (waiting there made Tune warn "may be a performance
    bottleneck" and slowed every trial). Only the sweep's end waits for W&B to finish."""
    from types import SimpleNamespace

    import ray

    from cmd_ray.wandb_runs import SweepWandbCallback

    sent: list[tuple] = []

    class Sender:
        def __getattr__(self, method):
            return SimpleNamespace(remote=lambda *args: sent.append((method, *args)) or f"ref-{method}")

    def no_waiting(*_, **__):
        raise AssertionError("the callback waited on the W&B actor during the sweep")

    callback = SweepWandbCallback("cmd-ray", "smoke")
    callback._runs = Sender()
    monkeypatch.setattr(ray, "get", no_waiting)
    trial = SimpleNamespace(trial_id="t1", config={"base": from_dict({}).to_dict(), "point": {"method": "ce"}})
    callback.on_trial_start(0, [trial], trial)
    callback.on_trial_result(1, [trial], trial, {"mean/test_accuracy": 0.5, "trial_id": "t1", "nan": float("nan")})
    callback.on_trial_complete(2, [trial], trial)
    assert [s[0] for s in sent] == ["start", "log", "finish"]
    assert sent[0][2]["config"]["method"] == "ce" and sent[0][2]["group"] == "smoke"
    assert sent[1][2] == {"mean/test_accuracy": 0.5}  # Tune's bookkeeping and non-finite values left out
    waited = []
    monkeypatch.setattr(ray, "get", lambda ref, timeout=None: waited.append(ref))
    monkeypatch.setattr(ray, "kill", lambda actor: None)
    callback.on_experiment_end([trial])
    assert waited == ["ref-close"] and callback._runs is None


def test_a_results_table_the_storage_refuses_is_one_line_and_resume_writes_it_without_training(
    fake_fmnist_root, tmp_path, local_ray, monkeypatch
):
    import errno

    from cmd_ray import sweep as sweep_module
    from cmd_ray.results import read_results
    from cmd_ray.storage import StorageError
    from cmd_ray.sweep import run_sweep

    from .conftest import tiny_config

    cfg = tiny_config(
        fake_fmnist_root,
        epochs=1,
        sweep__name="full",
        sweep__storage_path=str(tmp_path / "sweeps"),
        sweep__placement="trial",
        sweep__grid={"method": ["ce"]},
        sweep__wandb={"mode": "disabled"},
    )

    def full(path, table):
        raise StorageError(errno.ENOSPC, f"{path}: cannot write (No space left on device); nothing was written there")

    monkeypatch.setattr(sweep_module, "write_parquet_atomic", full)
    with pytest.raises(StorageError) as caught:
        run_sweep(cfg, log=lambda _: None)
    sweep = tmp_path / "sweeps" / "full"
    assert caught.value.strerror == (
        f"{sweep / 'results.parquet'}: cannot write (No space left on device); nothing was written there; "
        "the trials are kept: --resume writes it without training"
    )
    trained = _trial_histories(sweep)
    assert len(trained) == 1 and not (sweep / "results.parquet").exists()
    monkeypatch.undo()
    run_sweep(cfg, resume=True, log=lambda _: None)
    rows = read_results(sweep)
    assert [r["finished_at"] for r in rows] == [r["finished_at"] for r in next(iter(trained.values()))]


def test_percentage_panels_stop_at_100(tmp_path, monkeypatch):
    from cmd_ray import report

    base = from_dict({}).to_dict()
    history = [{"epoch": e, "mean/test_accuracy": 0.9, "mean/selected_fraction": 1.0,
                "mean/selection_precision": 1.0, "mean/memorisation": 0.0} for e in range(3)]  # fmt: skip
    rows = trial_rows("t0", {"method": "cmd-p"}, base, history, "finished", "")
    limits = []
    real_save = report.save_figure

    def keep_limits(fig, path):
        limits.extend(ax.get_ylim() for ax in fig.axes)
        return real_save(fig, path)

    monkeypatch.setattr(report, "save_figure", keep_limits)
    report.write_plots(rows, tmp_path)
    assert limits and all(-1.0 <= low and high <= 101.0 for low, high in limits), limits


def test_the_selection_plot_and_table_show_the_peers_disagreement_beside_selection_precision(tmp_path, monkeypatch):
    from cmd_ray import report, results

    base = from_dict({}).to_dict()
    history = [{"epoch": e, "mean/test_accuracy": 0.9, "mean/selected_fraction": 1.0, "mean/selection_precision": 0.9,
                "mean/memorisation": 0.1, "mean/disagreement": 0.3 - 0.1 * e} for e in range(3)]  # fmt: skip
    rows = trial_rows("t0", {"method": "cmd-p"}, base, history, "finished", "")
    panels = []
    real_save = report.save_figure

    def keep_panels(fig, path):
        panels.append((Path(path).name, [ax.get_ylabel() for ax in fig.axes]))
        return real_save(fig, path)

    monkeypatch.setattr(report, "save_figure", keep_panels)
    report.write_plots(rows, tmp_path)
    selection = dict(panels)["selection_vs_epoch.png"]
    assert "selection precision (%)" in selection and "peer disagreement (%)" in selection
    table = results.selection_table(rows)
    assert "selection precision / memorisation / disagreement" in table
    assert "| cmd-p | 90.0 / 10.0 / 10.0 |" in table  # the last epoch's disagreement


# --------------------------------------------------------------------------------------
# Outputs that say only what is true


def test_a_named_run_or_a_resumed_sweep_continues_only_with_its_own_settings(fake_fmnist_root, tmp_path, capsys):
    """A run is its settings: resumed under others it would report them beside results it never
    computed. Refused before any work, in one line naming each key and both values; keys that
    say only where and how it runs may change."""
    from cmd_ray.cli import main
    from cmd_ray.identity import check_same_run, save_run_settings
    from cmd_ray.ray_train import storage_path

    from .conftest import tiny_config

    cfg = tiny_config(fake_fmnist_root, output_dir=str(tmp_path / "out"))
    run = str(Path(storage_path(cfg)) / "mine")
    save_run_settings(run, cfg)
    elsewhere = tiny_config(fake_fmnist_root, output_dir=str(tmp_path / "out"), ray__max_failures=3,
                            ray__log_level="INFO", testing__step_sleep=0.1)  # fmt: skip
    assert check_same_run(run, elsewhere, "--run-name", "x")
    argv = ["train", "--set", f"data.root={fake_fmnist_root}", "--set", f"output_dir={tmp_path / 'out'}",
            "--set", "epochs=2", "--set", "batch_size=64", "--set", "data.train_subset=512",
            "--set", "data.test_subset=256", "--set", "noise.rate=0.2", "--set", "peers=3",
            "--run-name", "mine"]  # fmt: skip
    assert main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [
        f"cmd-ray: error: --run-name: the run at {run} was started with other settings (noise.rate 0.4 then, 0.2 now; "
        "peers 2 then, 3 now); allowed: the settings it started with, to continue it, or another --run-name for a "
        "new run"
    ]
    assert sorted(p.name for p in Path(run).iterdir()) == ["settings.json"]  # nothing trained, nothing written

    sweep = tmp_path / "sweep"
    grid = {"noise.rate": [0.2, 0.5], "method": ["ce", "cmd-p"]}
    swept = from_dict({**cfg.to_dict(), "sweep": {"grid": grid, "max_concurrent_trials": 1}})
    save_run_settings(str(sweep), swept, sweep=True)
    more = from_dict({**cfg.to_dict(), "sweep": {"grid": grid, "max_concurrent_trials": 2, "placement": "trial"}})
    assert check_same_run(str(sweep), more, "--resume", "another sweep.name", sweep=True)
    other = from_dict({**cfg.to_dict(), "sweep": {"grid": {**grid, "noise.rate": [0.2, 0.8]}}})
    changed = r"sweep\.grid\.noise\.rate \[0\.2, 0\.5\] then, \[0\.2, 0\.8\] now\)"
    with pytest.raises(ConfigError, match=r"^--resume: the sweep at \S+ was started with other settings \(" + changed):
        check_same_run(str(sweep), other, "--resume", "another sweep.name", sweep=True)


def test_a_run_started_before_a_key_existed_resumes_while_that_key_holds_its_default(tmp_path):
    """A later cmd-ray adds keys (labels.mixture_warm_up, ...): a named run or sweep whose saved
    settings lack one still resumes while the key holds its default (what cmd-ray did before the
    key existed), and is refused, naming the key, when it is set to anything else."""
    import json

    from cmd_ray.identity import SETTINGS_FILE, check_same_run, save_run_settings

    cfg = from_dict({"noise": {"rate": 0.4}})
    save_run_settings(str(tmp_path), cfg)
    saved = json.loads((tmp_path / SETTINGS_FILE).read_text())
    del saved["identity"]["labels.mixture_warm_up"]  # as an older cmd-ray wrote it
    (tmp_path / SETTINGS_FILE).write_text(json.dumps(saved))
    assert check_same_run(str(tmp_path), cfg, "--run-name", "x")
    other = from_dict({"noise": {"rate": 0.4}, "labels": {"mixture_warm_up": 7}})
    with pytest.raises(ConfigError, match=r"labels\.mixture_warm_up \(not set\) then, 7 now"):
        check_same_run(str(tmp_path), other, "--run-name", "x")


def test_a_labels_file_edited_in_place_is_another_run_and_its_resume_is_refused(tmp_path):
    """A run (or sweep) reads its noise files by path: the same name over other content, resumed,
    would report one run of two label sets. The content is part of what a run is (a grid's files
    too); a run saved before cmd-ray kept it resumes on the name alone."""
    import json

    from cmd_ray.identity import SETTINGS_FILE, check_same_run, save_run_settings

    labels, grid_labels = tmp_path / "noisy.csv", tmp_path / "other.csv"
    labels.write_text("0\n1\n")
    grid_labels.write_text("1\n1\n")
    cfg = from_dict({"method": "ce", "noise": {"type": "labels", "labels": str(labels)}})
    run = tmp_path / "run"
    save_run_settings(str(run), cfg)
    assert check_same_run(str(run), cfg, "--run-name", "x")
    labels.write_text("1\n1\n")  # edited in place
    changed = rf"content of {re.escape(str(labels))} \"sha256:\w{{16}}\" then, \"sha256:\w{{16}}\" now\)"
    with pytest.raises(ConfigError, match=r"^--run-name: the run at \S+ was started with other settings \(" + changed):
        check_same_run(str(run), cfg, "--run-name", "x")
    saved = json.loads((run / SETTINGS_FILE).read_text())
    saved["identity"] = {k: v for k, v in saved["identity"].items() if not k.startswith("content of ")}
    (run / SETTINGS_FILE).write_text(json.dumps(saved))  # as an older cmd-ray wrote it
    assert check_same_run(str(run), cfg, "--run-name", "x")

    grid = {"noise": [{"type": "labels", "labels": str(grid_labels)}, {"type": "symmetric", "rate": 0.2}]}
    swept = from_dict({"method": "ce", "sweep": {"grid": grid}})
    save_run_settings(str(tmp_path / "sweep"), swept, sweep=True)
    assert check_same_run(str(tmp_path / "sweep"), swept, "--resume", "another sweep.name", sweep=True)
    grid_labels.write_text("0\n0\n")
    with pytest.raises(ConfigError, match="content of " + re.escape(str(grid_labels))):
        check_same_run(str(tmp_path / "sweep"), swept, "--resume", "another sweep.name", sweep=True)


def test_a_table_cell_holds_the_seeds_of_one_grid_point_and_names_its_figure():
    """Two values of a swept key at one seed are two cells, never one 'n=2' cell; the caption
    says the figure is the peers' mean and what final means."""
    from cmd_ray.results import report_table, table_caption

    base = from_dict({}).to_dict()
    rows = []
    for i, (tau, seed, acc) in enumerate(((0.5, 0, 0.30), (0.9, 0, 0.40), (0.9, 1, 0.50))):
        history = [{"epoch": 0, "mean/test_accuracy": acc}]
        point = {"knowledge.tau_end": tau, "seed": seed, "method": "cmd-p"}
        rows += trial_rows(f"t{i}", point, base, history, "finished", "")
    table = report_table(rows)
    assert "cmd-p [knowledge.tau_end=0.5] | 30.00 / 30.00 (n=1)" in table
    assert "cmd-p [knowledge.tau_end=0.9] | 45.00±7.07 / 45.00±7.07 (n=2)" in table
    assert "35.00" not in table  # the two points are never averaged
    caption = table_caption("mean/test_accuracy", 5)
    assert "the peers' mean (not their ensemble)" in caption and "the mean of the last 5 epochs" in caption


def test_a_report_says_how_many_test_images_its_accuracy_was_measured_on(tmp_path, monkeypatch):
    """A validation sweep evaluates the test set on a subset (data.test_subset: 1,000 images); a
    plain report of it must not pass those figures off as the whole test set's."""
    import pyarrow as pa

    from cmd_ray.report import report

    base = from_dict({}).to_dict()
    rows = []
    for i, images in enumerate((1000, 1000, 10000)):
        history = [{"epoch": 0, "mean/test_accuracy": 0.5, "test_samples": images}]
        rows += trial_rows(f"t{i}", {"seed": i, "method": "cmd-p"}, base, history, "finished", "")
    pq.write_table(pa.Table.from_pylist(rows[:2]), tmp_path / "results.parquet")
    axis_labels: list[str] = []

    def keep_labels(fig, path):  # the plots say it too, on their accuracy axes
        axis_labels.extend(ax.get_ylabel() for ax in fig.axes if "test accuracy" in ax.get_ylabel())
        return str(path)

    monkeypatch.setattr("cmd_ray.report.save_figure", keep_labels)
    table, _ = report(tmp_path, show=lambda _: None)
    assert table.startswith("Clean test accuracy on 1,000 test images (%)"), table.splitlines()[0]
    assert images_evaluated(rows) == "1,000-10,000" and images_evaluated([]) == ""
    assert set(axis_labels) == {
        "clean test accuracy on 1,000 images (%)",
        "final clean test accuracy on 1,000 images (%)",
    }


def test_a_validation_tie_chooses_nothing_and_says_tie():
    from cmd_ray.validation import validation_choice

    base = from_dict({"data": {"validation_fraction": 0.1}}).to_dict()
    rows = []
    for i, (tau, acc) in enumerate(((0.5, 0.3833), (0.9, 0.3833), (0.7, 0.30))):
        history = [{"epoch": 0, "mean/val_accuracy": acc}]
        rows += trial_rows(f"t{i}", {"knowledge.tau_end": tau, "method": "cmd-p"}, base, history, "finished", "")
    table, best = validation_choice(rows, last_epochs=1)
    assert best == {} and "(chosen)" not in table
    assert table.count("(tie: none chosen)") == 2
    assert "cmd-p: a tie between knowledge.tau_end=0.5, knowledge.tau_end=0.9" in table
    rows[0]["mean/val_accuracy"] = 0.3834  # a hundredth of a point apart: a choice
    assert validation_choice(rows, last_epochs=1)[1] == {"cmd-p": "knowledge.tau_end=0.5"}


def test_a_validation_candidate_missing_a_seed_is_shown_but_not_chosen():
    """A stopped (or partly failed) validation sweep: a candidate with fewer finished trials than
    the others is not ranked, however high its mean over the seeds it has (one lucky seed must
    not win), and the table says what it lacks."""
    from cmd_ray.validation import validation_choice

    base = from_dict({"data": {"validation_fraction": 0.1}}).to_dict()
    rows = []
    for tau, accuracies in ((0.5, (0.40, 0.41, 0.42)), (0.9, (0.55,))):  # tau 0.9: seeds 1 and 2 stopped
        for seed, acc in enumerate(accuracies):
            history = [{"epoch": 0, "mean/val_accuracy": acc}]
            point = {"knowledge.tau_end": tau, "method": "cmd-p", "seed": seed}
            rows += trial_rows(f"t{tau}-{seed}", point, base, history, "finished", "")
    table, best = validation_choice(rows, last_epochs=1)
    assert best == {"cmd-p": "knowledge.tau_end=0.5"}, table
    assert "| cmd-p | knowledge.tau_end=0.9 | 55.00 | - |" in table
    assert (
        "cmd-p, knowledge.tau_end=0.9: not ranked, no finished trial at symmetric 0.4 seed 1, symmetric 0.4 seed 2"
        in table
    )


def test_a_final_over_more_epochs_than_a_trial_ran_is_refused_naming_last_epochs(tmp_path, capsys):
    """`--last-epochs 5` on 3-epoch trials would caption the mean of 3 epochs "the mean of the
    last 5": the report and the validation choice refuse it in one line (a bench refuses it before
    any work: test_bad_input.py)."""
    import pyarrow as pa

    from cmd_ray.cli import main

    base = from_dict({"epochs": 3, "data": {"validation_fraction": 0.1}}).to_dict()
    history = [{"epoch": e, "mean/test_accuracy": 0.5, "mean/val_accuracy": 0.4} for e in range(3)]
    rows = trial_rows("t0", {"seed": 0, "method": "cmd-p"}, base, history, "finished", "")
    rows += trial_rows("t1", {"seed": 1, "method": "cmd-p"}, base, history[:2], "stopped", "")  # not counted
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "results.parquet")
    plots = str(tmp_path / "plots")
    for extra in ([], ["--validation"]):
        assert main(["report", str(tmp_path), "--last-epochs", "3", "--plots", plots, *extra]) == 0
        capsys.readouterr()
        assert main(["report", str(tmp_path), "--last-epochs", "4", "--plots", plots, *extra]) == 2
        err = capsys.readouterr().err.strip()
        expected = "--last-epochs: got 4; allowed: an integer in [1, 3] (the shortest finished trial has 3 epochs)"
        assert err == "cmd-ray: error: " + expected


def test_rows_of_a_labels_file_carry_its_name_and_realised_rate_not_an_unused_rate(tmp_path, capsys):
    from cmd_ray.cli import main
    from cmd_ray.results import trial_finals

    labels = tmp_path / "noisy.csv"
    labels.write_text("0\n1\n")
    base = from_dict({"method": "ce", "noise": {"type": "labels", "labels": str(labels)}}).to_dict()
    history = [{"epoch": 0, "mean/test_accuracy": 0.5, "realised_noise_rate": 0.295}]
    rows = trial_rows("t0", {"seed": 0}, base, history, "finished", "")
    assert rows[0]["noise.rate"] is None and rows[0]["noise.labels"] == str(labels)
    (final,) = trial_finals(rows)
    assert final["noise"] == "labels noisy.csv" and final["noise.rate"] == 0.295
    argv = ["show-config", "--set", "method=ce", "--set", "noise.type=labels", "--set", f"noise.labels={labels}"]
    assert main(argv) == 0
    shown = capsys.readouterr().out
    noise = shown[shown.index("noise:") : shown.index("model:")]
    assert "rate" not in noise and f"labels: {labels}" in noise


def test_a_trial_is_finished_only_with_every_epoch_recorded():
    from cmd_ray.sweep import trial_status

    assert trial_status(None, [{"epoch": 0}, {"epoch": 1}], epochs=2) == "finished"
    assert trial_status(None, [{"epoch": 0}], epochs=2) == "interrupted"
    assert trial_status(None, [], epochs=2) == "interrupted"  # stopped before its first report
    assert trial_status(RuntimeError("boom"), [{"epoch": 0}, {"epoch": 1}], epochs=2) == "failed"


def test_a_grid_is_checked_for_the_methods_its_points_run(tmp_path):
    """With real noisy labels (no known noise rate) the preset's own method (cmd-p) would need
    coteaching.forget_rate; a grid whose points all run other methods never runs it."""
    labels = tmp_path / "noisy.npy"
    labels.write_bytes(b"")
    noise = {"type": "labels", "labels": str(labels)}
    for grid in ({"method": ["ce", "dml"]}, {"variant": [{"method": "ce"}, {"method": "dml", "label": "all"}]}):
        check_grid(from_dict({"method": "cmd-p", "noise": noise, "sweep": {"grid": grid}}))
    with pytest.raises(ConfigError, match=r"^sweep\.grid: the point method='coteaching' is refused: "
                                          r"coteaching\.forget_rate: got null"):  # fmt: skip
        check_grid(from_dict({"method": "cmd-p", "noise": noise, "sweep": {"grid": {"method": ["ce", "coteaching"]}}}))
    with pytest.raises(ConfigError, match=r"^coteaching\.forget_rate: got null"):  # no grid: the method runs
        from_dict({"method": "cmd-p", "noise": noise})


@pytest.mark.parametrize("first", ["SIGINT", "SIGTERM"])
def test_a_second_stop_signal_ends_the_sweep_at_once_with_one_line(first):
    """The first SIGINT or SIGTERM asks Tune to stop gracefully (through the SIGUSR1 handler its
    run loop installs: a stand-in here); a second one ends the process at once: one line, the
    first signal's status, no traceback."""
    script = (
        "import os, signal, time\n"
        "from cmd_ray.stopping import StopSignals\n"
        "signal.signal(signal.SIGUSR1, lambda *_: print('tune asked to stop', flush=True))\n"
        "with StopSignals('cmd-ray sweep --resume'):\n"
        f"    os.kill(os.getpid(), signal.{first})\n"
        "    time.sleep(1)\n"
        "    os.kill(os.getpid(), signal.SIGINT)\n"
        "    time.sleep(30)\n"
        "print('not stopped')\n"
    )
    started = time.time()
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60)
    assert time.time() - started < 20
    assert proc.returncode == {"SIGINT": 130, "SIGTERM": 143}[first]
    assert proc.stdout == "tune asked to stop\n"
    assert proc.stderr.splitlines()[-1] == "cmd-ray: stopped at once; resume with: cmd-ray sweep --resume"
    assert "Traceback" not in proc.stderr


def test_the_suite_kills_only_the_ray_of_the_driver_it_killed(tmp_path):
    """A user's sweep may run beside the test suite: the suite's clean-up after killing a sweep's
    driver finds that driver's own Ray session by the pid Ray puts in its name, no other."""
    for name in ("session_2026-12-03_08-41-21_768461_13213", "session_2026-12-03_08-43-32_341985_14626",
                 "session_2026-12-03_08-44-01_000001_132130", "session_latest"):  # fmt: skip
        (tmp_path / name).mkdir()
    assert ray_sessions_of(13213, tmp_path) == ["session_2026-12-03_08-41-21_768461_13213"]
    assert ray_sessions_of(99, tmp_path) == []


def test_the_finding_in_words_names_the_best_its_margin_over_ce_a_level_result_as_level_and_unequal_seeds():
    from cmd_ray.results import findings

    base = from_dict({}).to_dict()

    def rows(finals: dict[str, float]) -> list[dict]:
        out = []
        for i, (method, acc) in enumerate(finals.items()):
            history = [{"epoch": 0, "mean/test_accuracy": acc}]
            out += trial_rows(f"t{i}", {"method": method}, base, history, "finished", "")
        return out

    assert findings(rows({"ce": 0.552, "coteaching": 0.7847, "cmd-p": 0.7824})) == [
        "symmetric 0.4: coteaching ends best, 78.5% (1 seed), 23.3 points above ce (55.2%); next cmd-p, 78.2% "
        "(0.2 points behind)."
    ]
    assert findings(rows({"ce": 1.0, "cmd-p": 1.0})) == ["symmetric 0.4: ce, cmd-p end level at 100.0% (1 seed)."]
    unequal = rows({"ce": 0.5, "cmd-p": 0.8}) + [{**r, "trial_id": "t9", "seed": 1} for r in rows({"ce": 0.6})]
    assert findings(unequal) == [
        "symmetric 0.4: cmd-p ends best, 80.0% (1 seed), 25.0 points above ce (55.0%); seeds differ (ce 2, cmd-p 1)."
    ]


@pytest.mark.parametrize("placement, dashboard", [("trial", False), ("workers", True)])
def test_a_sweeps_local_ray_starts_its_dashboard_only_where_ray_train_runs(monkeypatch, placement, dashboard):
    """The dashboard (11 processes) answers the State API, which Ray Train's placement-group
    cleaner asks; a sweep whose trials hold their peers runs no Ray Train and starts without it."""
    import ray

    from cmd_ray.sweep import init_ray_for_sweep

    calls = []
    monkeypatch.setattr(ray, "is_initialized", lambda: False)
    monkeypatch.setattr(ray, "init", lambda **kwargs: calls.append(kwargs))
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    monkeypatch.delenv("RAY_API_SERVER_ADDRESS", raising=False)  # restored after: start_local_ray sets it
    init_ray_for_sweep(from_dict({"sweep": {"placement": placement}}), slots=2)
    assert len(calls) == 1 and calls[0]["include_dashboard"] is dashboard
    assert calls[0]["resources"] == {"TRAIN_DRIVER": 2}


def test_a_trial_restarted_at_its_last_checkpoint_still_reports_its_last_record(
    fake_fmnist_root, tmp_path, monkeypatch
):
    """A sweep's driver killed as a trial wrote its last checkpoint, before Tune recorded the
    trial's last result: resumed, the trial starts again with nothing left to train. It used to
    report nothing, so Tune kept a result without metrics or config, and the sweep resumed after
    it crashed collecting its results ('NoneType' object is not subscriptable). It now reports its
    last record again; and a sweep with a trial Tune holds no result of says it did not finish."""
    from ray import tune

    from cmd_ray import sweep as sweep_module
    from cmd_ray.trainer import load_run_data

    from .conftest import tiny_config

    cfg = tiny_config(fake_fmnist_root, output_dir=str(tmp_path / "trial"), epochs=1, sweep__placement="trial")
    data = load_run_data(cfg)
    reported = []
    monkeypatch.setattr(tune, "report", reported.append)
    sweep_module._train_in_trial(cfg, data, "t", {"trial_start": time.time()})  # trains its epoch, reports it
    kept = {p: p.stat().st_mtime_ns for p in Path(cfg.output_dir).rglob("checkpoint_*/*")}
    sweep_module._train_in_trial(cfg, data, "t", {"trial_start": time.time()})  # restarted: nothing to train
    assert [r["epoch"] for r in reported] == [0, 0] and reported[1] == reported[0]
    # ... without writing again the checkpoint it just read (a kill mid-write would leave it torn)
    assert kept and {p: p.stat().st_mtime_ns for p in Path(cfg.output_dir).rglob("checkpoint_*/*")} == kept
    # A trial Tune holds no result of adds no rows (run_sweep then says the sweep did not finish).
    from types import SimpleNamespace

    from cmd_ray.sweep import collect_results

    never_reported = SimpleNamespace(config=None, error=None, metrics={}, path="x")
    assert collect_results([never_reported]).num_rows == 0
    import ray

    monkeypatch.setattr(sweep_module, "init_ray_for_sweep", lambda cfg, slots: None)
    monkeypatch.setattr(ray, "cluster_resources", lambda: {"CPU": 2.0})
    monkeypatch.setattr(sweep_module, "build_tuner", lambda *_: SimpleNamespace(fit=lambda: [never_reported]))
    with pytest.raises(sweep_module.SweepStopped) as stopped:
        sweep_module._fit_grid(cfg, str(tmp_path / "sweep"), [{"seed": 0}], False, [], lambda _: None, "again")
    assert "0 of 1 trials finished" in str(stopped.value) and str(stopped.value).endswith("resume with: again")


def test_a_trial_checkpoints_in_ray_trains_format_and_its_pointer_names_only_a_whole_one(fake_fmnist_root, tmp_path):
    """Placement trial writes the checkpoint Ray Train's workers write (a folder of per-peer files
    and history.json), then replaces the pointer, then removes the older folder: a trial killed
    at any moment resumes from a whole checkpoint, and the same reader loads both placements'."""
    import torch

    from cmd_ray.peer import build_peer
    from cmd_ray.trainer import LATEST_CHECKPOINT, load_run_data, read_checkpoint, write_latest_checkpoint

    from .conftest import tiny_config

    cfg = tiny_config(fake_fmnist_root)
    data = load_run_data(cfg)
    peers = [build_peer(cfg, k, data.info, 10, torch.device("cpu")) for k in range(2)]
    trial = tmp_path / "trial"
    write_latest_checkpoint(str(trial), peers, 1, [{"epoch": 0}])
    peers[0].method_state["seen"] = torch.arange(3.0)
    second = write_latest_checkpoint(str(trial), peers, 2, [{"epoch": 0}, {"epoch": 1}])
    assert (trial / LATEST_CHECKPOINT).read_text() == "checkpoint_000002"
    assert sorted(p.name for p in trial.iterdir()) == ["checkpoint_000002", LATEST_CHECKPOINT]
    assert sorted(p.name for p in Path(second).iterdir()) == ["history.json", "peer0_replica0.pt", "peer1_replica0.pt"]
    fresh = [build_peer(cfg, k, data.info, 10, torch.device("cpu")) for k in range(2)]
    assert read_checkpoint(second, fresh) == (2, [{"epoch": 0}, {"epoch": 1}])
    assert torch.equal(fresh[0].method_state["seen"], torch.arange(3.0))
    saved, loaded = peers[1].model.state_dict(), fresh[1].model.state_dict()
    assert all(torch.equal(saved[key], loaded[key]) for key in saved)
