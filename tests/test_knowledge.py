"""The CMD maths pinned on hand-computed cases."""

from __future__ import annotations

import math

import pytest
import torch
from torch.nn import functional as F

from cmd_ray.config import from_dict
from cmd_ray.knowledge import (
    certainty,
    coteaching_forget_rate,
    coteaching_keep,
    peer_loss,
    progressive_tau,
    select,
    selected_target,
    threshold,
)


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
    cfg = from_dict({})
    c = torch.rand(2, 7)
    assert not select(c, threshold("zero", 0.3, cfg.knowledge)).any()
    assert select(c, threshold("all", 0.3, cfg.knowledge)).all()


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
    parts = peer_loss(own, peer_logits, 0, labels, "zero", threshold("zero", 0.0, cfg.knowledge), cfg)
    assert parts.total.item() == pytest.approx(F.cross_entropy(own, labels).item(), abs=1e-6)
    assert not parts.selected.any()


def test_all_knowledge_reproduces_deep_mutual_learning():
    cfg = from_dict({"method": "dml"})
    peer_logits, labels = _batch()
    own = peer_logits[0].clone().requires_grad_()
    parts = peer_loss(own, peer_logits, 0, labels, "all", -math.inf, cfg)
    p1 = F.softmax(peer_logits[1], -1)
    dml = F.cross_entropy(own, labels) + F.kl_div(F.log_softmax(own, -1), p1, reduction="batchmean")
    assert parts.total.item() == pytest.approx(dml.item(), abs=1e-6)
    assert parts.selected.all()


def test_distillation_is_averaged_over_the_whole_batch_not_the_selected_rows():
    cfg = from_dict({"method": "cmd-s", "knowledge": {"tau": 0.0}})
    peer_logits, labels = _batch(b=4)
    own = peer_logits[0].clone().requires_grad_()
    full = peer_loss(own, peer_logits, 0, labels, "all", -math.inf, cfg)
    # Make only sample 0 of the source confident enough.
    sharp = peer_logits.clone()
    sharp[1, 0] = torch.tensor([20.0, 0.0, 0.0, 0.0])
    part = peer_loss(own, sharp, 0, labels, "static", 0.9, cfg)
    assert part.selected.tolist() == [True, False, False, False]
    kl0 = (F.softmax(sharp[1, 0], -1) * (F.log_softmax(sharp[1, 0], -1) - F.log_softmax(own[0], -1))).sum()
    assert part.distill.item() == pytest.approx(kl0.item() / 4, abs=1e-5)
    assert full.distill.item() > 0


def test_temperature_scales_kl_by_t_squared():
    cfg = from_dict({"method": "dml", "distill": {"temperature": 2.0}})
    peer_logits, labels = _batch()
    own = peer_logits[0].clone()
    parts = peer_loss(own, peer_logits, 0, labels, "all", -math.inf, cfg)
    q = F.softmax(peer_logits[1] / 2, -1)
    expected = F.kl_div(F.log_softmax(own / 2, -1), q, reduction="batchmean") * 4
    assert parts.distill.item() == pytest.approx(expected.item(), abs=1e-5)


def test_gradients_never_flow_into_the_knowledge_source():
    cfg = from_dict({"method": "dml"})
    _, labels = _batch()
    source = torch.randn(8, 4, requires_grad=True)
    own = torch.randn(8, 4, requires_grad=True)
    peer_logits = torch.stack([own, source])  # not detached on purpose
    parts = peer_loss(own, peer_logits, 0, labels, "all", -math.inf, cfg)
    parts.total.backward()
    assert own.grad is not None and own.grad.abs().sum() > 0
    assert source.grad is None


def test_three_peers_use_the_mean_of_the_selected_others():
    cfg = from_dict({"method": "dml", "peers": 3})
    peer_logits, labels = _batch(p=3)
    own = peer_logits[1].clone()
    parts = peer_loss(own, peer_logits, 1, labels, "all", -math.inf, cfg)
    q = (F.softmax(peer_logits[0], -1) + F.softmax(peer_logits[2], -1)) / 2
    expected = F.kl_div(F.log_softmax(own, -1), q, reduction="batchmean")
    assert parts.distill.item() == pytest.approx(expected.item(), abs=1e-5)


def test_target_mix_uses_certainty_weighted_soft_target():
    cfg = from_dict({"method": "dml", "distill": {"loss": "target_mix", "mix_weight": 0.5}})
    peer_logits, labels = _batch()
    own = peer_logits[0].clone()
    parts = peer_loss(own, peer_logits, 0, labels, "all", -math.inf, cfg)
    p1 = F.softmax(peer_logits[1], -1)
    e = 0.5 * certainty(p1)[:, None]
    q = (1 - e) * F.one_hot(labels, 4) + e * p1
    expected = -(q * F.log_softmax(own, -1)).sum(-1).mean()
    assert parts.total.item() == pytest.approx(expected.item(), abs=1e-5)


def test_coteaching_keeps_the_small_loss_samples_of_the_peer():
    losses = torch.tensor([[0.1, 5.0, 0.3, 4.0, 0.2]])
    assert coteaching_keep(losses, 0.4).tolist() == [True, False, True, False, True]
    assert coteaching_forget_rate(5, 0.4, 10) == pytest.approx(0.2)
    assert coteaching_forget_rate(50, 0.4, 10) == pytest.approx(0.4)


def test_coteaching_loss_is_ce_on_samples_the_peer_kept():
    cfg = from_dict({"method": "coteaching"})
    peer_logits, labels = _batch(b=10)
    own = peer_logits[0].clone()
    parts = peer_loss(own, peer_logits, 0, labels, "coteaching", math.inf, cfg, forget_rate=0.5)
    peer_loss_per_sample = F.cross_entropy(peer_logits[1], labels, reduction="none")
    keep = peer_loss_per_sample.argsort()[:5]
    assert parts.selected.sum().item() == 5
    assert parts.total.item() == pytest.approx(F.cross_entropy(own[keep], labels[keep]).item(), abs=1e-6)
