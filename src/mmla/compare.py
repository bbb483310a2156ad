"""Is a difference between two runs real? `mmla compare RUN_A RUN_B`.

Rows are paired by (dataset, split, id); only rows both runs have are compared. Per dataset and for the pooled
average, per metric: A, B, diff = B - A (the official figures of mmla.evaluation over the shared rows), the 95%
percentile interval of the paired bootstrap of the difference (rows drawn with replacement, both runs' answers
together), its two-sided p-value (mmla.stats.bootstrap_p), Holm's adjustment of those p-values across datasets, and
for ACC the exact McNemar test. The pooled figure is the n-weighted average of the datasets' figures and its
bootstrap is stratified by dataset.
"""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import numpy as np

from . import stats
from .data import normalize_label
from .evaluation import METRICS, check_records, compute_metrics, label_indices, parse_output, unique_records
from .evaluation import read_predictions as read_file, weighted_average
from .tasks import get_task


def read_run(path: Path) -> list[dict]:
    """A run directory's predictions.jsonl (or the file itself); bad input is one line naming file and line."""
    path = Path(path)
    if path.is_dir():
        path = path / "predictions.jsonl"
    if not path.exists():
        raise ValueError(f"{path}: file not found (give a run directory or its predictions.jsonl)")
    records = read_file(path)
    try:
        check_records(records)
    except ValueError as e:
        raise ValueError(f"{path}: {e}") from None
    for n, r in enumerate(records, 1):
        if "id" not in r:
            raise ValueError(f"{path}: record {n}: missing field 'id' (rows are paired by dataset, split and id)")
    return records


def row_answers(records: list[dict]) -> dict[tuple, tuple[str, str]]:
    """(dataset, split, id) -> (gold, parsed answer); several sampled answers per row give their majority vote
    (ties: the answer drawn first), as metrics.json does."""
    records, _ = unique_records(records)
    answers: dict[tuple, list] = {}
    for r in sorted(records, key=lambda r: int(r.get("sample", 0))):
        task = get_task(r["dataset"])
        key = (task.name, str(r.get("split")), str(r["id"]))
        gold = normalize_label(r["label"], task.task)
        answers.setdefault(key, [gold, []])[1].append(parse_output(r["output"], task.labels))
    out = {}
    for key, (gold, preds) in answers.items():
        counts = Counter(preds)
        out[key] = gold, max(preds, key=lambda x: (counts[x], -preds.index(x)))
    return out


def pair(a: dict[tuple, tuple], b: dict[tuple, tuple]) -> tuple[dict[str, list], dict]:
    """Per dataset, the shared rows as (gold, answer A, answer B), in A's order; and how many rows each run had
    that the other has not."""
    shared = [k for k in a if k in b]
    by_ds: dict[str, list] = {}
    for k in shared:
        if a[k][0] != b[k][0]:
            raise ValueError(f"row {k[0]} / {k[1]} / {k[2]}: the two runs disagree on the gold label "
                             f"('{a[k][0]}' vs '{b[k][0]}')")
        by_ds.setdefault(k[0], []).append((a[k][0], a[k][1], b[k][1]))
    return by_ds, {"shared": len(shared), "only_a": len(a) - len(shared), "only_b": len(b) - len(shared)}


def _r(x: float) -> float:
    return round(float(x), 2)


def _ci(values: np.ndarray) -> list[float]:
    return [_r(100 * x) for x in stats.percentile_interval(values)]


