"""Choosing a method's settings on the noisy validation split, never on the test set: each
candidate's final validation accuracy per noise setting (mean over seeds), its mean over the
settings, the best per method (or a tie and no choice), as `cmd-ray report --validation` prints."""

from __future__ import annotations

import math
from collections import defaultdict
from typing import Any

from cmd_ray import methods
from cmd_ray.results import VALIDATION, final_value, finished_trials, method_order, noise_label

# Config sections a validation sweep's candidates differ in: every method's own.
CANDIDATE_SECTIONS = tuple(f"{key}." for key in methods.SECTIONS)


def _candidate(row: dict[str, Any], varying: set[str]) -> str:
    """The swept settings a row's method uses, e.g. 'knowledge.tau=0.3, labels.trust=all', or its
    grid variant's label."""
    if row.get("variant"):
        return row["variant"]
    method = methods.REGISTRY.get(row.get("method"))
    ignored = method.ignored_keys if method else frozenset()
    keys = sorted(k for k in varying if k not in ignored)
    return ", ".join(f"{k}={row.get(k)}" for k in keys) or "defaults"


# Scores closer than this (a fraction of accuracy: 0.005 points) are a tie: the table shows two
# decimals, and a choice no reader can see is no choice.
TIE = 5e-5


def validation_choice(rows: list[dict[str, Any]], last_epochs: int = 3) -> tuple[str, dict[str, str]]:
    """Rank each method's candidates by noisy-validation accuracy; return (markdown table, best per method).

    A candidate's score per noise setting is the mean over seeds of its final validation
    accuracy (mean of the last `last_epochs` epochs); its overall score is the mean over
    noise settings. A candidate without a finished trial for every noise setting and seed that
    any candidate has (a stopped sweep's, a failed trial's) is shown but not ranked: a choice is
    made on the same evidence for every candidate. Test accuracy is not read here.
    """
    scores, reference, seeds = _validation_scores(rows, last_epochs)
    noises = sorted({n for _, _, n in scores})
    candidates = sorted({(m, c) for m, c, _ in scores}, key=lambda mc: (method_order(mc[0]), mc[1]))
    every_seed = {n: set().union(*(s for (_, _, n2), s in seeds.items() if n2 == n)) for n in noises}
    missing = {}
    overall = {}
    for method, cand in candidates:
        cells = [scores.get((method, cand, n)) for n in noises]
        lacks = [
            f"{n} seed {seed}" for n in noises for seed in sorted(every_seed[n] - seeds.get((method, cand, n), set()))
        ]
        if lacks:
            missing[(method, cand)] = lacks
        done = [sum(c) / len(c) for c in cells if c]
        overall[(method, cand)] = sum(done) / len(done) if not lacks else float("nan")
    best, tied = _choose_on_validation(overall, reference)
    lines = ["| method | candidate | " + " | ".join(noises) + " | mean |", "|---" * (len(noises) + 3) + "|"]
    for method, cand in candidates:
        cells = [scores.get((method, cand, n)) for n in noises]
        shown = [f"{100 * sum(c) / len(c):.2f}" if c else "-" for c in cells]
        mark = (
            " **(chosen)**"
            if best.get(method) == cand
            else " (tie: none chosen)"
            if cand in tied.get(method, ())
            else " (reference)"
            if (method, cand) in reference
            else ""
        )
        mean = overall[(method, cand)]
        lines.append(
            f"| {method} | {cand}{mark} | "
            + " | ".join(shown)
            + f" | {'-' if math.isnan(mean) else f'{100 * mean:.2f}'} |"
        )
    for method, names in tied.items():
        lines.append(
            f"\n{method}: a tie between {', '.join(names)} (within {100 * TIE:g} points): none is chosen; more seeds "
            "or validation images would separate them"
        )
    for (method, cand), lacks in missing.items():
        shown = ", ".join(lacks[:3]) + (f" and {len(lacks) - 3} more" if len(lacks) > 3 else "")
        lines.append(f"\n{method}, {cand}: not ranked, no finished trial at {shown} (resume the sweep to finish it)")
    return "\n".join(lines), best


def _validation_scores(
    rows: list[dict[str, Any]], last_epochs: int
) -> tuple[dict[tuple[str, str, str], list[float]], set[tuple[str, str]], dict[tuple[str, str, str], set]]:
    """Each finished trial's final validation accuracy (mean of its last `last_epochs` epochs),
    listed under (method, candidate, noise); the (method, candidate) pairs marked as a
    reference (shown for comparison, never chosen); and the seeds of each (method, candidate, noise)."""
    scores: dict[tuple[str, str, str], list[float]] = defaultdict(list)
    seeds: dict[tuple[str, str, str], set] = defaultdict(set)
    reference: set[tuple[str, str]] = set()
    by_trial = finished_trials(rows, VALIDATION, last_epochs)
    if not by_trial:
        raise ValueError("no finished trial has validation accuracy; set data.validation_fraction > 0")
    firsts = [trial[0] for trial in by_trial.values()]
    columns = {k for row in firsts for k in row if k.startswith(CANDIDATE_SECTIONS)}
    varying = {k for k in columns if len({repr(row.get(k)) for row in firsts}) > 1}
    for trial in by_trial.values():
        first = trial[0]
        cell = (first["method"], _candidate(first, varying), noise_label(first))
        scores[cell].append(final_value(trial, last_epochs, VALIDATION))
        seeds[cell].add(first.get("seed"))
        if first.get("reference"):
            reference.add((first["method"], _candidate(first, varying)))
    return scores, reference, seeds


def _choose_on_validation(
    overall: dict[tuple[str, str], float], reference: set[tuple[str, str]]
) -> tuple[dict[str, str], dict[str, list[str]]]:
    """Per method, the candidate with the best overall score (references and incomplete ones
    left out), or, when others are within TIE of it, the tied candidates and no choice."""
    best: dict[str, str] = {}
    tied: dict[str, list[str]] = {}
    for method in sorted({m for m, _ in overall}, key=method_order):
        ranked = sorted(
            ((s, c) for (m, c), s in overall.items() if m == method and not math.isnan(s) and (m, c) not in reference),
            reverse=True,
        )
        top = [c for s, c in ranked if ranked[0][0] - s < TIE]
        if len(top) > 1:
            tied[method] = sorted(top)
        elif ranked:
            best[method] = ranked[0][1]
    return best, tied
