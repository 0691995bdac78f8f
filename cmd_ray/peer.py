"""One peer network and its training step: the code both the Ray workers and the in-process
trainer run. Only how the peers' logits are exchanged differs between the two.

A step is: `forward` (own logits on the batch) -> exchange (caller's business) ->
`peer_step` (select the others' confident knowledge, distil, backward, optimiser step,
count metrics). Clean labels enter `step_counts` only, never the loss.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Optional

import torch
from torch import nn

from cmd_ray import methods
from cmd_ray.batches import augment, normalise
from cmd_ray.config import Config
from cmd_ray.data import DataBundle, Split
from cmd_ray.datasets import DATASETS, Augmentation, DatasetInfo, augmentation
from cmd_ray.errors import NonFiniteLossError
from cmd_ray.knowledge import LossParts
from cmd_ray.methods import Plan, StepInputs, StepSchedule
from cmd_ray.metrics import accuracy, ensemble_key, peer_key
from cmd_ray.models import build_model
from cmd_ray.noise import expected_flip_rate


@dataclass
class Peer:
    """A peer network with its optimiser, learning-rate schedule and own random stream.

    Each peer keeps its own RNG state (dropout) so that stepping P peers in one process
    draws exactly the numbers P separate worker processes would, and its method's state
    (`StepInputs.state`), saved and restored with it.
    """

    index: int
    model: nn.Module  # possibly DDP-wrapped on the Ray path; see `unwrap`
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    autocast_bf16: bool = False
    rng_state: Optional[torch.Tensor] = None
    method_state: dict[str, torch.Tensor] = field(default_factory=dict)


def build_peer(cfg: Config, index: int, info: DatasetInfo, total_steps: int, device: torch.device) -> Peer:
    """Peer `index` with weights seeded by (seed, index), so a run is reproducible."""
    height, _, channels = info.shape
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(cfg.seed * 1000 + index)
        model = build_model(cfg.peer_models()[index], info.num_classes, channels, height).to(device)
    o = cfg.optim
    if o.name == "adam":
        optimizer = torch.optim.Adam(model.parameters(), lr=o.lr, weight_decay=o.weight_decay)
    else:
        optimizer = torch.optim.SGD(
            model.parameters(), lr=o.lr, momentum=o.momentum, weight_decay=o.weight_decay, nesterov=o.momentum > 0
        )
    if o.schedule == "cosine":
        scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=max(total_steps, 1))
    else:
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda _: 1.0)
    rng_state = torch.Generator().manual_seed(cfg.seed * 1000 + index + 500).get_state()
    return Peer(index, model, optimizer, scheduler, device, cfg.precision == "bf16", rng_state)


def unwrap(model: nn.Module) -> nn.Module:
    """The bare network under a DistributedDataParallel wrapper (or the model itself)."""
    return model.module if isinstance(model, nn.parallel.DistributedDataParallel) else model


def peer_state(peer: Peer, epoch: int) -> dict:
    """Everything needed to resume a peer after `epoch` epochs (tensors and plain types only)."""
    return {
        "peer": peer.index,
        "epoch": epoch,
        "model": unwrap(peer.model).state_dict(),
        "optimizer": peer.optimizer.state_dict(),
        "scheduler": peer.scheduler.state_dict(),
        "rng_state": peer.rng_state,
        "method_state": {key: value.cpu() for key, value in peer.method_state.items()},
    }


def load_peer_state(peer: Peer, state: dict) -> int:
    """Restore a peer saved by `peer_state`; return the number of epochs it had finished."""
    if state["peer"] != peer.index:
        raise ValueError(f"checkpoint holds peer {state['peer']}, not peer {peer.index}")
    unwrap(peer.model).load_state_dict(state["model"])
    peer.optimizer.load_state_dict(state["optimizer"])
    peer.scheduler.load_state_dict(state["scheduler"])
    peer.rng_state = state["rng_state"]
    # Checkpoints written before methods kept state have none: nothing to restore.
    peer.method_state = {key: value.to(peer.device) for key, value in state.get("method_state", {}).items()}
    return int(state["epoch"])


@dataclass
class Batch:
    """One training batch as every peer sees it (labels on the peer's device)."""

    images: torch.Tensor  # float (B, C, H, W), normalised, augmented if asked
    noisy_labels: torch.Tensor  # (B,)
    clean_labels: Optional[torch.Tensor]  # (B,) metrics only; None where no clean labels exist
    index: torch.Tensor  # (B,) sample ids, for checking that peers agree
    positions: Optional[torch.Tensor] = None  # (B,) positions in the split (per-sample method state)


def make_batch(
    split: Split,
    positions: torch.Tensor,
    info: DatasetInfo,
    device: torch.device,
    augment_seed: Optional[int] = None,
    policy: Optional[Augmentation] = None,
) -> Batch:
    """Gather, augment (when a `policy` and a seed are given) with a seeded generator,
    normalise, move to `device`."""
    images = split.images[positions]
    if augment_seed is not None and policy is not None:
        generator = torch.Generator().manual_seed(augment_seed)
        images = augment(images, generator, policy.crop_padding, policy.flip)
    return Batch(
        images=normalise(images.to(device, non_blocking=True), info),
        noisy_labels=split.noisy_labels[positions].to(device),
        clean_labels=None if split.clean_labels is None else split.clean_labels[positions].to(device),
        index=split.index[positions].to(device),
        positions=positions.to(device),
    )


def run_augmentation(cfg: Config, info: DatasetInfo) -> Optional[Augmentation]:
    """The run's augmentation (None = none), from data.augment, data.flip and the image side."""
    return augmentation(cfg.data.name, cfg.data.augment, info.shape[0], cfg.data.flip)


def augment_seed(cfg: Config, epoch: int, step: int) -> int:
    """Seed of a step's augmentation, shared by every peer."""
    return (cfg.seed * 1_000_003 + epoch) * 100_003 + step


def _autocast(peer: Peer):
    if peer.autocast_bf16:
        return torch.autocast(device_type=peer.device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


@contextlib.contextmanager
def _own_rng(peer: Peer):
    """Run with the peer's own CPU RNG stream (dropout), then hand the global one back."""
    if peer.rng_state is None or peer.device.type != "cpu":
        yield
        return
    saved = torch.get_rng_state()
    torch.set_rng_state(peer.rng_state)
    try:
        yield
    finally:
        peer.rng_state = torch.get_rng_state()
        torch.set_rng_state(saved)


def forward(peer: Peer, images: torch.Tensor) -> torch.Tensor:
    """Own logits (B, C) in training mode, with the graph kept for `peer_step`."""
    peer.model.train()
    with _own_rng(peer), _autocast(peer):
        return peer.model(images).float()


def step_inputs(peer: Peer, batch: Batch, seed: int) -> StepInputs:
    """What the method may read of this step beside the logits (see `StepInputs`)."""
    positions = batch.positions if batch.positions is not None else torch.arange(len(batch.index))
    return StepInputs(positions, batch.images, lambda images: forward(peer, images), seed, peer.method_state)


def method_plan(cfg: Config, num_classes: Optional[int] = None) -> Plan:
    """The run's method fixed for the run (once, not per step): its schedules, and the noise
    model's expected flip rate where the method's small-loss rule needs it and
    `coteaching.forget_rate` does not give it. num_classes: of the data (None = from the noise
    model's own data set or file)."""
    method = methods.get(cfg.method)
    noise_rate = None
    if method.needs_noise_rate(cfg) and cfg.coteaching.forget_rate is None:
        if num_classes is None and cfg.data.name in DATASETS:
            num_classes = DATASETS[cfg.data.name].num_classes
        noise_rate = expected_flip_rate(cfg.noise, num_classes, cfg.data.name)
    return method.plan(cfg, noise_rate)


COUNT_KEYS = (
    "samples",
    "loss_sum",
    "ce_sum",
    "distill_sum",
    "selected",
    "selected_correct",
    "noisy",
    "corrected",
    "memorised",
    "train_correct",
    "trusted",
    "trusted_clean",
    "disagreed",
)


CLEAN_COUNT_KEYS = ("selected_correct", "noisy", "corrected", "memorised", "train_correct", "trusted_clean")


def step_counts(parts: LossParts, logits: torch.Tensor, batch: Batch) -> dict[str, float]:
    """Sums over one batch, to be added up over an epoch (clean labels used here only).

    selected_correct: selected samples whose knowledge (argmax of the target) is the clean
    label; for co-teaching, kept samples whose noisy label is clean. corrected: noisy-labelled
    samples whose selected knowledge names the clean label. memorised: noisy-labelled samples
    the peer predicts with their noisy label. trusted / trusted_clean: labels the label term
    kept, and those of them that are clean. Without clean labels these counts are NaN, so
    every rate built on them is NaN ("not available"), never a rate against the noisy labels.
    """
    n = batch.noisy_labels.shape[0]
    selected = parts.selected
    trusted = parts.trusted if parts.trusted is not None else torch.ones_like(selected)
    counts = {
        "samples": float(n),
        "loss_sum": float(parts.total.detach()) * n,
        "ce_sum": float(parts.ce) * n,
        "distill_sum": float(parts.distill) * n,
        "selected": float(selected.sum()),
        "trusted": float(trusted.sum()),
    }
    if batch.clean_labels is None:
        return {**counts, **dict.fromkeys(CLEAN_COUNT_KEYS, float("nan"))}
    prediction = logits.detach().argmax(-1)
    is_noisy = batch.noisy_labels != batch.clean_labels
    if parts.target is not None:
        knowledge_right = parts.target.argmax(-1) == batch.clean_labels
    else:
        knowledge_right = ~is_noisy
    return {
        **counts,
        "selected_correct": float((selected & knowledge_right).sum()),
        "noisy": float(is_noisy.sum()),
        "corrected": float((selected & is_noisy & knowledge_right).sum()),
        "memorised": float((is_noisy & (prediction == batch.noisy_labels)).sum()),
        "train_correct": float((prediction == batch.clean_labels).sum()),
        "trusted_clean": float((trusted & ~is_noisy).sum()),
    }


def disagreement_count(index: int, peer_logits: torch.Tensor) -> float:
    """Samples of the batch on which peer `index` predicts another class than the other peers,
    averaged over them: sum_b (1 / (P - 1)) sum_{j != index} [argmax z_index,b != argmax z_j,b].

    peer_logits (P, B, C): every peer's logits on the batch, as exchanged. For two peers this
    counts the samples the pair disagree on (Co-teaching+'s disagreement set); it needs no clean
    label, so it is reported for user data too."""
    predictions = peer_logits.detach().argmax(-1)
    others = [j for j in range(predictions.shape[0]) if j != index]
    if not others:
        return 0.0
    differ = torch.stack([predictions[index] != predictions[j] for j in others]).float().mean(0)
    return float(differ.sum())


@dataclass
class StepResult:
    """What one peer step did: summed counts for the epoch, the selection mask, the loss."""

    counts: dict[str, float]
    selected: torch.Tensor  # (B,) bool
    loss: float


def peer_step(
    plan: Plan,
    peer: Peer,
    logits: torch.Tensor,
    peer_logits: torch.Tensor,
    batch: Batch,
    when: StepSchedule,
    seed: int = 0,
) -> StepResult:
    """Select, distil, step: one optimiser step of `peer` given every peer's logits.

    plan: the run's method (`method_plan`); logits (B, C): this peer's own, with graph (from
    `forward`); peer_logits (P, B, C): all peers' detached logits on the same batch, in peer
    order; seed: the step's seed, for a method's own random draws. Raises NonFiniteLossError
    naming the peer, epoch and step if the loss is NaN or inf.
    """
    parts = plan.loss(peer.index, logits, peer_logits, batch.noisy_labels, when, step_inputs(peer, batch, seed))
    if not torch.isfinite(parts.total):
        epoch = when.step // max(when.steps_per_epoch, 1) + 1
        raise NonFiniteLossError(
            f"peer {peer.index}: loss is {float(parts.total.detach())} at epoch {epoch}, global step {when.step}; "
            "stopping instead of training through it"
        )
    peer.optimizer.zero_grad(set_to_none=True)
    parts.total.backward()
    peer.optimizer.step()
    peer.scheduler.step()
    counts = step_counts(parts, logits, batch)
    counts["tau_sum"] = (parts.tau if math.isfinite(parts.tau) else float("nan")) * counts["samples"]
    counts["disagreed"] = disagreement_count(peer.index, peer_logits)
    return StepResult(counts, parts.selected.detach().cpu(), float(parts.total.detach()))


def add_counts(total: dict[str, float], counts: dict[str, float]) -> dict[str, float]:
    for key, value in counts.items():
        total[key] = total.get(key, 0.0) + value
    return total


def epoch_metrics(counts: dict[str, float]) -> dict[str, float]:
    """Turn an epoch's summed counts into rates (docs/METHOD.md, Metrics)."""
    n = max(counts.get("samples", 0.0), 1.0)
    selected = counts.get("selected", 0.0)
    noisy = counts.get("noisy", 0.0)
    nan = float("nan")
    return {
        "loss": counts.get("loss_sum", 0.0) / n,
        "ce_loss": counts.get("ce_sum", 0.0) / n,
        "distill_loss": counts.get("distill_sum", 0.0) / n,
        "tau": counts.get("tau_sum", float("nan")) / n,
        "selected_fraction": selected / n,
        "selection_precision": counts.get("selected_correct", 0.0) / selected if selected else float("nan"),
        "label_correction_rate": counts.get("corrected", 0.0) / noisy if noisy else float("nan"),
        "memorisation": counts.get("memorised", 0.0) / noisy if noisy else float("nan"),
        "train_clean_accuracy": counts.get("train_correct", 0.0) / n,
        "trusted_fraction": counts.get("trusted", 0.0) / n,
        "trusted_precision": counts.get("trusted_clean", 0.0) / counts["trusted"] if counts.get("trusted") else nan,
        "disagreement": counts.get("disagreed", nan) / n,
    }


@torch.no_grad()
def eval_logits(peer: Peer, split: Split, info: DatasetInfo, batch_size: int = 1000) -> torch.Tensor:
    """Logits (N, C) on every image of a split, unaugmented, in eval mode; no batch is dropped."""
    peer.model.eval()
    out = []
    for positions in torch.arange(len(split)).split(batch_size):
        images = normalise(split.images[positions].to(peer.device), info)
        with _autocast(peer):
            out.append(peer.model(images).float().cpu())
    return torch.cat(out)


def test_probabilities(peer: Peer, split: Split, info: DatasetInfo, batch_size: int = 1000) -> torch.Tensor:
    """Softmax outputs (N, C) on every image of a split, in eval mode; no batch is dropped."""
    return torch.softmax(eval_logits(peer, split, info, batch_size), -1)


def correct_counts(peer_probs: list[torch.Tensor], labels: torch.Tensor) -> torch.Tensor:
    """Correct predictions (P + 1,) of each peer and, last, of their ensemble (mean softmax)."""
    ensemble = torch.stack(peer_probs).mean(0)
    return torch.tensor([float((p.argmax(-1) == labels).sum()) for p in [*peer_probs, ensemble]])


def accuracy_names(peers: int, split: str = "test") -> list[str]:
    """Metric names of `correct_counts`' entries: peerK/<split>_accuracy, then the ensemble's."""
    return [peer_key(k, accuracy(split)) for k in range(peers)] + [ensemble_key(accuracy(split))]


def scored_splits(data: DataBundle) -> list[tuple[str, Split, torch.Tensor]]:
    """The splits scored after every epoch, each with the labels it is scored against: the test
    set on its clean labels, the validation split on its *noisy* labels (choosing settings never
    sees a clean label)."""
    splits = []
    if data.test is not None:
        splits.append(("test", data.test, data.test.clean_labels))
    if data.validation is not None:
        splits.append(("val", data.validation, data.validation.noisy_labels))
    return splits


# (split, its labels) -> every peer's softmax outputs (n, C) on the part of the split this
# process scores, and those samples' labels (n,).
ProbabilitiesOf = Callable[[Split, torch.Tensor], tuple[list[torch.Tensor], torch.Tensor]]


def evaluate(
    data: DataBundle, probabilities_of: ProbabilitiesOf, reduce: Optional[Callable[[torch.Tensor], torch.Tensor]] = None
) -> dict[str, float]:
    """Accuracy of every peer and of their ensemble (mean of softmax outputs) on each scored split:
    `peerK/<split>_accuracy`, `ensemble/<split>_accuracy`. One path for both placements, like
    the exchange: in process, `probabilities_of` runs every peer on the whole split and there is
    nothing to `reduce`; on Ray workers it scores this worker's shard with the peers' outputs
    gathered, and `reduce` sums the correct counts (P + 1,) over the workers."""
    accuracy = {}
    for name, split, labels in scored_splits(data):
        probs, part_labels = probabilities_of(split, labels)
        correct = correct_counts(probs, part_labels)
        if reduce is not None:
            correct = reduce(correct)
        accuracy.update(zip(accuracy_names(len(probs), name), (correct / max(len(split), 1)).tolist()))
    return accuracy


def steps_per_epoch(cfg: Config, data: DataBundle) -> int:
    return (len(data.train) + cfg.batch_size - 1) // cfg.batch_size
