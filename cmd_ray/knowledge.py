"""Confident knowledge selection and mutual distillation: the CMD maths (docs/METHOD.md), and the
small-loss rule the Co-teaching family shares with CMD's label trust.

Pure tensor functions, device-agnostic, no Ray and no optimiser. Shapes: B samples,
C classes, J knowledge sources (the other peers). Knowledge tensors are always detached
here: no gradient ever flows into the peer a piece of knowledge came from. Clean labels
never enter this module; they feed metrics only (see `cmd_ray.peer`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional

import torch
from torch.nn import functional as F

SCHEDULES = ("zero", "all", "static", "progressive")


def certainty(probs: torch.Tensor, kind: str = "entropy") -> torch.Tensor:
    """Certainty c(p) in [0, 1] of probability rows (..., C) -> (...).

    entropy: 1 - H(p) / log C (1 for one-hot, 0 for uniform); max_prob: max_c p_c.
    """
    if kind == "entropy":
        num_classes = probs.shape[-1]
        entropy = -(probs * torch.log(probs.clamp_min(1e-12))).sum(-1)
        return (1.0 - entropy / math.log(num_classes)).clamp(0.0, 1.0)
    if kind == "max_prob":
        return probs.max(-1).values
    raise ValueError(f"knowledge.certainty: got {kind!r}; allowed: entropy, max_prob")


def progressive_tau(
    progress: float,
    tau_start: float,
    tau_end: float,
    shape: str = "logistic",
    steepness: float = 10.0,
    midpoint: float = 0.5,
) -> float:
    """CMD-P threshold tau(s) = tau_start + (tau_end - tau_start) * g(s), s in [0, 1]."""
    s = min(max(progress, 0.0), 1.0)
    if shape == "logistic":
        g = 1.0 / (1.0 + math.exp(-steepness * (s - midpoint)))
    elif shape == "linear":
        g = s
    else:
        raise ValueError(f"knowledge.shape: got {shape!r}; allowed: logistic, linear")
    return tau_start + (tau_end - tau_start) * g


def threshold(
    schedule: str,
    progress: float,
    tau: float = 0.5,
    tau_start: float = 0.3,
    tau_end: float = 0.7,
    shape: str = "logistic",
    steepness: float = 10.0,
    midpoint: float = 0.5,
) -> float:
    """tau(s) for a schedule: `tau` (static), `progressive_tau` (progressive), -inf selects
    everything (all), +inf nothing (zero). Plain numbers: the `knowledge` section spells them."""
    if schedule == "all":
        return -math.inf
    if schedule == "zero":
        return math.inf
    if schedule == "static":
        return tau
    if schedule == "progressive":
        return progressive_tau(progress, tau_start, tau_end, shape, steepness, midpoint)
    raise ValueError(f"knowledge.schedule: got {schedule!r}; allowed: {', '.join(SCHEDULES)}")


def select(certainties: torch.Tensor, tau: float, threshold_on: str = "certainty") -> torch.Tensor:
    """Selection mask (J, B) bool: knowledge of source j on sample x is kept iff c >= threshold.

    threshold_on = certainty: the threshold is tau itself. quantile: the threshold is the
    tau-quantile of each source's certainties over the batch (about a 1 - tau fraction kept).
    """
    if math.isinf(tau):
        return torch.full_like(certainties, tau < 0, dtype=torch.bool)
    if threshold_on == "certainty":
        return certainties >= tau
    if threshold_on == "quantile":
        cut = torch.quantile(certainties.float(), tau, dim=-1, keepdim=True)
        return certainties >= cut
    raise ValueError(f"knowledge.threshold_on: got {threshold_on!r}; allowed: certainty, quantile")


def selected_target(
    source_logits: torch.Tensor, mask: torch.Tensor, temperature: float = 1.0
) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean of the selected sources' softmax(z / T) per sample.

    source_logits (J, B, C), mask (J, B) -> target (B, C), has_target (B,) bool. Rows with
    no selected source get a uniform placeholder and has_target False.
    """
    probs = F.softmax(source_logits.detach().float() / temperature, dim=-1)
    weights = mask.float()
    count = weights.sum(0)
    summed = (probs * weights[..., None]).sum(0)
    has_target = count > 0
    uniform = torch.full_like(summed, 1.0 / summed.shape[-1])
    target = torch.where(has_target[:, None], summed / count.clamp_min(1.0)[:, None], uniform)
    return target, has_target


