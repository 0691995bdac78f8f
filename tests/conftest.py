"""Shared fixtures: tiny configs and data sets written in the real formats."""

from __future__ import annotations

import gzip
import io
import os
import pickle
import struct
import sys
from pathlib import Path

import numpy as np
import pytest

from cmd_ray.config import from_dict
from cmd_ray.datasets.fashion_mnist import fashion_mnist_folder


def write_idx(path: Path, array: np.ndarray, gz: bool = True) -> Path:
    header = struct.pack(">HBB", 0, 0x08, array.ndim) + struct.pack(f">{array.ndim}I", *array.shape)
    raw = header + array.astype(np.uint8).tobytes()
    if gz:
        path = path.with_name(path.name + ".gz")
        path.write_bytes(gzip.compress(raw))
    else:
        path.write_bytes(raw)
    return path


def write_fake_fashion_mnist(root: Path, n_train: int = 600, n_test: int = 200, seed: int = 0) -> Path:
    """Learnable fake Fashion-MNIST in IDX format: class c lights up row band c."""
    rng = np.random.default_rng(seed)
    folder = root / "fashion-mnist"
    folder.mkdir(parents=True, exist_ok=True)
    for split, n in (("train", n_train), ("t10k", n_test)):
        labels = rng.integers(0, 10, n).astype(np.uint8)
        images = rng.integers(0, 60, (n, 28, 28)).astype(np.uint8)
        for i, c in enumerate(labels):
            images[i, 2 * c + 4 : 2 * c + 7, :] = 230
        write_idx(folder / f"{split}-images-idx3-ubyte", images)
        write_idx(folder / f"{split}-labels-idx1-ubyte", labels)
    return folder


def write_fake_cifar(root: Path, name: str, n_train: int = 100, n_test: int = 40, seed: int = 0) -> Path:
    """Small files in CIFAR's own python-pickle layout."""
    rng = np.random.default_rng(seed)
    num_classes = 10 if name == "cifar10" else 100
    if name == "cifar10":
        folder, train_files, test_files, key = (
            root / "cifar-10-batches-py",
            [f"data_batch_{i}" for i in range(1, 6)],
            ["test_batch"],
            b"labels",
        )
    else:
        folder, train_files, test_files, key = root / "cifar-100-python", ["train"], ["test"], b"fine_labels"
    folder.mkdir(parents=True, exist_ok=True)
    for files, n in ((train_files, n_train), (test_files, n_test)):
        for f in files:
            count = n // len(files)
            batch = {
                b"data": rng.integers(0, 256, (count, 3072)).astype(np.uint8),
                key: rng.integers(0, num_classes, count).tolist(),
            }
            with open(folder / f, "wb") as fh:
                pickle.dump(batch, fh)
    return folder


