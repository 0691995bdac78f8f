"""The method registry, and JoCoR and Co-teaching+ pinned to their published losses on hand-computed cases."""

from __future__ import annotations

import dataclasses
import json
import math
import os
import re

import numpy as np
import pytest
import torch
from torch.nn import functional as F

from cmd_ray import methods
from cmd_ray.config import Config, ConfigError, from_dict
from cmd_ray.methods import StepSchedule
from cmd_ray.peer import method_plan

LATE = StepSchedule(step=500, total_steps=1000, steps_per_epoch=10)  # past every ramp


def _softmax(row: list[float]) -> list[float]:
    exps = [math.exp(v) for v in row]
    return [e / sum(exps) for e in exps]


def _jocor_by_hand(z1: list[list[float]], z2: list[list[float]], labels: list[int], weight: float) -> list[float]:
    """(1 - w)(CE_1 + CE_2) + w (KL(p_1 || p_2) + KL(p_2 || p_1)) per sample, in plain Python."""
    out = []
    for a, b, y in zip(z1, z2, labels):
        p, q = _softmax(a), _softmax(b)
        ce = -math.log(p[y]) - math.log(q[y])
        kl = sum(pi * math.log(pi / qi) for pi, qi in zip(p, q)) + sum(qi * math.log(qi / pi) for pi, qi in zip(p, q))
        out.append((1 - weight) * ce + weight * kl)
    return out


Z1 = [[0.0, 0.0], [2.0, 0.0], [0.0, 1.0], [3.0, -1.0]]
Z2 = [[1.0, 0.0], [0.0, 0.0], [0.0, 3.0], [2.0, 0.0]]
LABELS = [0, 1, 1, 0]


def _plan(method: str, **sections):
    return method_plan(from_dict({"method": method, **sections}))


def test_the_registry_lists_every_method_once_with_its_sections_in_the_config():
    # Baselines first, CMD last (the order of report tables); a new method may go anywhere between.
    assert methods.NAMES[:3] == ("ce", "dml", "coteaching") and methods.NAMES[-2:] == ("cmd-s", "cmd-p")
    assert {"coteaching+", "jocor"} <= set(methods.NAMES) and len(set(methods.NAMES)) == len(methods.NAMES)
    fields = {f.name for f in dataclasses.fields(Config)}
    for name, method in methods.REGISTRY.items():
        assert method.name == name and method.summary
        assert set(method.sections) <= fields and set(method.reads) <= fields
        assert callable(method_plan(from_dict({"method": name})).loss)
    with pytest.raises(ConfigError, match="^method: got 'mixup'; allowed: one of ce, dml, coteaching, "):
        methods.get("mixup")


def test_jocor_loss_is_the_published_joint_loss_over_its_small_loss_half():
    plan = _plan("jocor", jocor={"weight": 0.7}, coteaching={"forget_rate": 0.5, "ramp_epochs": 0})
    peer_logits = torch.tensor([Z1, Z2])
    labels = torch.tensor(LABELS)
    by_hand = _jocor_by_hand(Z1, Z2, LABELS, 0.7)
    keep = sorted(range(4), key=by_hand.__getitem__)[:2]
    parts = plan.loss(0, peer_logits[0].clone(), peer_logits, labels, LATE)
    assert parts.selected.nonzero().flatten().tolist() == sorted(keep)
    assert parts.total.item() == pytest.approx(sum(by_hand[i] for i in keep) / 2, abs=1e-6)
    assert (parts.ce + parts.distill).item() == pytest.approx(parts.total.item(), abs=1e-6)


def test_jocor_split_across_peers_is_exactly_the_joint_update():
    """Each peer's gradient on its own logits equals the joint loss's, and both keep the same samples."""
    plan = _plan("jocor", coteaching={"forget_rate": 0.25, "ramp_epochs": 0})
    g = torch.Generator().manual_seed(0)
    peer_logits = 2 * torch.randn(2, 16, 5, generator=g)
    labels = torch.randint(0, 5, (16,), generator=g)
    z1, z2 = peer_logits[0].clone().requires_grad_(), peer_logits[1].clone().requires_grad_()
    p1, p2 = F.log_softmax(z1, -1), F.log_softmax(z2, -1)
    joint = 0.1 * (F.nll_loss(p1, labels, reduction="none") + F.nll_loss(p2, labels, reduction="none"))
    joint = joint + 0.9 * (F.kl_div(p1, p2, log_target=True, reduction="none").sum(-1))
    joint = joint + 0.9 * (F.kl_div(p2, p1, log_target=True, reduction="none").sum(-1))
    kept = joint.detach().argsort()[:12]
    joint[kept].mean().backward()
    for k, want in enumerate([z1.grad, z2.grad]):
        own = peer_logits[k].clone().requires_grad_()
        parts = plan.loss(k, own, peer_logits, labels, LATE)
        parts.total.backward()
        assert sorted(parts.selected.nonzero().flatten().tolist()) == sorted(kept.tolist())
        assert torch.allclose(own.grad, want, atol=1e-6)


