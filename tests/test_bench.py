"""Benchmarks: the accuracy runner resumes and feeds the report (no timing is asserted)."""

from __future__ import annotations

import pyarrow.parquet as pq

from cmd_ray import bench
from cmd_ray.config import from_dict
from cmd_ray.results import report


def test_accuracy_bench_writes_a_reportable_table_and_resumes(fake_fmnist_root, tmp_path, monkeypatch):
    cfg = from_dict(
        {
            "epochs": 2,
            "batch_size": 100,
            "data": {"root": str(fake_fmnist_root), "test_subset": 100},
            "sweep": {"grid": {"noise": [{"type": "pairflip", "rate": 0.45}], "method": ["ce", "cmd-p"]}},
        }
    )
    folder = tmp_path / "bench"
    lines = []
    bench.accuracy(cfg, folder, log=lines.append)
    assert len(lines) == 2
    rows = pq.read_table(folder / "results.parquet").to_pylist()
    assert {(r["method"], r["noise.type"], r["noise.rate"]) for r in rows} == {
        ("ce", "pairflip", 0.45),
        ("cmd-p", "pairflip", 0.45),
    }
    table, plots = report(folder, last_epochs=2)
    assert "pairflip 0.45" in table and len(plots) == 3

    def must_not_train(*_, **__):
        raise AssertionError("a finished benchmark run was trained again")

    monkeypatch.setattr("cmd_ray.trainer.train_in_process", must_not_train)
    bench.accuracy(cfg, folder, log=lines.append)
    assert len(lines) == 2
