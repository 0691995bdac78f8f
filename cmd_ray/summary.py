"""Per-epoch records, the console progress line and the run summary JSON.

Shared by the in-process trainer and the Ray Train path so both report the same keys.
"""

from __future__ import annotations

import math
import time
from typing import Any

from cmd_ray.config import Config
from cmd_ray.metrics import accuracy, ensemble_key, mean_key, peer_key
from cmd_ray.peer import epoch_metrics


def epoch_record(
    epoch: int,
    peer_counts: list[dict[str, float]],
    test_accuracy: dict[str, float],  # peerK/test_accuracy, ensemble/...; also val_accuracy with a validation split
    train_seconds: float,
    exchange_seconds: float,
) -> dict[str, Any]:
    """Flat dict of one epoch's metrics: `peerK/<metric>`, `ensemble/test_accuracy`, timing."""
    record: dict[str, Any] = {"epoch": epoch, "finished_at": time.time()}
    for k, counts in enumerate(peer_counts):
        for key, value in epoch_metrics(counts).items():
            record[peer_key(k, key)] = value
    record.update(test_accuracy)
    for split in ("test", "val"):
        if peer_key(0, accuracy(split)) in test_accuracy:
            peer_accuracy = [test_accuracy[peer_key(k, accuracy(split))] for k in range(len(peer_counts))]
            record[mean_key(accuracy(split))] = sum(peer_accuracy) / len(peer_accuracy)
    samples = peer_counts[0].get("samples", 0.0) if peer_counts else 0.0
    record["train_seconds"] = train_seconds
    record["samples_per_second"] = samples / train_seconds if train_seconds > 0 else float("nan")
    record["exchange_seconds"] = exchange_seconds
    record["exchange_fraction"] = exchange_seconds / train_seconds if train_seconds > 0 else float("nan")
    for key in (
        "selected_fraction",
        "selection_precision",
        "label_correction_rate",
        "memorisation",
        "tau",
        "trusted_fraction",
        "trusted_precision",
        "disagreement",
    ):
        values = [record[peer_key(k, key)] for k in range(len(peer_counts))]
        finite = [v for v in values if not math.isnan(v)]
        record[mean_key(key)] = sum(finite) / len(finite) if finite else float("nan")
    return record


def _fmt(value: float, pct: bool = True) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "  -  "
    return f"{100 * value:5.1f}" if pct else f"{value:.3f}"


def headline_split(record: dict[str, Any]) -> str:
    """'test' when the run has a test split, else 'val' (a user's data set without one: the
    accuracy on the held-out noisy labels is then what a run reports)."""
    return "test" if peer_key(0, accuracy("test")) in record else "val"


def progress_line(record: dict[str, Any], peers: int, epochs: int, label: str = "") -> str:
    """One readable line per epoch for the console (`label` tells concurrent runs apart)."""
    split = headline_split(record)
    accs = " ".join(_fmt(record[peer_key(k, accuracy(split))]) for k in range(peers))
    ensemble = _fmt(record[ensemble_key(accuracy(split))])
    name = "test acc" if split == "test" else "val (noisy) acc"
    val = (
        f"  val (noisy) {_fmt(record[mean_key('val_accuracy')])}"
        if split == "test" and mean_key("val_accuracy") in record
        else ""
    )
    return (
        (f"[{label}] " if label else "")
        + f"epoch {record['epoch'] + 1:>3}/{epochs}  {name} % [{accs}] ens {ensemble}"
        + val
        + f"  loss {record[peer_key(0, 'loss')]:.3f}  tau {_fmt(record[mean_key('tau')], pct=False)}"
        f"  sel {_fmt(record[mean_key('selected_fraction')])}% prec {_fmt(record[mean_key('selection_precision')])}%"
        f"  mem {_fmt(record[mean_key('memorisation')])}%  disagree {_fmt(record.get(mean_key('disagreement')))}%"
        f"  {record['samples_per_second']:.0f} samples/s"
        f"  exch {100 * record['exchange_fraction']:.1f}%"
    )


def _noise_settings(cfg: Config) -> dict[str, Any]:
    """The settings that define the run's noise (noise.rate only where a rate is asked for)."""
    n = cfg.noise
    if n.type == "labels":
        return {k: v for k, v in n.describe().items() if k != "type"}
    return {"none": {}, "matrix": {"matrix": n.matrix}}.get(n.type, {"rate": n.rate})


def summarise(cfg: Config, history: list[dict[str, Any]], noise: dict, extra: dict | None = None) -> dict[str, Any]:
    """Run summary: final and best accuracy per peer and ensemble on the clean test set (or, with
    no test split, on the noisy validation split: `<split>_accuracy`, named by `headline`),
    selection, speed."""
    last = history[-1]
    split = headline_split(last)
    metric = accuracy(split)
    keys = {f"peer{k}": peer_key(k, metric) for k in range(cfg.peers)} | {"ensemble": ensemble_key(metric)}
    per_network = {
        name: {
            "final": last[key],
            "best": max(r[key] for r in history),
            "best_epoch": max(range(len(history)), key=lambda i: history[i][key]) + 1,
        }
        for name, key in keys.items()
    }
    steady = history[1:] if len(history) > 1 else history
    summary = {
        "method": cfg.method,
        "peers": cfg.peers,
        "epochs": len(history),
        "dataset": cfg.data.name,
        "train_samples": int(last.get("train_samples", 0)),
        "test_samples": int(last.get("test_samples", 0)),
        "noise": {"type": cfg.noise.type, **_noise_settings(cfg), **{k: v for k, v in noise.items() if k != "noise"}},
        metric: per_network,
        "headline": mean_key(metric),
        "selected_fraction": {f"peer{k}": last[peer_key(k, "selected_fraction")] for k in range(cfg.peers)},
        "selection_precision": {f"peer{k}": last[peer_key(k, "selection_precision")] for k in range(cfg.peers)},
        "label_correction_rate": {f"peer{k}": last[peer_key(k, "label_correction_rate")] for k in range(cfg.peers)},
        "memorisation": {f"peer{k}": last[peer_key(k, "memorisation")] for k in range(cfg.peers)},
        "samples_per_second": sum(r["samples_per_second"] for r in steady) / len(steady),
        "exchange_fraction": sum(r["exchange_fraction"] for r in steady) / len(steady),
        "history": history,
        "config": cfg.to_dict(),
    }
    summary.update(extra or {})
    return summary