def test_jocor_with_three_peers_averages_the_agreement_over_the_other_peers():
    plan = _plan("jocor", peers=3, jocor={"weight": 0.5}, coteaching={"forget_rate": 0.0})
    z3 = [[0.5, 0.5], [1.0, -1.0], [-2.0, 0.0], [0.0, 0.0]]
    peer_logits = torch.tensor([Z1, Z2, z3])
    parts = plan.loss(1, peer_logits[1].clone(), peer_logits, torch.tensor(LABELS), LATE)
    expected = []
    for x in range(4):
        p = [_softmax(z[x]) for z in (Z1, Z2, z3)]
        ce = sum(-math.log(pk[LABELS[x]]) for pk in p)
        kl = sum(sum(a * math.log(a / b) for a, b in zip(p[j], p[k])) for j in range(3) for k in range(3) if j != k)
        expected.append(0.5 * ce + 0.5 / 2 * kl)
    assert parts.selected.all()
    assert parts.total.item() == pytest.approx(sum(expected) / 4, abs=1e-6)


def test_coteaching_plus_trains_on_the_small_loss_share_of_the_samples_the_peers_disagree_on():
    plan = _plan("coteaching+", coteaching={"forget_rate": 0.5, "ramp_epochs": 0})
    # predictions: peer 0 -> 0, 0, 1, 1, 0, 1; peer 1 -> 0, 1, 0, 1, 1, 0: disagreement on 1, 2, 4, 5
    own = torch.tensor([[2.0, 0.0], [1.0, 0.0], [0.0, 1.0], [0.0, 2.0], [3.0, 0.0], [0.0, 1.0]])
    other = torch.tensor([[2.0, 0.0], [0.0, 0.5], [3.0, 0.0], [0.0, 2.0], [0.0, 1.0], [0.2, 0.0]])
    labels = torch.tensor([0, 1, 1, 1, 1, 0])
    parts = plan.loss(0, own.clone(), torch.stack([own, other]), labels, LATE)
    other_ce = {i: -math.log(_softmax(other[i].tolist())[labels[i]]) for i in (1, 2, 4, 5)}
    kept = sorted(sorted(other_ce, key=other_ce.get)[:2])  # half of the 4 disagreements
    assert parts.selected.nonzero().flatten().tolist() == kept
    own_ce = [-math.log(_softmax(own[i].tolist())[labels[i]]) for i in kept]  # CE on the logits
    assert parts.total.item() == pytest.approx(sum(own_ce) / 2, abs=1e-6)


def test_coteaching_plus_is_coteaching_before_init_epochs_and_still_when_no_peer_disagrees():
    sections = {"coteaching": {"forget_rate": 0.5, "ramp_epochs": 0}}
    plus = _plan("coteaching+", coteaching_plus={"init_epochs": 2}, **sections)
    plain = _plan("coteaching", **sections)
    g = torch.Generator().manual_seed(1)
    peer_logits = torch.randn(2, 10, 3, generator=g)
    labels = torch.randint(0, 3, (10,), generator=g)
    early = StepSchedule(step=19, total_steps=100, steps_per_epoch=10)  # epoch 1.9 < 2
    a = plus.loss(0, peer_logits[0].clone(), peer_logits, labels, early)
    b = plain.loss(0, peer_logits[0].clone(), peer_logits, labels, early)
    assert torch.equal(a.selected, b.selected) and a.total.item() == b.total.item()
    agreeing = torch.stack([peer_logits[0], peer_logits[0] * 2])
    own = peer_logits[0].clone().requires_grad_()
    parts = plus.loss(0, own, agreeing, labels, LATE)
    parts.total.backward()
    assert not parts.selected.any() and parts.total.item() == 0.0 and not own.grad.any()


