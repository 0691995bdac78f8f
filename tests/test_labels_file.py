"""Noisy labels as real data sets ship them: a labels file that names images is joined by path,
never by row order; class names or integers; a file that does not cover the data set is refused
in one line (or, when asked, the images it leaves out are not trained on). Small image folders
and Parquet files the tests write; the flip counts are known exactly."""

from __future__ import annotations

import json
import random
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from cmd_ray.cli import main
from cmd_ray.config import from_dict
from cmd_ray.errors import NoiseError
from cmd_ray.labels_file import ImageKeys, join_labels, read_labels_file
from cmd_ray.trainer import load_run_data, train_in_process

from .conftest import CLASS_NAMES, class_image, png_bytes, write_image_folder

PER_CLASS = 30  # 90 training images
FLIPPED = 22  # labels the files below move to the next class


def _images(train: Path) -> list[str]:
    return sorted(p.relative_to(train).as_posix() for p in train.rglob("*.png"))


def _shuffled_noisy_rows(names: list[str], flips: int = FLIPPED) -> tuple[list[tuple[str, int]], set[str]]:
    """(path, noisy class index) for every image, `flips` of them moved to the next class, in a
    shuffled order (as an annotation export writes them), and the flipped paths."""
    rng = random.Random(0)
    flipped = set(rng.sample(names, flips))
    rows = []
    for name in names:
        clean = CLASS_NAMES.index(name.split("/")[0])
        rows.append((name, (clean + 1) % 3 if name in flipped else clean))
    rng.shuffle(rows)
    return rows, flipped


def _write(path: Path, rows: list[tuple[str, int]], names_as_labels: bool, prefix: str = "") -> Path:
    label = (lambda y: CLASS_NAMES[y]) if names_as_labels else str
    if path.suffix == ".csv":
        path.write_text("path,label\n" + "".join(f"{prefix}{p},{label(y)}\n" for p, y in rows))
    else:  # Clothing1M's noisy_label_kv.txt layout: `path label` per line
        path.write_text("".join(f"{prefix}{p} {label(y)}\n" for p, y in rows))
    return path


def _config(tmp_path: Path, train: Path, labels: Path, **noise) -> dict:
    return {
        "method": "ce",
        "epochs": 1,
        "batch_size": 32,
        "output_dir": str(tmp_path / "runs"),
        "model": {"name": "mlp"},
        "data": {"name": "image_folder", "path": str(train), "root": str(tmp_path / "cache"),
                 "validation_fraction": 0.1},
        "noise": {"type": "labels", "labels": str(labels), **noise},
    }  # fmt: skip


@pytest.mark.parametrize("suffix", [".csv", ".txt"])
@pytest.mark.parametrize("names_as_labels", [False, True], ids=["integers", "class-names"])
def test_a_shuffled_file_is_joined_by_path_and_its_realised_rate_is_exact(tmp_path, capsys, suffix, names_as_labels):
    """The file's rows are in a shuffled order: read by row order, the realised rate would be
    about 2/3; joined by path it is exactly FLIPPED / 90."""
    train = write_image_folder(tmp_path / "train", per_class=PER_CLASS)
    rows, _ = _shuffled_noisy_rows(_images(train))
    # The .txt paths carry the data set folder's own name first, as Clothing1M's `images/...` do.
    labels = _write(tmp_path / f"noisy{suffix}", rows, names_as_labels, prefix="train/" if suffix == ".txt" else "")
    argv = ["prepare", "--set", "data.name=image_folder", "--set", f"data.path={train}",
            "--set", f"data.root={tmp_path / 'cache'}", "--set", "data.validation_fraction=0.1",
            "--set", "noise.type=labels", "--set", f"noise.labels={labels}"]  # fmt: skip
    assert main(argv) == 0, capsys.readouterr().err
    printed = json.loads(capsys.readouterr().out)
    assert printed["realised_rate"] == FLIPPED / (3 * PER_CLASS)
    assert np.array(printed["realised_matrix"]).round(6).tolist() == np.array(printed["realised_matrix"]).tolist()


