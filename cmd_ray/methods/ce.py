"""Plain cross-entropy on the noisy labels: CMD with zero knowledge (no peer's knowledge is ever selected)."""

from __future__ import annotations

from typing import Any, Optional

from cmd_ray.methods.base import Method, Plan
from cmd_ray.methods.cmd import DistillationPlan


class CrossEntropy(Method):
    name = "ce"
    summary = "each peer alone on the noisy labels: zero knowledge, the floor every method must beat"

    def plan(self, cfg: Any, noise_rate: Optional[float]) -> Plan:
        from cmd_ray.knowledge import Formulation

        return DistillationPlan.of(cfg, Formulation("zero"), None)


METHOD = CrossEntropy()
