"""Label noise: realised transition matrices, seeding, class maps and refused specs."""

from __future__ import annotations

import numpy as np
import pytest

from cmd_ray.datasets import DATASETS
from cmd_ray.datasets.cifar import CIFAR100_FINE_NAMES, CIFAR100_SUPERCLASSES
from cmd_ray.noise import (
    NoiseError,
    NoiseSpec,
    apply_noise,
    check_matrix,
    read_matrix_file,
    transition_matrix,
)

N = 200_000


def _labels(num_classes: int, seed: int = 1) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, num_classes, N)


@pytest.mark.parametrize(
    "spec,dataset,num_classes",
    [
        (NoiseSpec("symmetric", 0.4), "fashion-mnist", 10),
        (NoiseSpec("symmetric", 0.8), "cifar10", 10),
        (NoiseSpec("pairflip", 0.45), "cifar10", 10),
        (NoiseSpec("asymmetric", 0.4), "fashion-mnist", 10),
        (NoiseSpec("asymmetric", 0.4), "cifar10", 10),
        (NoiseSpec("none", 0.3), "cifar10", 10),
    ],
)
def test_realised_matrix_matches_asked_within_sampling_error(spec, dataset, num_classes):
    clean = _labels(num_classes)
    noisy, report = apply_noise(clean, spec, num_classes, dataset, seed=7)
    counts = np.bincount(clean, minlength=num_classes)[:, None]
    sigma = np.sqrt(report.asked * (1 - report.asked) / counts)
    # 5 sigma per cell; a wrong matrix (e.g. flipping to the true class) is off by > 50 sigma.
    assert np.all(np.abs(report.realised - report.asked) <= 5 * sigma + 1e-12)
    expected_rate = float(np.mean(1 - np.diag(report.asked)[clean]))
    assert abs(report.realised_rate - expected_rate) < 0.005


def test_symmetric_never_keeps_label_when_it_flips():
    matrix = transition_matrix(NoiseSpec("symmetric", 1.0), 10, "cifar10")
    assert np.allclose(np.diag(matrix), 0.0)
    clean = _labels(10)
    noisy, report = apply_noise(clean, NoiseSpec("symmetric", 1.0), 10, "cifar10", seed=0)
    assert np.all(noisy != clean)
    assert report.realised_rate == 1.0


def test_same_seed_same_labels_and_other_seed_other_labels():
    clean = _labels(10)
    spec = NoiseSpec("symmetric", 0.5)
    a, _ = apply_noise(clean, spec, 10, "cifar10", seed=3)
    b, _ = apply_noise(clean, spec, 10, "cifar10", seed=3)
    c, _ = apply_noise(clean, spec, 10, "cifar10", seed=4)
    assert np.array_equal(a, b)
    assert not np.array_equal(a, c)


def test_pairflip_goes_to_next_class():
    matrix = transition_matrix(NoiseSpec("pairflip", 0.45), 10, "cifar10")
    for c in range(10):
        assert matrix[c, (c + 1) % 10] == pytest.approx(0.45)
        assert matrix[c, c] == pytest.approx(0.55)


def test_asymmetric_maps_follow_documented_pairs():
    fm = transition_matrix(NoiseSpec("asymmetric", 0.4), 10, "fashion-mnist")
    assert fm[0, 6] == fm[6, 0] == fm[2, 4] == fm[5, 7] == pytest.approx(0.4)
    assert fm[1, 1] == 1.0 and fm[9, 9] == 1.0
    c10 = DATASETS["cifar10"].asymmetric
    assert c10 == {9: 1, 2: 0, 4: 7, 3: 5, 5: 3}


def test_cifar100_asymmetric_stays_within_superclass():
    flips = DATASETS["cifar100"].asymmetric
    assert len(flips) == 100 and len(CIFAR100_FINE_NAMES) == 100
    assert CIFAR100_FINE_NAMES[0] == "apple" and CIFAR100_FINE_NAMES[99] == "worm"
    group = {n: g for g, names in CIFAR100_SUPERCLASSES.items() for n in names}
    for src, dst in flips.items():
        assert src != dst
        assert group[CIFAR100_FINE_NAMES[src]] == group[CIFAR100_FINE_NAMES[dst]]
    matrix = transition_matrix(NoiseSpec("asymmetric", 0.2), 100, "cifar100")
    check_matrix(matrix, 100)


