"""A user's own data: image folders and Parquet files of encoded images, real noisy-label files
(.npy, .csv, CIFAR-N's .pt), runs without clean labels or without a test split, both training
paths and a sweep. The data are small sets of generated PNGs the tests write."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from PIL import Image

from cmd_ray.cli import main
from cmd_ray.config import from_dict
from cmd_ray.data import DataError, load_data, read_parquet_split
from cmd_ray.noise import NoiseSpec
from cmd_ray.trainer import load_run_data, train_in_process
from cmd_ray.user_data import UserSource

from .conftest import CLASS_NAMES, class_image, png_bytes, write_image_folder, write_image_parquet


def _folder_config(tmp_path: Path, train: Path, **values) -> dict:
    config = {
        "method": "cmd-p",
        "epochs": 2,
        "batch_size": 32,
        "output_dir": str(tmp_path / "runs"),
        "data": {"name": "image_folder", "path": str(train), "root": str(tmp_path / "cache")},
        "noise": {"type": "symmetric", "rate": 0.2},
    }
    for key, value in values.items():
        section, _, name = key.partition("__")
        if name:
            config.setdefault(section, {})[name] = value
        else:
            config[key] = value
    return config


def _load(tmp_path: Path, train: Path, **values):
    return load_run_data(from_dict(_folder_config(tmp_path, train, **values)))


# --------------------------------------------------------------------------------------
# Import


def test_image_folder_keeps_grey_images_classes_in_sorted_order_and_the_test_folder(tmp_path):
    train = write_image_folder(tmp_path / "train", per_class=10)
    test = write_image_folder(tmp_path / "test", per_class=4, seed=1)
    data = _load(tmp_path, train, data__test_path=str(test), noise__type="none", labels__trust="all")
    assert data.info.shape == (28, 28, 1) and data.info.num_classes == 3
    assert data.train.meta["classes"] == list(CLASS_NAMES)
    # Class by class, files sorted: the order a labels file follows.
    assert data.train.noisy_labels.tolist() == [0] * 10 + [1] * 10 + [2] * 10
    assert len(data.test) == 12 and data.test.clean_labels.tolist() == [0] * 4 + [1] * 4 + [2] * 4
    first = np.array(Image.open(train / "ankle" / "0000.png"))
    assert torch.equal(data.train.images[0, 0], torch.from_numpy(first))  # pixels as found
    assert data.info.mean[0] == pytest.approx(float(data.train.images.float().mean() / 255), abs=0.02)


def test_one_colour_image_makes_the_set_rgb_and_image_size_resizes_every_image(tmp_path):
    train = write_image_folder(tmp_path / "train", per_class=4, size=20)
    rng = np.random.default_rng(3)
    (train / "coat" / "colour.png").write_bytes(png_bytes(class_image(2, 20, rng, colour=True)))
    data = _load(tmp_path, train, data__image_size=28, data__validation_fraction=0.25, noise__type="pairflip")
    assert data.info.shape == (28, 28, 3) and data.train.images.shape[1:] == (3, 28, 28)
    assert data.test is None and len(data.validation) == 3  # 13 images, no test split


def test_a_grey_test_folder_follows_a_colour_training_folder(tmp_path):
    train = write_image_folder(tmp_path / "train", per_class=3, colour=True)
    test = write_image_folder(tmp_path / "test", per_class=2)
    data = _load(tmp_path, train, data__test_path=str(test))
    assert data.train.images.shape[1:] == data.test.images.shape[1:] == (3, 28, 28)
    assert torch.equal(data.test.images[0, 0], data.test.images[0, 2])  # grey copied to R, G and B


def test_parquet_train_and_test_files_as_hugging_face_ships_them(tmp_path):
    import pyarrow as pa

    whole = pq.read_table(write_image_parquet(tmp_path / "all.parquet", n_train=30, n_test=9, names=True))
    train = tmp_path / "train.parquet"
    test = tmp_path / "test.parquet"
    pq.write_table(whole.slice(0, 30).drop(["split"]), train)  # no split column in either file
    pq.write_table(whole.slice(30).drop(["split"]), test)
    source = UserSource("parquet", str(train), test_path=str(test))
    data = load_data("parquet", tmp_path / "cache", NoiseSpec("symmetric", 0.2), 0, source=source)
    single = load_data("parquet", tmp_path / "cache", NoiseSpec("symmetric", 0.2), 0,
                       source=UserSource("parquet", str(tmp_path / "all.parquet")))  # fmt: skip
    assert len(data.train) == 30 and len(data.test) == 9 and data.info.num_classes == 3
    assert torch.equal(data.test.images, single.test.images)  # the same rows as one file with a split column
    assert torch.equal(data.test.clean_labels, single.test.clean_labels)
    assert data.train.meta["classes"] == list(CLASS_NAMES)
    mismatched = tmp_path / "other.parquet"
    pq.write_table(pa.table({"image": whole.column("image").slice(30), "label": pa.array([0.5] * 9)}), mismatched)
    with pytest.raises(DataError, match=r"^data\.test_path: column 'label' of \S+other\.parquet is double, of "):
        load_data("parquet", tmp_path / "cache", NoiseSpec("none"), 0,
                  source=UserSource("parquet", str(train), test_path=str(mismatched)))  # fmt: skip
    unknown = tmp_path / "unknown.parquet"
    pq.write_table(pa.table({"image": whole.column("image").slice(30), "label": ["ghost"] * 9}), unknown)
    with pytest.raises(DataError, match=r"^data\.label_column: test rows name class 'ghost', which no training"):
        load_data("parquet", tmp_path / "cache", NoiseSpec("none"), 0,
                  source=UserSource("parquet", str(train), test_path=str(unknown)))  # fmt: skip


def test_parquet_validation_rows_are_the_noisy_validation_split(tmp_path):
    import pyarrow as pa

    table = pq.read_table(write_image_parquet(tmp_path / "t.parquet", n_train=40, n_test=0))
    splits = ["validation" if i % 4 == 0 else "train" for i in range(40)]
    path = tmp_path / "with-validation.parquet"
    pq.write_table(table.drop(["split"]).append_column("split", pa.array(splits)), path)
    source = UserSource("parquet", str(path))
    data = load_data("parquet", tmp_path / "cache", NoiseSpec("symmetric", 0.4), 0, source=source)
    assert data.test is None and len(data.validation) == 10 and len(data.train) == 30
    assert data.validation.index.tolist() == list(range(0, 40, 4))  # the file's validation rows, in order
    assert not torch.equal(data.validation.noisy_labels, data.validation.clean_labels)  # noisy, as held-out rows are
    with pytest.raises(DataError, match=r"^data\.validation_fraction: got 0\.2, but \S+ has 10 validation rows of"):
        load_data("parquet", tmp_path / "cache", NoiseSpec("symmetric", 0.4), 0, validation_fraction=0.2,
                  source=source)  # fmt: skip


def test_parquet_with_a_split_column_class_names_and_a_hugging_face_image_struct(tmp_path):
    path = write_image_parquet(tmp_path / "plain.parquet", n_train=30, n_test=9, names=True)
    source = UserSource("parquet", str(path))
    data = load_data("parquet", tmp_path / "cache", NoiseSpec("none"), 0, source=source)
    assert data.train.meta["classes"] == sorted(CLASS_NAMES)
    assert len(data.train) == 30 and len(data.test) == 9
    assert data.train.clean_labels is None  # the user's labels are the noisy ones
    table = pq.read_table(path)
    struct = pa.StructArray.from_arrays([table.column("image").combine_chunks(), pa.nulls(39, pa.string())],
                                        names=["bytes", "path"])  # fmt: skip
    hf = tmp_path / "hf.parquet"
    pq.write_table(table.set_column(0, "img", struct), hf)
    source = UserSource("parquet", str(hf), image_column="img")
    other = load_data("parquet", tmp_path / "cache", NoiseSpec("none"), 0, source=source)
    assert torch.equal(other.train.images, data.train.images)
    assert torch.equal(other.train.noisy_labels, data.train.noisy_labels)


def test_images_are_imported_once_per_source_whatever_the_noise(tmp_path, capfd):
    train = write_image_folder(tmp_path / "train", per_class=5)
    labels = tmp_path / "noisy.npy"
    np.save(labels, np.array([1, 2, 0] * 5))
    settings = [
        dict(noise__type="symmetric", noise__rate=0.2),
        dict(noise__type="symmetric", noise__rate=0.5),
        dict(noise__type="pairflip", noise__rate=0.45),
        dict(noise__type="labels", noise__labels=str(labels), coteaching__forget_rate=0.2),
        dict(noise__type="none", labels__trust="all"),
    ]
    loaded = [_load(tmp_path, train, data__validation_fraction=0.2, **s) for s in settings]
    assert capfd.readouterr().err.count("importing image_folder") == 1  # one decode of the images
    given = loaded[-1]  # the labels as given: no clean labels
    assert given.train.clean_labels is None
    for data in loaded[:-1]:  # the same images; the labels as given are the clean reference
        assert torch.equal(data.train.images, given.train.images)
        assert torch.equal(data.train.clean_labels, given.train.noisy_labels)
    assert not torch.equal(loaded[0].train.noisy_labels, loaded[1].train.noisy_labels)
    assert loaded[0].train.meta["source"] == given.train.meta["source"]
    assert loaded[0].noise["noise"] == {"type": "symmetric", "rate": 0.2, "matrix": None}
    # Another seed draws other noise (and another validation split) from the same import.
    _load(tmp_path, train, data__validation_fraction=0.2, seed=3)
    assert "importing" not in capfd.readouterr().err


def test_a_changed_source_is_rebuilt_and_the_cache_records_its_identity(tmp_path, capfd):
    train = write_image_folder(tmp_path / "train", per_class=5)
    first = _load(tmp_path, train, data__validation_fraction=0.2)
    assert _load(tmp_path, train, data__validation_fraction=0.2).train.meta == first.train.meta  # reused
    assert capfd.readouterr().err.count("importing image_folder") == 1  # progress: stderr
    source = first.train.meta["source"]
    assert source["path"] == str(train) and source["bytes"] > 0 and len(source["sha256"]) == 64
    assert source["modified"].startswith("20")  # ISO 8601, the newest file's time
    image = train / "bag" / "0001.png"
    image.write_bytes(png_bytes(class_image(0, 28, np.random.default_rng(9))))
    os.utime(image, ns=(1, 1))  # a new size or modification time, whichever
    second = _load(tmp_path, train, data__validation_fraction=0.2)
    assert "importing image_folder" in capfd.readouterr().err
    assert second.train.meta["source"]["sha256"] != source["sha256"]
    assert len(list((tmp_path / "cache" / "cmd-ray-cache").glob("image_folder-*-symmetric-*"))) == 2


# --------------------------------------------------------------------------------------
# Real noisy labels


def _noisy(labels: np.ndarray, every: int) -> np.ndarray:
    """Every `every`-th label moved to the next class."""
    noisy = labels.copy()
    noisy[::every] = (noisy[::every] + 1) % 3
    return noisy


@pytest.mark.parametrize("suffix", [".npy", ".csv", ".pt"])
def test_a_labels_file_replaces_the_labels_and_its_noise_is_measured(tmp_path, suffix):
    train = write_image_folder(tmp_path / "train", per_class=10)
    clean = np.repeat(np.arange(3), 10)
    noisy = _noisy(clean, 4)
    path = tmp_path / f"labels{suffix}"
    key = None
    if suffix == ".npy":
        np.save(path, noisy)
    elif suffix == ".csv":
        path.write_text("\n".join(map(str, noisy)) + "\n")
    else:  # CIFAR-10N's layout: a dictionary of NumPy arrays
        torch.save({"clean_label": clean, "worse_label": noisy, "aggre_label": clean}, path)
        key = "worse_label"
    data = _load(
        tmp_path, train, data__validation_fraction=0.1, noise__type="labels", noise__labels=str(path),
        noise__labels_key=key, coteaching__forget_rate=0.2,
    )  # fmt: skip
    full = read_parquet_split(next((tmp_path / "cache" / "cmd-ray-cache").glob("image_folder-*-labels-*")))
    assert full.noisy_labels.tolist() == noisy.tolist() and full.clean_labels.tolist() == clean.tolist()
    assert data.noise["realised_rate"] == pytest.approx(8 / 30)
    realised = np.array(data.noise["realised_matrix"])
    assert realised[0, 1] == pytest.approx(3 / 10) and realised[1, 2] == pytest.approx(2 / 10)


def test_cifar_n_style_file_without_a_key_names_the_keys_it_has(tmp_path):
    train = write_image_folder(tmp_path / "train", per_class=2)
    path = tmp_path / "CIFAR-10_human.pt"
    torch.save({"worse_label": np.zeros(6, dtype=np.int64), "random_label1": np.ones(6, dtype=np.int64)}, path)
    with pytest.raises(Exception, match=r"^noise.labels_key: got null; allowed for CIFAR-10_human.pt: one of "
                                        r"random_label1, worse_label"):  # fmt: skip
        _load(tmp_path, train, data__validation_fraction=0.5, noise__type="labels", noise__labels=str(path),
              coteaching__forget_rate=0.1)  # fmt: skip


# --------------------------------------------------------------------------------------
# No clean labels, no test split


def test_own_labels_train_without_clean_label_metrics_and_report_validation_without_a_test_split(tmp_path):
    train = write_image_folder(tmp_path / "train", per_class=20)
    cfg = from_dict(
        _folder_config(tmp_path, train, noise__type="none", data__validation_fraction=0.2, coteaching__forget_rate=0.1)
    )
    summary = train_in_process(cfg, log=lambda _: None)
    assert summary["headline"] == "mean/val_accuracy" and "test_accuracy" not in summary
    assert summary["val_accuracy"]["ensemble"]["final"] > 0.6  # the classes are easy
    record = summary["history"][-1]
    assert "peer0/test_accuracy" not in record and record["test_samples"] == 0
    for key in ("selection_precision", "memorisation", "label_correction_rate", "train_clean_accuracy"):
        assert math.isnan(record[f"peer0/{key}"]), key  # not available, never computed on noisy labels
    assert record["peer0/selected_fraction"] > 0  # what needs no clean labels is still there
    assert 0.0 <= record["mean/disagreement"] <= 1.0
    assert summary["noise"]["realised_rate"] is None and "rate" not in summary["noise"]  # no rate was asked for


def test_no_test_split_and_no_validation_split_is_refused(tmp_path):
    train = write_image_folder(tmp_path / "train", per_class=2)
    with pytest.raises(DataError, match=r"^data.validation_fraction: got 0, but .* has no test split"):
        _load(tmp_path, train)


def test_import_benchmark_times_a_generated_folder_and_its_cache(tmp_path):
    from cmd_ray.tools.bench import import_speed

    lines = []
    figures = import_speed(tmp_path, images=40, size=12, colour=True, log=lines.append)
    assert len(list((tmp_path / "images").rglob("*.png"))) == 40
    assert figures["import_seconds"] > 0 and figures["cached_seconds"] > 0
    assert lines[0].startswith("[import] 40 12x12 RGB PNGs") and "images/s" in lines[0]


# --------------------------------------------------------------------------------------
# End to end: both training paths and a sweep


def _cli_args(tmp_path: Path, train: Path, test: Path, labels: Path) -> list[str]:
    return [
        "--set", "data.name=image_folder", "--set", f"data.path={train}", "--set", f"data.test_path={test}",
        "--set", f"data.root={tmp_path / 'cache'}", "--set", "noise.type=labels", "--set", f"noise.labels={labels}",
        "--set", "noise.labels_key=worse_label", "--set", "coteaching.forget_rate=0.2", "--set", "epochs=2",
        "--set", "batch_size=32", "--set", "ray.num_cpus=2",
    ]  # fmt: skip


@pytest.mark.slow
def test_cli_trains_an_image_folder_with_cifar_n_labels_in_process_and_on_ray(tmp_path, capsys, local_ray):
    train = write_image_folder(tmp_path / "train", per_class=40)
    test = write_image_folder(tmp_path / "test", per_class=10, seed=1)
    labels = tmp_path / "CIFAR-10_human.pt"
    torch.save({"worse_label": _noisy(np.repeat(np.arange(3), 40), 5)}, labels)
    summaries = {}
    for path, extra in (("in-process", ["--in-process"]), ("ray", [])):
        out = tmp_path / path
        code = main(["train", *_cli_args(tmp_path, train, test, labels), "--set", f"output_dir={out}", *extra])
        assert code == 0, capsys.readouterr().err
        summaries[path] = json.loads(next(out.rglob("summary*.json")).read_text())
    assert summaries["ray"]["path"] == "ray" and summaries["ray"]["workers"] == 2
    for summary in summaries.values():
        assert summary["dataset"] == "image_folder" and summary["test_samples"] == 30
        assert summary["noise"]["realised_rate"] == pytest.approx(24 / 120)
        assert summary["noise"]["labels"] == str(labels) and summary["noise"]["labels_key"] == "worse_label"
        assert summary["test_accuracy"]["ensemble"]["final"] > 0.6
        assert not math.isnan(summary["history"][-1]["mean/memorisation"])  # clean labels known here


@pytest.mark.slow
def test_a_sweep_on_a_parquet_data_set_without_clean_labels_or_a_test_split_and_a_failing_trial(tmp_path):
    """Ray workers sum NaN for what needs clean labels, and the report falls back to validation.
    The same sweep pins that a failing trial (a NaN loss) does not stop the others: it is a
    `failed` row with its error, counted on the console and listed under the report table; its
    grid is a variant axis (several keys set together), which also goes through Tune."""
    path = write_image_parquet(tmp_path / "shapes.parquet", n_train=120, n_test=0)
    env = {k: v for k, v in os.environ.items() if not k.startswith(("RAY_", "WANDB_"))}
    env.update(RAY_TRAIN_ENABLE_PREEMPTION_WATCHER="0", HOME=str(tmp_path / "home"))
    grid = "{variant: [{method: ce}, {method: cmd-p}, {method: ce, label: faulty, testing.nan_step: 2}]}"
    cmd = [
        sys.executable, "-m", "cmd_ray.cli", "sweep",
        "--set", "data.name=parquet", "--set", f"data.path={path}", "--set", f"data.root={tmp_path / 'cache'}",
        "--set", "data.validation_fraction=0.25", "--set", "noise.type=none", "--set", "coteaching.forget_rate=0.1",
        "--set", "epochs=2", "--set", "batch_size=30",
        "--set", f"sweep.storage_path={tmp_path / 'sweeps'}", "--set", "sweep.name=own",
        "--set", f"sweep.grid={grid}", "--set", "sweep.wandb.mode=disabled", "--set", "ray.num_cpus=2",
    ]  # fmt: skip
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    table = pq.read_table(tmp_path / "sweeps" / "own" / "results.parquet").to_pylist()
    failed = [r for r in table if r["variant"] == "faulty"]
    assert failed and all(r["status"] == "failed" and r["testing.nan_step"] == 2 for r in failed)
    assert "loss is nan" in failed[0]["error"]
    assert "2 trials finished, 1 failed" in proc.stdout + proc.stderr
    assert f"failed trials: {failed[0]['trial_id']}" in proc.stdout
    rows = [r for r in table if r["variant"] != "faulty"]
    assert {(r["method"], r["epoch"]) for r in rows} == {("ce", 0), ("ce", 1), ("cmd-p", 0), ("cmd-p", 1)}
    assert all(r["status"] == "finished" and r["train_samples"] == 90 and r["test_samples"] == 0 for r in rows)
    unavailable = [r["mean/memorisation"] is None or math.isnan(r["mean/memorisation"]) for r in rows]
    assert all(unavailable) and all(r.get("mean/test_accuracy") is None for r in rows)
    assert all(r["mean/val_accuracy"] > 0.4 for r in rows if r["epoch"] == 1)
    assert "No test split: accuracy on the held-out noisy labels" in proc.stdout


def test_prepare_asks_nothing_of_the_method_or_the_model(tmp_path, capsys):
    """The cache depends on data, noise and seed: `prepare` of labels with no known noise rate
    needs no coteaching.forget_rate, and 8x8 images no data.image_size (the README's first step)."""
    folder = write_image_folder(tmp_path / "digits", per_class=4, size=8)
    argv = ["prepare", "--set", "data.name=image_folder", "--set", f"data.path={folder}",
            "--set", f"data.root={tmp_path / 'cache'}", "--set", "data.validation_fraction=0.25",
            "--set", "noise.type=none"]  # fmt: skip
    assert main(argv) == 0, capsys.readouterr().err
    printed = json.loads(capsys.readouterr().out)
    assert printed["shape"] == [8, 8, 1] and printed["validation_samples"] == 3


def test_a_parquet_source_named_two_ways_is_one_source_imported_once(tmp_path, monkeypatch):
    """The README's walk-through names the file `~/data/x.parquet` in `prepare` and a sweep makes
    every path absolute: both must find the one import (a path as typed made a second one)."""
    monkeypatch.setenv("HOME", str(tmp_path))
    (tmp_path / "data").mkdir()
    write_image_parquet(tmp_path / "data" / "x.parquet", n_train=6, n_test=3)
    typed = UserSource("parquet", "~/data/x.parquet").identity().fingerprint
    assert UserSource("parquet", str(tmp_path / "data" / "x.parquet")).identity().fingerprint == typed
    monkeypatch.chdir(tmp_path / "data")
    assert UserSource("parquet", "x.parquet").identity().fingerprint == typed
