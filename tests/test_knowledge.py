"""The CMD maths pinned on hand-computed cases."""

from __future__ import annotations

import math

import pytest
import torch
from torch.nn import functional as F

from cmd_ray.config import from_dict
from cmd_ray.knowledge import (
    Formulation,
    StepValues,
    certainty,
    coteaching_keep,
    global_trust,
    peer_loss,
    progressive_tau,
    select,
    selected_target,
    threshold,
    trusted_labels,
)
from cmd_ray.methods import StepSchedule
from cmd_ray.methods.coteaching import ForgetSchedule
from cmd_ray.peer import method_plan


def formulation(cfg) -> Formulation:
    """The formulation a CE / DML / CMD run distils with."""
    return method_plan(cfg).form


def test_certainty_of_one_hot_is_one_and_of_uniform_is_zero():
    one_hot = torch.eye(5)
    uniform = torch.full((3, 5), 0.2)
    assert torch.allclose(certainty(one_hot, "entropy"), torch.ones(5))
    assert torch.allclose(certainty(uniform, "entropy"), torch.zeros(3), atol=1e-6)
    assert torch.allclose(certainty(one_hot, "max_prob"), torch.ones(5))
    assert torch.allclose(certainty(uniform, "max_prob"), torch.full((3,), 0.2))


def test_entropy_certainty_by_hand():
    p = torch.tensor([[0.5, 0.5, 0.0, 0.0]])
    # H = log 2, log C = log 4 -> c = 1 - 1/2
    assert certainty(p, "entropy").item() == pytest.approx(0.5, abs=1e-6)


def test_static_threshold_selects_exactly_the_rows_at_or_above_it():
    c = torch.tensor([[0.1, 0.5, 0.49, 0.9, 0.5001]])
    assert select(c, 0.5).tolist() == [[False, True, False, True, True]]


def test_quantile_threshold_selects_the_top_fraction():
    c = torch.arange(100, dtype=torch.float32)[None] / 100
    mask = select(c, 0.75, "quantile")
    assert mask.sum().item() == 25
    assert mask[0, 75:].all()


def test_zero_and_all_schedules():
    c = torch.rand(2, 7)
    assert not select(c, threshold("zero", 0.3)).any()
    assert select(c, threshold("all", 0.3)).all()


def test_progressive_tau_endpoints_and_midpoint():
    assert progressive_tau(0.0, 0.2, 0.8, "linear") == pytest.approx(0.2)
    assert progressive_tau(1.0, 0.2, 0.8, "linear") == pytest.approx(0.8)
    assert progressive_tau(0.5, 0.2, 0.8, "logistic", 10, 0.5) == pytest.approx(0.5)
    g0 = 1 / (1 + math.exp(5))
    assert progressive_tau(0.0, 0.2, 0.8, "logistic", 10, 0.5) == pytest.approx(0.2 + 0.6 * g0)
    # rises monotonically
    taus = [progressive_tau(s / 10, 0.2, 0.8) for s in range(11)]
    assert taus == sorted(taus)


def test_selected_target_is_the_mean_of_selected_sources_only():
    logits = torch.log(torch.tensor([[[0.7, 0.3]], [[0.1, 0.9]], [[0.5, 0.5]]]))  # J=3, B=1, C=2
    target, has = selected_target(logits, torch.tensor([[True], [True], [False]]))
    assert has.tolist() == [True]
    assert torch.allclose(target, torch.tensor([[0.4, 0.6]]), atol=1e-6)
    _, has = selected_target(logits, torch.zeros(3, 1, dtype=torch.bool))
    assert has.tolist() == [False]


def _batch(seed=0, b=8, c=4, p=2):
    g = torch.Generator().manual_seed(seed)
    peer_logits = torch.randn(p, b, c, generator=g)
    labels = torch.randint(0, c, (b,), generator=g)
    return peer_logits, labels


def test_zero_knowledge_is_plain_cross_entropy():
    cfg = from_dict({"method": "ce"})
    peer_logits, labels = _batch()
    own = peer_logits[0].clone().requires_grad_()
    parts = peer_loss(own, peer_logits, 0, labels, formulation(cfg), StepValues(threshold("zero", 0.0)))
    assert parts.total.item() == pytest.approx(F.cross_entropy(own, labels).item(), abs=1e-6)
    assert not parts.selected.any()


def test_all_knowledge_reproduces_deep_mutual_learning():
    cfg = from_dict({"method": "dml"})
    peer_logits, labels = _batch()
    own = peer_logits[0].clone().requires_grad_()
    parts = peer_loss(own, peer_logits, 0, labels, formulation(cfg), StepValues(-math.inf))
    p1 = F.softmax(peer_logits[1], -1)
    dml = F.cross_entropy(own, labels) + F.kl_div(F.log_softmax(own, -1), p1, reduction="batchmean")
    assert parts.total.item() == pytest.approx(dml.item(), abs=1e-6)
    assert parts.selected.all()