def test_user_matrix_file_is_used(tmp_path):
    matrix = np.eye(3) * 0.7 + np.roll(np.eye(3), 1, axis=1) * 0.3
    path = tmp_path / "t.csv"
    np.savetxt(path, matrix, delimiter=",")
    spec = NoiseSpec("matrix", 0.0, str(path))
    assert np.allclose(transition_matrix(spec, 3, "cifar10"), matrix)
    np.save(tmp_path / "t.npy", matrix)
    assert np.allclose(read_matrix_file(tmp_path / "t.npy", 3), matrix)


@pytest.mark.parametrize(
    "spec,classes,match",
    [
        (NoiseSpec("symmetric", 1.5), 10, r"^noise\.rate: got 1\.5; allowed: a number in \[0, 1\]$"),
        (NoiseSpec("pairflip", -0.1), 10, r"^noise\.rate: got -0\.1"),
        (NoiseSpec("gaussian", 0.1), 10, r"^noise\.type: got 'gaussian'; allowed: one of none, symmetric"),
        (NoiseSpec("matrix", 0.0, None), 10, r"^noise\.matrix: got null"),
        (
            NoiseSpec("matrix", 0.0, "/nonexistent/t.npy"),
            10,
            r"^noise\.matrix: file /nonexistent/t\.npy does not exist",
        ),
    ],
)
def test_bad_spec_is_refused_with_one_line(spec, classes, match):
    with pytest.raises(NoiseError, match=match) as err:
        transition_matrix(spec, classes, "cifar10")
    assert "\n" not in str(err.value)


@pytest.mark.parametrize(
    "matrix,match",
    [
        (np.full((3, 3), 0.5), r"^noise\.matrix: row 0 sums to 1\.5; allowed: every row sums to 1$"),
        (np.eye(4), r"^noise\.matrix: got shape \(4, 4\); allowed: \(3, 3\)"),
        (np.array([[1.5, -0.5, 0], [0, 1, 0], [0, 0, 1]]), r"negative or non-finite"),
    ],
)
def test_bad_matrix_is_refused(tmp_path, matrix, match):
    path = tmp_path / "m.npy"
    np.save(path, matrix)
    with pytest.raises(NoiseError, match=match):
        read_matrix_file(path, 3)


def test_unknown_dataset_for_asymmetric_is_refused():
    with pytest.raises(NoiseError, match="noise.type: 'asymmetric' has no class map for data set 'svhn'"):
        transition_matrix(NoiseSpec("asymmetric", 0.2), 10, "svhn")


def test_expected_flip_rate_is_the_noise_models_share_of_flipped_labels():
    from cmd_ray.noise import NoiseSpec, expected_flip_rate

    assert expected_flip_rate(NoiseSpec("symmetric", 0.5), 10, "fashion-mnist") == pytest.approx(0.5)
    assert expected_flip_rate(NoiseSpec("pairflip", 0.45), 10, "fashion-mnist") == pytest.approx(0.45)
    # Fashion-MNIST's map flips 4 of 10 classes: 0.4 * 4 / 10
    assert expected_flip_rate(NoiseSpec("asymmetric", 0.4), 10, "fashion-mnist") == pytest.approx(0.16)
    assert expected_flip_rate(NoiseSpec("none", 0.4), 10, "fashion-mnist") == 0.0


def test_small_loss_forget_rate_defaults_to_the_expected_flip_rate():
    from cmd_ray.config import from_dict
    from cmd_ray.methods import StepSchedule
    from cmd_ray.peer import method_plan

    late = StepSchedule(step=1000, total_steps=1000, steps_per_epoch=10)  # past the ramp
    for noise, expected in [({"type": "asymmetric", "rate": 0.4}, 0.16), ({"type": "none"}, 0.0)]:
        cfg = from_dict({"method": "coteaching", "noise": noise})
        assert method_plan(cfg).forget.at(late) == pytest.approx(expected)
    cfg = from_dict({"method": "cmd-p", "labels": {"trust": "small_loss"}, "coteaching": {"forget_rate": 0.3}})
    assert method_plan(cfg).forget.at(late) == pytest.approx(0.3)


