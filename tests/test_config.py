"""Configuration: presets, overrides and one-line refusals naming the field."""

from __future__ import annotations

from pathlib import Path

import pytest

from cmd_ray.cli import main
from cmd_ray.config import Config, ConfigError, from_dict
from cmd_ray.grid import check_grid, trial_config
from cmd_ray.presets import apply_overrides, load_config

ROOT = Path(__file__).resolve().parents[1]


def test_defaults_are_valid_and_cmd_p():
    cfg = from_dict({})
    assert isinstance(cfg, Config)
    assert cfg.method == "cmd-p" and cfg.peers == 2


@pytest.mark.parametrize("preset", sorted((ROOT / "launch" / "configs").glob("*.yaml")), ids=lambda p: p.name)
def test_every_preset_loads(preset, monkeypatch):
    monkeypatch.setenv("CMD_RAY_BUCKET", "my-bucket")  # what cluster.yaml exports on every node
    cfg = load_config(preset)
    for path in (cfg.output_dir, cfg.data.root, cfg.sweep.storage_path):
        assert "${" not in path


def test_cloud_presets_keep_to_object_storage_and_name_the_unset_bucket(monkeypatch):
    monkeypatch.setenv("CMD_RAY_BUCKET", "my-bucket")
    cfg = load_config(ROOT / "launch/configs/cifar10-paper.yaml")
    assert cfg.sweep.storage_path == "s3://my-bucket/cmd-ray/sweeps"
    assert cfg.data.root == "s3://my-bucket/cmd-ray/data" and cfg.output_dir == "s3://my-bucket/cmd-ray/runs"
    monkeypatch.delenv("CMD_RAY_BUCKET")
    with pytest.raises(ConfigError, match=r"^output_dir: \$\{CMD_RAY_BUCKET\} is not set in the environment"):
        load_config(ROOT / "launch/configs/cifar10-paper.yaml")


def test_overrides_reach_nested_keys_and_parse_types():
    cfg = load_config(
        ROOT / "launch/configs/fmnist.yaml",
        ["noise.rate=0.2", "method=cmd-s", "data.train_subset=null", "peers=3", "knowledge.tau=0.6"],
    )
    assert cfg.noise.rate == 0.2 and cfg.method == "cmd-s" and cfg.data.train_subset is None
    assert cfg.peers == 3 and cfg.knowledge.tau == 0.6


def test_override_does_not_mutate_input():
    values = {"noise": {"rate": 0.1}}
    apply_overrides(values, ["noise.rate=0.3"])
    assert values == {"noise": {"rate": 0.1}}


def test_per_peer_models():
    cfg = from_dict({"peers": 2, "model": {"per_peer": ["small_cnn", "small_cnn"]}})
    assert cfg.peer_models() == ["small_cnn", "small_cnn"]
    assert from_dict({"peers": 3}).peer_models() == ["small_cnn"] * 3