def test_distillation_is_averaged_over_the_whole_batch_not_the_selected_rows():
    cfg = from_dict(
        {"method": "cmd-s", "knowledge": {"tau": 0.0}, "distill": {"weight": 1.0}, "labels": {"trust": "all"}}
    )
    peer_logits, labels = _batch(b=4)
    own = peer_logits[0].clone().requires_grad_()
    full = peer_loss(own, peer_logits, 0, labels, formulation(cfg), StepValues(-math.inf))
    # Make only sample 0 of the source confident enough.
    sharp = peer_logits.clone()
    sharp[1, 0] = torch.tensor([20.0, 0.0, 0.0, 0.0])
    part = peer_loss(own, sharp, 0, labels, formulation(cfg), StepValues(0.9))
    assert part.selected.tolist() == [True, False, False, False]
    kl0 = (F.softmax(sharp[1, 0], -1) * (F.log_softmax(sharp[1, 0], -1) - F.log_softmax(own[0], -1))).sum()
    assert part.distill.item() == pytest.approx(kl0.item() / 4, abs=1e-5)
    assert full.distill.item() > 0


def test_temperature_scales_kl_by_t_squared():
    # CMD with all knowledge (threshold 0); dml itself keeps T = 1 as published
    cfg = from_dict(
        {
            "method": "cmd-s",
            "knowledge": {"tau": 0.0},
            "distill": {"temperature": 2.0, "weight": 1.0},
            "labels": {"trust": "all"},
        }
    )
    peer_logits, labels = _batch()
    own = peer_logits[0].clone()
    parts = peer_loss(own, peer_logits, 0, labels, formulation(cfg), StepValues(-math.inf))
    q = F.softmax(peer_logits[1] / 2, -1)
    expected = F.kl_div(F.log_softmax(own / 2, -1), q, reduction="batchmean") * 4
    assert parts.distill.item() == pytest.approx(expected.item(), abs=1e-5)


def test_gradients_never_flow_into_the_knowledge_source():
    cfg = from_dict({"method": "dml"})
    _, labels = _batch()
    source = torch.randn(8, 4, requires_grad=True)
    own = torch.randn(8, 4, requires_grad=True)
    peer_logits = torch.stack([own, source])  # not detached on purpose
    parts = peer_loss(own, peer_logits, 0, labels, formulation(cfg), StepValues(-math.inf))
    parts.total.backward()
    assert own.grad is not None and own.grad.abs().sum() > 0
    assert source.grad is None


def test_three_peers_use_the_mean_of_the_selected_others():
    cfg = from_dict({"method": "dml", "peers": 3})
    peer_logits, labels = _batch(p=3)
    own = peer_logits[1].clone()
    parts = peer_loss(own, peer_logits, 1, labels, formulation(cfg), StepValues(-math.inf))
    q = (F.softmax(peer_logits[0], -1) + F.softmax(peer_logits[2], -1)) / 2
    expected = F.kl_div(F.log_softmax(own, -1), q, reduction="batchmean")
    assert parts.distill.item() == pytest.approx(expected.item(), abs=1e-5)


def test_target_mix_uses_certainty_weighted_soft_target():
    form = Formulation("all", loss="target_mix")
    peer_logits, labels = _batch()
    own = peer_logits[0].clone()
    parts = peer_loss(own, peer_logits, 0, labels, form, StepValues(-math.inf, trust=0.5))
    p1 = F.softmax(peer_logits[1], -1)
    e = 0.5 * certainty(p1)[:, None]
    q = (1 - e) * F.one_hot(labels, 4) + e * p1
    expected = -(q * F.log_softmax(own, -1)).sum(-1).mean()
    assert parts.total.item() == pytest.approx(expected.item(), abs=1e-5)


def test_coteaching_keeps_the_small_loss_samples_of_the_peer():
    losses = torch.tensor([[0.1, 5.0, 0.3, 4.0, 0.2]])
    assert coteaching_keep(losses, 0.4).tolist() == [True, False, True, False, True]
    ramp = ForgetSchedule(ceiling=0.4, ramp_epochs=10)
    assert ramp.at(StepSchedule(step=50, total_steps=1000, steps_per_epoch=10)) == pytest.approx(0.2)
    assert ramp.at(StepSchedule(step=500, total_steps=1000, steps_per_epoch=10)) == pytest.approx(0.4)


