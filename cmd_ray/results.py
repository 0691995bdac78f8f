"""Sweep results: one Parquet table (a row per trial and epoch), and the tables and findings
computed from it (method x noise, selection, comparisons). `cmd_ray.report` prints them and
draws the plots; `cmd-ray report DIR` reads `DIR/results.parquet` and needs no Ray.
"""

from __future__ import annotations

import math
from collections import defaultdict
from pathlib import Path
from typing import Any, Optional

from cmd_ray import methods
from cmd_ray.config import NOISE_READS
from cmd_ray.errors import ConfigError
from cmd_ray.grid import point_overrides, trial_config, variant_label
from cmd_ray.metrics import TEST_ACCURACY, VALIDATION_ACCURACY, ensemble_key, mean_key
from cmd_ray.presets import flatten
from cmd_ray.storage import exists, join, read_parquet

# What the sweeps of one joined table must share: the runs' budget, data, model and optimiser
# (the methods, their settings, the noise and the seeds are what a table compares).
SHARED_SETTINGS = (
    "peers",
    "replicas",
    "epochs",
    "batch_size",
    "data.name",
    "data.train_subset",
    "data.validation_fraction",
    "model.name",
    "optim.name",
    "optim.lr",
    "optim.schedule",
)


# Config columns every results row carries (the grid's own keys are added to these). The noise
# keys a row's noise type does not read (a rate for a labels file) are left empty.
CONFIG_COLUMNS = (
    "method",
    "seed",
    *SHARED_SETTINGS,
    "noise.type",
    "noise.rate",
    "noise.matrix",
    "noise.labels",
    "noise.labels_key",
)

ACCURACY = TEST_ACCURACY  # mean of the peers' clean test accuracy
VALIDATION = VALIDATION_ACCURACY  # mean of the peers' accuracy on the held-out *noisy* labels


def _clean(value: Any) -> Any:
    return None if isinstance(value, float) and math.isnan(value) else value


def rows_table(rows: list[dict[str, Any]]):
    """A pyarrow Table of result rows with every column any row has (pyarrow alone would keep
    only the first row's keys, dropping e.g. a key that only some grid variants set)."""
    import pyarrow as pa

    columns: dict[str, None] = {}
    for row in rows:
        columns.update(dict.fromkeys(row))
    return pa.Table.from_pylist([{c: row.get(c) for c in columns} for row in rows])


def trial_rows(
    trial_id: str, point: dict[str, Any], base: dict[str, Any], history: list[dict[str, Any]], status: str, error: str
) -> list[dict[str, Any]]:
    """Rows of one trial: trial id, status, its config columns, then each epoch's metrics.

    A trial that failed before its first epoch still gets one row (metrics empty)."""
    flat = flatten(trial_config(base, point).to_dict())
    head = {"trial_id": trial_id, "status": status, "error": error}
    # Grid keys may name a whole section (e.g. noise: {type, rate}): keep its flattened keys.
    swept = point_overrides(point)
    keys = [k for k in flat if k in CONFIG_COLUMNS or any(k == p or k.startswith(p + ".") for p in swept)]
    head.update({k: flat[k] if _noise_reads(flat, k) else None for k in keys})
    if variant_label(point) is not None:
        head["variant"] = variant_label(point)
        head["reference"] = bool(point["variant"].get("reference", False))
    if not history:
        return [head]
    return [{**head, **{k: _clean(v) for k, v in record.items()}} for record in history]


def _noise_reads(flat: dict[str, Any], key: str) -> bool:
    """Whether a config key holds a value the run used: every key but the noise settings its
    noise type does not read (a rate nobody asked for is not a result's rate)."""
    if not key.startswith("noise.") or key == "noise.type":
        return True
    return key.split(".", 1)[1] in NOISE_READS.get(flat["noise.type"], ("rate",))


# --------------------------------------------------------------------------------------
# Report


def read_results(folder: str | Path) -> list[dict[str, Any]]:
    path = join(folder, "results.parquet")
    if not exists(path):
        raise FileNotFoundError(f"{path}: no results table; run a sweep into this folder first")
    return read_parquet(path).to_pylist()


