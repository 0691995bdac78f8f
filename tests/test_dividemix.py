"""DivideMix pinned to its published pieces: the loss mixture's clean probability, the warm-up loss,
co-division by the *other* peer, label co-refinement, co-guessing, the unlabelled ramp and the
uniform-prior penalty, on cases small enough to compute by hand."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from cmd_ray.config import ConfigError, from_dict
from cmd_ray.knowledge import clean_probability
from cmd_ray.methods import EPOCH_VALUES, StepInputs, StepSchedule
from cmd_ray.methods.dividemix import sharpen
from cmd_ray.peer import method_plan


def _plan(**settings):
    return method_plan(from_dict({"method": "dividemix", "dividemix": settings}))


def test_the_clean_probability_is_the_low_loss_components_posterior_whatever_the_losses_scale():
    g = torch.Generator().manual_seed(0)
    clean = 0.1 + 0.05 * torch.randn(700, generator=g)  # a low-loss bump (clean labels) ...
    noisy = 2.0 + 0.3 * torch.randn(300, generator=g)  # ... and a high one (wrong labels)
    losses = torch.cat([clean, noisy]).abs()
    probability = clean_probability(losses)
    assert probability.shape == (1000,) and probability.dtype == torch.float32
    assert (probability[:700] > 0.99).float().mean() > 0.99
    assert (probability[700:] < 0.01).float().mean() > 0.99
    # Losses are scaled to [0, 1] first: the division does not depend on their unit or offset.
    assert torch.allclose(clean_probability(5 * losses + 3), probability, atol=1e-5)


def test_the_warm_up_is_cross_entropy_on_every_noisy_label_with_the_optional_confidence_penalty():
    logits = torch.tensor([[2.0, 0.0, -1.0], [0.0, 1.0, 0.5]])
    labels = torch.tensor([1, 1])
    early = StepSchedule(step=5, total_steps=100, steps_per_epoch=10)  # epoch 0 of warm-up 10
    parts = _plan().loss(0, logits, logits[None].repeat(2, 1, 1), labels, early)
    assert float(parts.total) == pytest.approx(float(F.cross_entropy(logits, labels)))
    assert not parts.selected.any() and parts.trusted is None
    penalised = _plan(confidence_penalty=True).loss(0, logits, logits[None].repeat(2, 1, 1), labels, early)
    p = torch.softmax(logits, -1)
    negative_entropy = float((p * p.log()).sum(-1).mean())
    assert float(penalised.total) == pytest.approx(float(F.cross_entropy(logits, labels)) + negative_entropy)


def _inputs(images, clean_by_peer, seed=7):
    """Step inputs of a batch whose forward pass is the identity (logits = images' first C values)."""
    state = {EPOCH_VALUES: clean_by_peer[:, :, None]}
    return StepInputs(torch.arange(images.shape[0]), images, lambda x: x.flatten(1), seed, state)


def test_mixmatch_without_mixing_is_the_refined_labels_plus_the_ramped_guesses_plus_the_prior():
    """alpha -> 0 makes mixup's lambda 1 (no mixing), so the loss is computable by hand."""
    own = torch.tensor([[2.0, 0.0, 0.0], [0.0, 1.0, 0.0], [0.0, 0.0, 3.0], [1.0, 1.0, 0.0]])
    other = torch.tensor([[1.0, 0.0, 0.0], [0.0, 0.0, 2.0], [1.0, 0.0, 1.0], [0.0, 2.0, 0.0]])
    labels = torch.tensor([0, 2, 2, 1])
    # The division peer 0 trains on is peer 1's: samples 0 and 2 labelled (its own would be 1 and 3).
    clean = torch.tensor([[0.1, 0.9, 0.2, 0.8], [0.9, 0.3, 0.6, 0.4]])
    epoch, lambda_u, temperature = 12, 25.0, 0.5
    when = StepSchedule(step=epoch * 10, total_steps=1000, steps_per_epoch=10)
    plan = _plan(warm_up=10, alpha=1e-3, lambda_u=lambda_u, temperature=temperature)
    parts = plan.loss(0, own.clone(), torch.stack([own, other]), labels, when, _inputs(own.view(4, 3, 1, 1), clean))

    labelled = torch.tensor([True, False, True, False])
    assert torch.equal(parts.selected, labelled) and torch.equal(parts.trusted, labelled)
    p_own, p_other = torch.softmax(own, -1), torch.softmax(other, -1)
    w = clean[1][:, None]
    refined = sharpen(w * F.one_hot(labels, 3) + (1 - w) * p_own, temperature)
    guessed = sharpen((p_own + p_other) / 2, temperature)
    label_term = -(refined[labelled] * F.log_softmax(own[labelled], -1)).sum(-1).mean()
    guess_term = ((p_own[~labelled] - guessed[~labelled]) ** 2).mean()
    ramp = (epoch - 10) / 16
    prior = torch.full((3,), 1 / 3)
    penalty = (prior * (prior / p_own.mean(0)).log()).sum()
    expected = label_term + lambda_u * ramp * guess_term + penalty
    assert float(parts.total) == pytest.approx(float(expected), rel=1e-4)
    assert float(parts.ce) == pytest.approx(float(label_term), rel=1e-4)
    assert float(parts.distill) == pytest.approx(float(lambda_u * ramp * guess_term), rel=1e-4)


def test_mixup_draws_depend_on_the_steps_seed_and_the_peer_only():
    own = torch.randn(8, 3, generator=torch.Generator().manual_seed(1))
    labels = torch.randint(0, 3, (8,), generator=torch.Generator().manual_seed(2))
    clean = torch.rand(2, 8, generator=torch.Generator().manual_seed(3))
    when = StepSchedule(step=200, total_steps=1000, steps_per_epoch=10)
    plan = _plan(warm_up=10)

    def total(seed, peer=0):
        peers = torch.stack([own, own.flip(0)])
        inputs = _inputs(own.view(8, 3, 1, 1), clean, seed)
        return float(plan.loss(peer, own.clone(), peers, labels, when, inputs).total)

    assert total(7) == total(7)
    assert total(7) != total(8)
    assert total(7, peer=0) != total(7, peer=1)


def test_a_step_after_warm_up_without_the_epoch_hooks_division_is_refused():
    logits = torch.zeros(2, 3)
    late = StepSchedule(step=200, total_steps=1000, steps_per_epoch=10)
    with pytest.raises(ValueError, match="co-division"):
        _plan(warm_up=10).loss(0, logits, logits[None].repeat(2, 1, 1), torch.tensor([0, 1]), late)


def test_the_epoch_hook_runs_from_the_end_of_warm_up_on_the_peers_per_sample_losses():
    plan = _plan(warm_up=3)
    assert [plan.wants_epoch_values(e) for e in range(5)] == [False, False, False, True, True]
    logits = torch.tensor([[4.0, 0.0], [4.0, 0.0], [4.0, 0.0], [4.0, 0.0]])
    values = plan.epoch_values(0, logits, torch.tensor([0, 0, 0, 1]), epoch=3)
    assert values.shape == (4, 1)
    assert values[3, 0] < 0.5 < values[0, 0]  # the wrong label has the high loss


@pytest.mark.parametrize(
    "settings, match",
    [
        ({"p_threshold": 1.5}, "dividemix.p_threshold"),
        ({"warm_up": -1}, "dividemix.warm_up"),
        ({"temperature": 0.0}, "dividemix.temperature"),
        ({"alpha": 0.0}, "dividemix.alpha"),
        ({"lambda_u": -1.0}, "dividemix.lambda_u"),
    ],
)
def test_bad_dividemix_settings_are_refused_naming_the_field(settings, match):
    with pytest.raises(ConfigError, match=match):
        from_dict({"method": "dividemix", "dividemix": settings})


def test_the_published_defaults():
    d = from_dict({"method": "dividemix"}).dividemix
    assert (d.warm_up, d.p_threshold, d.temperature, d.alpha) == (10, 0.5, 0.5, 4.0)
    assert math.isclose(d.lambda_u, 25.0) and d.confidence_penalty is False


def test_three_peers_each_trained_on_the_mean_division_of_the_other_two(fake_fmnist_root):
    """P > 2: a peer's labelled set is where the *others'* mean clean probability passes the
    threshold, so peers share no division with themselves and every peer still trains."""
    from cmd_ray.trainer import train_in_process

    from .conftest import tiny_config

    cfg = tiny_config(fake_fmnist_root, method="dividemix", peers=3, epochs=1, dividemix__warm_up=0)
    summary = train_in_process(cfg, log=lambda _: None)
    record = summary["history"][0]
    fractions = [record[f"peer{k}/selected_fraction"] for k in range(3)]
    assert all(0.0 < f < 1.0 for f in fractions) and len(set(fractions)) > 1
    assert math.isfinite(record["peer2/loss"])


@pytest.mark.parametrize(
    "settings,unread",
    [
        ({"warm_up": 0}, {"dividemix.confidence_penalty"}),
        ({"warm_up": 4}, {"dividemix.p_threshold", "dividemix.lambda_u", "dividemix.temperature", "dividemix.alpha"}),
        ({"warm_up": 2}, set()),
    ],
)
def test_a_dividemix_key_said_to_be_unread_changes_no_step_of_the_run_and_the_others_are_read(settings, unread):
    """`unread_keys` refuses a grid over a key no trial reads: with warm_up 0 the warm-up's
    penalty, with warm_up >= epochs (4 here) everything after it. Each key it names, changed,
    leaves every step's loss of a 4-epoch run equal; each key it does not name changes one."""
    from cmd_ray import methods

    changed = {"confidence_penalty": True, "p_threshold": 0.9, "lambda_u": 100.0, "temperature": 0.9, "alpha": 0.5}
    cfg = from_dict({"method": "dividemix", "epochs": 4, "dividemix": settings})
    assert set(methods.get("dividemix").unread_keys(cfg)) == unread
    g = torch.Generator().manual_seed(0)
    logits, labels = 3 * torch.randn(2, 8, 3, generator=g), torch.randint(0, 3, (8,), generator=g)
    clean = torch.rand(2, 8, generator=g)

    def losses(plan) -> list[float]:
        out = []
        for epoch in range(4):
            when = StepSchedule(step=epoch * 10 + 5, total_steps=40, steps_per_epoch=10)
            inputs = _inputs(logits[0].reshape(8, 3, 1, 1), clean, seed=epoch)
            out.append(round(float(plan.loss(0, logits[0].clone(), logits, labels, when, inputs).total), 6))
        return out

    base = losses(_plan(**settings))
    for name, value in changed.items():
        assert (losses(_plan(**settings, **{name: value})) != base) == (f"dividemix.{name}" not in unread), name
