"""The official answer parser and metrics (official `eval.py`), plus strict figures and averages.

Pure functions: parse an output into a label, compute the six paper metrics for one dataset, and
average datasets weighted by sample count (the paper's leaderboard averaging).
"""

from __future__ import annotations

import json
import re
from functools import lru_cache

from .data import normalize_label
from .tasks import get_task

UNKNOWN, MULTI = "unknown", "multi"
METRICS = ("ACC", "F1", "Precision", "Recall", "WF1", "WP")


@lru_cache(maxsize=None)
def _patterns(labels: tuple[str, ...]) -> tuple[tuple[str, re.Pattern], ...]:
    return tuple((l, re.compile(r"(?<!\w)" + re.escape(l.lower()) + r"(?!\w)")) for l in labels)


def parse_output(output: str, labels: tuple[str, ...] | list[str]) -> str:
    """Lower-case the output, look for each label as a whole word: one label found -> that label,
    none -> 'unknown', two or more distinct labels -> 'multi'."""
    text = (output or "").lower()
    found = [l.lower() for l, pat in _patterns(tuple(labels)) if pat.search(text)]
    if not found:
        return UNKNOWN
    return found[0] if len(found) == 1 else MULTI


def _r(x: float) -> float:
    return round(100 * float(x), 2)


def compute_metrics(gold: list[str], pred: list[str], labels: tuple[str, ...] | None = None) -> dict:
    """ACC, macro F1/Precision/Recall, weighted F1/Precision (x100, 2 decimals) as scikit-learn computes
    them over gold and parsed labels with unknown/multi kept as classes; the unparsed rate; n; and
    `strict` metrics whose macro/weighted averages run over the gold label set only."""
    from sklearn.metrics import accuracy_score, f1_score, precision_score, recall_score

    if len(gold) != len(pred):
        raise ValueError(f"gold and pred differ in length: {len(gold)} vs {len(pred)}")
    if not gold:
        raise ValueError("no samples to evaluate")

    def six(**kw) -> dict:
        return {
            "ACC": _r(accuracy_score(gold, pred)),
            "F1": _r(f1_score(gold, pred, average="macro", zero_division=0, **kw)),
            "Precision": _r(precision_score(gold, pred, average="macro", zero_division=0, **kw)),
            "Recall": _r(recall_score(gold, pred, average="macro", zero_division=0, **kw)),
            "WF1": _r(f1_score(gold, pred, average="weighted", zero_division=0, **kw)),
            "WP": _r(precision_score(gold, pred, average="weighted", zero_division=0, **kw)),
        }

    out = six()
    out["unparsed"] = _r(sum(p in (UNKNOWN, MULTI) for p in pred) / len(pred))
    out["n"] = len(gold)
    strict_labels = list(labels) if labels else sorted(set(gold))
    out["strict"] = six(labels=strict_labels)
    return out


def weighted_average(per_dataset: dict[str, dict]) -> dict:
    """Average of each metric over datasets weighted by their sample count n (pooled accuracy)."""
    total = sum(m["n"] for m in per_dataset.values())
    if not total:
        return {}
    avg = {k: round(sum(m[k] * m["n"] for m in per_dataset.values()) / total, 2) for k in (*METRICS, "unparsed")}
    avg["n"] = total
    return avg


def _check(records: list[dict]) -> None:
    """Every record a JSON object with a known dataset and string label / output: else one line naming it."""
    if not records:
        raise ValueError("no records to evaluate")
    for i, r in enumerate(records, 1):
        if not isinstance(r, dict):
            raise ValueError(f"record {i}: expected a JSON object, got {type(r).__name__}")
        for key in ("dataset", "label", "output"):
            if key not in r:
                raise ValueError(f"record {i}: missing field '{key}'")
            if not isinstance(r[key], str) and not (key == "output" and r[key] is None):
                raise ValueError(f"record {i}: field '{key}' must be a string, got {json.dumps(r[key])[:40]}")
        get_task(r["dataset"])


def unique_records(records: list[dict]) -> tuple[list[dict], int]:
    """One record per (dataset, split, id, sample), the last one written (a file two runs appended to, or a
    rerun's retries), and how many were dropped. Records without an id are all kept."""
    last: dict = {}
    for i, r in enumerate(records):
        key = (r.get("dataset"), str(r.get("split")), str(r["id"]), str(r.get("sample", 0))) if "id" in r else i
        last.pop(key, None)  # re-insert: the kept record takes the place of the last one written
        last[key] = r
    return list(last.values()), len(records) - len(last)