def test_cmd_with_joint_small_loss_trusts_the_labels_jocors_joint_loss_keeps_the_same_for_every_peer():
    cfg = {
        "labels": {"trust": "joint_small_loss", "joint_weight": 0.7},
        "coteaching": {"forget_rate": 0.5, "ramp_epochs": 0},
    }
    plan = _plan("cmd-p", **cfg)
    # Sample 0: peer 1 fits its label, peer 0 predicts the other class: Co-teaching's rule for
    # peer 0 (peer 1's loss alone) trusts it, the joint loss (both losses and their disagreement) not.
    z1 = [[-3.0, 3.0], *Z1[1:]]
    z2 = [[3.0, -3.0], *Z2[1:]]
    peer_logits = torch.tensor([z1, z2])
    labels = torch.tensor(LABELS)
    by_hand = _jocor_by_hand(z1, z2, LABELS, 0.7)
    keep = sorted(sorted(range(4), key=by_hand.__getitem__)[:2])
    for peer in range(2):
        parts = plan.loss(peer, peer_logits[peer].clone(), peer_logits, labels, LATE)
        assert parts.trusted.nonzero().flatten().tolist() == keep, peer  # the same labels for both peers
    jocor = _plan("jocor", jocor={"weight": 0.7}, coteaching=cfg["coteaching"]).loss(
        0, peer_logits[0], peer_logits, labels, LATE
    )
    assert jocor.selected.nonzero().flatten().tolist() == keep  # JoCoR keeps these samples too
    small_loss = _plan("cmd-p", coteaching=cfg["coteaching"]).loss(0, peer_logits[0], peer_logits, labels, LATE)
    assert 0 in small_loss.trusted.nonzero().flatten().tolist() and 0 not in keep


def test_cmd_warm_up_selects_no_knowledge_before_its_epochs_and_as_usual_after():
    plan = _plan("cmd-p", knowledge={"warmup_epochs": 2})
    usual = _plan("cmd-p")
    peer_logits, labels = torch.tensor([Z1, Z2]), torch.tensor(LABELS)
    early = StepSchedule(step=19, total_steps=1000, steps_per_epoch=10)  # epoch 1.9
    after = StepSchedule(step=20, total_steps=1000, steps_per_epoch=10)
    assert math.isinf(plan.values(early).tau) and not math.isinf(usual.values(early).tau)
    assert not plan.loss(0, peer_logits[0], peer_logits, labels, early).selected.any()
    assert plan.values(after) == usual.values(after)
    assert _plan("dml", knowledge={"warmup_epochs": 2}).values(early).tau == -math.inf  # DML: all knowledge, always


def test_cmd_weight_end_ramps_lambda_linearly_from_weight_to_it_over_training_and_dml_keeps_lambda_1():
    """distill.weight_end: lambda(s) = weight + (weight_end - weight) * s; the knowledge term of
    the loss scales with it, the label term does not; DML's published lambda stays 1."""
    ramp = _plan("cmd-p", distill={"weight": 1.0, "weight_end": 5.0})
    constant = _plan("cmd-p", distill={"weight": 1.0})
    peer_logits, labels = torch.tensor([Z1, Z2]), torch.tensor(LABELS)
    start, quarter, end = (StepSchedule(step=s, total_steps=1000, steps_per_epoch=10) for s in (0, 250, 1000))
    assert [ramp.values(w).weight for w in (start, quarter, end)] == [1.0, 2.0, 5.0]
    assert constant.values(quarter).weight is None
    heavy, light = (p.loss(0, peer_logits[0], peer_logits, labels, quarter) for p in (ramp, constant))
    assert light.distill.item() > 0
    assert heavy.distill.item() == pytest.approx(2.0 * light.distill.item())
    assert heavy.ce.item() == pytest.approx(light.ce.item())
    assert _plan("dml", distill={"weight_end": 5.0}).values(quarter).weight is None


