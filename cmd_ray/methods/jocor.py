"""JoCoR (Wei et al., CVPR 2020): the peers trained together on the small-loss samples of a joint loss.

Per sample, the joint loss of P = 2 peers is

    l(x) = (1 - lambda) (CE(z_1, y~) + CE(z_2, y~)) + lambda (KL(p_1 || p_2) + KL(p_2 || p_1)),

the (1 - r(t)) share of the batch with the smallest l is kept (Co-teaching's schedule,
`coteaching.*`), and both peers step on the mean of l over it. Every peer computes the same
l from the exchanged logits, so all keep the same samples; its gradient reaches this peer's
weights through this peer's own logits only, which is exactly the joint update split across
the peers. With P > 2 the co-regularisation is lambda / (P - 1) times the sum of KL(p_j || p_k)
over every ordered pair of peers (for P = 2, the published term).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Optional

from cmd_ray.errors import check_range
from cmd_ray.methods.base import Method, Plan
from cmd_ray.methods.coteaching import ForgetSchedule


@dataclass
class JocorConfig:
    # lambda, the weight of the co-regularisation (agreement) term. 0.9: the authors' best for
    # CIFAR-10 at symmetric 20% / 50% and asymmetric 40% (0.65 at symmetric 80%, 0.85 for CIFAR-100).
    weight: float = 0.9


@dataclass(frozen=True)
class JocorPlan(Plan):
    forget: ForgetSchedule
    weight: float

    def loss(self, peer_index, logits, peer_logits, noisy_labels, when, inputs=None):
        from cmd_ray.knowledge import LossParts, coteaching_keep, joint_loss

        own = logits.float()
        exchanged = peer_logits.detach().float()
        all_logits = [own if k == peer_index else exchanged[k] for k in range(exchanged.shape[0])]
        joint, label, agreement = joint_loss(all_logits, noisy_labels, self.weight)
        keep = coteaching_keep(joint.detach()[None], self.forget.at(when))
        label_part, agreement_part = label[keep].mean().detach(), agreement[keep].mean().detach()
        return LossParts(joint[keep].mean(), label_part, agreement_part, keep, None, math.inf, keep)


class Jocor(Method):
    name = "jocor"
    summary = "both peers on the small-loss samples of a joint CE + agreement loss (Wei et al., CVPR 2020)"
    sections = {"jocor": JocorConfig}
    reads = ("jocor", "coteaching")

    def check_sections(self, cfg: Any) -> None:
        check_range("jocor.weight", cfg.jocor.weight, 0.0, 1.0)

    def needs_noise_rate(self, cfg: Any) -> bool:
        return True

    def plan(self, cfg: Any, noise_rate: Optional[float]) -> Plan:
        return JocorPlan(ForgetSchedule.of(cfg, noise_rate), cfg.jocor.weight)


METHOD = Jocor()
