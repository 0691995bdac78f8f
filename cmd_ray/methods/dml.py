"""Deep Mutual Learning (Zhang et al., CVPR 2018): CMD with all knowledge selected.

Each peer minimises CE(z, y~) + KL(q || softmax(z)), q the other peers' mean probabilities,
with the published lambda = T = 1 whatever `distill.*` says.
"""

from __future__ import annotations

from typing import Any, Optional

from cmd_ray.methods.base import Method, Plan
from cmd_ray.methods.cmd import DistillationPlan


class DeepMutualLearning(Method):
    name = "dml"
    summary = "every peer distils all of the others' knowledge (Zhang et al., CVPR 2018)"

    def plan(self, cfg: Any, noise_rate: Optional[float]) -> Plan:
        from cmd_ray.knowledge import Formulation

        return DistillationPlan.of(cfg, Formulation("all"), None)


METHOD = DeepMutualLearning()
