"""CMD (Li, Wang et al., arXiv 2106.01489): confident knowledge selection, then mutual distillation.

Each peer keeps, per sample, the other peers' knowledge whose certainty reaches the threshold
tau, and distils it on top of a loss on the noisy labels; CMD-S holds tau fixed, CMD-P raises
it over training (docs/METHOD.md). This module defines the `knowledge`, `distill` and
`labels` sections and `DistillationPlan`, which CE (zero knowledge: tau = +inf) and DML (all
knowledge: tau = -inf) reuse as CMD's special cases.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, ClassVar, Literal, Optional

from cmd_ray.errors import ConfigError, check_above, check_range
from cmd_ray.methods.base import Method, Plan, StepSchedule
from cmd_ray.methods.coteaching import ForgetSchedule

if TYPE_CHECKING:
    from cmd_ray.knowledge import Formulation, StepValues


@dataclass
class KnowledgeConfig:
    # Certainty c(p) of a peer's knowledge: entropy (1 - H(p)/log C) | max_prob.
    certainty: Literal["entropy", "max_prob"] = "entropy"
    # Compare c(p) with tau directly (certainty) or with the batch's tau-quantile (quantile).
    threshold_on: Literal["certainty", "quantile"] = "certainty"
    # CMD-S: static threshold.
    tau: float = 0.5
    # CMD-P: tau(s) = tau_start + (tau_end - tau_start) * g(s), s = training progress in [0, 1].
    tau_start: float = 0.3
    tau_end: float = 0.7
    shape: Literal["logistic", "linear"] = "logistic"
    steepness: float = 10.0  # B in g(s) = 1 / (1 + exp(-B (s - s0)))
    midpoint: float = 0.5  # s0
    # cmd-s / cmd-p: epochs at the start in which no knowledge is selected (the peers learn from
    # the label term alone before they distil each other's still-unformed knowledge); 0 = none.
    warmup_epochs: float = 0.0


@dataclass
class DistillConfig:
    """How selected knowledge q enters a cmd-s / cmd-p peer's loss (dml always uses kl)."""

    # kl: CE(z, y~) + lambda * T^2 * KL(q_T || softmax(z/T)) on selected rows (batch mean).
    # label_correction: CE(z, (1 - eps) onehot(y~) + eps q) with eps = g(s) * c(q) (or g(s), see
    #   epsilon) on selected rows, g(s) a logistic trust rising over training (ProSelfLC with a
    #   peer's knowledge in place of the model's own).
    # target_mix: the same target with a constant trust g = mix_weight.
    loss: Literal["kl", "label_correction", "target_mix"] = "kl"
    # lambda, kl only (dml keeps its published lambda = 1 whatever this says). 1 was chosen on
    # noisy validation splits over two regimes (docs/ACCURACY.md): 8 won slightly with the MLP in
    # the memorisation regime but stalled the small CNN at a short budget.
    weight: float = 1.0
    # lambda at the end of training, kl only: lambda rises (or falls) linearly with training
    # progress s from `weight` at s = 0 to this at s = 1, so the peers distil lightly while their
    # knowledge forms and heavily once the label term starts to fit wrong labels; null = constant.
    weight_end: Optional[float] = None
    temperature: float = 1.0  # T, kl only
    mix_weight: float = 1.0  # w, target_mix only
    # label_correction's eps: certainty = g(s) * c(q) (ProSelfLC) | trust = g(s) (selected knowledge
    # replaces the label entirely once g reaches 1).
    epsilon: Literal["certainty", "trust"] = "certainty"
    # soft: distil q, the selected peers' mean probabilities | hard: the one-hot of argmax q (a
    # pseudo-label; with a high threshold, FixMatch-style confident pseudo-labels between peers).
    target: Literal["soft", "hard"] = "soft"
    trust_steepness: float = 10.0  # B in g(s) = 1 / (1 + exp(-B (s - s0)))
    trust_midpoint: float = 0.5  # s0, in training progress s = step / total steps


