"""The in-process trainer and the shared peer step, end to end on tiny data."""

from __future__ import annotations

import json

import pytest
import torch

from cmd_ray.cli import main
from cmd_ray.datasets import DATASETS
from cmd_ray.methods import NAMES as METHODS
from cmd_ray.peer import Batch, NonFiniteLossError, StepSchedule, build_peer, method_plan, peer_step
from cmd_ray.trainer import train_in_process

from .conftest import tiny_config

SUMMARY_KEYS = {"test_accuracy", "selected_fraction", "selection_precision", "epochs", "samples_per_second"}


@pytest.mark.parametrize("method", METHODS)
def test_every_method_trains_and_reports_per_epoch_metrics(fake_fmnist_root, method):
    # JoCoR's published lambda = 0.9 leaves its labels a weight of 0.1: on these 18 steps the two
    # peers agree long before they learn (0.44 accuracy, measured), so the check of learning uses 0.5.
    light = {"jocor__weight": 0.5} if method == "jocor" else {}
    light |= {"dividemix__warm_up": 1} if method == "dividemix" else {}  # epoch 1 warm-up, epoch 2 MixMatch
    cfg = tiny_config(fake_fmnist_root, method=method, data__train_subset=None, data__test_subset=None, **light)
    lines = []
    summary = train_in_process(cfg, log=lines.append)
    assert SUMMARY_KEYS <= summary.keys()
    assert len(summary["history"]) == 2 and len(lines) == 3
    for name in ("peer0", "peer1", "ensemble"):
        acc = summary["test_accuracy"][name]
        assert 0.0 <= acc["final"] <= acc["best"] <= 1.0
    first = summary["history"][0]
    for key in ("loss", "ce_loss", "distill_loss", "selected_fraction", "memorisation", "label_correction_rate"):
        assert f"peer0/{key}" in first
    assert all(0.0 <= record["mean/disagreement"] <= 1.0 for record in summary["history"])
    assert all(record["torch_threads"] == torch.get_num_threads() for record in summary["history"])
    assert first["cpu_capability"] == torch.backends.cpu.get_cpu_capability()
    if method == "ce":
        assert summary["selected_fraction"]["peer0"] == 0.0
        assert first["peer0/distill_loss"] == 0.0
    if method == "dml":
        assert summary["selected_fraction"]["peer0"] == 1.0
        assert first["peer0/distill_loss"] > 0.0
    if method == "coteaching":
        assert 0.0 < summary["selected_fraction"]["peer0"] <= 1.0
    if method == "dividemix":  # no division during warm-up; then a labelled share by the other's mixture
        assert first["peer0/selected_fraction"] == 0.0
        assert 0.0 < summary["history"][1]["peer0/selected_fraction"] < 1.0
    # The fake data are easy: every method must learn them despite 40% noise.
    assert summary["test_accuracy"]["ensemble"]["best"] > 0.5


def test_disagreement_counts_the_samples_a_peer_predicts_unlike_the_others_averaged_over_them():
    from cmd_ray.peer import disagreement_count, epoch_metrics

    def logits_for(predictions):  # (P, B) class ids -> (P, B, 3) logits with those argmaxes
        return torch.nn.functional.one_hot(torch.tensor(predictions), 3).float()

    two = logits_for([[0, 1, 2, 2], [0, 2, 2, 1]])
    assert disagreement_count(0, two) == disagreement_count(1, two) == 2.0  # samples 1 and 3
    three = logits_for([[0, 1, 2, 2], [0, 2, 2, 1], [0, 1, 1, 1]])
    # peer 0 differs from peer 1 on 2 samples and from peer 2 on 2: (2 + 2) / 2
    assert disagreement_count(0, three) == 2.0
    # peer 2 differs from peer 0 on samples 2, 3 and from peer 1 on samples 1, 2: (2 + 2) / 2
    assert disagreement_count(2, three) == 2.0
    assert disagreement_count(1, logits_for([[1, 1], [1, 1]])) == 0.0
    assert epoch_metrics({"samples": 8.0, "disagreed": 2.0})["disagreement"] == 0.25