@dataclass(frozen=True)
class Formulation:
    """How a method turns the peers' logits into a peer's loss (fixed for a run).

    schedule: zero | all | static | progressive (which knowledge is selected);
    certainty, threshold_on: see `certainty` and `select`; loss: kl | label_correction |
    target_mix (how selected knowledge enters the loss); weight, temperature: lambda, T of
    `kl`; epsilon: certainty (eps = g(s) c(q)) | trust (eps = g(s)) for label correction;
    label_trust: all | small_loss | joint_small_loss | agreement | mixture |
    small_loss_and_mixture (which noisy labels the label term keeps); joint_weight: JoCoR's
    lambda in the joint loss that joint_small_loss ranks by;
    target: soft | hard (distil q itself, or its argmax as a one-hot pseudo-label).
    """

    schedule: str
    certainty: str = "entropy"
    threshold_on: str = "certainty"
    loss: str = "kl"
    weight: float = 1.0
    temperature: float = 1.0
    epsilon: str = "certainty"
    label_trust: str = "all"
    target: str = "soft"  # soft: the peers' mean probabilities q | hard: one-hot argmax q
    joint_weight: float = 0.9  # lambda of the joint loss, label_trust joint_small_loss only


@dataclass(frozen=True)
class StepValues:
    """The scheduled quantities at one step: tau(s), the small-loss forget rate r(t), trust g(s), lambda(s)."""

    tau: float
    forget_rate: float = 0.0
    trust: float = 0.0
    weight: Optional[float] = None  # kl's lambda at this step; None = the formulation's constant weight


@dataclass
class LossParts:
    """A peer's loss for one batch, split for logging; `total` carries the gradient."""

    total: torch.Tensor
    ce: torch.Tensor  # the noisy-label term as it enters the loss (weighted, batch mean)
    distill: torch.Tensor  # the knowledge term as it enters the loss (weighted, batch mean)
    selected: torch.Tensor  # (B,) bool: sample got knowledge (co-teaching: sample was kept)
    target: Optional[torch.Tensor]  # (B, C) selected knowledge at T = 1, or None
    tau: float
    trusted: Optional[torch.Tensor] = None  # (B,) bool: noisy label kept by the label term; None = all


def kl_term(logits: torch.Tensor, target_t: torch.Tensor, temperature: float) -> torch.Tensor:
    """Per-sample T^2 * KL(q_T(x) || softmax(z(x) / T)), shape (B,)."""
    log_student = F.log_softmax(logits / temperature, dim=-1)
    kl = (target_t * (torch.log(target_t.clamp_min(1e-12)) - log_student)).sum(-1)
    return kl * temperature**2


