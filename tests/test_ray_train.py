"""Ray Train path: peers as workers, replicas, equivalence with the in-process trainer,
fault tolerance. Real TorchTrainer runs on a local Ray with CPU workers (gloo)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from cmd_ray.cli import main
from cmd_ray.config import ConfigError
from cmd_ray.trainer import train_in_process

from .conftest import assert_same_steps, method_formulations, needs_fmnist, read_step_trace, tiny_config

ray = pytest.importorskip("ray")


@pytest.mark.parametrize("method, peers", [("cmd-p", 2), ("dividemix", 3)])
def test_peer_workers_match_the_in_process_trainer_step_for_step(fake_fmnist_root, tmp_path, local_ray, method, peers):
    """Ray Train's workers (one peer each, the data from the object store, the loop of
    `train_loop_per_worker`) take the in-process trainer's steps: CMD-P (the logit exchange) and
    DivideMix on 3 workers (its epoch hook's values through the same exchange, each peer divided
    by the mean of the other two). Every other method through the same calls on two gloo workers:
    test_exchange.py::test_every_method_steps_on_two_gloo_workers_exactly_as_in_the_in_process_trainer.
    Also: the checkpoint holds every peer's state and loads with weights_only."""
    from cmd_ray.ray_train import train_on_ray

    overrides = dict(
        **method_formulations()[method],
        peers=peers,
        epochs=1,
        data__train_subset=None,
        data__test_subset=None,
        data__validation_fraction=0.1,
        ray__cpus_per_worker=1.0,
    )
    ray_cfg = tiny_config(fake_fmnist_root, **overrides, testing__trace_dir=str(tmp_path / "ray"))
    ref_cfg = tiny_config(fake_fmnist_root, **overrides, testing__trace_dir=str(tmp_path / "ref"))
    ray_cfg.output_dir = str(tmp_path / "out")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as each Ray worker: same float reductions
    try:
        ref = train_in_process(ref_cfg, log=lambda _: None)
    finally:
        torch.set_num_threads(threads)
    summary = train_on_ray(ray_cfg, log=lambda _: None)

    # Each worker draws its own batches from the seed: every peer, and the in-process trainer,
    # train on the same samples at every step (540 of 600 samples, 60 held out, 64 a batch).
    assert_same_steps(tmp_path / "ray", tmp_path / "ref", peers=peers, steps=9)
    assert summary["path"] == "ray" and summary["workers"] == peers
    names = [f"peer{k}" for k in range(peers)]
    assert set(summary["test_accuracy"]) == {*names, "ensemble"}
    for name in (*names, "ensemble"):
        assert summary["test_accuracy"][name]["final"] == pytest.approx(ref["test_accuracy"][name]["final"], abs=0.01)
        key = f"{name}/val_accuracy"
        assert summary["history"][0][key] == pytest.approx(ref["history"][0][key], abs=1 / 60 + 1e-9)
    assert summary["history"][0]["peer0/selected_fraction"] == pytest.approx(
        ref["history"][0]["peer0/selected_fraction"]
    )
    folder = Path(summary["checkpoint"])
    assert sorted(p.name for p in folder.iterdir()) == ["history.json", *(f"peer{k}_replica0.pt" for k in range(peers))]
    state = torch.load(folder / "peer1_replica0.pt", weights_only=True)
    assert state["peer"] == 1 and state["epoch"] == 1
    assert {"model", "optimizer", "scheduler", "rng_state"} <= state.keys()