def test_validation_accuracy_is_scored_on_held_out_noisy_labels_never_clean_ones(fake_fmnist_root, monkeypatch):
    from cmd_ray import peer, trainer

    scored = []
    real_correct_counts = peer.correct_counts

    def spy(probs, labels):
        scored.append(labels.clone())
        return real_correct_counts(probs, labels)

    monkeypatch.setattr(peer, "correct_counts", spy)
    cfg = tiny_config(fake_fmnist_root, method="cmd-s", data__train_subset=None, data__validation_fraction=0.25)
    data = trainer.load_run_data(cfg)
    summary = train_in_process(cfg, data, log=lambda _: None)
    assert len(data.train) == 450 and summary["history"][0]["train_samples"] == 450
    val_size = len(data.validation)
    val_labels = [labels for labels in scored if len(labels) == val_size]
    assert len(scored) == 4 and len(val_labels) == 2 and len(data.test) != val_size  # test and val, each epoch
    assert all(torch.equal(labels, data.validation.noisy_labels) for labels in val_labels)
    assert not torch.equal(data.validation.noisy_labels, data.validation.clean_labels)
    for record in summary["history"]:
        assert 0.0 <= record["mean/val_accuracy"] <= 1.0 and "ensemble/val_accuracy" in record


def _metrics(record: dict) -> dict:
    """An epoch record's per-peer figures (losses, accuracies, counts), not its timings (NaN as None)."""
    figures = {key: value for key, value in record.items() if key.startswith(("peer", "mean/", "ensemble/"))}
    return {key: None if value != value else value for key, value in figures.items()}


def test_same_seed_gives_the_same_batches_and_run_and_another_seed_other_batches(fake_fmnist_root, tmp_path):
    def run(seed: int, name: str) -> tuple[dict, list[list[int]]]:
        cfg = tiny_config(fake_fmnist_root, epochs=2, seed=seed, data__train_subset=None, data__test_subset=None,
                          testing__trace_dir=str(tmp_path / name))  # fmt: skip
        summary = train_in_process(cfg, log=lambda _: None)
        lines = (tmp_path / name / "peer0.jsonl").read_text().splitlines()
        return summary, [json.loads(line)["samples"] for line in lines]

    (a, a_batches), (b, b_batches), (other, other_batches) = run(0, "a"), run(0, "b"), run(1, "other")
    assert a_batches == b_batches
    assert [_metrics(r) for r in a["history"]] == [_metrics(r) for r in b["history"]]
    assert a["test_accuracy"] == b["test_accuracy"]
    # Every sample once an epoch, in an order that changes with the epoch and the seed.
    assert sorted(sum(a_batches[:10], [])) == list(range(600)) and len(a_batches) == 20
    assert a_batches[:10] != a_batches[10:] and a_batches != other_batches
    assert other["history"][0]["peer0/loss"] != a["history"][0]["peer0/loss"]


def test_three_peers_with_different_architectures(fake_fmnist_root):
    cfg = tiny_config(fake_fmnist_root, epochs=1, peers=3, model__per_peer=["small_cnn", "mlp", "small_cnn"])
    summary = train_in_process(cfg, log=lambda _: None)
    assert set(summary["test_accuracy"]) == {"peer0", "peer1", "peer2", "ensemble"}


def test_nan_loss_stops_with_peer_and_step(fake_fmnist_root):
    cfg = tiny_config(fake_fmnist_root)
    peer = build_peer(cfg, 1, DATASETS["fashion-mnist"], 10, torch.device("cpu"))
    logits = torch.full((4, 10), float("nan"), requires_grad=True)
    labels = torch.zeros(4, dtype=torch.long)
    batch = Batch(torch.zeros(4, 1, 28, 28), labels, labels, torch.arange(4))
    with pytest.raises(NonFiniteLossError, match=r"^peer 1: loss is nan at epoch 2, global step 7"):
        peer_step(method_plan(cfg), peer, logits, torch.stack([logits.detach()] * 2), batch, StepSchedule(7, 10, 5))


def test_cli_train_writes_the_json_summary(fake_fmnist_root, tmp_path, capsys):
    out = tmp_path / "out" / "summary.json"
    code = main(
        [
            "train",
            "--in-process",
            "--set",
            f"data.root={fake_fmnist_root}",
            "--set",
            "epochs=1",
            "--set",
            f"output_dir={tmp_path / 'run'}",
            "--output-json",
            str(out),
        ]
    )
    assert code == 0
    summary = json.loads(out.read_text())
    assert summary["epochs"] == 1 and summary["method"] == "cmd-p"
    assert set(summary["test_accuracy"]) == {"peer0", "peer1", "ensemble"}
    assert (tmp_path / "run" / "summary.json").is_file()
    printed = capsys.readouterr()
    # stdout is the summary alone, in strict JSON (NaN as null: `selection_precision` of a peer
    # that selected nothing); the progress lines went to stderr.
    strict = json.loads(printed.out, parse_constant=lambda word: pytest.fail(f"{word} is not JSON"))
    assert strict["test_accuracy"] == summary["test_accuracy"]


