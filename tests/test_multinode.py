"""Several Ray nodes on this one machine (ray.cluster_utils.Cluster) with no shared folder:
run state and results on S3 (a moto server on 127.0.0.1), data through Ray's object store.

- a 2-peer run puts its peers on different nodes; the node holding one peer is removed
  mid-run, and the run resumes from its s3:// checkpoint (the epochs in it not trained again)
  on another node with the same final metrics as an uninterrupted run;
- a 2-trial sweep on the cluster keeps everything on s3://; its driver is killed and the
  sweep resumes from s3:// where its trials' checkpoints were; `cmd-ray report s3://...` reads
  it; no secret lands in any object, and the W&B key in no log of the cluster's Ray.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time

import pytest

from cmd_ray import storage
from cmd_ray.ray_internals import API_SERVER_ADDRESS

from .conftest import FAKE_AWS_SECRET, tiny_config

ray = pytest.importorskip("ray")
pytestmark = pytest.mark.slow

FAKE_WANDB_KEY = "fa4e1111111111111111111111111111111c0ffee"


@pytest.fixture(scope="module")
def cluster(s3_bucket):
    """A head with no CPUs (it holds the sweep's trial slots) and three 1-CPU worker nodes."""
    from ray.cluster_utils import Cluster

    os.environ.setdefault("RAY_TRAIN_ENABLE_PREEMPTION_WATCHER", "0")
    os.environ.setdefault("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "0.2")
    # A local Ray started earlier in this process (the local_ray fixture of another module run
    # by the same test worker) is shut down first, and its dashboard's address, which Ray's
    # processes would inherit, forgotten: the cluster's processes talk to the cluster.
    if ray.is_initialized():
        ray.shutdown()
    os.environ.pop(API_SERVER_ADDRESS, None)
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 0, "resources": {"TRAIN_DRIVER": 2}})
    nodes = [cluster.add_node(num_cpus=1) for _ in range(3)]
    ray.init(address=cluster.address, logging_level="WARNING")
    yield cluster, nodes
    ray.shutdown()
    cluster.shutdown()


def _placement(run_dir: str) -> list[str]:
    return [w["node"] for w in json.loads(storage.read_bytes(storage.join(run_dir, "placement.json")))["workers"]]


def _registered_history(run_dir: str) -> list[dict]:
    """The history in the latest checkpoint Ray Train registered for the run ([] if none yet)."""
    try:
        snapshot = json.loads(storage.read_bytes(storage.join(run_dir, "checkpoint_manager_snapshot.json")))
        latest = snapshot["latest_checkpoint_result"]["checkpoint_dir_name"]
        return json.loads(storage.read_bytes(storage.join(run_dir, latest, "history.json")))
    except (OSError, FileNotFoundError, TypeError, KeyError, ValueError):
        return []


def _registered_epochs(run_dir: str) -> int:
    return len(_registered_history(run_dir))


def _sweep_histories(sweep: str) -> dict[str, list[dict]]:
    """Each trial's registered history in a sweep on object storage, by Train run folder."""
    runs = {o.split("/train/", 1)[1].split("/", 1)[0] for o in storage.list_files(storage.join(sweep, "train"))}
    return {run: _registered_history(storage.join(sweep, "train", run)) for run in runs}


def _files_holding(folder: str, secret: bytes) -> list[str]:
    from pathlib import Path

    found = []
    for path in Path(folder).rglob("*"):
        try:
            if path.is_file() and not path.is_symlink() and secret in path.read_bytes():
                found.append(str(path))
        except OSError:
            pass
    return found


