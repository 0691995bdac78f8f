"""`cmd-ray report`: a sweep's tables and findings (`cmd_ray.results`) printed, then its PNG
plots drawn: accuracy, selection and the peers' disagreement against the epoch, final accuracy
against the noise rate; one colour per method (or grid variant) in every panel. No Ray.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Callable
from pathlib import Path
from typing import Any, Optional

from cmd_ray.config import NOISE_READS
from cmd_ray.metrics import mean_key
from cmd_ray.results import (
    ACCURACY,
    VALIDATION,
    cell_labels,
    findings,
    headline_metric,
    images_evaluated,
    known_value,
    mean_std,
    method_order,
    noise_label,
    read_joined,
    report_table,
    selection_table,
    table_caption,
    trial_finals,
)
from cmd_ray.storage import join, save_figure

Curves = dict[tuple[str, str], tuple[list[int], list[float]]]


def _epoch_curves(finished: list[dict[str, Any]], metric: str) -> Curves:
    """Mean over seeds of `metric` per (noise, cell label) and epoch: {(noise, label): (epochs, values)}."""
    labels = cell_labels(finished)
    acc: dict[tuple[str, str, int], list[float]] = defaultdict(list)
    for r in finished:
        if r.get(metric) is not None:
            acc[(noise_label(r), labels[r["trial_id"]], r["epoch"])].append(r[metric])
    out: Curves = {}
    for (noise, label, epoch), values in sorted(acc.items()):
        xs, ys = out.setdefault((noise, label), ([], []))
        xs.append(epoch + 1)
        ys.append(sum(values) / len(values))
    return out


def _plot_epoch_grid(
    finished: list[dict[str, Any]],
    metrics: list[tuple[str, str]],
    labels: list[str],
    colour: dict[str, Any],
    path: str,
    mark_best: bool = False,
) -> str:
    """One row of panels per metric, one column per noise setting, one line per run label;
    `mark_best` puts a star on each curve's best epoch (where plain training peaks before it
    fits the noisy labels, the field's signature picture)."""
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    noises = sorted({noise_label(r) for r in finished})
    fig, axes = plt.subplots(len(metrics), len(noises), figsize=(4 * len(noises), 3.2 * len(metrics)), squeeze=False)
    for row, (metric, axis_label) in enumerate(metrics):
        data = _epoch_curves(finished, metric)
        for col, noise in enumerate(noises):
            ax = axes[row][col]
            for label in labels:
                if (noise, label) in data:
                    xs, ys = data[(noise, label)]
                    marker = dict(marker="o", ms=3) if len(xs) <= 20 else {}  # long runs: lines only
                    ax.plot(xs, [100 * y for y in ys], label=label, color=colour[label], **marker)
                    if mark_best:
                        best = max(range(len(ys)), key=ys.__getitem__)
                        ax.plot(xs[best], 100 * ys[best], marker="*", ms=11, color=colour[label], mec="black", mew=0.5)
            ax.set_title(noise + (" (★ best epoch)" if mark_best else "") if row == 0 else "")
            ax.set_xlabel("epoch")
            ax.xaxis.set_major_locator(MaxNLocator(integer=True))
            ax.set_ylabel(axis_label)
            ax.grid(alpha=0.3)
            # Shares of 100: matplotlib's margin would run the axis past 100% (or below 0).
            bottom, top = ax.get_ylim()
            ax.set_ylim(max(bottom, -1.0), min(top, 101.0))
    _legend_below(fig, axes[0][0])
    return save_figure(fig, path)


