"""Every kind of bad input is refused by the command line before any work: exit status 2,
one line naming the field, no traceback, nothing written."""

from __future__ import annotations

import gzip
import re
from pathlib import Path

import numpy as np
import pytest

from cmd_ray.cli import main

from .conftest import png_bytes, write_image_folder, write_image_parquet

ROOT = Path(__file__).resolve().parents[1]
PRESET = str(ROOT / "launch/configs/fmnist.yaml")


def _files(tmp_path: Path, name: str, text: str) -> Path:
    path = tmp_path / name
    path.write_text(text)
    return path


def _bad_matrix(tmp_path: Path) -> str:
    path = tmp_path / "m.npy"
    np.save(path, np.full((10, 10), 0.2))
    return str(path)


def _wrong_shape_matrix(tmp_path: Path) -> str:
    path = tmp_path / "m3.csv"
    np.savetxt(path, np.eye(3), delimiter=",")
    return str(path)


def _truncated_fmnist(tmp_path: Path) -> str:
    folder = tmp_path / "bad-data" / "fashion-mnist"
    folder.mkdir(parents=True)
    for stem in (
        "train-images-idx3-ubyte",
        "train-labels-idx1-ubyte",
        "t10k-images-idx3-ubyte",
        "t10k-labels-idx1-ubyte",
    ):
        (folder / f"{stem}.gz").write_bytes(gzip.compress(b"\x00\x00\x08\x03" + b"\x00\x00\x00\x05" * 3 + b"xx"))
    return str(tmp_path / "bad-data")


def _own(t: Path, kind: str = "folder") -> Path:
    """A small data set of the user's under t/bad-data (the cache root of the cases below)."""
    root = t / "bad-data"
    if kind == "parquet":
        root.mkdir(parents=True, exist_ok=True)
        return write_image_parquet(root / "own.parquet", n_train=6, n_test=0)
    return write_image_folder(root / "own", per_class=2)


def _folder_args(t: Path, folder: Path, *extra: str) -> list[str]:
    return ["prepare", "--set", "data.name=image_folder", "--set", f"data.path={folder}",
            "--set", f"data.root={t / 'bad-data'}", "--set", "data.validation_fraction=0.5", *extra]  # fmt: skip


def _empty_class(t: Path) -> list[str]:
    folder = _own(t)
    (folder / "dress").mkdir()
    return _folder_args(t, folder)


def _corrupt_image(t: Path) -> list[str]:
    folder = _own(t)
    (folder / "bag" / "0001.png").write_bytes(b"\x89PNG not really")
    return _folder_args(t, folder)


def _mixed_sizes(t: Path) -> list[str]:
    folder = _own(t)
    (folder / "bag" / "big.png").write_bytes(png_bytes(np.zeros((32, 32), dtype=np.uint8)))
    return _folder_args(t, folder)


def _labels_file(t: Path, labels: list[int]) -> list[str]:
    folder = _own(t)
    path = t / "bad-data" / "noisy.npy"
    np.save(path, np.array(labels))
    return _folder_args(t, folder, "--set", "noise.type=labels", "--set", f"noise.labels={path}",
                        "--set", "coteaching.forget_rate=0.2")  # fmt: skip


def _one_class(t: Path) -> list[str]:
    folder = t / "bad-data" / "one"
    write_image_folder(folder, per_class=3)
    for name in ("bag", "coat"):
        for image in (folder / name).iterdir():
            image.unlink()
        (folder / name).rmdir()
    return _folder_args(t, folder, "--set", "noise.rate=0.3")


def _class_all_held_out(t: Path) -> list[str]:
    folder = _own(t)
    for image in sorted((folder / "bag").iterdir())[1:]:
        image.unlink()  # one image of `bag` left: a 0.5 validation share can take it
    return _folder_args(t, folder, "--set", "seed=1", "--set", "noise.type=none")


