"""The report's statistical parts: notes on the intervals and on paper figures outside them, the calibration of a
score-mode run, and where two runs differ (paired differences, per-class F1 differences, confusion matrices side by
side). Runs are mmla.report.RunDir objects; nothing here reads files."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from . import stats
from .compare import compare_runs, pair, row_answers
from .evaluation import METRICS, evaluate_records
from .plots import image, plot_confusion, plot_reliability
from .tasks import get_task

CAVEAT = ("A difference in checkpoint revision or hardware (and the library versions that come with it) can explain "
          "such a gap; the mark is not a proof of error, in the paper or here.")


def _slug(text: str) -> str:
    return "".join(c if c.isalnum() or c in "._-" else "-" for c in text).strip("-") or "x"


def fill_intervals(metrics: dict, predictions: list[dict]) -> dict:
    """metrics.json written before intervals existed: compute them from the run's predictions (seed 0) when those
    give the same datasets and row counts as the figures, so old runs get whiskers too."""
    if metrics.get("bootstrap") or not predictions:
        return metrics
    try:
        fresh = evaluate_records(predictions)
    except (ValueError, KeyError, TypeError):  # predictions a report can show but not re-evaluate
        return metrics
    per = metrics.get("per_dataset") or {}
    if {ds: m.get("n") for ds, m in per.items()} != {ds: m["n"] for ds, m in fresh["per_dataset"].items()}:
        return metrics
    out = {**metrics, "bootstrap": fresh["bootstrap"],
           "per_dataset": {ds: {**m, "ci95": fresh["per_dataset"][ds]["ci95"]} for ds, m in per.items()}}
    if isinstance(metrics.get("average"), dict):
        out["average"] = {**metrics["average"], "ci95": fresh["average"]["ci95"]}
    return out


def interval_notes(rows: list[dict], metrics: dict, outside_mark: str) -> list[str]:
    """How the intervals were made, and which paper figures lie outside them (with the caveat)."""
    boot = metrics.get("bootstrap")
    if not boot:
        return []
    notes = [f"95% CI: percentile bootstrap over utterances ({boot['resamples']} resamples, seed {boot['seed']}); "
             "the average's interval resamples within each dataset. Figures show them as whiskers."]
    outside = [f"{r['dataset']} ({', '.join(m for m in METRICS if r.get(f'outside_{m}'))})" for r in rows
               if any(r.get(f"outside_{m}") for m in METRICS)]
    if outside:
        notes.append(f"{outside_mark} The paper's figure lies outside this run's 95% interval: {'; '.join(outside)}. "
                     + CAVEAT)
    return notes


def calibration_section(run, run_dir: Path, out_dir: Path) -> dict | None:
    """For rows that carry candidate probabilities (score mode): ECE and Brier per dataset (from metrics.json) and
    one reliability diagram over all of them."""
    confidence, correct = [], []
    for r in run.predictions:
        probs = r.get("probs")
        if not isinstance(probs, list) or not probs or "dataset" not in r:
            continue
        labels = [l.lower() for l in get_task(r["dataset"]).labels]
        if len(probs) != len(labels):
            continue
        top = int(np.argmax(probs))
        confidence.append(probs[top] / sum(probs))
        correct.append(labels[top] == str(r.get("label", "")).lower())
    if not confidence:
        return None
    per = run.metrics.get("per_dataset", {})
    cells = [[ds, str(c["n"]), f"{c['ECE']:.2f}", f"{c['Brier']:.4f}"]
             for ds, m in per.items() if (c := m.get("calibration"))]
    avg = (run.metrics.get("average") or {}).get("calibration")
    if avg:
        cells.append(["average", str(avg["n"]), f"{avg['ECE']:.2f}", f"{avg['Brier']:.4f}"])
    bins = stats.reliability(np.array(confidence), np.array(correct))
    fig = plot_reliability(bins, f"{run.label}: reliability ({len(confidence)} rows)", run_dir / "reliability.png")
    return {"headers": ["dataset", "n", "ECE", "Brier"], "cells": cells,
            "figure": image(fig, out_dir, "reliability diagram: accuracy against the top candidate's probability"),
            "note": f"ECE: {stats.ECE_BINS} equal-width bins of the top candidate's probability, x100; Brier: the "
                    "multi-class score (sum over candidates of the squared error, 0..2), averaged over rows."}


def _fmt_p(p: float) -> str:
    return "<0.0001" if p < 1e-4 else f"{p:.4f}"


def _fmt_ci(ci: list[float]) -> str:
    return f"[{ci[0]:+.2f}, {ci[1]:+.2f}]"


def pair_section(run_a, run_b, out_dir: Path, resamples: int = stats.RESAMPLES) -> dict:
    """Where B differs from A over the rows both have: per dataset the paired differences, per class the F1
    difference with its interval, and both confusion matrices side by side."""
    result = compare_runs(run_a.predictions, run_b.predictions, resamples=resamples, per_class=True)
    folder = out_dir / "pairs" / f"{_slug(run_a.label)}--vs--{_slug(run_b.label)}"
    folder.mkdir(parents=True, exist_ok=True)
    summary = []
    for ds, block in [*result["per_dataset"].items(), ("average", result["average"])]:
        acc, f1 = block["ACC"], block["F1"]
        summary.append([ds, str(block["n"]), f"{block['agreement']:.2f}", f"{acc['diff']:+.2f}", _fmt_ci(acc["ci95"]),
                        _fmt_p(acc["p_holm"]), _fmt_p(acc["mcnemar_p"]), f"{f1['diff']:+.2f}", _fmt_ci(f1["ci95"]),
                        _fmt_p(f1["p_holm"])])
    classes = [[ds, label, str(c["support"]), f"{c['a']:.2f}", f"{c['b']:.2f}", f"{c['diff']:+.2f}",
                _fmt_ci(c["ci95"])] for ds, per in result["per_class_f1"].items() for label, c in per.items()]
    by_ds, _ = pair(row_answers(run_a.predictions), row_answers(run_b.predictions))
    confusions = []
    for ds, triples in by_ds.items():
        side = []
        for name, run, col in (("A", run_a, 1), ("B", run_b, 2)):
            rows = [{"dataset": ds, "label": t[0], "pred": t[col]} for t in triples]
            path = plot_confusion(rows, ds, folder / f"confusion_{_slug(ds)}_{name}.png", f"{ds}, {name}: {run.label}")
            side.append(image(path, out_dir, f"{ds} {name}"))
        confusions.append({"dataset": ds, "a": side[0], "b": side[1]})
    rows = result["rows"]
    return {
        "a": run_a.label, "b": run_b.label, "anchor": "pair-" + _slug(f"{run_a.label}-vs-{run_b.label}"),
        "rows": rows,
        "summary_headers": ["dataset", "n", "agreement %", "Δ ACC", "95% CI", "p Holm", "McNemar p", "Δ F1",
                            "95% CI ", "p Holm "],
        "summary": summary,
        "class_headers": ["dataset", "class", "support", "F1 A", "F1 B", "Δ F1 (B − A)", "95% CI"],
        "classes": classes, "confusions": confusions,
        "note": (f"Paired by (dataset, split, id) over the {rows['shared']} rows both runs have"
                 + (f" ({rows['only_a']} rows only in A and {rows['only_b']} only in B left out)"
                    if rows["only_a"] or rows["only_b"] else "")
                 + f"; {result['bootstrap']['resamples']} paired bootstrap resamples (seed "
                   f"{result['bootstrap']['seed']}), percentile intervals; p: two-sided bootstrap p-value, Holm-"
                   "adjusted across datasets; McNemar: exact, on the rows only one run got right."),
    }