def test_coteaching_loss_is_ce_on_samples_the_peer_kept():
    cfg = from_dict({"method": "coteaching", "coteaching": {"forget_rate": 0.5, "ramp_epochs": 0}})
    peer_logits, labels = _batch(b=10)
    own = peer_logits[0].clone()
    parts = method_plan(cfg).loss(0, own, peer_logits, labels, StepSchedule(0, 100, 10))
    peer_loss_per_sample = F.cross_entropy(peer_logits[1], labels, reduction="none")
    keep = peer_loss_per_sample.argsort()[:5]
    assert parts.selected.sum().item() == 5
    assert parts.total.item() == pytest.approx(F.cross_entropy(own[keep], labels[keep]).item(), abs=1e-6)


def _two_sample_case():
    """Own logits, a peer confident on sample 0 only (p = [0.8, 0.2]; [0.5, 0.5]), labels [1, 0]."""
    own = torch.tensor([[1.0, 0.0], [1.0, 0.0]])
    peer = torch.log(torch.tensor([[0.8, 0.2], [0.5, 0.5]]))
    return own, torch.stack([own, peer]), torch.tensor([1, 0])


# log_softmax([1, 0]) = [-0.313262, -1.313262]
LOG_P = (-0.3132617, -1.3132617)


def test_label_correction_mixes_the_label_with_certainty_weighted_knowledge_by_hand():
    own, peer_logits, labels = _two_sample_case()
    form = Formulation("static", certainty="max_prob", loss="label_correction", epsilon="certainty")
    parts = peer_loss(own, peer_logits, 0, labels, form, StepValues(tau=0.6, trust=0.5))
    assert parts.selected.tolist() == [True, False]
    # sample 0: eps = g * c = 0.5 * 0.8 = 0.4, target 0.6 * [0, 1] + 0.4 * [0.8, 0.2] = [0.32, 0.68]
    sample0 = -(0.32 * LOG_P[0] + 0.68 * LOG_P[1])
    # sample 1: not selected, plain CE on its label 0
    sample1 = -LOG_P[0]
    assert parts.total.item() == pytest.approx((sample0 + sample1) / 2, abs=1e-5)
    # the split: label term (1 - eps) CE(y) and knowledge term eps CE(q), batch means
    assert parts.ce.item() == pytest.approx((0.6 * -LOG_P[1] + sample1) / 2, abs=1e-5)
    assert parts.distill.item() == pytest.approx(0.4 * -(0.8 * LOG_P[0] + 0.2 * LOG_P[1]) / 2, abs=1e-5)


def test_label_correction_with_trust_epsilon_replaces_the_label_as_trust_reaches_one():
    own, peer_logits, labels = _two_sample_case()
    form = Formulation("static", certainty="max_prob", loss="label_correction", epsilon="trust")
    half = peer_loss(own, peer_logits, 0, labels, form, StepValues(tau=0.6, trust=0.5))
    # eps = g = 0.5: target [0.4, 0.6]
    assert half.total.item() == pytest.approx((-(0.4 * LOG_P[0] + 0.6 * LOG_P[1]) - LOG_P[0]) / 2, abs=1e-5)
    full = peer_loss(own, peer_logits, 0, labels, form, StepValues(tau=0.6, trust=1.0))
    # eps = 1: the label of sample 0 is gone, the target is the peer's knowledge
    assert full.ce.item() == pytest.approx(-LOG_P[0] / 2, abs=1e-5)
    assert full.total.item() == pytest.approx((-(0.8 * LOG_P[0] + 0.2 * LOG_P[1]) - LOG_P[0]) / 2, abs=1e-5)


def test_agreement_drops_the_label_where_selected_knowledge_names_another_class():
    own, peer_logits, labels = _two_sample_case()
    # the peer's confident knowledge on sample 0 says class 0, its label is 1: the label goes
    form = Formulation("static", certainty="max_prob", loss="kl", label_trust="agreement")
    parts = peer_loss(own, peer_logits, 0, labels, form, StepValues(tau=0.6))
    assert parts.trusted.tolist() == [False, True]
    assert parts.ce.item() == pytest.approx(-LOG_P[0] / 2, abs=1e-5)
    kl0 = 0.8 * (math.log(0.8) - LOG_P[0]) + 0.2 * (math.log(0.2) - LOG_P[1])
    assert parts.distill.item() == pytest.approx(kl0 / 2, abs=1e-5)
    # an untrusted label under label correction leaves only eps * CE(z, q) on that sample
    form = Formulation("static", certainty="max_prob", loss="label_correction", label_trust="agreement")
    parts = peer_loss(own, peer_logits, 0, labels, form, StepValues(tau=0.6, trust=0.5))
    assert parts.total.item() == pytest.approx((0.4 * -(0.8 * LOG_P[0] + 0.2 * LOG_P[1]) - LOG_P[0]) / 2, abs=1e-5)