def test_peers_times_replicas_equal_the_in_process_trainer_and_resume_from_their_last_kept_checkpoint(
    fake_fmnist_root, tmp_path, local_ray
):
    """D = 2 replicas of each peer, each on half of every batch, with gradients averaged (DDP),
    train as one peer on the whole batch does: the same losses and accuracies as the in-process
    trainer, within float reordering. An MLP (no batch norm, no dropout: those see the shard)
    and DML (every loss term a mean over the batch). A run killed in epoch 3 with
    checkpoint_every 2 resumes from the checkpoint after epoch 2 (the only one kept) and ends
    where the uninterrupted run ends (a killed worker of a run without replicas: a removed node,
    test_multinode.py::test_peers_run_on_different_nodes_and_a_removed_node_resumes_from_s3).
    Started again after its last epoch, the run reports its last record again. Each peer's counts
    cover the whole epoch, summed over its two replicas' shards."""
    from cmd_ray.ray_train import train_on_ray

    common = dict(
        method="dml",
        model__name="mlp",
        epochs=4,
        data__train_subset=None,
        data__test_subset=None,
        ray__max_failures=1,
        ray__checkpoint_every=2,
        ray__checkpoints_to_keep=1,
    )
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        ref = train_in_process(tiny_config(fake_fmnist_root, **common), log=lambda _: None)
    finally:
        torch.set_num_threads(threads)
    clean_cfg = tiny_config(fake_fmnist_root, **common, replicas=2, output_dir=str(tmp_path / "a"),
                            testing__trace_dir=str(tmp_path / "trace"))  # fmt: skip
    clean = train_on_ray(clean_cfg, log=lambda _: None)
    assert clean["workers"] == 4
    assert clean["history"][0]["train_samples"] == 600 and clean["test_samples"] == 200
    trace = read_step_trace(tmp_path / "trace", 0)
    assert len(trace) == 40 and len(trace[0]["selected"]) == 32  # replica 0's half of each batch, 4 epochs
    for want, got in zip(ref["history"], clean["history"], strict=True):
        for peer in ("peer0", "peer1"):
            assert got[f"{peer}/loss"] == pytest.approx(want[f"{peer}/loss"], rel=1e-4), got["epoch"]
            assert got[f"{peer}/test_accuracy"] == pytest.approx(want[f"{peer}/test_accuracy"], abs=2 / 200)
    crashed_cfg = tiny_config(fake_fmnist_root, **common, replicas=2, output_dir=str(tmp_path / "b"),
                              testing__crash_epoch=3, testing__crash_step=2, testing__crash_rank=3)  # fmt: skip
    lines: list[str] = []
    crashed = train_on_ray(crashed_cfg, log=lines.append, run_name="crash")
    run = tmp_path / "b" / "ray" / "crash"
    killed_at = (run / ".crash-injected").stat().st_mtime
    history = crashed["history"]
    assert [r["epoch"] for r in history] == [0, 1, 2, 3]
    # Epochs 0-1 from the checkpoint; epoch 2 (trained before the kill, never checkpointed) again.
    assert history[1]["finished_at"] < killed_at < history[2]["finished_at"]
    kept = [p.name for p in run.iterdir() if (p / "history.json").is_file()]
    assert len(kept) == 1, kept
    assert sorted(p.name for p in (run / kept[0]).iterdir()) == [
        "history.json",
        *(f"peer{p}_replica{r}.pt" for p in range(2) for r in range(2)),
    ]
    for a, b in zip(clean["history"], history, strict=True):
        assert b["peer0/loss"] == pytest.approx(a["peer0/loss"], rel=1e-6)
    assert crashed["test_accuracy"] == clean["test_accuracy"]

    # Started again after its last epoch, the run reports its last record (with a checkpoint) once:
    # a sweep's trial resumed there gets its metrics (sweep: test_sweep.py's restarted-trial test).
    reports = _reports_of_another_fit(crashed_cfg, "crash", tmp_path / "reports.jsonl")
    assert len(reports) == 1 and reports[0]["checkpointed"], reports
    assert reports[0]["epoch"] == 3 and reports[0]["peer0/loss"] == pytest.approx(history[-1]["peer0/loss"])


def _reports_of_another_fit(cfg, run_name: str, into: Path) -> list[dict]:
    """What Ray Train's controller receives when the run `run_name` is fitted again: each
    report's first worker's metrics, and whether it came with a checkpoint."""
    from ray.train import UserCallback

    from cmd_ray.ray_train import build_trainer, fit, storage_path
    from cmd_ray.trainer import load_run_data

    class WriteReports(UserCallback):  # runs in the controller actor: it writes to a file
        def after_report(self, run_context, metrics, checkpoint):
            with open(into, "a") as out:
                out.write(json.dumps({**metrics[0], "checkpointed": checkpoint is not None}) + "\n")

    storage = storage_path(cfg)
    fit(build_trainer(cfg, run_name, storage, load_run_data(cfg), [WriteReports()]), f"{storage}/{run_name}")
    return [json.loads(line) for line in into.read_text().splitlines()] if into.exists() else []


def test_workers_get_the_data_through_the_object_store_and_refuse_other_labels(fake_fmnist_root, local_ray):
    from cmd_ray.exchange import Topology
    from cmd_ray.ray_train import DataMismatchError, _received_data, labels_digest
    from cmd_ray.trainer import load_run_data

    data = load_run_data(tiny_config(fake_fmnist_root))
    config = {"data": ray.put(data), "labels_digest": labels_digest(data)}
    received = _received_data(config, Topology(2, 1, 0))
    assert torch.equal(received.train.noisy_labels, data.train.noisy_labels)
    with pytest.raises(DataMismatchError, match=r"worker 1: its noisy labels differ from the driver's"):
        _received_data({**config, "labels_digest": "0" * 64}, Topology(2, 1, 1))