def test_cli_prepare_reports_the_realised_noise(fake_fmnist_root, capsys):
    assert main(["prepare", "--set", f"data.root={fake_fmnist_root}", "--set", "noise.rate=0.3"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["train_samples"] == 600 and 0.2 < report["realised_rate"] < 0.4


def test_bf16_precision_runs_the_forward_in_bfloat16_and_still_learns_on_cpu(fake_fmnist_root):
    from cmd_ray.peer import _autocast

    cfg = tiny_config(fake_fmnist_root, method="cmd-p", precision="bf16", data__train_subset=None)
    peer = build_peer(cfg, 0, DATASETS["fashion-mnist"], total_steps=10, device=torch.device("cpu"))
    with _autocast(peer):
        raw = peer.model(torch.zeros(4, 1, 28, 28))
    assert raw.dtype == torch.bfloat16
    summary = train_in_process(cfg, log=lambda _: None)
    assert all(torch.isfinite(torch.tensor(r["peer0/loss"])) for r in summary["history"])
    assert summary["test_accuracy"]["ensemble"]["best"] > 0.5


class _SharingPlan:
    """A method that shares 1000 k + position for peer k's samples once an epoch, counts in its
    state how often it stepped on each sample, and records what every step's inputs held."""

    def __init__(self):
        self.seen: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = []

    def wants_epoch_values(self, epoch):
        return True

    def epoch_values(self, peer_index, logits, noisy_labels, epoch):
        return (1000.0 * peer_index + torch.arange(len(noisy_labels), dtype=torch.float32))[:, None]

    def loss(self, peer_index, logits, peer_logits, noisy_labels, when, inputs=None):
        from cmd_ray.knowledge import LossParts

        self.seen.append((inputs.sample_ids.clone(), inputs.epoch_values()[..., 0].clone(), noisy_labels.clone()))
        counts = inputs.state.setdefault("steps", torch.zeros(600))
        counts.index_add_(0, inputs.sample_ids, torch.ones(len(inputs.sample_ids)))
        ce = torch.nn.functional.cross_entropy(logits, noisy_labels)
        nothing = torch.zeros(len(noisy_labels), dtype=torch.bool)
        return LossParts(ce, ce.detach(), torch.zeros(()), nothing, None, float("inf"))


def test_a_methods_epoch_values_reach_every_peer_at_the_batchs_samples_and_its_state_survives_checkpoints(
    fake_fmnist_root, tmp_path
):
    """The contract DivideMix needs: sample ids that address the training split, every peer's
    epoch-hook values gathered at those ids, and per-peer state saved and restored with the peer
    in the checkpoint both placements write."""
    from cmd_ray.trainer import load_run_data, read_checkpoint, train_epoch, write_checkpoint

    cfg = tiny_config(fake_fmnist_root, data__train_subset=None, data__test_subset=None)
    data = load_run_data(cfg)
    assert len(data.train) == 600
    build = lambda: [build_peer(cfg, k, data.info, 20, torch.device("cpu")) for k in range(2)]  # noqa: E731
    peers, plan = build(), _SharingPlan()
    train_epoch(cfg, peers, data, 0, plan=plan)
    assert len(plan.seen) == 2 * 10  # 2 peers x ceil(600 / 64) steps
    for ids, values, labels in plan.seen:
        assert torch.equal(values, torch.stack([1000.0 * k + ids.float() for k in range(2)]))
        assert torch.equal(labels, data.train.noisy_labels[ids])  # the ids are positions in the training split
    for peer in peers:
        assert torch.equal(peer.method_state["steps"], torch.ones(600))  # every sample once in the epoch

    write_checkpoint(tmp_path, peers, 1, [])  # both placements' format
    restored = build()
    assert read_checkpoint(tmp_path, restored) == (1, [])
    for peer, again in zip(peers, restored):
        assert again.method_state.keys() == {"steps", "epoch_values"}
        for key, value in peer.method_state.items():
            assert torch.equal(again.method_state[key], value)