def test_peers_run_on_different_nodes_and_a_removed_node_resumes_from_s3(fake_fmnist_root, s3_bucket, cluster):
    from cmd_ray.ray_train import train_on_ray

    head_cluster, nodes = cluster
    common = dict(
        epochs=3,
        data__train_subset=None,
        data__test_subset=None,
        ray__max_failures=2,
        ray__cpus_per_worker=1.0,
        ray__storage_path=storage.join(s3_bucket, "train"),
    )
    clean = train_on_ray(tiny_config(fake_fmnist_root, **common, output_dir=str(fake_fmnist_root / "a")), log=print)
    clean_dir = clean["run_dir"]
    assert clean_dir.startswith("s3://cmd-ray-test/train/")
    first = _placement(clean_dir)
    assert len(first) == 2 and first[0] != first[1], "the two peers shared a node"
    objects = storage.list_files(clean_dir)
    assert any(o.endswith("peer1_replica0.pt") for o in objects) and any(o.endswith("history.json") for o in objects)

    # Peer 1's worker stops mid-epoch 1 (after epoch 0's checkpoint) and stays stopped until
    # its node is removed: the removal lands mid-run however slow the machine.
    cfg = tiny_config(fake_fmnist_root, **common, output_dir=str(fake_fmnist_root / "b"), testing__crash_epoch=1,
                      testing__crash_step=3, testing__crash_mode="hang")  # fmt: skip
    run_dir = storage.join(s3_bucket, "train", "node-lost")
    result: dict = {}
    runner = threading.Thread(target=lambda: result.update(train_on_ray(cfg, log=print, run_name="node-lost")))
    runner.start()
    deadline = time.time() + 300
    stopped = storage.join(run_dir, ".crash-injected")
    while not (storage.exists(stopped) and _registered_epochs(run_dir) == 1) and time.time() < deadline:
        time.sleep(0.2)
    assert storage.exists(stopped) and _registered_epochs(run_dir) == 1, "peer 1 never stopped after epoch 0"
    lost = _placement(run_dir)[1]
    node = next(n for n in nodes if n.node_id == lost)
    removed_at = time.time()
    head_cluster.remove_node(node, allow_graceful=False)  # the node holding peer 1 goes away
    runner.join(timeout=600)
    assert not runner.is_alive() and result, "the run did not finish after losing a node"
    after = _placement(run_dir)
    assert lost not in after and after[0] != after[1]
    # Resumed from the checkpoint after epoch 0 (kept, not trained again); epochs 1-2 after.
    history = result["history"]
    assert [r["epoch"] for r in history] == [0, 1, 2]
    assert history[0]["finished_at"] < removed_at < history[1]["finished_at"]
    for a, b in zip(clean["history"], history, strict=True):
        assert b["peer0/loss"] == pytest.approx(a["peer0/loss"], rel=1e-6)
        assert b["peer1/test_accuracy"] == a["peer1/test_accuracy"]
    assert result["test_accuracy"] == clean["test_accuracy"]
    head_cluster.add_node(num_cpus=1)  # back to three worker nodes for the sweep


def _sweep_cmd(root, address: str, folder: str, *extra: str) -> list[str]:
    return [
        sys.executable, "-m", "cmd_ray.cli", "sweep",
        "--address", address,
        "--set", f"data.root={root}",
        "--set", "data.train_subset=null",
        "--set", "epochs=3",
        "--set", "batch_size=100",
        "--set", "ray.cpus_per_worker=1",
        "--set", "sweep.placement=workers",  # peers as Train workers on the cluster's nodes
        "--set", "testing.step_sleep=0.3",
        "--set", f"sweep.storage_path={folder}",
        "--set", "sweep.name=s3-sweep",
        "--set", "sweep.grid={method: [ce, cmd-p]}",
        *extra,
    ]  # fmt: skip


