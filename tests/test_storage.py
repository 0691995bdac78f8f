"""A full disk (or over-quota / too-large file) fails with one clear line, and nothing already
written is lost: atomic writes keep the previous version, and the figures reach the console."""

from __future__ import annotations

import errno
import json
import os
import resource
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from cmd_ray.cli import main
from cmd_ray.storage import StorageError, atomic_path, write_json_atomic

ROOT = Path(__file__).resolve().parents[1]


def test_a_full_disk_keeps_the_previous_file_and_leaves_no_temporary_file(tmp_path, monkeypatch):
    target = tmp_path / "summary.json"
    target.write_text('{"old": true}\n')

    def full(self, *args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(Path, "write_bytes", full)
    with pytest.raises(StorageError, match=r"summary\.json: cannot write \(No space left on device\); its previous"):
        write_json_atomic(target, {"new": True})
    monkeypatch.undo()
    assert target.read_text() == '{"old": true}\n'
    assert [p.name for p in tmp_path.iterdir()] == ["summary.json"]


def test_result_files_get_the_usual_permissions_not_a_temporary_files(tmp_path):
    mask = os.umask(0o022)
    try:
        path = write_json_atomic(tmp_path / "summary.json", {"a": 1})
    finally:
        os.umask(mask)
    assert Path(path).stat().st_mode & 0o777 == 0o644


def test_an_error_that_is_not_about_storage_is_not_disguised(tmp_path):
    with pytest.raises(ValueError):
        with atomic_path(tmp_path / "x.json"):
            raise ValueError("a bug")
    assert list(tmp_path.iterdir()) == []


def _limit_file_size(limit: int):
    def apply() -> None:
        # Over the limit a write fails with EFBIG, as on a full disk, instead of killing the process.
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))

    return apply


def test_training_on_full_storage_fails_in_one_line_keeps_the_old_summary_and_prints_the_figures(
    fake_fmnist_root, tmp_path
):
    out = tmp_path / "run"
    out.mkdir()
    (out / "summary.json").write_text('{"old": true}\n')
    args = [
        "--set", "epochs=1",
        "--set", f"output_dir={out}",
        "--set", f"data.root={fake_fmnist_root}",
        "--set", "data.train_subset=256",
        "--set", "data.test_subset=128",
    ]  # fmt: skip
    cli = [sys.executable, "-m", "cmd_ray.cli"]
    env = {**os.environ, "PYTHONDONTWRITEBYTECODE": "1"}
    # Build the data cache first, without the limit (here, in this process): the run itself must
    # fail only on its result.
    assert main(["prepare", *args]) == 0
    done = subprocess.run(
        [*cli, "train", "--in-process", *args],
        capture_output=True,
        text=True,
        env=env,
        cwd=tmp_path,
        timeout=300,
        preexec_fn=_limit_file_size(4096),  # the summary with its history is larger
    )
    assert done.returncode == 1, done.stderr
    lines = [line for line in done.stderr.splitlines() if line.startswith("cmd-ray:")]
    assert len(lines) == 1 and "Traceback" not in done.stderr
    assert "summary.json: cannot write (File too large); its previous version is kept" in lines[0]
    assert (out / "summary.json").read_text() == '{"old": true}\n'
    assert not [p for p in out.iterdir() if p.name.endswith(".tmp")]
    printed = json.loads(done.stdout[done.stdout.index("{") :])
    assert printed["test_accuracy"]["ensemble"]["final"] >= 0.0


def _run_limited(args: list[str], cwd: Path, limit: int) -> subprocess.CompletedProcess:
    """`cmd-ray ARGS` with files limited to `limit` bytes (a full disk, as the process sees it)."""
    env = {**os.environ, "PYTHONDONTWRITEBYTECODE": "1", "MPLCONFIGDIR": str(cwd / "mpl")}
    # matplotlib's font cache is written on first use: build it without the limit.
    subprocess.run([sys.executable, "-c", "import matplotlib.pyplot"], check=True, env=env, timeout=300)
    return subprocess.run(
        [sys.executable, "-m", "cmd_ray.cli", *args],
        capture_output=True,
        text=True,
        env=env,
        cwd=cwd,
        timeout=300,
        preexec_fn=_limit_file_size(limit),
    )


def _one_error_line(done: subprocess.CompletedProcess) -> str:
    lines = [line for line in done.stderr.splitlines() if line.startswith("cmd-ray:")]
    assert done.returncode == 1 and len(lines) == 1 and "Traceback" not in done.stderr, done.stderr[-3000:]
    return lines[0]


def test_a_report_on_full_storage_prints_the_table_and_fails_on_the_plots_in_one_line(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    from cmd_ray.config import from_dict
    from cmd_ray.results import trial_rows

    base = from_dict({}).to_dict()
    rows = []
    for seed in (0, 1):
        history = [{"epoch": e, "mean/test_accuracy": 0.5 + e / 10 + seed / 100} for e in range(3)]
        rows += trial_rows(f"t{seed}", {"seed": seed, "method": "cmd-p"}, base, history, "finished", "")
    sweep = tmp_path / "sweep"
    (sweep / "plots").mkdir(parents=True)
    pq.write_table(pa.Table.from_pylist(rows), sweep / "results.parquet")
    done = _run_limited(["report", str(sweep)], tmp_path, 4096)  # every plot is larger
    line = _one_error_line(done)
    assert line.startswith(f"cmd-ray: error: {sweep / 'plots'}/") and "cannot write (File too large)" in line
    assert "nothing was written there" in line
    assert "cmd-p " in done.stdout and "(n=2)" in done.stdout  # the figures reached the console first
    assert list((sweep / "plots").iterdir()) == []  # no partial or temporary plot left


def test_a_data_cache_on_full_storage_fails_in_one_line_and_leaves_no_partial_cache(fake_fmnist_root, tmp_path):
    cache = tmp_path / "cache"
    cache.mkdir()
    for name in ("fashion-mnist",):  # the raw files the cache is built from
        (cache / name).symlink_to(fake_fmnist_root / name)
    done = _run_limited(["prepare", "--set", f"data.root={cache}"], tmp_path, 64 * 1024)
    line = _one_error_line(done)
    assert line.startswith(f"cmd-ray: error: {cache}/") and ".parquet: cannot write (File too large)" in line
    assert not [p for p in cache.rglob("*") if p.suffix in (".parquet", ".tmp")]
    assert main(["prepare", "--set", f"data.root={cache}"]) == 0  # with room again (this process), the cache builds
    assert len([p for p in cache.rglob("*.parquet")]) == 2  # train (with its noise) and test