BAD = [
    ({"epochs": "ten"}, r"^epochs: got 'ten'; allowed: an integer$"),
    ({"epochs": 0}, r"^epochs: got 0; allowed: an integer >= 1$"),
    ({"peers": 1}, r"^peers: got 1; allowed: an integer >= 2"),
    (
        {"method": "mixup"},
        r"^method: got 'mixup'; allowed: one of 'ce', 'dml', 'coteaching', 'coteaching\+', 'jocor', 'dividemix', "
        r"'cmd-s', 'cmd-p'$",
    ),
    ({"noise": {"rate": 1.2}}, r"^noise\.rate: got 1\.2; allowed: a number in \[0\.0, 1\.0\]$"),
    ({"noise": {"type": "gauss"}}, r"^noise\.type: got 'gauss'; allowed: one of"),
    ({"noise": {"type": "matrix"}}, r"^noise\.matrix: got null"),
    ({"knowledge": {"tau": -0.1}}, r"^knowledge\.tau: got -0\.1; allowed: a number in \[0\.0, 1\.0\]$"),
    ({"knowledge": {"tau_end": 2}}, r"^knowledge\.tau_end: got 2\.0"),
    (
        {"knowledge": {"certainty": "margin"}},
        r"^knowledge\.certainty: got 'margin'; allowed: one of 'entropy', 'max_prob'$",
    ),
    (
        {"data": {"name": "mnist"}},
        r"^data\.name: got 'mnist'; allowed: one of 'fashion-mnist', 'cifar10', 'cifar100', 'image_folder', 'parquet'$",
    ),
    ({"data": {"colour": 1}}, r"^data\.colour: unknown key; allowed at this level:"),
    ({"lr": 0.1}, r"^lr: unknown key; allowed at this level:"),
    ({"model": {"name": "vgg"}}, r"^model\.name: got 'vgg'"),
    ({"model": {"per_peer": ["small_cnn"]}}, r"^model\.per_peer: got 1 names; allowed: exactly peers=2 names$"),
    ({"model": {"per_peer": ["small_cnn", "resnet"]}}, r"^model\.per_peer\[1\]: got 'resnet'"),
    ({"optim": {"lr": 0}}, r"^optim\.lr: got 0\.0; allowed: a number > 0$"),
    ({"distill": {"temperature": 0}}, r"^distill\.temperature: got 0\.0"),
    (
        {"distill": {"loss": "mse"}},
        r"^distill\.loss: got 'mse'; allowed: one of 'kl', 'label_correction', 'target_mix'$",
    ),
    ({"distill": {"trust_midpoint": 1.5}}, r"^distill\.trust_midpoint: got 1\.5; allowed: a number in \[0\.0, 1\.0\]$"),
    ({"distill": {"trust_steepness": 0}}, r"^distill\.trust_steepness: got 0\.0; allowed: a number > 0$"),
    (
        {"labels": {"trust": "clean"}},
        r"^labels\.trust: got 'clean'; allowed: one of 'all', 'small_loss', "
        r"'joint_small_loss', 'agreement', 'mixture', 'small_loss_and_mixture'$",
    ),
    ({"use_gpu": "yes"}, r"^use_gpu: got 'yes'; allowed: true or false$"),
    ({"data": 3}, r"^data: got 3; allowed: a mapping of its keys$"),
    ({"batch_size": 10, "replicas": 3}, r"^batch_size: got 10; allowed: a multiple of replicas=3$"),
]


@pytest.mark.parametrize("values,match", BAD, ids=[m for _, m in BAD])
def test_bad_value_is_refused_with_one_line_naming_the_field(values, match):
    with pytest.raises(ConfigError, match=match) as err:
        from_dict(values)
    assert "\n" not in str(err.value)