def read_joined(folder: str | Path, others: list[str | Path]) -> list[dict[str, Any]]:
    """The rows of the sweep in `folder` and of each sweep in `others` (e.g. rows added later to a
    table under the same settings), as one table. Refused (ValueError naming both folders): a cell
    (method or variant, noise, seed) that two of them hold (a joined table never counts a run
    twice), and sweeps whose runs differ in one of SHARED_SETTINGS (e.g. 40 epochs beside 60: a
    joined table compares methods under one budget). Tables written before a setting was a
    column are not checked on it."""
    rows = read_results(folder)
    held = {_cell(r): str(folder) for r in rows}
    for other in others:
        extra = [{**r, "trial_id": f"{other}:{r['trial_id']}"} for r in read_results(other)]
        for cell in {_cell(r) for r in extra}:
            if cell in held:
                raise ValueError(f"{other} repeats {held[cell]}'s run {cell[0]}, {cell[1]}, seed {cell[2]}")
        _check_shared_settings(rows, str(folder), extra, str(other))
        held.update({_cell(r): str(other) for r in extra})
        rows += extra
    return rows


def _check_shared_settings(rows: list[dict[str, Any]], folder: str, extra: list[dict[str, Any]], other: str) -> None:
    for key in SHARED_SETTINGS:
        ours, theirs = _one_value(rows, key), _one_value(extra, key)
        if ours is not None and theirs is not None and ours != theirs:
            raise ValueError(
                f"{other} ran with {key} {theirs[0]}, {folder} with {ours[0]}: the sweeps of a joined table "
                "share their runs' budget, data, model and optimiser"
            )


def _one_value(rows: list[dict[str, Any]], key: str) -> Optional[tuple[Any]]:
    """(the value,) when every row that has `key` holds the same one (None-valued allowed), else
    None: not a column (an older table) or a grid axis of that sweep."""
    values = {repr(r[key]): r[key] for r in rows if key in r}
    return (next(iter(values.values())),) if len(values) == 1 else None


def _cell(row: dict[str, Any]) -> tuple[str, str, Any]:
    return run_label(row), noise_label(row), row["seed"]


def noise_label(row: dict[str, Any]) -> str:
    """A row's noise as the tables and plots name it: its type and rate, or its file for
    `matrix` and `labels` (which ask for no rate)."""
    kind = row["noise.type"]
    if kind == "none":
        return "none"
    if kind in ("matrix", "labels"):
        file = Path(str(row.get(f"noise.{kind}") or "")).name
        key = row.get("noise.labels_key") if kind == "labels" else None
        return f"{kind} {file}" + (f" [{key}]" if key else "")
    return f"{kind} {row['noise.rate']:g}"


def mean_std(values: list[float]) -> tuple[float, float]:
    mean = sum(values) / len(values)
    std = math.sqrt(sum((v - mean) ** 2 for v in values) / (len(values) - 1)) if len(values) > 1 else 0.0
    return mean, std


def point_label(row: dict[str, Any]) -> str:
    """A results row's trial in words: 'ce, symmetric 0.2, seed 0'."""
    return f"{run_label(row)}, {noise_label(row)}, seed {row['seed']}"


def run_label(row: dict[str, Any]) -> str:
    """What a results row is reported as: its grid variant's label, else its method."""
    return row.get("variant") or row["method"]


def headline_metric(rows: list[dict[str, Any]]) -> str:
    """The accuracy a sweep reports: clean test accuracy, or — for a user's data set without a
    test split — accuracy on the held-out noisy labels."""
    has_test = any(r.get(ACCURACY) is not None for r in rows)
    return VALIDATION if not has_test and any(r.get(VALIDATION) is not None for r in rows) else ACCURACY


def _config_keys() -> frozenset[str]:
    """Every dotted config key a results row may carry as a column."""
    from cmd_ray.config import Config

    return frozenset(flatten(Config().to_dict()))