@pytest.mark.parametrize(
    "text",
    [
        "2\n0\n1\n2\n",  # one label per line
        "label\n2\n0\n1\n2\n",  # with a header
        ",label\n0,2\n1,0\n2,1\n3,2\n",  # pandas' to_csv: an unnamed index column first
        "index,noisy_label\n7,2\n8,0\n9,1\n10,2\n",  # a named labels column
        "2,0,1,2\n",  # one row
    ],
    ids=["plain", "header", "pandas", "named", "row"],
)
def test_a_csv_labels_file_without_paths_reads_by_position_with_or_without_a_header(text, tmp_path):
    from cmd_ray.labels_file import ImageKeys, join_labels, read_labels_file

    path = tmp_path / "noisy.csv"
    path.write_text(text)
    found = read_labels_file(str(path))
    assert not found.keyed
    labels, kept = join_labels(found, 4, 3, ImageKeys())
    assert labels.tolist() == [2, 0, 1, 2] and kept is None


@pytest.mark.parametrize(
    "text,message",
    [
        ("a,b\n1,2\n", r"has columns 'a', 'b'; allowed: one column of labels, or a header naming one labels column"),
        ("label\n2\ncat\n", r"line 3: 'cat' is not a label of this data set; allowed: an integer 0 to 2$"),
        ("", r"is empty"),
    ],
    ids=["unnamed-columns", "word", "empty"],
)
def test_a_csv_labels_file_that_cannot_be_read_is_one_line_naming_why(text, message, tmp_path):
    from cmd_ray.labels_file import ImageKeys, join_labels, read_labels_file

    path = tmp_path / "noisy.csv"
    path.write_text(text)
    with pytest.raises(NoiseError, match=r"^noise\.labels: \S+noisy\.csv " + message):
        join_labels(read_labels_file(str(path)), 2, 3, ImageKeys())


def test_noise_read_from_a_file_is_named_by_the_file_not_by_a_rate_nobody_asked_for():
    from cmd_ray.results import noise_label

    labels = NoiseSpec("labels", 0.4, labels="~/data/CIFAR-10_human.pt", labels_key="worse_label")
    assert labels.tag() == "labels-CIFAR-10_human-worse_label" and "rate" not in labels.describe()
    assert NoiseSpec("matrix", 0.4, matrix="/x/T.npy").tag() == "matrix-T"
    assert NoiseSpec("symmetric", 0.4).tag() == "symmetric-0.4" and NoiseSpec("none", 0.4).tag() == "clean"
    row = {"noise.type": "labels", "noise.rate": 0.4, "noise.labels": "/d/noisy.csv", "noise.labels_key": None}
    assert noise_label(row) == "labels noisy.csv"
    assert noise_label({**row, "noise.type": "none"}) == "none"
    assert noise_label({**row, "noise.type": "pairflip", "noise.rate": 0.45}) == "pairflip 0.45"


def test_the_noise_files_are_checked_beside_their_readers_not_when_a_worker_rebuilds_the_config(tmp_path):
    """A Ray worker (or a report, later) rebuilds the run's config on a machine that may not hold
    the driver's noise files: the config itself must load there; the file check, run by the
    command line and the grid check before any work, refuses them."""
    from cmd_ray.config import from_dict
    from cmd_ray.noise import check_noise_files

    labels = from_dict({"noise": {"type": "labels", "labels": str(tmp_path / "gone.npy")}, "method": "ce"})
    matrix = from_dict({"noise": {"type": "matrix", "matrix": str(tmp_path / "gone.npy")}, "method": "ce"})
    assert labels.noise is not None and isinstance(labels.noise, NoiseSpec)  # the config's section is the spec
    with pytest.raises(NoiseError, match=r"^noise\.labels: got '\S+gone\.npy'; allowed with noise.type 'labels'"):
        check_noise_files(labels)
    with pytest.raises(NoiseError, match=r"^noise\.matrix: file \S+gone\.npy does not exist"):
        check_noise_files(matrix)
    np.save(tmp_path / "ok.npy", np.eye(10))
    check_noise_files(from_dict({"noise": {"type": "matrix", "matrix": str(tmp_path / "ok.npy")}, "method": "ce"}))