def _labels_by_path(t: Path) -> list[str]:
    folder = _own(t)
    path = t / "bad-data" / "noisy.csv"
    path.write_text(
        "path,label\n" + "".join(f"{p.parent.name}/{p.name},bag\n" for p in sorted(folder.rglob("*.png"))[1:])
    )
    return _folder_args(t, folder, "--set", "noise.type=labels", "--set", f"noise.labels={path}")


def _parquet_args(t: Path, *extra: str) -> list[str]:
    return ["prepare", "--set", "data.name=parquet", "--set", f"data.path={_own(t, 'parquet')}",
            "--set", f"data.root={t / 'bad-data'}", "--set", "data.validation_fraction=0.5", *extra]  # fmt: skip


CASES = [
    # (id, argv builder, expected start of the message after "cmd-ray: error: ")
    ("unknown key", lambda t: ["train", "--set", "colour=red"], "colour: unknown key"),
    ("unknown nested key", lambda t: ["train", "--set", "noise.level=0.2"], "noise.level: unknown key"),
    ("wrong type", lambda t: ["train", "--set", "epochs=many"], "epochs: got 'many'; allowed: an integer"),
    ("bool type", lambda t: ["train", "--set", "use_gpu=maybe"], "use_gpu: got 'maybe'; allowed: true or false"),
    ("malformed yaml", lambda t: ["train", "--config", str(_files(t, "b.yaml", "peers: [2\n"))], "--config: "),
    ("yaml not a mapping", lambda t: ["train", "--config", str(_files(t, "l.yaml", "- 1\n- 2\n"))], "--config: "),
    ("missing config", lambda t: ["train", "--config", str(t / "nope.yaml")], "--config: cannot read"),
    ("override without =", lambda t: ["train", "--set", "noise.rate"], "--set: got 'noise.rate'"),
    ("noise rate high", lambda t: ["train", "--set", "noise.rate=1.5"], "noise.rate: got 1.5"),
    ("noise rate negative", lambda t: ["train", "--set", "noise.rate=-0.1"], "noise.rate: got -0.1"),
    (
        "validation share too large",
        lambda t: ["train", "--set", "data.validation_fraction=0.7"],
        "data.validation_fraction: got 0.7; allowed: a number in [0.0, 0.5]",
    ),
    ("unknown noise", lambda t: ["train", "--set", "noise.type=gauss"], "noise.type: got 'gauss'"),
    ("matrix rows", lambda t: ["prepare", "--set", "noise.type=matrix", "--set", f"noise.matrix={_bad_matrix(t)}"],
     "noise.matrix: row 0 sums to 2"),
    ("matrix shape", lambda t: ["prepare", "--set", "noise.type=matrix", "--set",
                                f"noise.matrix={_wrong_shape_matrix(t)}"], "noise.matrix: got shape (3, 3)"),
    ("matrix missing", lambda t: ["train", "--set", "noise.type=matrix"], "noise.matrix: got null"),
    ("unknown label trust", lambda t: ["train", "--set", "labels.trust=clean"], "labels.trust: got 'clean'"),
    ("trust midpoint", lambda t: ["train", "--set", "distill.trust_midpoint=2"], "distill.trust_midpoint: got 2.0"),
    ("tau high", lambda t: ["train", "--set", "knowledge.tau=1.2"], "knowledge.tau: got 1.2"),
    ("tau_start negative", lambda t: ["train", "--set", "knowledge.tau_start=-1"], "knowledge.tau_start: got -1"),
    ("one peer", lambda t: ["train", "--set", "peers=1"], "peers: got 1; allowed: an integer >= 2"),
    ("unknown dataset", lambda t: ["train", "--set", "data.name=svhn"], "data.name: got 'svhn'"),
    ("unknown model", lambda t: ["train", "--set", "model.name=vgg16"], "model.name: got 'vgg16'"),
    ("unknown method", lambda t: ["train", "--set", "method=mixup"], "method: got 'mixup'"),
    ("model for wrong images", lambda t: ["train", "--set", "model.name=preact_resnet18", "--in-process"],
     "model.name: 'preact_resnet18' takes 32x32 images"),
    ("truncated data", lambda t: ["prepare", "--set", f"data.root={_truncated_fmnist(t)}"],
     re.compile(r"data\.root: \S+/train-images-idx3-ubyte\.gz: truncated IDX data \(2 bytes, header says 125\)")),
    ("unwritable output", lambda t: ["train", "--set", f"output_dir={_files(t, 'f', 'x')}/sub"],
     "output_dir: cannot write to"),
    ("run name with a folder", lambda t: ["train", "--run-name", "../elsewhere"], "--run-name: got '../elsewhere'"),
    ("run name in-process", lambda t: ["train", "--in-process", "--run-name", "x"], "--run-name: got 'x'; allowed"),
    ("gpu without one", lambda t: ["train", "--set", "use_gpu=true"], "use_gpu: got true, but"),
    ("bad grid", lambda t: ["sweep", "--set", "sweep.grid={noise.rate: [0.2, 2]}"], "sweep.grid: the point"),
    ("grid over a key no trial reads",
     lambda t: ["sweep", "--set", "sweep.grid={labels.mixture_threshold: [0.5, 0.7]}"],
     "sweep.grid.labels.mixture_threshold: no trial of this grid reads it (cmd-p reads it only with labels.trust "
     "mixture or small_loss_and_mixture)"),
    ("grid variant with a key it does not read",
     lambda t: ["sweep", "--set", "sweep.grid={variant: [{method: ce, coteaching.ramp_epochs: 2}]}"],
     "sweep.grid.variant[0].coteaching.ramp_epochs: no trial of this variant reads it (method ce does not read"),
    ("unwritable sweep storage", lambda t: ["sweep", "--set", f"sweep.storage_path={_files(t, 'g', 'x')}/s"],
     "sweep.storage_path: cannot write to"),
    ("resume nothing", lambda t: ["sweep", "--set", f"sweep.storage_path={t}", "--resume"], "--resume: no sweep"),
    ("bad placement", lambda t: ["sweep", "--set", "sweep.placement=gpu"],
     "sweep.placement: got 'gpu'; allowed: one of 'auto', 'workers', 'trial'"),
    ("replicas in one trial process", lambda t: ["sweep", "--set", "sweep.placement=trial", "--set", "replicas=2"],
     "sweep.placement: got 'trial' with replicas=2"),
    ("no CPU for a trial", lambda t: ["sweep", "--set", "sweep.cpus_per_trial=0"], "sweep.cpus_per_trial: got 0.0"),
    ("report nothing", lambda t: ["report", str(t)], "folder: "),
    ("final over more epochs than the runs have",
     lambda t: ["bench", "accuracy", "--config", PRESET, "--folder", str(t / "b"), "--set", "epochs=3",
                "--last-epochs", "5"],
     "--last-epochs: got 5; allowed: an integer in [1, 3] (the grid's shortest run)"),
    # A user's own data
    ("own data without a path", lambda t: ["train", "--set", "data.name=image_folder"], "data.path: got null"),
    ("unreadable folder", lambda t: _folder_args(t, t / "nowhere"), "data.path: "),
    ("folder without classes", lambda t: _folder_args(t, (t / "bad-data" / "flat").mkdir(parents=True) or
                                                      t / "bad-data" / "flat"), "data.path: "),
    ("class folder without images", _empty_class, "data.path: class folder"),
    ("corrupt image", _corrupt_image,  # the file, not the address of PIL's in-memory buffer
     re.compile(r"data\.path: 1 image\(s\) cannot be decoded \(first: \S+0001\.png: cannot identify image file\); ")),
    ("model for your images", lambda t: ["train", "--in-process", *_folder_args(t, _own(t), "--set",
                                                                                "model.name=preact_resnet18")[1:]],
     re.compile(r"model\.name: 'preact_resnet18' takes 32x32 images, \S+/own has 28x28; allowed here: small_cnn, "
                r"mlp; or set data\.image_size: 32 to resize the images at import$")),  # before the import: no cache
    ("model for your parquet", lambda t: ["train", "--in-process",
                                          *_parquet_args(t, "--set", "model.name=preact_resnet18")[1:]],
     re.compile(r"model\.name: 'preact_resnet18' takes 32x32 images, \S+own\.parquet has 28x28; allowed here: ")),
    ("mixed sizes", _mixed_sizes, "data.image_size: got null, but images differ in size"),
    ("label out of range", lambda t: _labels_file(t, [0, 1, 2, 3, 0, 1]),
     re.compile(r"noise\.labels: \S+noisy\.npy line 4: 3 is not a label of this data set; allowed: an integer 0 to 2")),
    ("labels file leaves an image out", _labels_by_path,
     re.compile(r"noise\.labels: \S+noisy\.csv names 0 paths the data set lacks and leaves out 1 of its 6 images "
                r"\(first: 'ankle/0000\.png'\); allowed: ")),
    ("one class", _one_class, re.compile(r"data\.path: \S+one has 1 class folder \('ankle'\); allowed: at least 2 ")),
    ("training subset larger than the data", lambda t: _folder_args(t, _own(t), "--set", "data.train_subset=100"),
     re.compile(r"data\.train_subset: got 100, but \S+own has \d+ training images; allowed: an integer up to \d+, "
                r"or null \(all of them\)$")),
    ("a class all held out", _class_all_held_out,
     re.compile(r"data\.validation_fraction: got 0\.5, but class '\w+' has \d image\(s\), all held out for validat")),
    ("labels file too short", lambda t: _labels_file(t, [0, 1, 2]), "noise.labels: "),
    ("labels file missing", lambda t: _folder_args(t, _own(t), "--set", "noise.type=labels", "--set",
                                                   f"noise.labels={t / 'none.npy'}"), "noise.labels: got"),
    ("parquet without the column", lambda t: _parquet_args(t, "--set", "data.image_column=pixels"),
     "data.image_column: 'pixels' is not a column"),
    ("parquet label out of range", lambda t: _parquet_args(t, "--set", "data.num_classes=2"),
     "data.label_column: 'label' of "),
    ("no test and no validation", lambda t: _parquet_args(t, "--set", "data.validation_fraction=0"),
     "data.validation_fraction: got 0, but"),
    ("asymmetric on own data", lambda t: _folder_args(t, _own(t), "--set", "noise.type=asymmetric"),
     "noise.type: got 'asymmetric'"),
    ("unknown noise rate for small-loss",  # train: prepare asks nothing of the method
     lambda t: ["train", "--in-process", *_folder_args(t, _own(t), "--set", "noise.type=none")[1:]],
     "coteaching.forget_rate: got null, but the noise rate"),
    ("own-data key on a built-in set", lambda t: ["train", "--set", "data.image_size=28"],
     "data.image_size: got 28; allowed only with data.name image_folder or parquet"),
]  # fmt: skip


@pytest.mark.parametrize("argv,expected", [(c[1], c[2]) for c in CASES], ids=[c[0] for c in CASES])
def test_bad_input_exits_2_with_one_line_and_no_traceback(argv, expected, tmp_path, monkeypatch, capsys):
    monkeypatch.setattr("cmd_ray.datasets.fashion_mnist.DEBIAN_FOLDER", tmp_path / "no-debian")
    monkeypatch.chdir(tmp_path)  # nothing may be written here
    args = argv(tmp_path)
    if "use_gpu=true" in args:
        import torch

        if torch.cuda.is_available():
            pytest.skip("this machine has a GPU")
    before = {p for p in tmp_path.rglob("*")}
    code = main(args)
    err = capsys.readouterr().err
    assert code == 2
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    if isinstance(expected, re.Pattern):  # a message that names a temporary path
        assert re.match("cmd-ray: error: " + expected.pattern, lines[0]), lines[0]
    else:
        assert lines[0].startswith("cmd-ray: error: " + expected), lines[0]
    assert "Traceback" not in err
    assert {p for p in tmp_path.rglob("*")} == before, "a refused run writes nothing: no run folder, lock or cache"