def test_cmd_with_mixture_trust_keeps_the_labels_the_other_peers_loss_mixture_trusts_and_every_label_before():
    """labels.trust mixture: before each epoch past the warm-up a peer shares its clean
    probability of every training label (a loss mixture over the whole split); a peer's label
    term keeps the labels the *other* peer's mixture trusts; in the warm-up, every label."""
    from cmd_ray.methods.base import EPOCH_VALUES, StepInputs

    plan = _plan("cmd-p", labels={"trust": "mixture", "mixture_warm_up": 2, "mixture_threshold": 0.5})
    assert [plan.wants_epoch_values(e) for e in range(4)] == [False, False, True, True]
    # Six samples, four fitted (low loss) and two not: the mixture trusts the four.
    own = torch.tensor([[4.0, 0.0]] * 4 + [[0.0, 4.0]] * 2)
    clean = plan.epoch_values(0, own, torch.zeros(6, dtype=torch.long), epoch=2)
    assert clean.shape == (6, 1) and (clean[:4] > 0.9).all() and (clean[4:] < 0.1).all()
    peer_logits, labels = torch.tensor([Z1, Z2]), torch.tensor(LABELS)
    ids = torch.tensor([0, 1, 2, 3])
    values = torch.tensor([[[0.9], [0.9], [0.1], [0.1]], [[0.1], [0.8], [0.7], [0.2]]])  # (P, N, 1)
    inputs = StepInputs(ids, torch.zeros(4, 1, 1, 1), lambda x: x, seed=0, state={EPOCH_VALUES: values})
    for peer, other in ((0, 1), (1, 0)):
        parts = plan.loss(peer, peer_logits[peer].clone(), peer_logits, labels, LATE, inputs)
        assert parts.trusted.tolist() == (values[other, :, 0] > 0.5).tolist(), peer  # the other's division
    warm_up = StepInputs(ids, torch.zeros(4, 1, 1, 1), lambda x: x, seed=0)  # no division yet
    assert plan.loss(0, peer_logits[0].clone(), peer_logits, labels, LATE, warm_up).trusted.all()
    assert not methods.get("cmd-p").needs_noise_rate(from_dict({"labels": {"trust": "mixture"}}))
    both = _plan("cmd-p", labels={"trust": "small_loss_and_mixture", "mixture_warm_up": 2})
    assert [both.wants_epoch_values(e) for e in range(4)] == [False, False, True, True]
    kept = both.loss(0, peer_logits[0].clone(), peer_logits, labels, LATE, inputs).trusted
    assert not kept[values[1, :, 0] <= 0.5].any()  # nothing the other peer's mixture distrusts


# A valid value other than the default of every CMD key a setting can leave unread.
CMD_CONDITIONAL_KEYS = {
    "knowledge.tau": 0.9,
    "knowledge.tau_start": 0.05,
    "knowledge.tau_end": 0.95,
    "knowledge.shape": "linear",
    "knowledge.steepness": 2.0,
    "knowledge.midpoint": 0.2,
    "distill.weight": 3.0,
    "distill.weight_end": 5.0,
    "distill.temperature": 2.0,
    "distill.epsilon": "trust",
    "distill.trust_steepness": 2.0,
    "distill.trust_midpoint": 0.1,
    "distill.mix_weight": 0.3,
    "labels.joint_weight": 0.2,
    "labels.mixture_warm_up": 0,
    "labels.mixture_threshold": 0.9,
    "coteaching.forget_rate": 0.6,
    "coteaching.ramp_epochs": 1.0,
}


def _cmd_behaviour(settings: dict) -> list:
    """What a CMD plan does on one batch of 3 peers at five points of training: each peer's
    total loss, kept labels and selected knowledge, and the epochs it asks for the mixtures."""
    from cmd_ray.methods.base import EPOCH_VALUES, StepInputs
    from cmd_ray.presets import set_path

    values: dict = {"peers": 3}
    for key, value in settings.items():
        values = set_path(values, key, value)
    plan = method_plan(from_dict(values))
    g = torch.Generator().manual_seed(0)
    peer_logits, labels = 3 * torch.randn(3, 24, 5, generator=g), torch.randint(0, 5, (24,), generator=g)
    values = torch.rand(3, 24, 1, generator=g)
    inputs = StepInputs(torch.arange(24), torch.zeros(24, 1, 1, 1), lambda x: x, seed=0, state={EPOCH_VALUES: values})
    seen = [[plan.wants_epoch_values(e) for e in range(6)]]
    for step in (0, 15, 120, 500, 990):
        when = StepSchedule(step=step, total_steps=1000, steps_per_epoch=10)
        for peer in range(3):
            parts = plan.loss(peer, peer_logits[peer].clone(), peer_logits, labels, when, inputs)
            trusted = None if parts.trusted is None else parts.trusted.tolist()
            seen.append((round(parts.total.item(), 6), trusted, parts.selected.tolist()))
    return seen


