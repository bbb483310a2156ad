"""The official answer parser and metrics (official `eval.py`), plus strict figures and averages.

Pure functions: parse an output into a label, compute the six paper metrics for one dataset, and
average datasets weighted by sample count (the paper's leaderboard averaging). Every figure gets a 95% bootstrap
interval (mmla.stats; pooled figures resample within each dataset) and score-mode rows, which carry their candidate
probabilities (`probs`), add calibration.
"""

from __future__ import annotations

import json
import re
from functools import lru_cache

from . import stats
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


def preload_metrics() -> None:
    """Import what compute_metrics needs (scikit-learn: about a second), for a caller that has a core to spare now."""
    import sklearn.metrics  # noqa: F401


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
    if all("strict" in m for m in per_dataset.values()):
        avg["strict"] = {k: round(sum(m["strict"][k] * m["n"] for m in per_dataset.values()) / total, 2)
                         for k in METRICS}
    return avg


def bootstrap_record(seed: int, resamples: int) -> dict:
    """What metrics.json says about its intervals."""
    return {"seed": seed, "resamples": resamples, "level": stats.LEVEL, "interval": "percentile",
            "unit": "utterance (rows drawn with replacement, the dataset's size each time)",
            "average": "stratified: each dataset resampled on its own, then the same n-weighted average"}


def label_indices(task, gold: list[str], *preds: list[str]) -> tuple[list[str], list]:
    """One label universe for a dataset (its gold labels, then anything else predicted, sorted) and each list of
    labels as an index array into it."""
    import numpy as np

    known = [l.lower() for l in task.labels]
    extra = sorted({x for col in (gold, *preds) for x in col} - set(known))
    universe = known + extra
    index = {l: i for i, l in enumerate(universe)}
    return universe, [np.array([index[x] for x in col], dtype=np.int64) for col in (gold, *preds)]


def intervals(by_ds: dict[str, tuple[list, list]], seed: int = stats.SEED,
              resamples: int = stats.RESAMPLES) -> tuple[dict, dict]:
    """95% percentile intervals (x100, 2 decimals) of every figure per dataset (strict ones under `strict`) and
    of the pooled average (stratified: the n-weighted average of the datasets' resampled figures)."""
    import numpy as np

    per, pooled, total = {}, {}, sum(len(g) for g, _ in by_ds.values())
    for ds, (gold, pred) in by_ds.items():
        task = get_task(ds)
        universe, (g, p) = label_indices(task, gold, pred)
        strict = np.array([i < len(task.labels) for i in range(len(universe))])
        dist = stats.bootstrap_metrics(g, p, len(universe), strict, resamples=resamples,
                                       rng=stats.rng_for(seed, ds))
        ci = {m: [_r(x) for x in stats.percentile_interval(dist[m])] for m in METRICS}
        ci["strict"] = {m: [_r(x) for x in stats.percentile_interval(dist[f"strict/{m}"])] for m in METRICS}
        per[ds] = ci
        for name, v in dist.items():
            pooled[name] = pooled.get(name, 0) + v * (len(gold) / total)
    avg = {m: [_r(x) for x in stats.percentile_interval(pooled[m])] for m in METRICS}
    avg["strict"] = {m: [_r(x) for x in stats.percentile_interval(pooled[f"strict/{m}"])] for m in METRICS}
    return per, avg


def calibration(records: list[dict], task) -> dict | None:
    """ECE (x100) and Brier score of the rows that carry candidate probabilities (`probs`, in the task's label
    order, as score mode writes them); None when no row does."""
    import numpy as np

    rows = [r for r in records if isinstance(r.get("probs"), list) and len(r["probs"]) == len(task.labels)]
    if not rows:
        return None
    index = {l.lower(): i for i, l in enumerate(task.labels)}
    probs = np.array([r["probs"] for r in rows], dtype=float)
    probs /= probs.sum(1, keepdims=True)
    gold = np.array([index[normalize_label(r["label"], task.task)] for r in rows])
    c = stats.calibration(probs, gold)
    return {"ECE": _r(c["ECE"]), "Brier": round(c["Brier"], 4), "n": len(rows), "bins": stats.ECE_BINS,
            "binning": f"{stats.ECE_BINS} equal-width bins of the top candidate's probability"}


def check_records(records: list[dict]) -> None:
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


def read_predictions(path) -> list[dict]:
    """The records of a predictions JSONL file; bad input is one line naming the file and line."""
    import json
    from pathlib import Path

    path = Path(path)
    if not path.is_file():
        raise ValueError(f"{path}: {'is a directory, not a predictions file' if path.is_dir() else 'file not found'}")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise ValueError(f"{path}: not UTF-8 text (byte {e.start})") from None
    records = []
    for n, line in enumerate(text.splitlines(), 1):
        if line.strip():
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError as e:
                raise ValueError(f"{path}: line {n}: not valid JSON ({e.msg})") from None
    if not records:
        raise ValueError(f"{path}: no predictions in this file")
    return records