def test_gpu_asked_on_a_cluster_without_gpus_is_refused(fake_fmnist_root, local_ray):
    from cmd_ray.cluster import check_cluster_resources

    with pytest.raises(ConfigError, match=r"^use_gpu: got true, but the Ray cluster has no GPUs"):
        check_cluster_resources(tiny_config(fake_fmnist_root, use_gpu=True))
    with pytest.raises(ConfigError, match=r"^ray\.cpus_per_worker: 2 workers x 3 CPUs = 6 CPUs"):
        check_cluster_resources(tiny_config(fake_fmnist_root, ray__cpus_per_worker=3.0))


@needs_fmnist
@pytest.mark.slow
def test_cli_cmd_p_on_real_fashion_mnist_beats_80pct_per_peer(real_data_root, tmp_path, capsys, local_ray):
    """The issue's bar: 2 peers on 2 CPU workers, 10k samples with 40% symmetric noise, 5 epochs."""
    out = tmp_path / "summary.json"
    code = main(
        [
            "train",
            "--config", "launch/configs/fmnist.yaml",
            "--set", f"data.root={real_data_root}",
            "--set", f"output_dir={tmp_path}",
            "--output-json", str(out),
        ]
    )  # fmt: skip
    assert code == 0
    summary = json.loads(out.read_text())
    assert summary["path"] == "ray" and summary["epochs"] == 5 and summary["test_samples"] == 10_000
    assert summary["noise"]["type"] == "symmetric" and summary["noise"]["rate"] == 0.4
    for peer in ("peer0", "peer1"):
        assert summary["test_accuracy"][peer]["final"] > 0.80
    assert json.loads(capsys.readouterr().out)["test_accuracy"]  # stdout: the summary alone, strict JSON


def test_only_placement_groups_of_drivers_that_died_are_released(monkeypatch):
    """A driver killed while its Train run starts a worker group leaves the group's placement
    group holding CPUs after the job ended (Ray 2.60); joining the cluster releases those,
    never a running job's nor a detached one."""
    import importlib
    from types import SimpleNamespace

    import ray.util.state as state

    pg_module = importlib.import_module("ray.util.placement_group")  # the module, not its function

    from cmd_ray.cluster import release_orphaned_placement_groups

    jobs = [SimpleNamespace(job_id="01000000", status="JobStatus.RUNNING"),
            SimpleNamespace(job_id="02000000", status="JobStatus.SUCCEEDED")]  # fmt: skip
    groups = [
        SimpleNamespace(placement_group_id="aa" * 18, creator_job_id="02000000", is_detached=False),  # orphaned
        SimpleNamespace(placement_group_id="bb" * 18, creator_job_id="01000000", is_detached=False),  # running job's
        SimpleNamespace(placement_group_id="cc" * 18, creator_job_id="02000000", is_detached=True),  # meant to outlive
    ]
    removed = []
    monkeypatch.setattr(state, "list_jobs", lambda **_: jobs)
    monkeypatch.setattr(state, "list_placement_groups", lambda **_: groups)
    monkeypatch.setattr(pg_module, "remove_placement_group", lambda pg: removed.append(pg.id.hex()))
    lines: list[str] = []
    assert release_orphaned_placement_groups(lines.append) == ["aa" * 18]
    assert removed == ["aa" * 18]
    assert len(lines) == 1 and "job 02000000" in lines[0]
    groups.pop(0)
    assert release_orphaned_placement_groups(lines.append) == [] and len(lines) == 1  # nothing to say


