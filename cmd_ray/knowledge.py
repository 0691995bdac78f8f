"""Confident knowledge selection and mutual distillation: the CMD maths (DESIGN.md section 1).

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

SCHEDULES = ("zero", "all", "static", "progressive", "coteaching")


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


def threshold(schedule: str, progress: float, knowledge_cfg) -> float:
    """tau(s) for a schedule: -inf selects everything (all), +inf nothing (zero, coteaching)."""
    if schedule == "all":
        return -math.inf
    if schedule in ("zero", "coteaching"):
        return math.inf
    if schedule == "static":
        return knowledge_cfg.tau
    if schedule == "progressive":
        k = knowledge_cfg
        return progressive_tau(progress, k.tau_start, k.tau_end, k.shape, k.steepness, k.midpoint)
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


@dataclass
class LossParts:
    """A peer's loss for one batch, split for logging; `total` carries the gradient."""

    total: torch.Tensor
    ce: torch.Tensor
    distill: torch.Tensor
    selected: torch.Tensor  # (B,) bool: sample got distillation / was kept
    target: Optional[torch.Tensor]  # (B, C) selected knowledge at T = 1, or None
    tau: float


def kl_distillation(
    logits: torch.Tensor,
    noisy_labels: torch.Tensor,
    target_t: torch.Tensor,
    selected: torch.Tensor,
    temperature: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(CE(z, y~), distillation term); the peer's loss is CE + lambda * distillation.

    distill = mean over the whole batch of m(x) * T^2 * KL(q_T(x) || softmax(z(x) / T)).
    """
    ce = F.cross_entropy(logits, noisy_labels)
    log_student = F.log_softmax(logits / temperature, dim=-1)
    kl = (target_t * (torch.log(target_t.clamp_min(1e-12)) - log_student)).sum(-1)
    distill = (selected.float() * kl).mean() * temperature**2
    return ce, distill


def target_mix_loss(
    logits: torch.Tensor,
    noisy_labels: torch.Tensor,
    target: torch.Tensor,
    selected: torch.Tensor,
    mix_weight: float,
    certainty_kind: str,
) -> tuple[torch.Tensor, torch.Tensor]:
    """CE against q = (1 - e) onehot(y~) + e * target on selected rows, e = w * c(target).

    Returns (loss, plain CE on the noisy labels for logging).
    """
    onehot = F.one_hot(noisy_labels, logits.shape[-1]).float()
    e = (mix_weight * certainty(target, certainty_kind) * selected.float())[:, None]
    mixed = (1.0 - e) * onehot + e * target
    log_probs = F.log_softmax(logits, dim=-1)
    loss = -(mixed * log_probs).sum(-1).mean()
    ce = F.nll_loss(log_probs, noisy_labels)
    return loss, ce


def coteaching_forget_rate(epoch_progress: float, forget_rate: float, ramp_epochs: float) -> float:
    """r(t) = r_max * min(t / T_k, 1) with t and T_k in epochs."""
    if ramp_epochs <= 0:
        return forget_rate
    return forget_rate * min(epoch_progress / ramp_epochs, 1.0)


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


def peer_loss(
    logits: torch.Tensor,
    peer_logits: torch.Tensor,
    peer_index: int,
    noisy_labels: torch.Tensor,
    schedule: str,
    tau: float,
    cfg,
    forget_rate: float = 0.0,
) -> LossParts:
    """Loss of peer `peer_index` on one batch: select the other peers' knowledge, distil.

    logits (B, C) with gradient; peer_logits (P, B, C) every peer's logits on the same batch
    (row `peer_index` is this peer's own and is ignored as knowledge); noisy_labels (B,).
    `cfg` is the run Config (uses knowledge.*, distill.*). For coteaching, `forget_rate` is
    r(t). Every term is a mean over the whole batch.
    """
    logits = logits.float()
    others = [j for j in range(peer_logits.shape[0]) if j != peer_index]
    sources = peer_logits[others].detach().float()
    if schedule == "coteaching":
        losses = torch.stack([F.cross_entropy(s, noisy_labels, reduction="none") for s in sources])
        keep = coteaching_keep(losses, forget_rate)
        ce = F.cross_entropy(logits[keep], noisy_labels[keep])
        return LossParts(ce, ce.detach(), torch.zeros(()), keep, None, math.inf)

    k = cfg.knowledge
    probs = F.softmax(sources, dim=-1)
    mask = select(certainty(probs, k.certainty), tau, k.threshold_on)
    target, selected = selected_target(sources, mask, 1.0)
    d = cfg.distill
    if d.loss == "kl":
        target_t = target if d.temperature == 1.0 else selected_target(sources, mask, d.temperature)[0]
        ce, distill = kl_distillation(logits, noisy_labels, target_t, selected, d.temperature)
        total = ce + d.weight * distill
    elif d.loss == "target_mix":
        total, ce = target_mix_loss(logits, noisy_labels, target, selected, d.mix_weight, k.certainty)
        distill = total - ce
    else:
        raise ValueError(f"distill.loss: got {d.loss!r}; allowed: kl, target_mix")
    return LossParts(total, ce.detach(), distill.detach(), selected, target, tau)