def _legend_below(fig, ax) -> None:
    """One legend for the whole figure, in a band added under the panels, so it hides no curve."""
    handles, labels = ax.get_legend_handles_labels()
    width, height = fig.get_size_inches()
    longest = max((len(label) for label in labels), default=1)
    columns = max(1, min(len(labels), int(width / (0.07 * longest + 0.6))))  # about 0.07 in a character
    band = 0.2 * -(-len(labels) // columns) + 0.2  # inches
    fig.set_size_inches(width, height + band)
    fig.legend(handles, labels, loc="lower center", ncol=columns, fontsize=8, frameon=False)
    fig.tight_layout(rect=(0, band / (height + band), 1, 1))


def _colours(labels: list[str]) -> dict[str, Any]:
    """One colour per run label in every panel (tab20 past ten labels, so none repeats)."""
    import matplotlib

    cmap = matplotlib.colormaps["tab10" if len(labels) <= 10 else "tab20"]
    return {label: cmap(i % cmap.N) for i, label in enumerate(labels)}


def _plot_final_vs_noise(
    finals: list[dict[str, Any]], labels: list[str], colour: dict[str, Any], path: str, axis_label: str
) -> str:
    """Final accuracy (mean +- std over seeds) against the noise rate, one panel per noise type."""
    import matplotlib.pyplot as plt

    types = sorted({f["noise.type"] for f in finals})
    fig, axes = plt.subplots(1, len(types), figsize=(4.5 * len(types), 3.4), squeeze=False)
    for ax, noise_type in zip(axes[0], types):
        for label in labels:
            points: dict[float, list[float]] = defaultdict(list)
            for f in finals:
                if f["method"] == label and f["noise.type"] == noise_type and known_value(f["noise.rate"]):
                    points[f["noise.rate"]].append(100 * f["final"])
            if points:
                xs = sorted(points)
                stats = [mean_std(points[x]) for x in xs]
                means, stds = [m for m, _ in stats], [sd for _, sd in stats]
                ax.errorbar(xs, means, yerr=stds, marker="o", capsize=3, label=label, color=colour[label])
        ax.set_title(f"{noise_type} noise")
        ax.set_xlabel("noise rate" if noise_type not in NOISE_READS else "realised noise rate")
        ax.set_ylabel(f"final {axis_label}")
        ax.grid(alpha=0.3)
    _legend_below(fig, axes[0][0])
    return save_figure(fig, path)


SELECTION_METRICS = [
    (mean_key("selected_fraction"), "selected fraction (%)"),
    (mean_key("selection_precision"), "selection precision (%)"),
    (mean_key("memorisation"), "memorisation (%)"),
    (mean_key("disagreement"), "peer disagreement (%)"),
]


def write_plots(
    rows: list[dict[str, Any]], folder: str | Path, last_epochs: int = 1, validation: bool = False
) -> list[str]:
    """PNG plots: accuracy vs epoch; selected fraction, selection precision, memorisation and the
    peers' disagreement vs epoch; final accuracy (mean of the last `last_epochs` epochs) vs noise rate. One colour per
    method (or grid variant) in every panel. `validation`: accuracy on the held-out noisy labels
    instead of the clean test set, and no final-accuracy plot (for choosing settings)."""
    import matplotlib

    matplotlib.use("Agg")
    metric = VALIDATION if validation else ACCURACY
    finished = [r for r in rows if r.get("status") == "finished" and r.get(metric) is not None]
    if not finished:
        return []
    labels = sorted(set(cell_labels(finished).values()), key=method_order)
    colour = _colours(labels)
    if validation:
        accuracy = [(VALIDATION, "noisy validation accuracy (%)")]
        return [_plot_epoch_grid(finished, accuracy, labels, colour, join(folder, "validation_vs_epoch.png"))]
    images = images_evaluated(finished)  # a validation sweep's test figures are on a subset
    axis_label = f"clean test accuracy{f' on {images} images' if images else ''} (%)"
    finals = trial_finals(rows, last_epochs)
    return [
        _plot_epoch_grid(
            finished, [(ACCURACY, axis_label)], labels, colour, join(folder, "accuracy_vs_epoch.png"), mark_best=True
        ),  # fmt: skip
        _plot_epoch_grid(finished, SELECTION_METRICS, labels, colour, join(folder, "selection_vs_epoch.png")),
        _plot_final_vs_noise(finals, labels, colour, join(folder, "accuracy_vs_noise.png"), axis_label),
    ]


def report(
    folder: str | Path,
    last_epochs: int = 1,
    plots_dir: Optional[str | Path] = None,
    joined: Optional[list[str | Path]] = None,
    show: Callable[[str], None] = print,
) -> tuple[str, list[str]]:
    """The sweep's table for `folder` (with the sweeps in `joined`), handed to `show` before the
    plots are written (a full disk then costs the plots, never the figures); returns the table
    and the plot paths."""
    rows = read_joined(folder, joined or [])
    metric = headline_metric(rows)
    table = "" if metric == ACCURACY else "No test split: accuracy on the held-out noisy labels (%).\n"
    table += table_caption(metric, last_epochs, images_evaluated(rows)) + "\n" + report_table(rows, last_epochs, metric)
    table += "\n\nAt the last epoch, mean over seeds (%):\n" + selection_table(rows, metric)
    found = findings(rows, last_epochs, metric)
    table += ("\n\n" + "\n".join(found)) if found else ""
    show(table)
    paths = write_plots(rows, plots_dir or join(folder, "plots"), last_epochs, validation=metric == VALIDATION)
    return table, paths