def test_the_join_puts_each_label_on_the_image_it_names(tmp_path):
    train = write_image_folder(tmp_path / "train", per_class=4)
    names = _images(train)
    rows, flipped = _shuffled_noisy_rows(names, flips=4)
    found = read_labels_file(str(_write(tmp_path / "noisy.csv", rows, names_as_labels=True)))
    labels, kept = join_labels(found, len(names), 3, ImageKeys.of_folder(names, list(CLASS_NAMES), str(train)))
    expected = [(CLASS_NAMES.index(n.split("/")[0]) + (n in flipped)) % 3 for n in names]
    assert kept is None and labels.tolist() == expected


def test_a_file_that_names_missing_images_and_leaves_others_out_is_refused_with_both_counts(tmp_path, capsys):
    train = write_image_folder(tmp_path / "train", per_class=PER_CLASS)
    rows, _ = _shuffled_noisy_rows(_images(train))
    labels = _write(tmp_path / "noisy.csv", rows[:-3] + [("coat/9999.png", 1)], names_as_labels=False)
    left_out = sorted(p for p, _ in rows[-3:])[0]
    argv = ["train", "--in-process", "--set", "method=ce", "--set", "model.name=mlp",
            "--set", "data.name=image_folder", "--set", f"data.path={train}",
            "--set", f"data.root={tmp_path / 'cache'}", "--set", "data.validation_fraction=0.1",
            "--set", "noise.type=labels", "--set", f"noise.labels={labels}",
            "--set", f"output_dir={tmp_path / 'runs'}"]  # fmt: skip
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert "Traceback" not in err
    err = err.splitlines()[-1]
    assert err.startswith(f"cmd-ray: error: noise.labels: {labels} names 1 path(s) the data set lacks ")
    assert "(first: 'coat/9999.png', line 89)" in err
    assert f"and leaves out 3 of its 90 images (first: {left_out!r})" in err
    assert not list((tmp_path / "cache").rglob("*.parquet")), "a refused labels file leaves no cache"


def test_images_the_file_leaves_out_are_refused_unless_asked_for_and_then_left_out_and_counted(tmp_path):
    train = write_image_folder(tmp_path / "train", per_class=PER_CLASS)
    rows, flipped = _shuffled_noisy_rows(_images(train))
    listed = rows[:80]
    labels = _write(tmp_path / "noisy.txt", listed, names_as_labels=False)
    with pytest.raises(NoiseError, match=r"leaves out 10 of its 90 images .*noise\.labels_coverage: listed"):
        load_run_data(from_dict(_config(tmp_path, train, labels)))
    cfg = from_dict(_config(tmp_path, train, labels, labels_coverage="listed"))
    data = load_run_data(cfg)
    assert len(data.train) + len(data.validation) == 80 and data.noise["left_out"] == 10
    assert data.noise["realised_rate"] == sum(p in flipped for p, _ in listed) / 80
    summary = train_in_process(cfg, data, log=lambda line: None)
    assert summary["noise"]["left_out"] == 10 and summary["noise"]["labels_coverage"] == "listed"


def test_a_label_the_data_set_does_not_have_is_one_line_naming_it_and_its_line(tmp_path):
    train = write_image_folder(tmp_path / "train", per_class=2)
    names = _images(train)
    labels = tmp_path / "noisy.csv"
    labels.write_text("file,label\n" + "".join(f"{n},{'boot' if i == 3 else 'bag'}\n" for i, n in enumerate(names)))
    message = r"^noise\.labels: \S+ line 5: 'boot' is not a label of this data set; allowed: an integer 0 to 2 or a "
    with pytest.raises(NoiseError, match=message + r"class name \(ankle, bag, coat\)$"):
        load_run_data(from_dict(_config(tmp_path, train, labels)))


