"""DivideMix (Li, Socher and Hoi, ICLR 2020): each peer divides the data for the other, then both
train semi-supervised with MixMatch.

Published algorithm (two networks), as run here for peers k and j:
1. Warm-up (`dividemix.warm_up` epochs): cross-entropy on the noisy labels, every sample (with
   `dividemix.confidence_penalty`, the negative-entropy term the authors add for asymmetric noise).
2. Co-divide, once an epoch: each peer's per-sample cross-entropy over the whole training set (eval
   mode, unaugmented), scaled to [0, 1], gets a two-component 1-D Gaussian mixture; a sample's
   clean probability w is the posterior of the low-loss component. Peer k trains on the division
   of peer j: labelled where w_j > `dividemix.p_threshold`, unlabelled otherwise.
3. Label co-refinement (labelled): target w y + (1 - w) p_k(x), sharpened at temperature T.
   Co-guessing (unlabelled): target the mean of both peers' predictions, sharpened.
4. MixMatch: mixup of the batch with a shuffled copy (lambda ~ Beta(alpha, alpha), lambda >=
   1/2), then L = L_x (soft cross-entropy, labelled) + lambda_u r(t) L_u (squared error of the
   probabilities, unlabelled; r ramps 0 -> 1 over the 16 epochs after warm-up) + a penalty
   pulling the mean prediction to uniform.

Where this engine differs from the authors' code, and why:
- One batch holds both sets: the batch's samples are split by the other peer's division (the
  code draws a labelled and an unlabelled batch of 64 each). Each peer steps once per batch.
- One view per sample: the batch as the engine gives it (`data.augment` decides its crop and
  flip, shared by both peers); the code averages each network's predictions over two augmented
  views. For an MLP on flat images with `data.augment: false`, the guesses are the peers'
  predictions on the image itself, and mixup is the only augmentation.
- The guess uses the other peer's logits from the exchange (training mode, this batch), so both
  peers train at once instead of in turn; co-division uses both peers' losses gathered through
  the same exchange at the start of every epoch.
- The mixture is fitted by hand (EM in torch, float64, k-means start; 10 iterations, tolerance
  1e-2, variance floor 5e-4: scikit-learn's GaussianMixture as the authors call it): no new
  dependency for 30 lines, the same numbers on any device, nothing random.
- With P > 2 peers, a peer is divided by the mean clean probability of the others and co-guesses
  with all of them (for P = 2, the published rule).
lambda_u's default 25 is the authors' CIFAR-10 symmetric-50% value (they use 0 for 20%, 50 for
80%, 0 for asymmetric 40%); it is one setting for every noise model here, chosen per regime on
the noisy validation split like every method's settings.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Optional

from cmd_ray.errors import check_range
from cmd_ray.methods.base import Method, Plan, StepInputs

if TYPE_CHECKING:
    import torch

# Epochs over which lambda_u ramps from 0 to its value after warm-up (the authors' code: 16).
RAMP_UP_EPOCHS = 16


@dataclass
class DivideMixConfig:
    # Epochs of plain cross-entropy before the first co-division (authors: 10 for CIFAR-10, 30 for CIFAR-100).
    warm_up: int = 10
    # Clean probability above which the other peer's division keeps a sample labelled (authors: 0.5).
    p_threshold: float = 0.5
    # Weight of the unlabelled (squared-error) term after its ramp (authors: 0-150 by noise; 25 at CIFAR-10 sym 50%).
    lambda_u: float = 25.0
    # Sharpening temperature of the refined labels and the guesses (authors: 0.5).
    temperature: float = 0.5
    # Beta(alpha, alpha) of mixup (authors: 4).
    alpha: float = 4.0
    # Add the negative-entropy penalty during warm-up (the authors' code does for asymmetric noise).
    confidence_penalty: bool = False


def sharpen(probabilities: torch.Tensor, temperature: float) -> torch.Tensor:
    """p^(1/T), renormalised per row; (B, C) -> (B, C)."""
    powered = probabilities ** (1.0 / temperature)
    return powered / powered.sum(-1, keepdim=True)


@dataclass(frozen=True)
class DivideMixPlan(Plan):
    settings: DivideMixConfig

    def wants_epoch_values(self, epoch: int) -> bool:
        return epoch >= self.settings.warm_up

    def epoch_values(self, peer_index, logits, noisy_labels, epoch):
        from cmd_ray.knowledge import label_clean_probability

        return label_clean_probability(logits, noisy_labels)[:, None]

    def loss(self, peer_index, logits, peer_logits, noisy_labels, when, inputs=None):
        epoch = when.step // max(when.steps_per_epoch, 1)
        if epoch < self.settings.warm_up:
            return self._warm_up(logits, noisy_labels)
        if inputs is None or inputs.epoch_values() is None:
            raise ValueError("dividemix: a step after warm-up needs the co-division of the epoch hook")
        return self._mixmatch(peer_index, logits, peer_logits, noisy_labels, when, inputs)

    def _warm_up(self, logits, noisy_labels):
        import torch
        import torch.nn.functional as F

        from cmd_ray.knowledge import LossParts

        ce = F.cross_entropy(logits, noisy_labels)
        total = ce
        if self.settings.confidence_penalty:
            probabilities = torch.softmax(logits, -1)
            total = ce + (probabilities * probabilities.clamp_min(1e-12).log()).sum(-1).mean()
        none = torch.zeros(len(noisy_labels), dtype=torch.bool, device=logits.device)
        return LossParts(total, ce.detach(), torch.zeros(()), none, None, math.inf)

    def _mixmatch(self, peer_index, logits, peer_logits, noisy_labels, when, inputs: StepInputs):
        import numpy as np
        import torch
        import torch.nn.functional as F

        from cmd_ray.knowledge import LossParts, soft_cross_entropy

        s = self.settings
        peers = peer_logits.shape[0]
        others = [j for j in range(peers) if j != peer_index]
        clean = inputs.epoch_values()[others, :, 0].mean(0)  # (B,) the others' division of this batch
        labelled = clean > s.p_threshold
        with torch.no_grad():
            own = torch.softmax(logits.detach().float(), -1)
            everyone = torch.softmax(peer_logits.detach().float(), -1)
            everyone[peer_index] = own
            one_hot = F.one_hot(noisy_labels, own.shape[-1]).float()
            w = clean[:, None].to(own.device)
            refined = sharpen(w * one_hot + (1 - w) * own, s.temperature)
            guessed = sharpen(everyone.mean(0), s.temperature)
            target = torch.where(labelled[:, None], refined, guessed)
        # The step's draws from its seed and the peer: the same on a Ray worker and in process.
        draw_seed = inputs.seed * 31 + peer_index
        mix = float(np.random.default_rng(draw_seed).beta(s.alpha, s.alpha))
        mix = max(mix, 1.0 - mix)
        generator = torch.Generator().manual_seed(draw_seed)
        order = torch.randperm(len(noisy_labels), generator=generator).to(inputs.images.device)
        mixed_images = mix * inputs.images + (1 - mix) * inputs.images[order]
        mixed_target = mix * target + (1 - mix) * target[order.to(target.device)]
        mixed_logits = inputs.forward(mixed_images)
        zero = mixed_logits.sum() * 0.0  # a set with no sample adds nothing (and keeps the graph)
        label_term, guess_term = zero, zero
        if labelled.any():
            label_term = soft_cross_entropy(mixed_logits[labelled], mixed_target[labelled]).mean()
        unlabelled = ~labelled
        if unlabelled.any():
            probabilities = torch.softmax(mixed_logits[unlabelled], -1)
            guess_term = ((probabilities - mixed_target[unlabelled]) ** 2).mean()
        ramp = min(max((when.epoch_progress - s.warm_up) / RAMP_UP_EPOCHS, 0.0), 1.0)
        mean_prediction = torch.softmax(mixed_logits, -1).mean(0)
        prior = torch.full_like(mean_prediction, 1.0 / mean_prediction.numel())
        penalty = (prior * (prior / mean_prediction).log()).sum()
        unlabelled_part = s.lambda_u * ramp * guess_term
        total = label_term + unlabelled_part + penalty
        return LossParts(total, label_term.detach(), unlabelled_part.detach(), labelled, None, math.inf, labelled)


class DivideMix(Method):
    name = "dividemix"
    summary = "peers divide the data for each other by a loss mixture, then MixMatch (Li et al., ICLR 2020)"
    sections = {"dividemix": DivideMixConfig}
    reads = ("dividemix",)

    def check_sections(self, cfg: Any) -> None:
        d = cfg.dividemix
        if d.warm_up < 0:
            from cmd_ray.errors import ConfigError

            raise ConfigError(f"dividemix.warm_up: got {d.warm_up!r}; allowed: an integer >= 0")
        check_range("dividemix.p_threshold", d.p_threshold, 0.0, 1.0)
        check_range("dividemix.lambda_u", d.lambda_u, 0.0, 1e6)
        check_range("dividemix.temperature", d.temperature, 1e-3, 10.0)
        check_range("dividemix.alpha", d.alpha, 1e-3, 100.0)

    def unread_keys(self, cfg: Any) -> dict[str, str]:
        unread = super().unread_keys(cfg)
        if cfg.dividemix.warm_up == 0:
            unread["dividemix.confidence_penalty"] = f"{self.name} reads it only in its warm-up, with warm_up > 0"
        if cfg.dividemix.warm_up >= cfg.epochs:  # every epoch is warm-up: no division, no MixMatch
            for name in ("p_threshold", "lambda_u", "temperature", "alpha"):
                unread[f"dividemix.{name}"] = f"{self.name} reads it only after its warm-up, with warm_up < epochs"
        return unread

    def plan(self, cfg: Any, noise_rate: Optional[float]) -> Plan:
        return DivideMixPlan(cfg.dividemix)


METHOD = DivideMix()
