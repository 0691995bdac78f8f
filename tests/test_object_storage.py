"""Object storage (s3://) for results, reports, Ray Train state and sweeps, against an
S3-compatible server (moto) on 127.0.0.1 with fake credentials from the environment."""

from __future__ import annotations

import json
import os

import pyarrow as pa
import pytest

from cmd_ray import storage
from cmd_ray.cli import main
from cmd_ray.config import from_dict
from cmd_ray.results import trial_rows

from .conftest import FAKE_AWS_SECRET, s3_environment, start_s3_server


def test_objects_are_written_read_listed_and_atomic_writers_take_uris(s3_bucket):
    prefix = storage.join(s3_bucket, "unit")
    assert prefix == "s3://cmd-ray-test/unit" and storage.is_uri(prefix) and not storage.is_uri("/tmp/x")
    path = storage.write_json_atomic(storage.join(prefix, "a", "summary.json"), {"accuracy": 0.5, "nan": float("nan")})
    assert json.loads(storage.read_bytes(path)) == {"accuracy": 0.5, "nan": None}
    storage.write_parquet_atomic(storage.join(prefix, "t.parquet"), pa.table({"x": [1, 2]}))
    assert storage.read_parquet(storage.join(prefix, "t.parquet")).to_pylist() == [{"x": 1}, {"x": 2}]
    assert storage.list_files(prefix) == [f"{prefix}/a/summary.json", f"{prefix}/t.parquet"]
    assert storage.exists(path) and not storage.exists(storage.join(prefix, "nothing"))
    with pytest.raises(FileNotFoundError):
        storage.read_bytes(storage.join(prefix, "nothing"))