def test_a_sweep_on_the_cluster_keeps_everything_on_s3_and_resumes_after_its_driver_dies(
    fake_fmnist_root, s3_bucket, cluster, tmp_path
):
    from cmd_ray.data import materialise
    from cmd_ray.noise import NoiseSpec

    head_cluster, _ = cluster
    materialise("fashion-mnist", fake_fmnist_root, NoiseSpec("symmetric", 0.4), 0)
    env = {k: v for k, v in os.environ.items() if not k.startswith(("RAY_", "WANDB_"))}
    env.update(WANDB_API_KEY=FAKE_WANDB_KEY, WANDB_MODE="offline", HOME=str(tmp_path / "home"))
    folder = storage.join(s3_bucket, "sweeps")
    sweep = storage.join(folder, "s3-sweep")
    cmd = _sweep_cmd(fake_fmnist_root, head_cluster.address, folder)
    driver = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                              start_new_session=True)  # fmt: skip
    deadline = time.time() + 300
    while time.time() < deadline:  # a trial registered a checkpoint on S3, and none is complete
        time.sleep(0.5)
        histories = _sweep_histories(sweep)
        if any(histories.values()):
            break
    else:
        driver.kill()
        pytest.fail("the sweep never got going: " + (driver.communicate()[0] or "")[-2000:])
    os.killpg(driver.pid, signal.SIGKILL)
    driver.wait(timeout=60)
    assert not storage.exists(storage.join(sweep, "results.parquet"))
    before = {run: history for run, history in _sweep_histories(sweep).items() if history}
    assert before and any(len(h) < 3 for h in before.values()), before

    resumed = subprocess.run(cmd + ["--resume"], env=env, capture_output=True, text=True, timeout=900)
    assert resumed.returncode == 0, resumed.stdout[-3000:] + resumed.stderr[-3000:]
    table = storage.read_parquet(storage.join(sweep, "results.parquet")).to_pylist()
    assert {r["method"] for r in table} == {"ce", "cmd-p"}
    assert all(r["status"] == "finished" for r in table) and len(table) == 6  # 2 trials x 3 epochs
    # From where: every epoch checkpointed on S3 before the kill was kept, not trained again.
    after = _sweep_histories(sweep)
    for run, history in before.items():
        assert len(after[run]) == 3
        assert [r["finished_at"] for r in after[run][: len(history)]] == [r["finished_at"] for r in history], run
    resumed_from = {f"resumed from the checkpoint after epoch {len(h)}" for h in before.values() if len(h) < 3}
    assert all(line in resumed.stdout + resumed.stderr for line in resumed_from), resumed.stdout[-3000:]
    assert any(o.endswith(".png") for o in storage.list_files(storage.join(sweep, "plots")))

    report = subprocess.run(
        [sys.executable, "-m", "cmd_ray.cli", "report", sweep], env=env, capture_output=True, text=True, timeout=300
    )
    assert report.returncode == 0 and "cmd-p" in report.stdout, report.stderr[-2000:]
    # W&B's offline runs stay on the driver's disk; nothing secret is in any object or file.
    wandb_runs = list((tmp_path / "home" / ".cache" / "cmd-ray" / "wandb" / "s3-sweep").rglob("offline-run-*"))
    assert wandb_runs
    for secret in (FAKE_WANDB_KEY, FAKE_AWS_SECRET):
        assert not [o for o in storage.list_files(s3_bucket) if secret.encode() in storage.read_bytes(o)]
        assert secret not in resumed.stdout + resumed.stderr
        for path in (tmp_path / "home").rglob("*"):
            if path.is_file() and not path.is_symlink():
                assert secret.encode() not in path.read_bytes(), path
    # ... nor in any log or record of the cluster's Ray (every node's session folder): on a
    # cluster the driver hands the key to the W&B actor in a call, never as a runtime env.
    sessions = {node.get_session_dir_path() for node in [head_cluster.head_node, *head_cluster.worker_nodes]}
    assert sessions
    for session in sessions:
        assert _files_holding(session, FAKE_WANDB_KEY.encode()) == [], session


def test_a_local_run_starts_its_own_ray_while_another_cluster_runs_on_the_machine(cluster):
    """A cluster started on this machine (this module's, as `ray start` would) is named in
    /tmp/ray/ray_current_cluster, which `ray.init()` without an address joins; cmd-ray's local
    runs must start their own Ray instead (they used to join it and fail: "When connecting to an
    existing cluster, num_cpus and num_gpus must not be provided"). Checked on the call every
    local run, sweep and bench makes (`init_ray` without an address), in a process of its own:
    the Ray it holds is a new one-node Ray with the CPUs asked for, not the cluster."""
    head_cluster, _ = cluster
    env = {k: v for k, v in os.environ.items() if not k.startswith(("RAY_", "WANDB_"))}
    probe = (
        "import json, ray\n"
        "from cmd_ray.cluster import init_ray\n"
        "from cmd_ray.config import from_dict\n"
        "init_ray(from_dict({'ray': {'num_cpus': 2}}), dashboard=False)\n"
        "print(json.dumps({'gcs': ray.get_runtime_context().gcs_address, 'nodes': len(ray.nodes()),"
        " 'cpus': ray.cluster_resources().get('CPU')}))\n"
    )
    done = subprocess.run([sys.executable, "-c", probe], env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    local = json.loads(done.stdout.strip().splitlines()[-1])
    assert local["gcs"] != head_cluster.address and local["nodes"] == 1 and local["cpus"] == 2, local