def test_cli_train_exits_1_when_failures_run_out_says_how_to_resume_and_resumes_from_the_checkpoint(
    fake_fmnist_root, tmp_path, local_ray, capfd, monkeypatch
):
    """Also: no secret in the environment (a W&B key, a cloud secret) lands in any file of the run."""
    secrets = {"WANDB_API_KEY": "fa4e000000000000000000000000000000c0ffee", "AWS_SECRET_ACCESS_KEY": "Zq9secretZq9"}
    for name, value in secrets.items():
        monkeypatch.setenv(name, value)
    out = tmp_path / "out"
    argv = ["train", "--set", f"data.root={fake_fmnist_root}", "--set", "epochs=3", "--set", "data.train_subset=null",
            "--set", "data.test_subset=null", "--set", f"output_dir={out}", "--set", "ray.max_failures=0",
            "--set", "testing.crash_epoch=1", "--set", "testing.crash_step=2",
            "--run-name", "flaky", "--output-json", str(tmp_path / "summary.json")]  # fmt: skip
    assert main(argv) == 1
    err = capfd.readouterr().err
    ours = [line for line in err.splitlines() if line.startswith("cmd-ray:")]
    assert ours[0] == "cmd-ray: resume from the last checkpoint: the same command with --run-name flaky"
    assert ours[-1].startswith("cmd-ray: training failed: ") and len(ours) == 2, err[-3000:]
    killed_at = (out / "ray" / "flaky" / ".crash-injected").stat().st_mtime
    assert main(argv) == 0  # the same command (the crash hook fires once): resumed, not restarted
    printed = capfd.readouterr()
    assert "resumed from the checkpoint after epoch 1" in printed.out + printed.err
    history = json.loads((tmp_path / "summary.json").read_text())["history"]
    assert [r["epoch"] for r in history] == [0, 1, 2]
    assert history[0]["finished_at"] < killed_at < history[1]["finished_at"]
    for path in [*out.rglob("*"), tmp_path / "summary.json"]:
        if path.is_file():
            data = path.read_bytes()
            assert not any(v.encode() in data for v in secrets.values()), path


def test_a_nan_loss_stops_the_run_without_retrying_exits_1_naming_peer_and_step_and_keeps_the_last_good_checkpoint(
    fake_fmnist_root, tmp_path, local_ray, capsys
):
    argv = ["train", "--set", f"data.root={fake_fmnist_root}", "--set", "method=ce", "--set", "epochs=3",
            "--set", "batch_size=64", "--set", "data.train_subset=null", "--set", f"output_dir={tmp_path}",
            "--set", "ray.max_failures=3",  # a numerical fault must not be retried even when failures are
            "--set", "testing.nan_step=12", "--set", "testing.nan_peer=1",  # epoch 2 (10 steps an epoch), step 3
            "--set", f"testing.trace_dir={tmp_path / 'trace'}", "--run-name", "nan"]  # fmt: skip
    assert main(argv) == 1
    ours = [line for line in capsys.readouterr().err.splitlines() if line.startswith("cmd-ray:")]
    assert len(ours) == 1 and ours[0].startswith(
        "cmd-ray: training stopped: peer 1: loss is nan at epoch 2, global step 12;"
    )  # no resume hint: the same settings would stop at the same step
    assert ours[0].endswith(
        f"delete {tmp_path / 'ray' / 'nan' / 'stopped-nonfinite.txt'} to resume this run with other settings)"
    )
    assert not (tmp_path / "summary.json").exists()
    # Peer 0 stepped through epoch 1 and into epoch 2 once; a retry from the epoch-1
    # checkpoint would have replayed those steps and traced them again.
    steps = read_step_trace(tmp_path / "trace", 0)
    assert len(steps) <= 13 and len({(s["epoch"], s["step"]) for s in steps}) == len(steps)
    run = tmp_path / "ray" / "nan"
    snapshot = json.loads((run / "checkpoint_manager_snapshot.json").read_text())
    kept = run / snapshot["latest_checkpoint_result"]["checkpoint_dir_name"]
    history = json.loads((kept / "history.json").read_text())
    assert [r["epoch"] for r in history] == [0]  # the last good epoch, before the fault
    state = torch.load(kept / "peer1_replica0.pt", weights_only=True)
    assert all(torch.isfinite(t).all() for t in state["model"].values() if t.is_floating_point())


def test_a_local_ray_that_fails_to_start_is_tried_once_more_then_one_line(monkeypatch, capsys):
    """On a loaded machine Ray's node sometimes misses its start-up deadline (a bare Exception
    with a traceback); cmd-ray tries once more, and a second failure is one line, exit 1."""
    import ray

    from cmd_ray.cli import main
    from cmd_ray.cluster import start_local_ray

    calls = []

    def failing_init(**kwargs):
        calls.append(kwargs)
        if len(calls) in (1, 3, 4):
            raise Exception("Traceback ...\nThe current node timed out during startup. This could happen because ...")

    monkeypatch.setattr(ray, "init", failing_init)
    monkeypatch.setattr(ray, "shutdown", lambda: None)
    monkeypatch.setattr(ray, "is_initialized", lambda: False)
    start_local_ray(num_cpus=2)
    assert len(calls) == 2 and calls[0]["dashboard_port"] != 0
    assert main(["train", "--set", "epochs=1", "--set", "data.train_subset=64", "--set", "data.test_subset=64"]) == 1
    err = [line for line in capsys.readouterr().err.splitlines() if line.startswith("cmd-ray")]
    assert err == [
        "cmd-ray: error: the local Ray did not start, twice (The current node timed out during startup. This could "
        "happen because ...)"
    ]
