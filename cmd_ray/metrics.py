"""The names of a run's metrics, one home for the spelling every record, table, plot and W&B chart
shares: `peer<k>/<metric>` per peer, `mean/<metric>` over the peers, `ensemble/<split>_accuracy`
for the peers' averaged prediction. Pure strings: imported by the torch-free results and the
peer step alike.
"""

from __future__ import annotations


def peer_key(peer: int, metric: str) -> str:
    """One peer's metric, e.g. peer_key(0, "loss") = "peer0/loss"."""
    return f"peer{peer}/{metric}"


def mean_key(metric: str) -> str:
    """The peers' mean of a metric, e.g. "mean/memorisation"."""
    return f"mean/{metric}"


def ensemble_key(metric: str) -> str:
    """A metric of the peers' averaged prediction, e.g. "ensemble/test_accuracy"."""
    return f"ensemble/{metric}"


def accuracy(split: str) -> str:
    """Accuracy on a split: test (clean labels) or val (the held-out *noisy* labels)."""
    return f"{split}_accuracy"


def is_metric(key: str) -> bool:
    """Whether a record's key is a per-peer, mean or ensemble metric (not epoch, timing, ...)."""
    return key.split("/", 1)[0] in ("mean", "ensemble") or key.startswith("peer") and "/" in key


# The headline: mean clean test accuracy; without a test split, mean accuracy on the noisy
# validation labels.
TEST_ACCURACY = mean_key(accuracy("test"))
VALIDATION_ACCURACY = mean_key(accuracy("val"))