def test_small_loss_label_trust_keeps_the_labels_the_other_peer_finds_easy_and_still_distils():
    peer_logits, labels = _batch(b=10)
    trusted = trusted_labels(peer_logits[1:], labels, "small_loss", 0.3, None, None)
    peer_ce = F.cross_entropy(peer_logits[1], labels, reduction="none")
    assert trusted.sum().item() == 7
    assert set(torch.nonzero(trusted).flatten().tolist()) == set(peer_ce.argsort()[:7].tolist())
    own = peer_logits[0].clone()
    form = Formulation("all", loss="kl", label_trust="small_loss")
    parts = peer_loss(own, peer_logits, 0, labels, form, StepValues(-math.inf, forget_rate=0.3))
    ce = (F.cross_entropy(own, labels, reduction="none") * trusted.float()).sum() / 10
    kl = F.kl_div(F.log_softmax(own, -1), F.softmax(peer_logits[1], -1), reduction="batchmean")
    assert parts.ce.item() == pytest.approx(ce.item(), abs=1e-5)
    assert parts.distill.item() == pytest.approx(kl.item(), abs=1e-5)  # every sample still gets knowledge


def test_small_loss_and_mixture_trust_keeps_the_labels_both_rules_keep_and_the_small_loss_share_before_a_division():
    peer_logits, labels = _batch(b=10)
    small_loss = trusted_labels(peer_logits[1:], labels, "small_loss", 0.3, None, None)
    division = torch.tensor([True, False] * 5)
    both = trusted_labels(peer_logits[1:], labels, "small_loss_and_mixture", 0.3, None, None, division=division)
    assert both.tolist() == (small_loss & division).tolist() and both.sum() < small_loss.sum()
    before = trusted_labels(peer_logits[1:], labels, "small_loss_and_mixture", 0.3, None, None)
    assert before.tolist() == small_loss.tolist()


def test_global_trust_is_logistic_in_training_progress():
    assert global_trust(0.15, 16, 0.15) == pytest.approx(0.5)
    assert global_trust(0.0, 16, 0.15) == pytest.approx(1 / (1 + math.exp(16 * 0.15)))
    values = [global_trust(s / 20, 16, 0.15) for s in range(21)]
    assert values == sorted(values) and values[-1] > 0.99


def test_the_threshold_follows_its_schedule_from_plain_numbers():
    assert threshold("static", 0.9, tau=0.42) == 0.42
    assert threshold("progressive", 0.5, tau_start=0.2, tau_end=0.6, shape="linear") == pytest.approx(0.4)
    assert threshold("progressive", 1.0, tau_start=0.2, tau_end=0.6) == pytest.approx(progressive_tau(1.0, 0.2, 0.6))
    with pytest.raises(ValueError, match="knowledge.schedule"):
        threshold("rising", 0.5)


def test_a_falling_threshold_selects_more_knowledge_later():
    taus = [progressive_tau(s / 10, 0.8, 0.2) for s in range(11)]
    assert taus == sorted(taus, reverse=True)
    c = torch.linspace(0, 1, 101)[None]
    assert select(c, taus[0]).sum() < select(c, taus[-1]).sum()


def test_the_baselines_keep_their_published_losses_whatever_the_cmd_options():
    options = {
        "distill": {"loss": "label_correction", "weight": 8.0, "temperature": 3.0},
        "labels": {"trust": "small_loss"},
        "knowledge": {"certainty": "max_prob"},
    }
    assert formulation(from_dict({"method": "dml", **options})) == Formulation("all")
    assert formulation(from_dict({"method": "ce", **options})) == Formulation("zero")
    cmd = formulation(from_dict({"method": "cmd-p", **options}))
    assert (cmd.schedule, cmd.loss, cmd.label_trust) == ("progressive", "label_correction", "small_loss")


def test_hard_targets_distil_the_argmax_of_selected_knowledge_as_a_one_hot_pseudo_label():
    own, peer_logits, labels = _two_sample_case()
    form = Formulation("static", certainty="max_prob", loss="kl", target="hard")
    parts = peer_loss(own, peer_logits, 0, labels, form, StepValues(tau=0.6))
    # sample 0's knowledge [0.8, 0.2] becomes class 0: KL(onehot(0) || p) = -log p_0
    assert parts.distill.item() == pytest.approx(-LOG_P[0] / 2, abs=1e-5)
    form = Formulation("static", certainty="max_prob", loss="label_correction", epsilon="trust", target="hard")
    parts = peer_loss(own, peer_logits, 0, labels, form, StepValues(tau=0.6, trust=1.0))
    assert parts.total.item() == pytest.approx((-LOG_P[0] - LOG_P[0]) / 2, abs=1e-5)