def soft_cross_entropy(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Per-sample CE(z, q) = -sum_c q_c log softmax(z)_c against soft targets q (B, C) -> (B,)."""
    return -(target * F.log_softmax(logits, dim=-1)).sum(-1)


def global_trust(progress: float, steepness: float, midpoint: float) -> float:
    """g(s) = 1 / (1 + exp(-B (s - s0))): ProSelfLC's progressive trust in knowledge, about 0 -> 1."""
    return progressive_tau(progress, 0.0, 1.0, "logistic", steepness, midpoint)


def correction_epsilon(target: torch.Tensor, selected: torch.Tensor, trust: float, rule: str, kind: str):
    """eps(x) in [0, 1], (B,): g(s) * c(q(x)) (rule certainty) or g(s) (trust) where knowledge
    was selected, 0 elsewhere. The label-correction target is (1 - eps) onehot(y~) + eps q."""
    if rule == "certainty":
        per_sample = trust * certainty(target, kind)
    elif rule == "trust":
        per_sample = torch.full_like(target[:, 0], trust)
    else:
        raise ValueError(f"distill.epsilon: got {rule!r}; allowed: certainty, trust")
    return per_sample * selected.float()


def coteaching_keep(source_losses: torch.Tensor, forget_rate: float) -> torch.Tensor:
    """Keep the (1 - r) fraction of samples with the smallest loss under the other peers.

    source_losses (J, B) per-sample CE of each other peer -> keep mask (B,) bool (>= 1 kept).
    """
    mean_loss = source_losses.mean(0)
    batch = mean_loss.shape[0]
    num_keep = max(1, int((1.0 - forget_rate) * batch))
    keep = torch.zeros(batch, dtype=torch.bool, device=mean_loss.device)
    keep[torch.argsort(mean_loss, stable=True)[:num_keep]] = True
    return keep


def joint_loss(all_logits: list[torch.Tensor], noisy_labels: torch.Tensor, weight: float):
    """JoCoR's per-sample joint loss (B,) and its two parts (label, agreement), from every peer's
    logits (B, C) in peer order: (1 - lambda) sum_k CE(z_k, y~) + lambda / (P - 1) sum_{j != k}
    KL(p_j || p_k), lambda = `weight` (for P = 2, the published symmetric KL)."""
    peers = len(all_logits)
    log_probs = [F.log_softmax(z, dim=-1) for z in all_logits]
    label = (1.0 - weight) * torch.stack([F.nll_loss(lp, noisy_labels, reduction="none") for lp in log_probs]).sum(0)
    pairs = [
        (log_probs[j].exp() * (log_probs[j] - log_probs[k])).sum(-1)  # KL(p_j || p_k)
        for k in range(peers)
        for j in range(peers)
        if j != k
    ]
    agreement = (weight / (peers - 1)) * torch.stack(pairs).sum(0)
    return label + agreement, label, agreement


LABEL_TRUST = ("all", "small_loss", "joint_small_loss", "agreement", "mixture", "small_loss_and_mixture")


def clean_probability(losses: torch.Tensor, iterations: int = 10, tolerance: float = 1e-2, floor: float = 5e-4):
    """Posterior (N,) of the low-mean component of a two-component 1-D Gaussian mixture fitted by
    EM to per-sample losses (N,) scaled to [0, 1]: DivideMix's clean probability. Deterministic:
    a 2-means start from the extremes, then at most `iterations` EM steps, stopping when the mean
    log-likelihood moves less than `tolerance`; `floor` is added to each variance."""
    x = losses.detach().double().flatten().cpu()
    span = (x.max() - x.min()).clamp_min(1e-12)
    x = (x - x.min()) / span
    centres = torch.tensor([0.0, 1.0], dtype=torch.float64)
    for _ in range(10):
        nearest = (x[:, None] - centres).abs().argmin(1)
        centres = torch.stack([x[nearest == k].mean() if (nearest == k).any() else centres[k] for k in range(2)])
    responsibility = torch.nn.functional.one_hot(nearest, 2).double()
    previous = -math.inf
    for _ in range(iterations):
        mass = responsibility.sum(0) + 1e-10
        means = (responsibility * x[:, None]).sum(0) / mass
        variances = (responsibility * (x[:, None] - means) ** 2).sum(0) / mass + floor
        log_density = -0.5 * (2 * math.pi * variances).log() - (x[:, None] - means) ** 2 / (2 * variances)
        log_joint = (mass / len(x)).log() + log_density
        likelihood = float(torch.logsumexp(log_joint, 1).mean())
        responsibility = torch.softmax(log_joint, 1)
        if abs(likelihood - previous) < tolerance:
            break
        previous = likelihood
    return responsibility[:, int(means.argmin())].to(losses.device, torch.float32)


def label_clean_probability(logits: torch.Tensor, noisy_labels: torch.Tensor) -> torch.Tensor:
    """Each label's clean probability (N,) from a peer's logits (N, C) on the whole training split
    and the noisy labels (N,): `clean_probability` of the per-sample cross-entropy (DivideMix's
    co-division; CMD's `labels.trust: mixture`)."""
    losses = F.cross_entropy(logits.float(), noisy_labels.to(logits.device), reduction="none")
    return clean_probability(losses)


def trusted_labels(
    sources: torch.Tensor,
    noisy_labels: torch.Tensor,
    rule: str,
    forget_rate: float,
    target: torch.Tensor,
    selected: torch.Tensor,
    everyone: Optional[torch.Tensor] = None,
    joint_weight: float = 0.9,
    division: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """Which noisy labels the label term keeps, (B,) bool.

    all: every label. small_loss: the (1 - r) share of the batch with the smallest mean loss
    under the other peers (Co-teaching's rule; sources (J, B, C) their logits).
    joint_small_loss: the (1 - r) share with the smallest JoCoR joint loss over every peer
    (`everyone` (P, B, C), detached, this peer's own included), so all peers trust the same
    labels: those they both fit and agree on. agreement: every label except where selected
    knowledge names another class (argmax q != y~). mixture: `division` (B,) bool, the other
    peers' split of the batch by their loss mixture over the whole training set (made by the
    method's epoch hook); every label while there is none yet (the warm-up).
    small_loss_and_mixture: the labels both rules keep (small_loss alone while there is no
    division yet).
    """
    if rule == "all" or (rule == "mixture" and division is None):
        return torch.ones_like(noisy_labels, dtype=torch.bool)
    if rule == "mixture":
        return division.to(noisy_labels.device, torch.bool)
    if rule in ("small_loss", "small_loss_and_mixture"):
        losses = torch.stack([F.cross_entropy(s, noisy_labels, reduction="none") for s in sources])
        keep = coteaching_keep(losses, forget_rate)
        return keep if division is None else keep & division.to(keep.device, torch.bool)
    if rule == "joint_small_loss":
        if everyone is None:
            raise ValueError("labels.trust joint_small_loss needs every peer's logits")
        joint, _, _ = joint_loss(list(everyone), noisy_labels, joint_weight)
        return coteaching_keep(joint[None], forget_rate)
    if rule == "agreement":
        return ~(selected & (target.argmax(-1) != noisy_labels))
    raise ValueError(f"labels.trust: got {rule!r}; allowed: {', '.join(LABEL_TRUST)}")


def _shaped(target: torch.Tensor, kind: str) -> torch.Tensor:
    """The distilled target: q itself (soft) or the one-hot of its argmax (hard), (B, C)."""
    if kind == "soft":
        return target
    if kind == "hard":
        return F.one_hot(target.argmax(-1), target.shape[-1]).to(target.dtype)
    raise ValueError(f"distill.target: got {kind!r}; allowed: soft, hard")


def _batch_mean(weights: torch.Tensor, per_sample: torch.Tensor) -> torch.Tensor:
    return (weights * per_sample).mean()


def peer_loss(
    logits: torch.Tensor,
    peer_logits: torch.Tensor,
    peer_index: int,
    noisy_labels: torch.Tensor,
    form: Formulation,
    at: StepValues,
    division: Optional[torch.Tensor] = None,
) -> LossParts:
    """Loss of peer `peer_index` on one batch: select the other peers' knowledge, distil.

    logits (B, C) with gradient; peer_logits (P, B, C) every peer's logits on the same batch
    (row `peer_index` is this peer's own and is ignored as knowledge); noisy_labels (B,);
    division (B,) bool: the labels the other peers' loss mixture trusts (label_trust mixture).
    With t(x) = 1 where the label is trusted (`trusted_labels`), m(x) = 1 where knowledge q(x)
    was selected, and every term a mean over the whole batch:

    - kl: mean[t CE(z, y~)] + lambda mean[m T^2 KL(q_T || softmax(z / T))]
    - label_correction / target_mix: mean[t (1 - eps) CE(z, y~)] + mean[eps CE(z, q)], i.e. CE
      against (1 - eps) onehot(y~) + eps q where the label is trusted and eps q alone where not;
      eps from `correction_epsilon` with g(s) = `at.trust`.
    Co-teaching and its relatives have their own losses (`cmd_ray.methods`).
    """
    logits = logits.float()
    others = [j for j in range(peer_logits.shape[0]) if j != peer_index]
    sources = peer_logits[others].detach().float()
    label_ce = F.cross_entropy(logits, noisy_labels, reduction="none")
    probs = F.softmax(sources, dim=-1)
    mask = select(certainty(probs, form.certainty), at.tau, form.threshold_on)
    target, selected = selected_target(sources, mask, 1.0)
    everyone = peer_logits.detach().float() if form.label_trust == "joint_small_loss" else None
    trusted = trusted_labels(
        sources, noisy_labels, form.label_trust, at.forget_rate, target, selected, everyone, form.joint_weight, division
    )
    label_weight = trusted.float()
    if form.loss == "kl":
        t = form.temperature
        target_t = target if t == 1.0 else selected_target(sources, mask, t)[0]
        ce = _batch_mean(label_weight, label_ce)
        weight = form.weight if at.weight is None else at.weight
        distill = weight * _batch_mean(selected.float(), kl_term(logits, _shaped(target_t, form.target), t))
    elif form.loss in ("label_correction", "target_mix"):
        eps = correction_epsilon(target, selected, at.trust, form.epsilon, form.certainty)
        ce = _batch_mean(label_weight * (1.0 - eps), label_ce)
        distill = _batch_mean(eps, soft_cross_entropy(logits, _shaped(target, form.target)))
    else:
        raise ValueError(f"distill.loss: got {form.loss!r}; allowed: kl, label_correction, target_mix")
    total = ce + distill
    return LossParts(total, ce.detach(), distill.detach(), selected, target, at.tau, trusted)