def unique_records(records: list[dict]) -> tuple[list[dict], int]:
    """One record per (dataset, split, id, sample), the last one written (a file two runs appended to, or a
    rerun's retries), and how many were dropped. Records without an id are all kept."""
    last: dict = {}
    for i, r in enumerate(records):
        key = (r.get("dataset"), str(r.get("split")), str(r["id"]), str(r.get("sample", 0))) if "id" in r else i
        last.pop(key, None)  # re-insert: the kept record takes the place of the last one written
        last[key] = r
    return list(last.values()), len(records) - len(last)


def _add_intervals(result: dict, by_ds: dict, seed: int | None, resamples: int) -> dict:
    if seed is None:
        return result
    per, avg = intervals(by_ds, seed, resamples)
    for ds, ci in per.items():
        result["per_dataset"][ds]["ci95"] = ci
    result["average"]["ci95"] = avg
    result["bootstrap"] = bootstrap_record(seed, resamples)
    return result


def evaluate_records(records: list[dict], *, seed: int | None = stats.SEED, resamples: int = stats.RESAMPLES) -> dict:
    """records: dicts with at least dataset, label (gold) and output (raw model text); the output is
    always parsed here, so any stored `pred` is ignored. Each (dataset, split, id, sample) counts once (the last
    record). Returns {"per_dataset": ..., "average": ..., "duplicates_dropped": n, "bootstrap": ...}; each figure's
    95% interval is under `ci95` beside it (seed=None: no intervals), calibration under `calibration` for rows
    with candidate probabilities."""
    check_records(records)
    records, dropped = unique_records(records)
    by_ds: dict[str, tuple[list, list]] = {}
    rows: dict[str, list[dict]] = {}
    for r in records:
        task = get_task(r["dataset"])
        pred = parse_output(r["output"], task.labels)
        g, p = by_ds.setdefault(task.name, ([], []))
        g.append(normalize_label(r["label"], task.task))
        p.append(pred)
        rows.setdefault(task.name, []).append(r)
    per = {ds: compute_metrics(g, p, get_task(ds).labels) for ds, (g, p) in by_ds.items()}
    result = {"per_dataset": per, "average": weighted_average(per), "duplicates_dropped": dropped}
    cal = {ds: c for ds, rs in rows.items() if (c := calibration(rs, get_task(ds))) is not None}
    for ds, c in cal.items():
        per[ds]["calibration"] = c
    if cal:
        n = sum(c["n"] for c in cal.values())
        result["average"]["calibration"] = {
            "ECE": round(sum(c["ECE"] * c["n"] for c in cal.values()) / n, 2),
            "Brier": round(sum(c["Brier"] * c["n"] for c in cal.values()) / n, 4), "n": n, "bins": stats.ECE_BINS}
    return _add_intervals(result, by_ds, seed, resamples)


def evaluate_samples(records: list[dict], *, seed: int | None = stats.SEED,
                     resamples: int = stats.RESAMPLES) -> dict:
    """Records of K sampled answers per row (field `sample`, 0..K-1): the metrics of each draw, their mean and
    standard deviation (how far a sampled protocol moves on its own, which a difference from the paper must exceed
    to mean anything), and the majority vote over the K parsed answers (ties: the answer drawn first) as the main
    figure. With one sample per row this is `evaluate_records`."""
    import statistics
    from collections import Counter

    check_records(records)
    records, dropped = unique_records(records)
    draws: dict[int, list[dict]] = {}
    for r in records:
        draws.setdefault(int(r.get("sample", 0)), []).append(r)
    if len(draws) < 2:
        return {**evaluate_records(records, seed=seed, resamples=resamples), "duplicates_dropped": dropped}
    each = {k: evaluate_records(v, seed=None) for k, v in sorted(draws.items())}
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
    return _add_intervals(result, by_ds, seed, resamples)


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
    # the main table's average line is named once in the output (a launcher's log shows one report per run)
    named = [*result["per_dataset"].items(), ("average (pooled)", result["average"])]
    if "bootstrap" in result:
        b = result["bootstrap"]
        lines += ["", f"95% intervals (percentile bootstrap over utterances, {b['resamples']} resamples, seed "
                      f"{b['seed']}; the average resamples within each dataset)",
                  f"{'dataset':<22}" + "".join(f"{c:>14}" for c in METRICS)]
        for ds, m in named:
            if "ci95" in m:
                lines.append(f"{ds:<22}" + "".join(f"{f'{lo:.2f}-{hi:.2f}':>14}" for lo, hi in
                                                   (m["ci95"][c] for c in METRICS)))
    cal = [(ds, m["calibration"]) for ds, m in named if "calibration" in m]
    if cal:
        lines += ["", f"calibration of the candidate probabilities (ECE: {cal[0][1]['bins']} equal-width bins of "
                      f"the top probability, x100; Brier: multi-class, 0..2)"]
        lines += [f"{ds:<22}{'ECE':>8}{c['ECE']:>8.2f}{'Brier':>8}{c['Brier']:>8.4f}" for ds, c in cal]
    if "samples" in result:
        s = result["samples"]
        lines.append(f"(majority vote over {s['k']} sampled answers per row; single draws: "
                     + ", ".join(f"{m} {v['mean']} +/- {v['std']}" for m, v in s["average"].items()) + ")")
    return "\n".join(lines)
