"""Benchmarks: the accuracy runner resumes and feeds the report (no timing is asserted)."""

from __future__ import annotations

import pyarrow.parquet as pq

from cmd_ray import bench
from cmd_ray.config import from_dict
from cmd_ray.results import report, validation_choice


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
    # A line cut short by a crash or a full disk is skipped on resume, not fatal.
    with open(folder / "trials.jsonl", "a") as f:
        f.write('{"trial_id": "bench_00009", "point": {"meth')
    bench.accuracy(cfg, folder, log=lines.append)
    assert len(lines) == 3 and "skipping an unfinished line" in lines[2]
    # Without the trials log (kept out of git for long benchmarks) the table alone resumes.
    before = pq.read_table(folder / "results.parquet").to_pylist()
    (folder / "trials.jsonl").unlink()
    bench.accuracy(cfg, folder, log=lines.append)
    assert len(lines) == 3
    assert pq.read_table(folder / "results.parquet").to_pylist() == before


def test_accuracy_bench_runs_points_in_parallel_processes_with_the_same_table(fake_fmnist_root, tmp_path):
    cfg = from_dict(
        {
            "epochs": 1,
            "batch_size": 100,
            "data": {"root": str(fake_fmnist_root), "test_subset": 100},
            "sweep": {"grid": {"method": ["ce", "coteaching", "cmd-p"]}},
        }
    )
    lines = []
    bench.accuracy(cfg, tmp_path / "parallel", log=lines.append, jobs=2)
    assert len(lines) == 3 and all(line.startswith("[") for line in lines)
    rows = pq.read_table(tmp_path / "parallel" / "results.parquet").to_pylist()
    assert sorted(r["method"] for r in rows) == ["ce", "cmd-p", "coteaching"]
    assert sorted(r["trial_id"] for r in rows) == ["bench_00000", "bench_00001", "bench_00002"]
    bench.accuracy(cfg, tmp_path / "parallel", log=lines.append, jobs=2)  # all done: nothing reruns
    assert len(lines) == 3


def test_validation_sweep_ranks_candidates_on_noisy_validation_accuracy_without_test_figures(
    fake_fmnist_root, tmp_path, capsys
):
    from cmd_ray.cli import main

    cfg = from_dict(
        {
            "epochs": 2,
            "batch_size": 100,
            "data": {"root": str(fake_fmnist_root), "test_subset": 100, "validation_fraction": 0.2},
            "sweep": {
                "grid": {
                    "method": ["cmd-s", "cmd-p"],
                    "knowledge": [
                        {"threshold_on": "certainty", "tau": 0.5, "tau_start": 0.3, "tau_end": 0.7},
                        {"threshold_on": "quantile", "tau": 0.2, "tau_start": 0.0, "tau_end": 0.5},
                    ],
                }
            },
        }
    )
    folder = tmp_path / "validation"
    lines = []
    bench.accuracy(cfg, folder, log=lines.append)
    assert len(lines) == 4 and all("noisy-validation" in line and "test" not in line for line in lines)
    table, best = validation_choice(pq.read_table(folder / "results.parquet").to_pylist(), last_epochs=2)
    assert set(best) == {"cmd-s", "cmd-p"}
    assert "tau=0.5" in table and "tau_start" not in best["cmd-s"] and "tau=" not in best["cmd-p"].replace("tau_", "")
    assert table.count("(chosen)") == 2 and "test" not in table
    assert main(["report", str(folder), "--validation", "--last-epochs", "2"]) == 0
    assert "chosen for cmd-p on validation:" in capsys.readouterr().out


def test_load_sampler_counts_the_memory_of_child_processes():
    import subprocess
    import sys
    import time

    sampler = bench.LoadSampler(interval=0.1)
    sampler.start()
    hold = "import time; x = bytearray(300 * 1024 * 1024); x[::4096] = b'1' * len(x[::4096]); time.sleep(3)"
    child = subprocess.Popen([sys.executable, "-c", hold])
    time.sleep(2.0)
    samples = sampler.stop()
    child.wait()
    assert samples and max(s["tree_pss"] for s in samples) > 300 * 1024 * 1024
    assert all(s["train_workers"] == 0 for s in samples)
    peak = max(samples, key=lambda s: s["tree_pss"])
    assert peak["by_kind"]["other"][1] >= 1 and peak["by_kind"]["driver"][1] == 1
    assert peak["by_kind"]["other"][0] > 300 * 1024 * 1024  # the child is "other": no Ray in its command line


def test_process_kinds_name_ray_and_wandb_processes_by_their_command_lines():
    assert bench.process_kind("ray::RayTrainWorker.run_train_fn") == "Train worker"
    assert bench.process_kind("ray::_WandbLoggingActor.run") == "W&B logging actor"
    assert bench.process_kind("ray::ImplicitFunc.train") == "trial driver"
    assert bench.process_kind("/x/ray/core/src/ray/raylet/raylet --node") == "raylet"
    assert bench.process_kind("/x/wandb/bin/wandb-core --port-filename f") == "W&B service"
    assert bench.process_kind("python -c pass") == "other"


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
