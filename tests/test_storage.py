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
    # Build the data cache first, without the limit: the run itself must fail only on its result.
    subprocess.run([*cli, "prepare", *args], check=True, capture_output=True, env=env, cwd=tmp_path, timeout=300)
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