def compare_runs(records_a: list[dict], records_b: list[dict], *, seed: int = stats.SEED,
                 resamples: int = stats.RESAMPLES, per_class: bool = False) -> dict:
    """The comparison of two runs (see the module docstring). per_class adds `per_class_f1`: per dataset and
    label, F1 of A and B, their difference and its 95% interval."""
    by_ds, rows = pair(row_answers(records_a), row_answers(records_b))
    if not by_ds:
        raise ValueError("the two runs share no row (rows are paired by dataset, split and id)")
    order = list(by_ds)
    total = sum(len(by_ds[ds]) for ds in order)
    per, classes, figures_a, figures_b = {}, {}, {}, {}
    pooled: dict[str, np.ndarray] = {}
    discordant = [0, 0]
    for ds in order:
        gold, pa, pb = (list(col) for col in zip(*by_ds[ds]))
        task = get_task(ds)
        figures_a[ds] = compute_metrics(gold, pa, task.labels)
        figures_b[ds] = compute_metrics(gold, pb, task.labels)
        universe, (g, ia, ib) = label_indices(task, gold, pa, pb)
        dist = stats.paired_bootstrap(g, ia, ib, len(universe), resamples=resamples, rng=stats.rng_for(seed, ds))
        right_a, right_b = ia == g, ib == g
        discordant[0] += int(np.sum(right_a & ~right_b))
        discordant[1] += int(np.sum(~right_a & right_b))
        block = {"n": len(gold), "agreement": _r(100 * np.mean(ia == ib))}
        for m in METRICS:
            diffs = dist[f"{m}_b"] - dist[f"{m}_a"]
            pooled[m] = pooled.get(m, 0) + diffs * (len(gold) / total)
            a, b = figures_a[ds][m], figures_b[ds][m]
            block[m] = {"a": a, "b": b, "diff": _r(b - a), "ci95": _ci(diffs), "p": stats.bootstrap_p(diffs)}
        block["ACC"]["mcnemar_p"] = stats.mcnemar_exact(right_a, right_b)
        per[ds] = block
        if per_class:
            classes[ds] = _per_class(universe, g, ia, ib, dist, task)
    for m in METRICS:
        for ds, p in stats.holm({ds: per[ds][m]["p"] for ds in order}).items():
            per[ds][m]["p_holm"] = p
    avg_a, avg_b = weighted_average(figures_a), weighted_average(figures_b)
    agree = sum(per[ds]["agreement"] * per[ds]["n"] for ds in order) / total
    average = {"n": total, "agreement": _r(agree)}
    for m in METRICS:
        p = stats.bootstrap_p(pooled[m])
        average[m] = {"a": avg_a[m], "b": avg_b[m], "diff": _r(avg_b[m] - avg_a[m]), "ci95": _ci(pooled[m]),
                      "p": p, "p_holm": p}
    average["ACC"]["mcnemar_p"] = stats.mcnemar_counts(*discordant)
    for block in (*per.values(), average):  # the keys in the order the README lists them
        for m in METRICS:
            block[m] = {k: block[m][k] for k in ("a", "b", "diff", "ci95", "p", "p_holm", "mcnemar_p") if k in block[m]}
    out = {"rows": rows, "bootstrap": {**_bootstrap(seed, resamples)}, "per_dataset": per, "average": average}
    if per_class:
        out["per_class_f1"] = classes
    return out


def _bootstrap(seed: int, resamples: int) -> dict:
    return {"seed": seed, "resamples": resamples, "level": stats.LEVEL, "interval": "percentile, paired",
            "p": "2 x min(share of resampled diffs <= 0, share >= 0), capped at 1",
            "p_holm": "Holm across the datasets, per metric (the average is one test: p_holm = p)",
            "mcnemar_p": "exact: two-sided binomial test on the discordant rows"}


def _per_class(universe, g, ia, ib, dist, task) -> dict:
    """F1 per gold label of A and B on the shared rows, B - A, and the paired bootstrap interval of B - A."""
    k = len(universe)
    out = {}
    for side, pred in (("a", ia), ("b", ib)):
        keys, counts = stats.distinct(g, pred)
        tp, t, p = stats.class_counts(counts[None, :], keys[:, 0], keys[:, 1], k)
        out[side] = stats.per_class(tp, t, p)[2][0]
    diffs = dist["f1_b"] - dist["f1_a"]
    rows = {}
    for i, label in enumerate(universe[: len(task.labels)]):
        if not (np.any(g == i) or np.any(ia == i) or np.any(ib == i)):
            continue
        a, b = _r(100 * out["a"][i]), _r(100 * out["b"][i])
        rows[label] = {"support": int(np.sum(g == i)), "a": a, "b": b, "diff": _r(b - a),
                       "ci95": _ci(diffs[:, i])}
    return rows


def left_out_line(rows: dict) -> str:
    """The one line saying what the comparison used."""
    if not rows["only_a"] and not rows["only_b"]:
        return f"compared all {rows['shared']} rows (both runs have the same rows)"
    return (f"compared the {rows['shared']} rows both runs share; left out {rows['only_a'] + rows['only_b']} "
            f"({rows['only_a']} only in A, {rows['only_b']} only in B)")


def format_comparison(result: dict, name_a: str = "A", name_b: str = "B") -> str:
    """A readable table: one block per dataset and the average."""
    head = f"{'metric':<10}{'A':>9}{'B':>9}{'B - A':>9}{'95% CI of B - A':>20}{'p':>9}{'p Holm':>9}{'McNemar':>9}"
    lines = [f"A = {name_a}", f"B = {name_b}",
             f"({result['bootstrap']['resamples']} paired bootstrap resamples, seed {result['bootstrap']['seed']})"]
    blocks = list(result["per_dataset"].items()) + [("average (n-weighted)", result["average"])]
    for ds, block in blocks:
        lines += ["", f"{ds}  n={block['n']}  agreement {block['agreement']:.2f}%", head]
        for m in METRICS:
            c = block[m]
            ci = f"[{c['ci95'][0]:+.2f}, {c['ci95'][1]:+.2f}]"
            mc = f"{c['mcnemar_p']:>9.4f}" if "mcnemar_p" in c else f"{'':>9}"
            lines.append(f"{m:<10}{c['a']:>9.2f}{c['b']:>9.2f}{c['diff']:>+9.2f}{ci:>20}{c['p']:>9.4f}"
                         f"{c['p_holm']:>9.4f}{mc}")
    return "\n".join(lines)