@dataclass
class LabelsConfig:
    """Which noisy labels the label term of a cmd-s / cmd-p peer's loss keeps."""

    # all: every label | small_loss: the (1 - r(t)) share of each batch with the smallest loss
    # under the other peers (Co-teaching's rule, r(t) from coteaching.*) | joint_small_loss: the
    # (1 - r(t)) share with the smallest JoCoR joint loss over all peers (every peer trusts the
    # same labels: those the peers both fit and agree on) | agreement: every label except where
    # the selected knowledge names another class | mixture: per sample over the whole training
    # set, DivideMix's co-division: once an epoch each peer fits a two-component Gaussian mixture
    # to its own losses on every training sample, and a peer keeps the labels whose clean
    # probability under the other peers' mixtures exceeds mixture_threshold (needs no noise rate) |
    # small_loss_and_mixture: the labels both small_loss and mixture keep.
    # small_loss was chosen on a noisy validation split in the memorisation regime (docs/ACCURACY.md).
    trust: Literal["all", "small_loss", "joint_small_loss", "agreement", "mixture", "small_loss_and_mixture"] = (
        "small_loss"
    )
    # lambda of the joint loss (1 - lambda) sum CE + lambda sum KL that joint_small_loss ranks
    # samples by (JoCoR's published 0.9); joint_small_loss only.
    joint_weight: float = 0.9
    # mixture, small_loss_and_mixture: epochs before the first division (mixture keeps every
    # label in them, small_loss_and_mixture the small-loss share): the peers' losses separate
    # clean from noisy labels only once they have learnt the easy, clean ones.
    mixture_warm_up: int = 5
    # mixture, small_loss_and_mixture: the clean probability above which a label is kept
    # (DivideMix's p_threshold).
    mixture_threshold: float = 0.5


# The label trusts that drop the large-loss share r(t) of each batch (Co-teaching's schedule).
SMALL_LOSS_TRUST = ("small_loss", "joint_small_loss", "small_loss_and_mixture")
# The label trusts that read the other peers' loss mixtures (the epoch hook's values).
MIXTURE_TRUST = ("mixture", "small_loss_and_mixture")


def formulation_of(cfg: Any, schedule: str) -> Formulation:
    """CMD's formulation from the `knowledge`, `distill` and `labels` sections."""
    from cmd_ray.knowledge import Formulation

    k, d = cfg.knowledge, cfg.distill
    return Formulation(
        schedule=schedule,
        certainty=k.certainty,
        threshold_on=k.threshold_on,
        loss=d.loss,
        weight=d.weight,
        temperature=d.temperature,
        epsilon=d.epsilon,
        label_trust=cfg.labels.trust,
        target=d.target,
        joint_weight=cfg.labels.joint_weight,
    )


@dataclass(frozen=True)
class DistillationPlan(Plan):
    """Select the other peers' knowledge by the threshold of `form.schedule`, distil (CE, DML, CMD)."""

    form: Formulation
    knowledge: Any  # the knowledge section, for tau(s)
    forget: Optional[ForgetSchedule]  # labels.trust small_loss / joint_small_loss only
    trust_steepness: float = 10.0
    trust_midpoint: float = 0.5
    mix_weight: float = 1.0
    labels: LabelsConfig = field(default_factory=LabelsConfig)  # for labels.trust mixture's warm-up and threshold
    weight_end: Optional[float] = None  # distill.weight_end: lambda at s = 1 (cmd-s / cmd-p only)

    @classmethod
    def of(cls, cfg: Any, form: Formulation, noise_rate: Optional[float]) -> DistillationPlan:
        forget = ForgetSchedule.of(cfg, noise_rate) if form.label_trust in SMALL_LOSS_TRUST else None
        d = cfg.distill
        weight_end = d.weight_end if form.schedule in ("static", "progressive") else None  # dml keeps lambda 1
        return cls(
            form, cfg.knowledge, forget, d.trust_steepness, d.trust_midpoint, d.mix_weight, cfg.labels, weight_end
        )

    def values(self, when: StepSchedule) -> StepValues:
        """tau(s), r(t), the label-correction trust g(s) and lambda(s) at a step."""
        from cmd_ray.knowledge import StepValues, global_trust, threshold

        forget_rate = self.forget.at(when) if self.forget is not None else 0.0
        if self.form.loss == "target_mix":
            trust = self.mix_weight
        else:
            trust = global_trust(when.progress, self.trust_steepness, self.trust_midpoint)
        k = self.knowledge
        tau = threshold(
            self.form.schedule,
            when.progress,
            tau=k.tau,
            tau_start=k.tau_start,
            tau_end=k.tau_end,
            shape=k.shape,
            steepness=k.steepness,
            midpoint=k.midpoint,
        )
        if self.form.schedule in ("static", "progressive") and when.epoch_progress < k.warmup_epochs:
            tau = math.inf  # warm-up: no knowledge selected yet
        weight = None
        if self.weight_end is not None:
            weight = self.form.weight + (self.weight_end - self.form.weight) * when.progress
        return StepValues(tau, forget_rate, trust, weight)

    def wants_epoch_values(self, epoch: int) -> bool:
        return self.form.label_trust in MIXTURE_TRUST and epoch >= self.labels.mixture_warm_up

    def epoch_values(self, peer_index, logits, noisy_labels, epoch):
        """This peer's clean probability of every training label, (N, 1) (labels.trust mixture)."""
        from cmd_ray.knowledge import label_clean_probability

        return label_clean_probability(logits, noisy_labels)[:, None]

    def loss(self, peer_index, logits, peer_logits, noisy_labels, when, inputs=None):
        from cmd_ray.knowledge import peer_loss

        division = None
        values = inputs.epoch_values() if inputs is not None else None
        if self.form.label_trust in MIXTURE_TRUST and values is not None:
            others = [j for j in range(values.shape[0]) if j != peer_index]
            division = values[others, :, 0].mean(0) > self.labels.mixture_threshold
        return peer_loss(logits, peer_logits, peer_index, noisy_labels, self.form, self.values(when), division)