@pytest.mark.parametrize("method", ["cmd-s", "cmd-p"])
def test_a_cmd_key_said_to_be_unread_changes_nothing_and_one_said_to_be_read_changes_something(method):
    """`unread_keys` is what refuses a grid over a key no trial reads (test_bad_input.py): every
    key it names, set to another value, leaves every loss, kept label and selection as they were,
    under every distillation loss and label trust; and each key, where it is said to be read,
    changes something under at least one of them (so the first half could fail)."""
    changes_somewhere = dict.fromkeys(CMD_CONDITIONAL_KEYS, False)
    for loss in ("kl", "label_correction", "target_mix"):
        for trust in ("all", "small_loss", "joint_small_loss", "agreement", "mixture", "small_loss_and_mixture"):
            base = {"method": method, "distill.loss": loss, "labels.trust": trust}
            config = {"method": method, "distill": {"loss": loss}, "labels": {"trust": trust}}
            unread = methods.get(method).unread_keys(from_dict(config))
            assert set(unread) <= set(CMD_CONDITIONAL_KEYS)
            before = _cmd_behaviour(base)
            for key, other in CMD_CONDITIONAL_KEYS.items():
                changed = _cmd_behaviour({**base, key: other}) != before
                if key in unread:
                    assert not changed, f"{key} is said to be unread with {loss}, {trust} but changes the step"
                else:
                    changes_somewhere[key] |= changed
    read_somewhere = {k for k in CMD_CONDITIONAL_KEYS if k not in methods.get(method).ignored_keys}
    assert {k for k in read_somewhere if not changes_somewhere[k]} == set()


def test_every_cmd_setting_reaches_its_formulation_field():
    """formulation_of names every field: a setting wired to the wrong field would fail here."""
    cfg = {
        "knowledge": {"certainty": "max_prob", "threshold_on": "quantile"},
        "distill": {"loss": "target_mix", "weight": 3.0, "temperature": 2.0, "epsilon": "trust", "target": "hard"},
        "labels": {"trust": "joint_small_loss", "joint_weight": 0.25},
    }
    form = _plan("cmd-s", **cfg).form
    assert dataclasses.asdict(form) == {
        "schedule": "static", "certainty": "max_prob", "threshold_on": "quantile", "loss": "target_mix",
        "weight": 3.0, "temperature": 2.0, "epsilon": "trust", "label_trust": "joint_small_loss",
        "target": "hard", "joint_weight": 0.25,
    }  # fmt: skip


@pytest.mark.parametrize(
    "values,match",
    [
        ({"method": "jocor", "jocor": {"weight": 1.5}}, r"^jocor.weight: got 1.5; allowed: a number in \[0.0, 1.0\]$"),
        ({"coteaching_plus": {"init_epochs": -1}}, r"^coteaching_plus.init_epochs: got -1.0; allowed: a number >= 0$"),
        ({"jocor": {"lambda": 0.9}}, r"^jocor.lambda: unknown key; allowed at this level: weight$"),
        ({"labels": {"joint_weight": 2}}, r"^labels.joint_weight: got 2.0; allowed: a number in \[0.0, 1.0\]$"),
        ({"knowledge": {"warmup_epochs": -1}}, r"^knowledge.warmup_epochs: got -1.0; allowed: a number >= 0$"),
        ({"distill": {"weight_end": -2}}, r"^distill.weight_end: got -2.0; allowed: a number >= 0$"),
        (
            {"labels": {"mixture_threshold": 1.5}},
            r"^labels.mixture_threshold: got 1.5; allowed: a number in \[0.0, 1.0\]$",
        ),
        ({"labels": {"mixture_warm_up": -1}}, r"^labels.mixture_warm_up: got -1; allowed: an integer >= 0$"),
    ],
)
def test_bad_method_settings_are_refused_naming_the_field(values, match):
    with pytest.raises(ConfigError, match=match):
        from_dict(values)


@pytest.mark.parametrize("method", ["coteaching", "coteaching+", "jocor"])
def test_small_loss_methods_ask_for_a_forget_rate_when_the_noise_rate_is_unknown(tmp_path, method):
    labels = tmp_path / "noisy.npy"
    np.save(labels, np.zeros(10, dtype=np.int64))
    with pytest.raises(ConfigError, match=rf"^coteaching.forget_rate: got null, .* of {re.escape(method)} needs it"):
        from_dict({"method": method, "noise": {"type": "labels", "labels": str(labels)}})


