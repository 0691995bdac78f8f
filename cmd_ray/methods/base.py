"""What a noisy-label method is to cmd-ray: a name, its config section, its per-run plan and its loss.

A method module (one per method, registered in `cmd_ray.methods`) defines a `Method`: the
config section it brings (a dataclass of documented defaults), the checks of its values, and
`plan(cfg, noise_rate)`, which fixes everything that is constant over a run (the formulation,
the forget-rate ceiling) and returns a `Plan`. A plan's `loss` turns one batch into one peer's
`LossParts`, given the peer's own logits (with gradient), every peer's exchanged logits and
the noisy labels; the Ray workers and the in-process trainer call it the same way.

Method modules are read by config validation, which must not import torch (`cmd-ray --help`
and `show-config` stay fast): they import torch and `cmd_ray.knowledge` inside their loss
functions, never at module level.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar, Optional

from cmd_ray.errors import ConfigError

if TYPE_CHECKING:
    import torch

    from cmd_ray.knowledge import LossParts


@dataclass(frozen=True)
class StepSchedule:
    """Where training stands at a step: what schedules (tau(s), r(t), g(s)) are functions of."""

    step: int  # global step, 0-based
    total_steps: int
    steps_per_epoch: int

    @property
    def progress(self) -> float:
        """s = step / total steps, in [0, 1]."""
        return self.step / max(self.total_steps, 1)

    @property
    def epoch_progress(self) -> float:
        """t = steps done in epochs (fractional)."""
        return self.step / max(self.steps_per_epoch, 1)


class Plan:
    """A method fixed for one run: `loss` is called once per peer and step."""

    def loss(
        self,
        peer_index: int,
        logits: torch.Tensor,
        peer_logits: torch.Tensor,
        noisy_labels: torch.Tensor,
        when: StepSchedule,
    ) -> LossParts:
        """Loss of peer `peer_index` on one batch. logits (B, C) this peer's own, with gradient;
        peer_logits (P, B, C) every peer's logits on the batch in peer order (row `peer_index`
        holds this peer's own values, detached); noisy_labels (B,). Clean labels never enter."""
        raise NotImplementedError


class Method:
    """A noisy-label method as cmd-ray knows it; subclass it in one module and register it."""

    name: ClassVar[str]  # what `method:` says, e.g. "jocor"
    summary: ClassVar[str]  # one line: what it does and where it was published
    # Config sections this method brings: top-level key -> dataclass of documented defaults.
    # A section may be shared (read) by other methods; it is defined by exactly one.
    sections: ClassVar[dict[str, type]] = {}
    # Every config section whose values this method reads (its own and shared ones).
    reads: ClassVar[tuple[str, ...]] = ()
    # The most peers the method is defined for (None = any P >= 2).
    max_peers: ClassVar[Optional[int]] = None
    # Keys of shared sections this method ignores, left out of a validation candidate's name.
    ignored_keys: ClassVar[frozenset[str]] = frozenset()
    # Appended to the "give coteaching.forget_rate" error when the method has another way out.
    noise_rate_hint: ClassVar[str] = ""

    def check(self, cfg: Any) -> None:
        """Raise ConfigError (one line naming the field) for values this method cannot run with.
        Range checks of a section belong to the method that defines it (`check_sections`)."""
        if self.max_peers is not None and cfg.peers > self.max_peers:
            raise ConfigError(f"peers: got {cfg.peers}; allowed with method {self.name}: 2 to {self.max_peers}")

    def check_sections(self, cfg: Any) -> None:
        """Range checks of the sections this method defines; run whatever the method is."""

    def needs_noise_rate(self, cfg: Any) -> bool:
        """Whether a run needs the share of wrong labels (a small-loss forget rate); when it does
        and the noise model cannot say, the user must give `coteaching.forget_rate`."""
        return False

    def plan(self, cfg: Any, noise_rate: Optional[float]) -> Plan:
        """The method fixed for a run. noise_rate: the noise model's expected flip rate when
        `needs_noise_rate`, else None."""
        raise NotImplementedError