class _Cmd(Method):
    sections = {"knowledge": KnowledgeConfig, "distill": DistillConfig, "labels": LabelsConfig}
    reads = ("knowledge", "distill", "labels", "coteaching")
    schedule: ClassVar[str]  # which threshold tau(s) follows: static | progressive
    noise_rate_hint = ", or labels.trust: all"

    def check_sections(self, cfg: Any) -> None:
        k, d = cfg.knowledge, cfg.distill
        for name in ("tau", "tau_start", "tau_end", "midpoint"):
            check_range(f"knowledge.{name}", getattr(k, name), 0.0, 1.0)
        check_above("knowledge.steepness", k.steepness, 0)
        check_above("knowledge.warmup_epochs", k.warmup_epochs, 0, inclusive=True)
        check_range("labels.joint_weight", cfg.labels.joint_weight, 0.0, 1.0)
        check_range("labels.mixture_threshold", cfg.labels.mixture_threshold, 0.0, 1.0)
        if not isinstance(cfg.labels.mixture_warm_up, int) or cfg.labels.mixture_warm_up < 0:
            raise ConfigError(f"labels.mixture_warm_up: got {cfg.labels.mixture_warm_up!r}; allowed: an integer >= 0")
        check_above("distill.weight", d.weight, 0, inclusive=True)
        if d.weight_end is not None:
            check_above("distill.weight_end", d.weight_end, 0, inclusive=True)
        check_above("distill.temperature", d.temperature, 0)
        check_range("distill.mix_weight", d.mix_weight, 0.0, 1.0)
        check_above("distill.trust_steepness", d.trust_steepness, 0)
        check_range("distill.trust_midpoint", d.trust_midpoint, 0.0, 1.0)

    def needs_noise_rate(self, cfg: Any) -> bool:
        return cfg.labels.trust in SMALL_LOSS_TRUST

    def unread_keys(self, cfg: Any) -> dict[str, str]:
        unread = super().unread_keys(cfg)
        loss, trust = cfg.distill.loss, cfg.labels.trust
        when_read = {  # key -> (read with these settings, when that is)
            "distill.weight": (loss == "kl", "distill.loss kl"),
            "distill.weight_end": (loss == "kl", "distill.loss kl"),
            "distill.temperature": (loss == "kl", "distill.loss kl"),
            "distill.epsilon": (loss != "kl", "distill.loss label_correction or target_mix"),
            "distill.trust_steepness": (loss == "label_correction", "distill.loss label_correction"),
            "distill.trust_midpoint": (loss == "label_correction", "distill.loss label_correction"),
            "distill.mix_weight": (loss == "target_mix", "distill.loss target_mix"),
            "labels.joint_weight": (trust == "joint_small_loss", "labels.trust joint_small_loss"),
            "labels.mixture_warm_up": (trust in MIXTURE_TRUST, "labels.trust " + " or ".join(MIXTURE_TRUST)),
            "labels.mixture_threshold": (trust in MIXTURE_TRUST, "labels.trust " + " or ".join(MIXTURE_TRUST)),
            "coteaching.forget_rate": (trust in SMALL_LOSS_TRUST, "labels.trust " + " or ".join(SMALL_LOSS_TRUST)),
            "coteaching.ramp_epochs": (trust in SMALL_LOSS_TRUST, "labels.trust " + " or ".join(SMALL_LOSS_TRUST)),
        }
        unread.update(
            {key: f"{self.name} reads it only with {when}" for key, (read, when) in when_read.items() if not read}
        )
        return unread

    def plan(self, cfg: Any, noise_rate: Optional[float]) -> Plan:
        return DistillationPlan.of(cfg, formulation_of(cfg, self.schedule), noise_rate)


class CmdS(_Cmd):
    name = "cmd-s"
    summary = "confident knowledge selection at a static threshold knowledge.tau, then mutual distillation"
    schedule = "static"
    ignored_keys = frozenset(f"knowledge.{k}" for k in ("tau_start", "tau_end", "shape", "steepness", "midpoint"))


class CmdP(_Cmd):
    name = "cmd-p"
    summary = "confident knowledge selection at a threshold rising over training, then mutual distillation"
    schedule = "progressive"
    ignored_keys = frozenset({"knowledge.tau"})


CMD_S = CmdS()
CMD_P = CmdP()