def class_image(label: int, size: int, rng: np.random.Generator, colour: bool = False) -> np.ndarray:
    """A noisy image whose class (0, 1, 2) is easy to learn: a bright top half, left half or diagonal."""
    image = rng.integers(0, 60, (size, size), dtype=np.uint8)
    if label == 0:
        image[: size // 2] += 150
    elif label == 1:
        image[:, : size // 2] += 150
    else:
        image[np.arange(size), np.arange(size)] = 255
    return np.stack([image, image // 2, 255 - image], axis=-1) if colour else image


def png_bytes(array: np.ndarray) -> bytes:
    from PIL import Image

    out = io.BytesIO()
    Image.fromarray(array).save(out, format="PNG")
    return out.getvalue()


CLASS_NAMES = ("ankle", "bag", "coat")


def write_image_folder(folder: Path, per_class: int, size: int = 28, colour: bool = False, seed: int = 0) -> Path:
    """`folder/<class>/<nnnn>.png` for 3 classes in ImageFolder's layout."""
    rng = np.random.default_rng(seed)
    for label, name in enumerate(CLASS_NAMES):
        (folder / name).mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            (folder / name / f"{i:04d}.png").write_bytes(png_bytes(class_image(label, size, rng, colour)))
    return folder


def write_image_parquet(path: Path, n_train: int, n_test: int, size: int = 28, names: bool = False, seed: int = 0):
    """A Parquet file of PNG bytes with `image`, `label` (ints, or class names) and `split` columns."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    rng = np.random.default_rng(seed)
    labels = [i % 3 for i in range(n_train + n_test)]
    table = pa.table(
        {
            "image": pa.array([png_bytes(class_image(y, size, rng)) for y in labels], pa.binary()),
            "label": [CLASS_NAMES[y] for y in labels] if names else labels,
            "split": ["train"] * n_train + ["test"] * n_test,
        }
    )
    pq.write_table(table, path)
    return path


# A test that asks for one of these starts Ray (or a sweep that does): it belongs to the `ray`
# tier, which `make test` runs and `make test-fast` leaves out.
RAY_FIXTURES = frozenset({"local_ray", "sweep_env", "cluster", "s3_bucket"})


def pytest_collection_modifyitems(config, items):
    """Mark every test that starts Ray (through a Ray fixture) or runs end to end (`slow`) as
    `ray`; `make test-fast` runs the rest (`-m "not ray"`)."""
    for item in items:
        if RAY_FIXTURES & set(getattr(item, "fixturenames", ())) or item.get_closest_marker("slow"):
            item.add_marker(pytest.mark.ray)


@pytest.fixture(autouse=True)
def _no_ray_in_the_fast_tier(request, monkeypatch):
    """In the fast tier (`-m "not ray"`), a test that starts Ray in this process fails at once,
    naming the fix, instead of silently making the tier slow."""
    if request.node.get_closest_marker("ray") is None and "not ray" in (request.config.getoption("-m") or ""):
        ray = sys.modules.get("ray")
        if ray is not None:

            def refuse(*_, **__):
                raise AssertionError("this test starts Ray: give it the local_ray fixture or @pytest.mark.ray")

            monkeypatch.setattr(ray, "init", refuse)
    yield


@pytest.fixture
def local_ray():
    """A local Ray shared by every test that asks for one: started on first use (4 logical CPUs,
    so 4 workers fit on a 2-core machine) and shut down at the end of the session; a test that
    needs a Ray of its own (the multi-node cluster) shuts it down, and the next user starts it
    again."""
    ray = pytest.importorskip("ray")
    os.environ.setdefault("RAY_TRAIN_ENABLE_PREEMPTION_WATCHER", "0")
    # Ray Train registers a reported checkpoint when its controller next polls the workers;
    # poll often so a kill soon after a report finds it registered.
    os.environ.setdefault("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "0.2")
    if not ray.is_initialized():
        from cmd_ray.cluster import start_local_ray

        start_local_ray(num_cpus=4)
    yield


def ray_sessions_started_since(started: float) -> list[str]:
    """Names of the local Ray sessions that began after `started` (from the start time in the name:
    session_<date>_<time>_<microseconds>_<pid>; a folder's own times change as Ray writes in it)."""
    import datetime

    names = []
    for folder in Path("/tmp/ray").glob("session_2*"):
        try:
            date, clock, micro = folder.name.split("_")[1:4]
            began = datetime.datetime.strptime(f"{date} {clock}.{micro}", "%Y-%m-%d %H-%M-%S.%f").timestamp()
        except ValueError:
            continue
        if began >= started - 1:
            names.append(folder.name)
    return names


def ray_sessions_of(driver_pid: int, root: Path = Path("/tmp/ray")) -> list[str]:
    """The local Ray sessions a driver process started: Ray names a session folder
    session_<date>_<time>_<microseconds>_<pid of the process that started it>."""
    return [folder.name for folder in root.glob(f"session_2*_{driver_pid}")]


def kill_the_ray_of(driver_pid: int) -> None:
    """SIGKILL the daemons (GCS, raylet, dashboard, monitors) of the local Ray that the killed
    driver `driver_pid` started, such as a killed sweep's own Ray; their workers follow them.
    Every other Ray on the machine is left alone: `ray stop` would stop them all, this test run's
    and a user's sweep running beside the tests (an earlier helper that killed every Ray started
    since the test began took a user's sweep down with it: "cancelled before it started")."""
    import signal
    import time

    sessions = ray_sessions_of(driver_pid)
    for _ in range(3):  # a daemon may be starting a child as we look
        for proc in Path("/proc").iterdir():
            if not proc.name.isdigit():
                continue
            try:
                cmdline = (proc / "cmdline").read_bytes().decode(errors="replace")
            except OSError:
                continue
            if any(session in cmdline for session in sessions):
                try:
                    os.kill(int(proc.name), signal.SIGKILL)
                except OSError:
                    pass
        time.sleep(1)


@pytest.fixture(scope="session", autouse=True)
def _no_ray_left_running():
    yield
    ray = sys.modules.get("ray")
    if ray is not None and ray.is_initialized():
        ray.shutdown()


@pytest.fixture
def fake_fmnist_root(tmp_path, monkeypatch) -> Path:
    """A data root holding fake Fashion-MNIST; Debian's real copy is hidden."""
    monkeypatch.setattr("cmd_ray.datasets.fashion_mnist.DEBIAN_FOLDER", tmp_path / "no-debian")
    write_fake_fashion_mnist(tmp_path)
    return tmp_path


def real_fmnist_available() -> bool:
    return fashion_mnist_folder(Path("/nonexistent")) is not None


needs_fmnist = pytest.mark.skipif(not real_fmnist_available(), reason="Fashion-MNIST IDX files not installed")


@pytest.fixture(scope="session")
def real_data_root(tmp_path_factory) -> Path:
    """A cache root shared by the end-to-end tests (real Fashion-MNIST from Debian's package)."""
    return tmp_path_factory.mktemp("data")


# What a run of one or two epochs needs to reach every phase of a method: DivideMix trains on plain
# cross-entropy for its warm-up (10 epochs by default), so short tests start its co-division at
# once (its warm-up loss is pinned in tests/test_methods.py).
SHORT_RUN: dict[str, dict] = {"dividemix": {"dividemix__warm_up": 0}}


def method_formulations() -> dict[str, dict]:
    """Every registered method (each reaching all its phases in one epoch, SHORT_RUN), CMD-P's
    label correction with a trust already high in epoch 1 and labels dropped where confident
    knowledge disagrees, and CMD-P's mixture label trust from epoch 1: the overrides of
    tiny_config that the step-for-step tests run."""
    from cmd_ray.methods import NAMES

    formulations = {name: {"method": name, **SHORT_RUN.get(name, {})} for name in NAMES}
    formulations["cmd-p-label-correction"] = dict(
        method="cmd-p",
        distill__loss="label_correction",
        distill__epsilon="trust",
        distill__trust_midpoint=0.0,
        labels__trust="agreement",
        knowledge__tau_start=0.1,
        knowledge__tau_end=0.3,
    )
    # the per-sample label trust: the epoch hook's loss mixtures, gathered through the exchange
    formulations["cmd-p-mixture"] = dict(method="cmd-p", labels__trust="mixture", labels__mixture_warm_up=0)
    return formulations


def read_step_trace(folder: Path, peer: int) -> list[dict]:
    """The per-step records `testing.trace_dir` (trainer.StepTrace) wrote for one peer."""
    import json

    return [json.loads(line) for line in (folder / f"peer{peer}.jsonl").read_text().splitlines()]


def assert_same_steps(got: Path, want: Path, peers: int, steps: int, rel: float = 1e-5, abs: float = 1e-6) -> None:
    """Two step traces of one run: the same samples, selections and losses at every step of
    every peer, and both peers on the same samples at every step."""
    import pytest

    assert [r["samples"] for r in read_step_trace(got, 0)] == [r["samples"] for r in read_step_trace(got, 1)]
    for peer in range(peers):
        got_steps, want_steps = read_step_trace(got, peer), read_step_trace(want, peer)
        assert len(got_steps) == len(want_steps) == steps, (peer, len(got_steps), len(want_steps))
        for g, w in zip(got_steps, want_steps):
            assert g["samples"] == w["samples"], f"peer {peer} step {g['step']}: another batch"
            assert g["selected"] == w["selected"], f"peer {peer} step {g['step']}: selection differs"
            assert g["loss"] == pytest.approx(w["loss"], rel=rel, abs=abs), f"peer {peer} step {g['step']}"


def tiny_config(root: Path, **overrides):
    """A small, fast config on Fashion-MNIST (real or fake, depending on `root`)."""
    values = {
        "method": "cmd-p",
        "peers": 2,
        "epochs": 2,
        "batch_size": 64,
        "seed": 0,
        "output_dir": str(root / "runs"),
        "data": {"name": "fashion-mnist", "root": str(root), "train_subset": 512, "test_subset": 256},
        "noise": {"type": "symmetric", "rate": 0.4},
    }
    for key, value in overrides.items():
        node = values
        parts = key.split("__")
        for part in parts[:-1]:
            node = node.setdefault(part, {})
        node[parts[-1]] = value
    return from_dict(values)


# --------------------------------------------------------------------------------------
# Object storage: an S3-compatible server (moto) on 127.0.0.1, fake credentials

FAKE_AWS_SECRET = "cmdrayFAKEsecretDoNotLeak0123456789abcdef"


def start_s3_server(enforce_auth: bool = False):
    """(process, endpoint URL) of a moto S3 server on a free port; with `enforce_auth` it refuses
    credentials it does not know (as AWS does)."""
    import os
    import socket
    import subprocess
    import sys
    import time

    from cmd_ray.exchange import free_port

    port = free_port()
    env = dict(os.environ)
    if enforce_auth:
        env["INITIAL_NO_AUTH_ACTION_COUNT"] = "0"
    server = Path(sys.executable).parent / "moto_server"
    proc = subprocess.Popen(
        [str(server), "-H", "127.0.0.1", "-p", str(port)], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    deadline = time.time() + 60
    while time.time() < deadline:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return proc, f"http://127.0.0.1:{port}"
        except OSError:
            time.sleep(0.2)
    proc.kill()
    raise RuntimeError("the moto S3 server did not start")


def s3_environment(endpoint: str) -> dict[str, str]:
    """Fake credentials and the endpoint, as a user's environment would carry them."""
    return {
        "AWS_ACCESS_KEY_ID": "AKIACMDRAYFAKEKEY000",
        "AWS_SECRET_ACCESS_KEY": FAKE_AWS_SECRET,
        "AWS_DEFAULT_REGION": "us-east-1",
        "AWS_ENDPOINT_URL": endpoint,
        "AWS_EC2_METADATA_DISABLED": "true",  # no instance-profile lookups on this machine
    }


@pytest.fixture(scope="module")
def s3_bucket():
    """s3://<bucket> on a moto server, with the credentials and endpoint in os.environ for the
    module (set before any Ray starts, so Ray's processes inherit them)."""
    import os

    boto3 = pytest.importorskip("boto3")
    pytest.importorskip("moto")
    proc, endpoint = start_s3_server()
    env = s3_environment(endpoint)
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    try:
        boto3.client("s3", endpoint_url=endpoint).create_bucket(Bucket="cmd-ray-test")
        yield "s3://cmd-ray-test"
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
        proc.terminate()
        proc.wait(timeout=30)