def test_a_file_that_names_an_image_twice_is_refused(tmp_path):
    train = write_image_folder(tmp_path / "train", per_class=2)
    names = _images(train)
    labels = tmp_path / "noisy.txt"
    labels.write_text("".join(f"{n} 0\n" for n in names) + f"./{names[1]} 2\n")
    with pytest.raises(NoiseError, match=rf"line 7 names './{names[1]}' again \(first on line 2\)"):
        load_run_data(from_dict(_config(tmp_path, train, labels)))


def test_a_file_by_path_for_a_data_set_without_paths_is_refused(fake_fmnist_root, tmp_path):
    labels = tmp_path / "noisy.txt"
    labels.write_text("a.png 1\nb.png 2\n")
    cfg = from_dict({"method": "ce", "data": {"name": "fashion-mnist", "root": str(fake_fmnist_root)},
                     "noise": {"type": "labels", "labels": str(labels)}})  # fmt: skip
    with pytest.raises(NoiseError, match=r"names images by path \(line 1: 'a\.png'\), but this data set has no "
                                         r"image paths"):  # fmt: skip
        load_run_data(cfg)


def test_a_file_without_paths_still_follows_the_data_sets_order(tmp_path):
    """A labels file with no paths keeps its meaning: the i-th label is the i-th image's, class
    by class with files sorted by name."""
    train = write_image_folder(tmp_path / "train", per_class=5)
    noisy = [2, 0, 0, 0, 0, 1, 1, 1, 1, 1, 2, 2, 2, 2, 1]
    labels = tmp_path / "noisy.txt"
    labels.write_text("\n".join(CLASS_NAMES[y] for y in noisy) + "\n")  # class names, one per line
    data = load_run_data(from_dict({**_config(tmp_path, train, labels), "data": {
        **_config(tmp_path, train, labels)["data"], "validation_fraction": 0.0, "test_path": str(train)}}))  # fmt: skip
    assert data.train.noisy_labels.tolist() == noisy and data.noise["realised_rate"] == 2 / 15


def test_listed_coverage_needs_a_file_that_names_images(tmp_path, capsys):
    train = write_image_folder(tmp_path / "train", per_class=2)
    labels = tmp_path / "noisy.csv"
    labels.write_text("0\n1\n2\n0\n1\n2\n")
    argv = ["show-config", "--set", "data.name=image_folder", "--set", f"data.path={train}", "--set", "method=ce",
            "--set", "noise.type=labels", "--set", f"noise.labels={labels}",
            "--set", "noise.labels_coverage=listed"]  # fmt: skip
    assert main(argv) == 2
    assert "noise.labels_coverage: got 'listed', but" in capsys.readouterr().err


def test_a_parquet_file_with_a_path_column_is_joined_by_path(tmp_path):
    rng = np.random.default_rng(0)
    clean = [i % 3 for i in range(60)]
    paths = [f"img/{i:03d}.png" for i in range(60)]
    table = pa.table({
        "image": pa.array([png_bytes(class_image(y, 28, rng)) for y in clean], pa.binary()),
        "label": clean, "path": paths, "split": ["train"] * 48 + ["validation"] * 12,
    })  # fmt: skip
    pq.write_table(table, tmp_path / "data.parquet")
    order = list(range(60))
    random.Random(1).shuffle(order)
    flipped = set(order[:15])
    labels = tmp_path / "noisy.csv"
    labels.write_text("image,label\n" + "".join(f"{paths[i]},{(clean[i] + (i in flipped)) % 3}\n" for i in order))
    cfg = from_dict({"method": "ce", "model": {"name": "mlp"},
                     "data": {"name": "parquet", "path": str(tmp_path / "data.parquet"), "root": str(tmp_path / "c")},
                     "noise": {"type": "labels", "labels": str(labels)}})  # fmt: skip
    data = load_run_data(cfg)
    assert data.noise["realised_rate"] == 15 / 60
    assert data.validation.noisy_labels.tolist() == [(clean[i] + (i in flipped)) % 3 for i in range(48, 60)]