def test_cmd_ray_methods_lists_every_registered_method_with_the_sections_it_reads(capsys):
    from cmd_ray.cli import main

    assert main(["methods"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert [line.split()[0] for line in lines] == list(methods.NAMES)
    assert "[jocor, coteaching]" in lines[methods.NAMES.index("jocor")]


THROWAWAY_METHOD = '''"""Label smoothing (Szegedy et al., 2016): each peer alone on smoothed labels (a throwaway)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional

from cmd_ray.errors import check_range
from cmd_ray.methods.base import Method, Plan


@dataclass
class SmoothingConfig:
    epsilon: float = 0.1  # the share of each label's mass spread evenly over the classes


@dataclass(frozen=True)
class SmoothingPlan(Plan):
    epsilon: float

    def loss(self, peer_index, logits, peer_logits, noisy_labels, when, inputs=None):
        import math

        import torch
        import torch.nn.functional as F

        from cmd_ray.knowledge import LossParts

        ce = F.cross_entropy(logits.float(), noisy_labels, label_smoothing=self.epsilon)
        nothing = torch.zeros_like(noisy_labels, dtype=torch.bool)
        return LossParts(ce, ce.detach(), torch.zeros(()), nothing, None, math.inf)


class Smoothing(Method):
    name = "smooth"
    summary = "each peer alone on label-smoothed noisy labels"
    sections = {"smoothing": SmoothingConfig}
    reads = ("smoothing",)

    def check_sections(self, cfg: Any) -> None:
        check_range("smoothing.epsilon", cfg.smoothing.epsilon, 0.0, 0.99)

    def plan(self, cfg: Any, noise_rate: Optional[float]) -> Plan:
        return SmoothingPlan(cfg.smoothing.epsilon)


METHOD = Smoothing()
'''


def test_a_new_method_is_one_module_and_its_registry_line(fake_fmnist_root, tmp_path):
    """The README's "Adding a method", done: a copy of the package gets one new module and its
    registry line, and from there the command line lists the method, trains with it and its
    section, and refuses a bad value of that section in one line naming the field."""
    import shutil
    import subprocess
    import sys
    from pathlib import Path

    import cmd_ray

    package = tmp_path / "src" / "cmd_ray"
    shutil.copytree(Path(cmd_ray.__file__).parent, package, ignore=shutil.ignore_patterns("__pycache__"))
    (package / "methods" / "smoothing.py").write_text(THROWAWAY_METHOD)
    registry = package / "methods" / "__init__.py"
    text = registry.read_text()
    imports = re.search(r"^from cmd_ray.methods import ce, .*$", text, flags=re.MULTILINE).group(0)
    assert "    cmd.CMD_P,\n)" in text
    text = text.replace(imports, imports + ", smoothing").replace(
        "    cmd.CMD_P,\n)", "    cmd.CMD_P,\n    smoothing.METHOD,\n)"
    )
    registry.write_text(text)

    env = {**os.environ, "PYTHONPATH": str(tmp_path / "src")}

    def cli(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-m", "cmd_ray.cli", *args], env=env, capture_output=True,
                              text=True, timeout=300, cwd=tmp_path)  # fmt: skip

    listed = cli("methods")
    assert listed.returncode == 0 and "smooth" in listed.stdout and "smoothing" in listed.stdout, listed.stderr
    run = ["train", "--in-process", "--set", "method=smooth", "--set", f"data.root={fake_fmnist_root}",
           "--set", "data.train_subset=256", "--set", "data.test_subset=128", "--set", "model.name=mlp",
           "--set", "epochs=1", "--set", f"output_dir={tmp_path / 'runs'}"]  # fmt: skip
    trained = cli(*run, "--set", "smoothing.epsilon=0.2")
    assert trained.returncode == 0, trained.stderr[-2000:]
    summary = json.loads((tmp_path / "runs" / "summary.json").read_text())
    assert summary["method"] == "smooth" and summary["config"]["smoothing"] == {"epsilon": 0.2}
    assert summary["history"][0]["peer0/ce_loss"] > 0
    refused = cli(*run, "--set", "smoothing.epsilon=1.5")
    assert refused.returncode == 2 and refused.stderr.strip().count("\n") == 0, refused.stderr
    assert "smoothing.epsilon" in refused.stderr