def cell_labels(rows: list[dict[str, Any]]) -> dict[str, str]:
    """How tables and plots name each trial's cell: its method (or grid variant) and, where trials
    of one method and noise setting differ in another swept key (e.g. knowledge.tau_end), that key
    and value: a cell averages the seeds of one grid point, never different points."""
    firsts: dict[str, dict[str, Any]] = {}
    for row in rows:
        firsts.setdefault(row["trial_id"], row)
    groups: dict[tuple[str, str], list[dict[str, Any]]] = defaultdict(list)
    for row in firsts.values():
        groups[(run_label(row), noise_label(row))].append(row)
    columns = _config_keys() & {k for row in firsts.values() for k in row}
    split = sorted(
        k for k in columns - {"seed"} if any(len({repr(r.get(k)) for r in group}) > 1 for group in groups.values())
    )
    return {
        trial: run_label(row) + (" [" + ", ".join(f"{k}={row.get(k)}" for k in split) + "]" if split else "")
        for trial, row in firsts.items()
    }


def finished_trials(rows: list[dict[str, Any]], metric: str, last_epochs: int = 1) -> dict[str, list[dict[str, Any]]]:
    """Each finished trial's rows that carry `metric`, in epoch order, by trial id. Refuses a
    `last_epochs` longer than the shortest of them: its final would be the mean of fewer epochs
    than the caption says."""
    by_trial: dict[str, list[dict[str, Any]]] = defaultdict(list)
    for row in rows:
        if row.get("status") == "finished" and row.get(metric) is not None:
            by_trial[row["trial_id"]].append(row)
    for trial in by_trial.values():
        trial.sort(key=lambda r: r["epoch"])
    shortest = min((len(trial) for trial in by_trial.values()), default=last_epochs)
    if last_epochs > shortest:
        raise ConfigError(
            f"--last-epochs: got {last_epochs}; allowed: an integer in [1, {shortest}] "
            f"(the shortest finished trial has {shortest} epochs)"
        )
    return dict(by_trial)


def final_value(trial: list[dict[str, Any]], last_epochs: int, metric: str) -> float:
    """A trial's final `metric`: the mean over its last `last_epochs` rows (in epoch order)."""
    tail = [r[metric] for r in trial[-last_epochs:]]
    return sum(tail) / len(tail)


def trial_finals(rows: list[dict[str, Any]], last_epochs: int = 1, metric: str = ACCURACY) -> list[dict[str, Any]]:
    """Per finished trial: its cell's label (method or variant, and any other key its grid point
    sets apart: `cell_labels`), noise, seed, final (mean of the last `last_epochs` epochs) and
    best `metric` (mean of the peers' accuracy)."""
    by_trial = finished_trials(rows, metric, last_epochs)
    labels = cell_labels([r for trial in by_trial.values() for r in trial])
    out = []
    for trial_id, trial_rows_ in by_trial.items():
        first = trial_rows_[0]
        out.append(
            {
                "method": labels[trial_id],
                "noise": noise_label(first),
                "noise.type": first["noise.type"],
                # A labels file or a matrix asks for no rate: plotted at the rate it realised.
                "noise.rate": first["noise.rate"]
                if first.get("noise.rate") is not None
                else trial_rows_[-1].get("realised_noise_rate"),
                "seed": first["seed"],
                "final": final_value(trial_rows_, last_epochs, metric),
                "best": max(r[metric] for r in trial_rows_),
                "ensemble_final": trial_rows_[-1].get(ensemble_key(metric.split("/", 1)[1])),
                "selection_precision": trial_rows_[-1].get(mean_key("selection_precision")),
                "memorisation": trial_rows_[-1].get(mean_key("memorisation")),
                "disagreement": trial_rows_[-1].get(mean_key("disagreement")),
            }
        )
    return out


def known_value(value: Any) -> bool:
    return value is not None and not (isinstance(value, float) and math.isnan(value))


def _format_mean(values: list[float]) -> str:
    """'83.48±0.10' over several seeds; '83.48' for one (a spread of one run is no spread)."""
    mean, std = mean_std(values)
    return f"{mean:.2f}±{std:.2f}" if len(values) > 1 else f"{mean:.2f}"