def test_malformed_yaml_names_the_file_and_line(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("method: cmd-p\nnoise: [unclosed\n")
    with pytest.raises(ConfigError, match=r"^--config: .*bad\.yaml is not valid YAML at line \d+"):
        load_config(bad)


def test_override_without_equals_is_refused():
    with pytest.raises(ConfigError, match=r"^--set: got 'noise\.rate'; allowed: KEY=VALUE"):
        load_config(None, ["noise.rate"])


def test_cli_refuses_bad_input_with_exit_2_and_one_line(capsys, tmp_path):
    code = main(["train", "--config", str(ROOT / "launch/configs/fmnist.yaml"), "--set", "noise.rate=3"])
    err = capsys.readouterr().err
    assert code == 2
    assert err.strip().splitlines() == ["cmd-ray: error: noise.rate: got 3.0; allowed: a number in [0.0, 1.0]"]


def test_cli_refuses_unwritable_output_dir(capsys, tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    code = main(["train", "--set", f"output_dir={blocker}/sub"])
    assert code == 2
    assert capsys.readouterr().err.startswith("cmd-ray: error: output_dir: cannot write to")


def test_show_config_prints_validated_yaml(capsys):
    assert main(["show-config", "--set", "peers=3"]) == 0
    assert "peers: 3" in capsys.readouterr().out


def test_a_variant_axis_sets_several_keys_together_and_is_checked():
    from cmd_ray.grid import check_grid, point_overrides, trial_config, variant_label

    grid = {
        "variant": [{"method": "ce"}, {"method": "cmd-p", "label": "cmd-p, all", "knowledge.tau_end": 0.0}],
        "seed": [0, 1],
    }
    cfg = from_dict({"sweep": {"grid": grid}})
    points = check_grid(cfg)
    assert len(points) == 4
    ablation = points[2]
    assert point_overrides(ablation) == {"method": "cmd-p", "knowledge.tau_end": 0.0, "seed": 0}
    assert variant_label(ablation) == "cmd-p, all" and variant_label({"seed": 0}) is None
    assert variant_label(points[0]) == "ce"
    assert variant_label({"variant": {"method": "dml", "seed": 3}}) == "method=dml, seed=3"
    run = trial_config(cfg.to_dict(), ablation)
    assert run.method == "cmd-p" and run.knowledge.tau_end == 0.0
    for bad, match in [
        ({"variant": [3]}, r"^sweep\.grid\.variant\[0\]: got 3; allowed: a mapping"),
        ({"variant": [{"ray.num_cpus": 2}]}, r"^sweep\.grid\.variant\[0\]\.ray\.num_cpus: not sweepable"),
        ({"variant": [{"method": "nope"}]}, r"^sweep\.grid: the point variant=.* is refused: method: got 'nope'"),
    ]:
        with pytest.raises(ConfigError, match=match):
            check_grid(from_dict({"sweep": {"grid": bad}}))


@pytest.mark.parametrize(
    "values,placement",
    [
        ({}, "trial"),  # CPU peers: all in the trial's process
        ({"use_gpu": True, "ray": {"gpus_per_worker": 0.5}}, "trial"),  # peers would share a GPU anyway
        ({"use_gpu": True}, "workers"),  # a whole GPU per peer: each peer its own worker
        ({"replicas": 2}, "workers"),  # data-parallel replicas need Ray Train workers
        ({"sweep": {"placement": "workers"}}, "workers"),
        ({"use_gpu": True, "sweep": {"placement": "trial"}}, "trial"),
    ],
)
def test_auto_placement_decides_from_what_a_trial_requests(values, placement):
    assert from_dict(values).placement == placement


def test_on_and_off_read_as_written_in_files_overrides_and_grids(tmp_path):
    """YAML 1.1 reads on/off/yes/no as booleans; an enumerated value reads as the word typed."""
    preset = tmp_path / "p.yaml"
    preset.write_text("data:\n  augment: off\n")
    assert load_config(preset).data.augment == "off"
    assert load_config(preset, ["data.augment=on"]).data.augment == "on"
    assert load_config(preset, ["data.augment=yes"]).data.augment == "on"  # the same word to YAML
    cfg = load_config(preset, ["sweep.grid={data.augment: [on, off]}"])
    assert [trial_config(cfg.to_dict(), p).data.augment for p in check_grid(cfg)] == ["on", "off"]
    with pytest.raises(ConfigError, match=r"^precision: got True; allowed: one of 'fp32', 'bf16'$"):
        load_config(preset, ["precision=on"])  # no on/off word to match: refused as typed


def test_help_and_show_config_import_neither_torch_nor_ray():
    """`cmd-ray --help` and `show-config` answer at once: the command line loads torch, Ray and
    the data readers only for the commands that use them (measured: 0.1 s, against 5-6 s)."""
    import subprocess
    import sys

    probe = (
        "import sys\n"
        "from cmd_ray.cli import main\n"
        "assert main(['show-config', '--set', 'peers=3']) == 0\n"
        "try:\n"
        "    main(['--help'])\n"
        "except SystemExit as stop:\n"
        "    assert stop.code == 0\n"
        "heavy = [m for m in ('torch', 'ray', 'numpy', 'pyarrow', 'wandb', 'torchvision') if m in sys.modules]\n"
        "print('heavy:', heavy)\n"
    )
    done = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "peers: 3" in done.stdout and "usage: cmd-ray" in done.stdout
    assert done.stdout.strip().splitlines()[-1] == "heavy: []"


def test_a_setting_the_method_never_reads_is_noted_not_silently_taken(capsys):
    assert main(["show-config", "--set", "method=ce", "--set", "coteaching.forget_rate=0.2"]) == 0
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [
        "cmd-ray: note: coteaching.forget_rate is set, but the run does not read it "
        "(method ce does not read coteaching.*; read by coteaching, coteaching+, jocor, cmd-s, cmd-p)"
    ]
    assert main(["show-config", "--set", "method=cmd-p", "--set", "coteaching.forget_rate=0.2"]) == 0
    assert capsys.readouterr().err == ""  # CMD's small-loss label trust reads it
    grid = "sweep.grid={method: [ce, coteaching]}"
    assert main(["show-config", "--set", grid, "--set", "method=ce", "--set", "coteaching.forget_rate=0.2"]) == 0
    assert capsys.readouterr().err == ""  # some trials of the grid read it
    # a key the method's own settings leave unread
    assert main(["show-config", "--set", "method=cmd-p", "--set", "labels.mixture_threshold=0.7"]) == 0
    assert capsys.readouterr().err.strip() == (
        "cmd-ray: note: labels.mixture_threshold is set, but the run does not read it "
        "(cmd-p reads it only with labels.trust mixture or small_loss_and_mixture)"
    )
    grid = "sweep.grid={labels.trust: [small_loss, small_loss_and_mixture]}"
    assert main(["show-config", "--set", grid, "--set", "labels.mixture_threshold=0.7"]) == 0
    assert capsys.readouterr().err == ""  # the second trust reads it


def test_a_sweep_hands_its_trials_absolute_paths(tmp_path, monkeypatch):
    """Tune runs each trial in a folder of its own: relative paths are made absolute against the
    folder the sweep was started in (found by the README walk-through: data.path: digits)."""
    from cmd_ray.presets import with_absolute_paths

    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    for name in ("home/noisy.npy", "a.npy", "b.npy"):
        (tmp_path / name).parent.mkdir(exist_ok=True)
        (tmp_path / name).write_bytes(b"")
    cfg = from_dict(
        {
            "data": {"name": "image_folder", "path": "digits", "root": "runs/data"},
            "noise": {"type": "labels", "labels": "~/noisy.npy"},
            "coteaching": {"forget_rate": 0.2},
            "sweep": {
                "storage_path": "s3://bucket/sweeps",
                "grid": {"noise.labels": ["a.npy", str(tmp_path / "b.npy")]},
            },
        }
    )
    out = with_absolute_paths(cfg)
    assert out.data.path == str(tmp_path / "digits") and out.data.root == str(tmp_path / "runs" / "data")
    assert out.noise.labels == str(tmp_path / "home" / "noisy.npy")
    assert out.sweep.storage_path == "s3://bucket/sweeps"  # object storage untouched
    assert out.sweep.grid["noise.labels"] == [str(tmp_path / "a.npy"), str(tmp_path / "b.npy")]
    assert out.output_dir == str(tmp_path / cfg.output_dir)


def test_run_sweep_works_on_absolute_paths_from_its_first_step(tmp_path, monkeypatch):
    from cmd_ray import sweep

    class Seen(Exception):
        pass

    def first_step(cfg):
        raise Seen(cfg.data.root)

    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sweep, "check_grid", first_step)  # stop before any Ray work
    with pytest.raises(Seen) as seen:
        sweep.run_sweep(from_dict({"data": {"root": "runs/data"}}), log=lambda _: None)
    assert seen.value.args[0] == str(tmp_path / "runs" / "data")