def test_a_missing_bucket_is_one_line_before_any_work(s3_bucket, capsys):
    code = main(["sweep", "--set", "sweep.storage_path=s3://no-such-bucket/sweeps"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1, err
    assert err[0].startswith("cmd-ray: error: sweep.storage_path: cannot write to s3://no-such-bucket/sweeps (")
    assert "NO_SUCH_BUCKET" in err[0]
    code = main(["train", "--set", "output_dir=s3://no-such-bucket/run"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and err[0].startswith("cmd-ray: error: output_dir: cannot write to s3://")


def test_credentials_the_store_refuses_are_one_line_before_any_work(capsys, monkeypatch, tmp_path):
    pytest.importorskip("moto")
    proc, endpoint = start_s3_server(enforce_auth=True)  # refuses keys it does not know, as AWS does
    try:
        for key, value in s3_environment(endpoint).items():
            monkeypatch.setenv(key, value)
        code = main(["train", "--set", f"output_dir={tmp_path}", "--set", "ray.storage_path=s3://cmd-ray-test/train"])
        err = capsys.readouterr().err.strip().splitlines()
        assert code == 2 and len(err) == 1, err
        assert err[0].startswith("cmd-ray: error: ray.storage_path: cannot write to s3://cmd-ray-test/train (")
        assert "credentials" in err[0] and FAKE_AWS_SECRET not in err[0]
    finally:
        proc.terminate()
        proc.wait(timeout=30)


def test_report_reads_a_sweep_on_object_storage_and_writes_its_plots_there(s3_bucket, capsys):
    base = from_dict({}).to_dict()
    rows = []
    for seed, method in [(0, "ce"), (1, "ce"), (0, "cmd-p"), (1, "cmd-p")]:
        history = [{"epoch": e, "mean/test_accuracy": 0.5 + 0.1 * e + 0.01 * seed} for e in range(2)]
        rows += trial_rows(f"t{seed}{method}", {"seed": seed, "method": method}, base, history, "finished", "")
    folder = storage.join(s3_bucket, "reported")
    storage.write_parquet_atomic(storage.join(folder, "results.parquet"), pa.Table.from_pylist(rows))
    assert main(["report", folder]) == 0
    out = capsys.readouterr().out
    assert "cmd-p" in out and "final / best" in out
    plots = [p for p in storage.list_files(folder) if p.endswith(".png")]
    assert sorted(p.rsplit("/", 1)[1] for p in plots) == [
        "accuracy_vs_epoch.png",
        "accuracy_vs_noise.png",
        "selection_vs_epoch.png",
    ]
    assert all(len(storage.read_bytes(p)) > 5000 for p in plots)
    assert os.environ["AWS_ENDPOINT_URL"].startswith("http://127.0.0.1:")


def test_a_users_parquet_data_set_is_read_from_object_storage(s3_bucket, tmp_path):
    from cmd_ray.data import load_data
    from cmd_ray.noise import NoiseSpec
    from cmd_ray.user_data import UserSource

    from .conftest import write_image_parquet

    local_file = write_image_parquet(tmp_path / "own.parquet", n_train=12, n_test=6)
    uri = storage.write_bytes(storage.join(s3_bucket, "own", "shapes.parquet"), local_file.read_bytes())
    cache = storage.join(s3_bucket, "own-cache")
    data = load_data("parquet", cache, NoiseSpec("symmetric", 0.25), 0, source=UserSource("parquet", uri))
    assert len(data.train) == 12 and len(data.test) == 6 and data.train.meta["source"]["path"] == uri
    assert any("parquet-shapes-train-symmetric" in p for p in storage.list_files(cache))


def test_a_write_the_store_refuses_mid_run_is_one_line_naming_the_object(s3_bucket):
    """The bucket checked at start-up can go (deleted, or access revoked) before a result is
    written: the write fails with one line naming the object, never a pyarrow traceback."""
    import os

    import boto3

    s3 = boto3.client("s3", endpoint_url=os.environ["AWS_ENDPOINT_URL"])
    s3.create_bucket(Bucket="vanishing")
    target = "s3://vanishing/run/summary.json"
    storage.write_json_atomic(target, {"epoch": 1})
    s3.delete_object(Bucket="vanishing", Key="run/summary.json")
    s3.delete_bucket(Bucket="vanishing")
    with pytest.raises(storage.StorageError) as caught:
        storage.write_json_atomic(target, {"epoch": 2})
    message = caught.value.strerror
    assert message.startswith(f"{target}: cannot write (") and message.endswith("); nothing was written there")
    assert "\n" not in message


def test_a_trial_placed_in_one_process_keeps_its_checkpoint_on_object_storage(s3_bucket, fake_fmnist_root):
    """Placement trial with output on s3://: the checkpoint folder (Ray Train's format) and its
    pointer are objects; the older checkpoint's objects are removed once the pointer moved."""
    import torch

    from cmd_ray.peer import build_peer
    from cmd_ray.trainer import LATEST_CHECKPOINT, load_run_data, read_checkpoint, write_latest_checkpoint

    from .conftest import tiny_config

    cfg = tiny_config(fake_fmnist_root)
    data = load_run_data(cfg)
    peers = [build_peer(cfg, k, data.info, 10, torch.device("cpu")) for k in range(2)]
    trial = storage.join(s3_bucket, "sweeps", "trials", "t0")
    write_latest_checkpoint(trial, peers, 1, [{"epoch": 0}])
    second = write_latest_checkpoint(trial, peers, 2, [{"epoch": 0}, {"epoch": 1}])
    assert storage.read_bytes(storage.join(trial, LATEST_CHECKPOINT)) == b"checkpoint_000002"
    assert storage.list_files(trial) == [
        f"{second}/history.json",
        f"{second}/peer0_replica0.pt",
        f"{second}/peer1_replica0.pt",
        storage.join(trial, LATEST_CHECKPOINT),
    ]
    fresh = [build_peer(cfg, k, data.info, 10, torch.device("cpu")) for k in range(2)]
    assert read_checkpoint(second, fresh) == (2, [{"epoch": 0}, {"epoch": 1}])