def images_evaluated(rows: list[dict[str, Any]]) -> str:
    """How many test images the rows' accuracy was measured on ("1,000"; "1,000-10,000" when the
    trials differ; "" when no row says): a validation sweep evaluates a subset (data.test_subset)."""
    counts = sorted({int(r["test_samples"]) for r in rows if r.get("test_samples")})
    if not counts:
        return ""
    return f"{counts[0]:,}" if len(counts) == 1 else f"{counts[0]:,}-{counts[-1]:,}"


def table_caption(metric: str, last_epochs: int, images: str = "") -> str:
    """What a report table's figures are, in one line; `images`: `images_evaluated` of its rows."""
    what = "Clean test accuracy" if metric == ACCURACY else "Accuracy on the held-out noisy labels"
    what += f" on {images} test images" if images and metric == ACCURACY else ""
    final = "the last epoch" if last_epochs == 1 else f"the mean of the last {last_epochs} epochs"
    return (
        f"{what} (%), the peers' mean (not their ensemble): final = {final}, best = the best epoch; "
        "mean ± std over seeds (n = seeds of one grid point)."
    )


def report_table(rows: list[dict[str, Any]], last_epochs: int = 1, metric: str = ACCURACY) -> str:
    """Method x noise table: final and best clean test accuracy (or another `metric`), mean +-
    std over seeds (%); a cell holds the seeds of one grid point (`cell_labels`)."""
    finals = trial_finals(rows, last_epochs, metric)
    if not finals:
        return "No finished trial yet: nothing to tabulate."
    cells: dict[tuple[str, str], list[dict[str, Any]]] = defaultdict(list)
    for f in finals:
        cells[(f["method"], f["noise"])].append(f)
    methods = sorted({f["method"] for f in finals}, key=method_order)
    noises = sorted({f["noise"] for f in finals})
    header = ["method"] + [f"{n} final / best" for n in noises]
    lines = [header]
    for method in methods:
        line = [method]
        for noise in noises:
            group = cells.get((method, noise))
            if not group:
                line.append("-")
                continue
            final = _format_mean([100 * g["final"] for g in group])
            best = _format_mean([100 * g["best"] for g in group])
            line.append(f"{final} / {best} (n={len(group)})")
        lines.append(line)
    widths = [max(len(row[i]) for row in lines) for i in range(len(header))]
    text = [" | ".join(cell.ljust(w) for cell, w in zip(row, widths)) for row in lines]
    text.insert(1, "-+-".join("-" * w for w in widths))
    failed = sorted({r["trial_id"] for r in rows if r.get("status") == "failed"})
    if failed:
        text.append(f"failed trials: {', '.join(failed)}")
    return "\n".join(text)


def compare_table(rows: list[dict[str, Any]], other: list[dict[str, Any]], last_epochs: int = 1) -> str:
    """Markdown table of the same cells in two sweeps (e.g. a rerun and the table it replaces):
    per method x noise, the final clean test accuracy of each (mean +- std over seeds), their
    difference, and the largest difference of one seed's run between the two (%)."""

    def by_cell(finals: list[dict[str, Any]]) -> dict[tuple[str, str], dict[Any, float]]:
        cells: dict[tuple[str, str], dict[Any, float]] = defaultdict(dict)
        for f in finals:
            cells[(f["method"], f["noise"])][f["seed"]] = 100 * f["final"]
        return cells

    mine, theirs = by_cell(trial_finals(rows, last_epochs)), by_cell(trial_finals(other, last_epochs))
    lines = [
        "| method | noise | this sweep | the other | difference | largest difference of one seed |",
        "|---|---|---|---|---|---|",
    ]
    unpaired = []
    for method, noise in sorted(set(mine) & set(theirs), key=lambda c: (method_order(c[0]), c[1])):
        a, b = mine[(method, noise)], theirs[(method, noise)]
        paired = [a[seed] - b[seed] for seed in a if seed in b]
        largest = max(paired, key=abs) if paired else float("nan")
        difference = mean_std(list(a.values()))[0] - mean_std(list(b.values()))[0]
        shown = [_format_mean(list(a.values())), _format_mean(list(b.values()))]
        if set(a) != set(b):  # the means are over other seeds: say so where the figures are
            shown = [f"{text} (seeds {', '.join(map(str, sorted(c)))})" for text, c in zip(shown, (a, b))]
            unpaired.append(f"{method}, {noise}")
        lines.append(f"| {method} | {noise} | {shown[0]} | {shown[1]} | {difference:+.2f} | {largest:+.2f} |")
    if unpaired:
        cells = "; ".join(unpaired)
        lines.append(f"\nThe two hold other seeds at: {cells} (their difference is of means over other seeds).")
    return "\n".join(lines)