def evaluate_records(records: list[dict]) -> dict:
    """records: dicts with at least dataset, label (gold) and output (raw model text); the output is
    always parsed here, so any stored `pred` is ignored. Each (dataset, split, id, sample) counts once (the last
    record). Returns {"per_dataset": ..., "average": ..., "duplicates_dropped": n}."""
    _check(records)
    records, dropped = unique_records(records)
    by_ds: dict[str, tuple[list, list]] = {}
    for r in records:
        task = get_task(r["dataset"])
        pred = parse_output(r["output"], task.labels)
        g, p = by_ds.setdefault(task.name, ([], []))
        g.append(normalize_label(r["label"], task.task))
        p.append(pred)
    per = {ds: compute_metrics(g, p, get_task(ds).labels) for ds, (g, p) in by_ds.items()}
    return {"per_dataset": per, "average": weighted_average(per), "duplicates_dropped": dropped}


def evaluate_samples(records: list[dict]) -> dict:
    """Records of K sampled answers per row (field `sample`, 0..K-1): the metrics of each draw, their mean and
    standard deviation (how far a sampled protocol moves on its own, which a difference from the paper must exceed
    to mean anything), and the majority vote over the K parsed answers (ties: the answer drawn first) as the main
    figure. With one sample per row this is `evaluate_records`."""
    import statistics
    from collections import Counter

    _check(records)
    records, dropped = unique_records(records)
    draws: dict[int, list[dict]] = {}
    for r in records:
        draws.setdefault(int(r.get("sample", 0)), []).append(r)
    if len(draws) < 2:
        return {**evaluate_records(records), "duplicates_dropped": dropped}
    each = {k: evaluate_records(v) for k, v in sorted(draws.items())}
    rows: dict[tuple, list[dict]] = {}
    for k in sorted(draws):
        for r in draws[k]:
            rows.setdefault((r["dataset"], r.get("split"), r["id"]), []).append(r)
    by_ds: dict[str, tuple[list, list]] = {}
    for (ds, _, _), rs in rows.items():
        task = get_task(ds)
        preds = [parse_output(r["output"], task.labels) for r in rs]
        counts = Counter(preds)
        g, p = by_ds.setdefault(task.name, ([], []))
        g.append(normalize_label(rs[0]["label"], task.task))
        p.append(max(preds, key=lambda x: (counts[x], -preds.index(x))))
    per = {ds: compute_metrics(g, p, get_task(ds).labels) for ds, (g, p) in by_ds.items()}
    result = {"per_dataset": per, "average": weighted_average(per), "duplicates_dropped": dropped}

    def spread(get) -> dict:
        vals = [get(res) for res in each.values()]
        return {m: {"mean": round(statistics.fmean(v[m] for v in vals), 2),
                    "std": round(statistics.stdev(v[m] for v in vals), 2)} for m in METRICS}

    result["samples"] = {
        "k": len(each), "vote": "majority of the K parsed answers per row",
        "average": spread(lambda res: res["average"]),
        "per_dataset": {ds: spread(lambda res, ds=ds: res["per_dataset"][ds]) for ds in per},
    }
    return result


def format_table(result: dict, reference: dict[str, float] | None = None) -> str:
    """A readable fixed-width table; `reference` adds a column of paper ACC per dataset."""
    cols = (*METRICS, "unparsed", "n")
    head = f"{'dataset':<22}" + "".join(f"{c:>10}" for c in cols) + (f"{'paper ACC':>11}" if reference else "")
    lines = [head, "-" * len(head)]
    rows = list(result["per_dataset"].items()) + [("average (n-weighted)", result["average"])]
    if reference is not None:
        # the paper's numbers weighted by our n, over the datasets both have: a like-for-like average
        both = {ds: m["n"] for ds, m in result["per_dataset"].items() if reference.get(ds) is not None}
        if both:
            reference = {**reference, "average (n-weighted)":
                         sum(reference[ds] * n for ds, n in both.items()) / sum(both.values())}
    for ds, m in rows:
        cells = "".join(f"{m[c]:>10}" for c in cols)
        ref = ""
        if reference is not None:
            v = reference.get(ds)
            ref = f"{v:>11.2f}" if v is not None else f"{'-':>11}"
        lines.append(f"{ds:<22}{cells}{ref}")
    if "samples" in result:
        s = result["samples"]
        lines.append(f"(majority vote over {s['k']} sampled answers per row; single draws: "
                     + ", ".join(f"{m} {v['mean']} +/- {v['std']}" for m, v in s["average"].items()) + ")")
    return "\n".join(lines)
