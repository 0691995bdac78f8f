"""What a noisy-label method is to cmd-ray: a name, its config section, its per-run plan and its loss.

A method module (one per method, registered in `cmd_ray.methods`) defines a `Method`: the
config section it brings (a dataclass of documented defaults), the checks of its values, and
`plan(cfg, noise_rate)`, which fixes everything that is constant over a run (the formulation,
the forget-rate ceiling) and returns a `Plan`. A plan's `loss` turns one batch into one peer's
`LossParts`, given the peer's own logits (with gradient), every peer's exchanged logits and
the noisy labels; the Ray workers and the in-process trainer call it the same way. Methods that
need more of a step (sample ids, the images, another forward pass, per-sample state kept across
epochs and checkpoints, values each peer computes over the whole training set once an epoch and
shares with the others) read it from the `StepInputs` the engine passes beside, and say when
they want the epoch hook (`wants_epoch_values`, `epoch_values`).

Method modules are read by config validation, which must not import torch (`cmd-ray --help`
and `show-config` stay fast): they import torch and `cmd_ray.knowledge` inside their loss
functions, never at module level.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
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


@dataclass
class StepInputs:
    """What a method may read of one step beyond the logits and noisy labels.

    sample_ids index the training split (0 .. N - 1), so they address per-sample state; the
    images are the batch exactly as the peer forwarded it (normalised, augmented as the run
    asks); `forward` runs this peer's network on other inputs in training mode with the
    gradient kept, under the peer's own random stream and precision (a second forward pass, as
    MixMatch needs). `state` is this peer's method state: tensors the method keeps across steps,
    saved in every checkpoint and restored with the peer (Ray and in-process alike); the engine
    puts the last epoch hook's shared values there as `state[EPOCH_VALUES]` (P, N, K).
    """

    sample_ids: torch.Tensor  # (B,) long: positions in the training split
    images: torch.Tensor  # (B, C, H, W) float
    forward: Callable[[torch.Tensor], torch.Tensor]  # images (b, C, H, W) -> logits (b, C), with graph
    seed: int  # the step's seed (shared by every peer); draw a method's random numbers from it
    state: dict[str, torch.Tensor] = field(default_factory=dict)

    def epoch_values(self) -> Optional[torch.Tensor]:
        """Every peer's epoch-hook values at this batch's samples, (P, B, K); None before any."""
        values = self.state.get(EPOCH_VALUES)
        return None if values is None else values[:, self.sample_ids.to(values.device)]


# The key of `StepInputs.state` under which the engine keeps the epoch hook's shared values.
EPOCH_VALUES = "epoch_values"


class Plan:
    """A method fixed for one run: `loss` is called once per peer and step."""

    def loss(
        self,
        peer_index: int,
        logits: torch.Tensor,
        peer_logits: torch.Tensor,
        noisy_labels: torch.Tensor,
        when: StepSchedule,
        inputs: Optional[StepInputs] = None,
    ) -> LossParts:
        """Loss of peer `peer_index` on one batch. logits (B, C) this peer's own, with gradient;
        peer_logits (P, B, C) every peer's logits on the batch in peer order (row `peer_index`
        holds this peer's own values, detached); noisy_labels (B,); inputs: the rest of the step
        (the engine always passes it; unit tests of methods that do not read it may leave it out).
        Clean labels never enter."""
        raise NotImplementedError

    def wants_epoch_values(self, epoch: int) -> bool:
        """Whether the epoch hook runs before epoch `epoch` (0-based) trains; by default never."""
        return False

    def epoch_values(
        self, peer_index: int, logits: torch.Tensor, noisy_labels: torch.Tensor, epoch: int
    ) -> torch.Tensor:
        """The epoch hook: this peer's per-sample values (N, K) to share with every peer for the
        epoch's steps. logits (N, C): this peer's network in eval mode on every training sample,
        unaugmented, in training-split order; noisy_labels (N,). The engine gathers every peer's
        values into `StepInputs.state[EPOCH_VALUES]` (P, N, K) through the run's exchange."""
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
    # Keys of sections it reads that this method never reads (left out of a validation
    # candidate's name); `unread_keys` adds those its own settings leave unread.
    ignored_keys: ClassVar[frozenset[str]] = frozenset()
    # Appended to the "give coteaching.forget_rate" error when the method has another way out.
    noise_rate_hint: ClassVar[str] = ""

    def unread_keys(self, cfg: Any) -> dict[str, str]:
        """Dotted keys of the sections this method reads that a run with `cfg` never reads, each
        with why (e.g. {"labels.mixture_threshold": "cmd-p reads it only with labels.trust mixture
        or small_loss_and_mixture"}): a grid over one gives identical trials."""
        return {key: f"{self.name} does not read it" for key in self.ignored_keys}

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
