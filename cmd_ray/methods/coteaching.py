"""Co-teaching (Han et al., NeurIPS 2018): each peer trains on the samples the other peers find easy.

Per batch, the other peers' per-sample cross-entropy ranks the samples; this peer takes a
gradient from the (1 - r(t)) share with the smallest loss, r(t) = r_max * min(t / T_k, 1)
with t in epochs (updated every step here, every epoch in the authors' code). r_max is the
noise model's expected flip rate unless `coteaching.forget_rate` says otherwise; the same
small-loss schedule serves Co-teaching+, JoCoR and CMD's `labels.trust: small_loss`, which is
why this module defines the `coteaching` section they all read.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Optional

from cmd_ray.errors import check_above, check_range
from cmd_ray.methods.base import Method, Plan, StepSchedule

if TYPE_CHECKING:
    import torch

    from cmd_ray.knowledge import LossParts


@dataclass
class CoteachingConfig:
    """The small-loss schedule of coteaching, coteaching+, jocor and `labels.trust: small_loss`."""

    # r_max: fraction of large-loss samples dropped at full ramp; None = the noise model's expected
    # flip rate (Co-teaching assumes it known): noise.rate for symmetric and pairflip, noise.rate x
    # (mapped classes / C) for asymmetric, 1 - mean diagonal for matrix, 0 for none.
    forget_rate: Optional[float] = None
    # T_k: epochs over which the drop rate ramps linearly from 0 to r_max.
    ramp_epochs: float = 10.0


def forget_ceiling(cfg: Any, noise_rate: Optional[float]) -> float:
    """r_max: `coteaching.forget_rate`, or the noise model's expected flip rate."""
    return cfg.coteaching.forget_rate if cfg.coteaching.forget_rate is not None else float(noise_rate)


@dataclass(frozen=True)
class ForgetSchedule:
    """r(t) = r_max * min(t / T_k, 1), t in epochs."""

    ceiling: float  # r_max
    ramp_epochs: float  # T_k

    @classmethod
    def of(cls, cfg: Any, noise_rate: Optional[float]) -> ForgetSchedule:
        return cls(forget_ceiling(cfg, noise_rate), cfg.coteaching.ramp_epochs)

    def at(self, when: StepSchedule) -> float:
        if self.ramp_epochs <= 0:
            return self.ceiling
        return self.ceiling * min(when.epoch_progress / self.ramp_epochs, 1.0)


def small_loss_parts(
    logits: torch.Tensor, sources: torch.Tensor, noisy_labels: torch.Tensor, forget_rate: float, among=None
) -> LossParts:
    """Mean CE(z, y~) over the small-loss share of the samples as judged by `sources` (J, B, C),
    the other peers' logits; `among` (B,) bool limits the candidates (Co-teaching+'s disagreement
    set). With no candidate the loss is zero and nothing is kept."""
    import torch
    from torch.nn import functional as F

    from cmd_ray.knowledge import LossParts, coteaching_keep

    label_ce = F.cross_entropy(logits, noisy_labels, reduction="none")
    if among is None:
        losses = torch.stack([F.cross_entropy(s, noisy_labels, reduction="none") for s in sources])
        keep = coteaching_keep(losses, forget_rate)
    else:
        keep = torch.zeros_like(among)
        candidates = among.nonzero().squeeze(-1)
        if len(candidates):
            picked = sources[:, candidates]
            losses = torch.stack([F.cross_entropy(s, noisy_labels[candidates], reduction="none") for s in picked])
            keep[candidates[coteaching_keep(losses, forget_rate)]] = True
    ce = label_ce[keep].mean() if keep.any() else (label_ce * 0.0).sum()
    return LossParts(ce, ce.detach(), torch.zeros(()), keep, None, math.inf, keep)


@dataclass(frozen=True)
class CoteachingPlan(Plan):
    forget: ForgetSchedule

    def loss(self, peer_index, logits, peer_logits, noisy_labels, when, inputs=None):
        others = [j for j in range(peer_logits.shape[0]) if j != peer_index]
        sources = peer_logits[others].detach().float()
        return small_loss_parts(logits.float(), sources, noisy_labels, self.forget.at(when))


class Coteaching(Method):
    name = "coteaching"
    summary = "each peer trains on the small-loss samples of the others (Han et al., NeurIPS 2018)"
    sections = {"coteaching": CoteachingConfig}
    reads = ("coteaching",)

    def check_sections(self, cfg: Any) -> None:
        if cfg.coteaching.forget_rate is not None:
            check_range("coteaching.forget_rate", cfg.coteaching.forget_rate, 0.0, 1.0)
        check_above("coteaching.ramp_epochs", cfg.coteaching.ramp_epochs, 0, inclusive=True)

    def needs_noise_rate(self, cfg: Any) -> bool:
        return True

    def plan(self, cfg: Any, noise_rate: Optional[float]) -> Plan:
        return CoteachingPlan(ForgetSchedule.of(cfg, noise_rate))


METHOD = Coteaching()