METHOD_ORDER = methods.NAMES


def method_order(label: str) -> tuple[int, str]:
    """Baselines first, CMD last; a variant sorts after the method its label starts with."""
    method = next((m for m in sorted(METHOD_ORDER, key=len, reverse=True) if label.startswith(m)), None)
    return (METHOD_ORDER.index(method) if method else len(METHOD_ORDER), label)


def findings(rows: list[dict[str, Any]], last_epochs: int = 1, metric: str = ACCURACY) -> list[str]:
    """The table in words, one sentence per noise setting: which method ends best, at what final
    accuracy, over how many seeds, and its margin over plain cross-entropy (`ce`) where the sweep
    ran it, saying so when the methods' seed counts differ, e.g. 'symmetric 0.5: cmd-p ends best,
    78.4% (3 seeds), 23.4 points above ce (55.0%).'"""
    cells: dict[tuple[str, str], list[float]] = defaultdict(list)
    for f in trial_finals(rows, last_epochs, metric):
        cells[(f["noise"], f["method"])].append(100 * f["final"])
    out = []
    for noise in sorted({n for n, _ in cells}):
        means = {m: mean_std(v)[0] for (n, m), v in cells.items() if n == noise}
        if len(means) < 2:
            continue
        best = max(means, key=means.get)
        seeds = len(cells[(noise, best)])
        tied = sorted((m for m in means if means[best] - means[m] < 0.05), key=method_order)  # equal as printed
        if len(tied) > 1:
            line = (
                f"{noise}: {', '.join(tied)} end level at {means[best]:.1f}% ({seeds} seed{'s' if seeds > 1 else ''})"
            )
        else:
            line = f"{noise}: {best} ends best, {means[best]:.1f}% ({seeds} seed{'s' if seeds > 1 else ''})"
        if "ce" in means and "ce" not in tied:
            line += f", {means[best] - means['ce']:.1f} points above ce ({means['ce']:.1f}%)"
        others = [m for m in means if m not in tied]
        runner_up = max(others, key=means.get) if others else "ce"
        if runner_up != "ce":
            line += f"; next {runner_up}, {means[runner_up]:.1f}% ({means[best] - means[runner_up]:.1f} points behind)"
        counts = {m: len(cells[(noise, m)]) for m in sorted(means, key=method_order)}
        if len(set(counts.values())) > 1:  # a stopped sweep's, a failed trial's: not a like-for-like reading
            line += "; seeds differ (" + ", ".join(f"{m} {n}" for m, n in counts.items()) + ")"
        out.append(line + ".")
    return out


def selection_table(rows: list[dict[str, Any]], metric: str = ACCURACY) -> str:
    """Markdown: last-epoch selection precision, memorisation and the peers' disagreement per
    method and noise (mean over seeds, %; '-' where a figure is not available, e.g. no clean
    labels)."""
    finals = trial_finals(rows, metric=metric)
    methods = sorted({f["method"] for f in finals}, key=method_order)
    noises = sorted({f["noise"] for f in finals})
    figures = ("selection_precision", "memorisation", "disagreement")
    header = " / ".join(figure.replace("_", " ") for figure in figures)
    lines = ["| method | " + " | ".join(f"{n}: {header}" for n in noises) + " |"]
    lines.append("|---" * (len(noises) + 1) + "|")
    for method in methods:
        cells = []
        for noise in noises:
            group = [f for f in finals if f["method"] == method and f["noise"] == noise]
            shown = []
            for figure in figures:
                values = [100 * f[figure] for f in group if known_value(f.get(figure))]
                shown.append(f"{mean_std(values)[0]:.1f}" if values else "-")
            cells.append(" / ".join(shown))
        lines.append(f"| {method} | " + " | ".join(cells) + " |")
    return "\n".join(lines)
