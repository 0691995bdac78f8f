"""Co-teaching+ (Yu et al., ICML 2019): Co-teaching restricted to the samples the peers disagree on.

Per batch, the samples where the peers' predictions differ form the disagreement set; each
peer trains on the small-loss share of that set as judged by the other peers (Co-teaching's
rule and schedule, `coteaching.*`). During the first `coteaching_plus.init_epochs` epochs it is
plain Co-teaching (the authors' code: 0 for MNIST, 20 of 200 for CIFAR-10, 5 for CIFAR-100).
With P > 2 peers a sample is in the disagreement set when any two peers predict differently.

Two departures from the authors' code, both toward the paper's Algorithm 1: the loss is CE on
the logits (the code passes softmax outputs into a second softmax), and a batch without
disagreement updates nothing (the code trains on all of it while `epoch * i < 5000`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional

from cmd_ray.errors import check_above
from cmd_ray.methods.base import Method, Plan
from cmd_ray.methods.coteaching import ForgetSchedule, small_loss_parts


@dataclass
class CoteachingPlusConfig:
    # Epochs of plain Co-teaching before the disagreement rule starts (the authors' MNIST setting: 0).
    init_epochs: float = 0.0


def disagreement(peer_logits):
    """(B,) bool: the samples on which not every peer predicts the same class. peer_logits (P, B, C)."""
    predictions = peer_logits.argmax(-1)
    return (predictions != predictions[:1]).any(0)


@dataclass(frozen=True)
class CoteachingPlusPlan(Plan):
    forget: ForgetSchedule
    init_epochs: float  # epochs of plain Co-teaching

    def loss(self, peer_index, logits, peer_logits, noisy_labels, when, inputs=None):
        others = [j for j in range(peer_logits.shape[0]) if j != peer_index]
        sources = peer_logits[others].detach().float()
        among = None if when.epoch_progress < self.init_epochs else disagreement(peer_logits.detach())
        return small_loss_parts(logits.float(), sources, noisy_labels, self.forget.at(when), among)


class CoteachingPlus(Method):
    name = "coteaching+"
    summary = "Co-teaching on the samples where the peers disagree (Yu et al., ICML 2019)"
    sections = {"coteaching_plus": CoteachingPlusConfig}
    reads = ("coteaching_plus", "coteaching")

    def check_sections(self, cfg: Any) -> None:
        check_above("coteaching_plus.init_epochs", cfg.coteaching_plus.init_epochs, 0, inclusive=True)

    def needs_noise_rate(self, cfg: Any) -> bool:
        return True

    def plan(self, cfg: Any, noise_rate: Optional[float]) -> Plan:
        return CoteachingPlusPlan(ForgetSchedule.of(cfg, noise_rate), cfg.coteaching_plus.init_epochs)


METHOD = CoteachingPlus()
