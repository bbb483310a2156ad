"""mmla.stats against independent computations: scikit-learn on explicitly resampled rows, the exact binomial
written out, the normal approximation of a proportion, a slow row-by-row bootstrap, Holm by hand."""

import math
import random

import numpy as np
import pytest
from sklearn.metrics import accuracy_score, f1_score, precision_score, recall_score

from mmla import stats
from mmla.evaluation import compute_metrics, evaluate_records, intervals, label_indices
from mmla.tasks import get_task


def _rows(n=300, seed=0, dataset="MIntRec"):
    rng = random.Random(seed)
    labels = [l.lower() for l in get_task(dataset).labels]
    gold = [rng.choice(labels[:8]) for _ in range(n)]  # some labels never gold: macro sets differ from the list
    pred = [g if rng.random() < 0.45 else rng.choice(labels[:10] + ["unknown", "multi"]) for g in gold]
    return gold, pred


def test_vectorised_metrics_equal_sklearn_on_resampled_rows():
    task = get_task("MIntRec")
    gold, pred = _rows()
    universe, (g, p) = label_indices(task, gold, pred)
    strict = np.array([i < len(task.labels) for i in range(len(universe))])
    rng = np.random.default_rng(1)
    for _ in range(20):
        idx = rng.integers(0, len(gold), len(gold))  # one bootstrap resample, drawn as rows
        rg, rp = [gold[i] for i in idx], [pred[i] for i in idx]
        weights = np.bincount(idx, minlength=len(gold))[None, :]  # the same resample, as counts per row
        tp, t, pc = stats.class_counts(weights, g, p, len(universe))
        for labels, got in ((None, stats.metrics_from_counts(tp, t, pc)),
                            (task.labels, stats.metrics_from_counts(tp, t, pc, strict))):
            kw = {"labels": [l.lower() for l in labels]} if labels else {}
            expect = {
                "ACC": accuracy_score(rg, rp),
                "F1": f1_score(rg, rp, average="macro", zero_division=0, **kw),
                "Precision": precision_score(rg, rp, average="macro", zero_division=0, **kw),
                "Recall": recall_score(rg, rp, average="macro", zero_division=0, **kw),
                "WF1": f1_score(rg, rp, average="weighted", zero_division=0, **kw),
                "WP": precision_score(rg, rp, average="weighted", zero_division=0, **kw),
            }
            for m, v in expect.items():
                assert got[m][0] == pytest.approx(v, abs=1e-12), (m, labels)


def test_accuracy_interval_matches_the_normal_approximation():
    """n Bernoulli rows with 60% right: the percentile interval is p +- 1.96 sqrt(p(1-p)/n) within Monte Carlo
    error (n = 2000 keeps the binomial close to normal; 10,000 resamples put the quantiles within ~0.3 points)."""
    n, right = 2000, 1200
    gold = np.zeros(n, dtype=np.int64)
    pred = np.r_[np.zeros(right, np.int64), np.ones(n - right, np.int64)]
    dist = stats.bootstrap_metrics(gold, pred, 2, None, resamples=10_000, rng=np.random.default_rng(0))
    lo, hi = stats.percentile_interval(dist["ACC"])
    half = 1.96 * math.sqrt(0.6 * 0.4 / n)
    assert lo == pytest.approx(0.6 - half, abs=0.003) and hi == pytest.approx(0.6 + half, abs=0.003)


def test_macro_f1_interval_matches_a_slow_row_bootstrap():
    """The count-based bootstrap against the plain one: draw rows with replacement, call scikit-learn."""
    gold, pred = _rows(200, seed=3, dataset="MELD")
    task = get_task("MELD")
    universe, (g, p) = label_indices(task, gold, pred)
    fast = stats.bootstrap_metrics(g, p, len(universe), None, resamples=4000, rng=np.random.default_rng(5))
    rng = np.random.default_rng(6)
    slow = []
    for _ in range(1500):
        idx = rng.integers(0, len(gold), len(gold))
        slow.append(f1_score([gold[i] for i in idx], [pred[i] for i in idx], average="macro", zero_division=0))
    for q in (2.5, 50, 97.5):  # quantiles of both within Monte Carlo error (sd of F1 here is ~0.035)
        assert np.percentile(fast["F1"], q) == pytest.approx(np.percentile(slow, q), abs=0.012)
    assert np.mean(fast["F1"]) == pytest.approx(np.mean(slow), abs=0.004)


def test_same_seed_same_interval_and_the_figure_lies_inside():
    gold, pred = _rows(150)
    records = [{"dataset": "MIntRec", "split": "test", "id": str(i), "label": g, "output": f"intent: {p}"}
               for i, (g, p) in enumerate(zip(gold, pred))]
    one, two = evaluate_records(records, seed=7), evaluate_records(records, seed=7)
    other = evaluate_records(records, seed=8)
    assert one == two
    assert one["bootstrap"]["seed"] == 7 and one["bootstrap"]["resamples"] == stats.RESAMPLES
    ci = one["per_dataset"]["MIntRec"]["ci95"]
    assert ci != other["per_dataset"]["MIntRec"]["ci95"]
    for m in stats.METRICS:
        assert ci[m][0] <= one["per_dataset"]["MIntRec"][m] <= ci[m][1]
        assert ci["strict"][m][0] <= one["per_dataset"]["MIntRec"]["strict"][m] <= ci["strict"][m][1]


def test_pooled_interval_is_stratified_by_dataset():
    """One dataset's interval does not depend on the others; the pooled one contains the n-weighted average and is
    narrower than the smaller dataset's."""
    a, b = _rows(200, 1, "MELD"), _rows(100, 2, "MOSI")
    per_one, _ = intervals({"MELD": a}, seed=0, resamples=2000)
    per_two, avg = intervals({"MELD": a, "MOSI": b}, seed=0, resamples=2000)
    assert per_one["MELD"] == per_two["MELD"]
    acc = (compute_metrics(*a)["ACC"] * 200 + compute_metrics(*b)["ACC"] * 100) / 300
    assert avg["ACC"][0] <= acc <= avg["ACC"][1]
    assert avg["ACC"][1] - avg["ACC"][0] < per_two["MOSI"]["ACC"][1] - per_two["MOSI"]["ACC"][0]


@pytest.mark.parametrize("only_a,only_b", [(0, 0), (3, 3), (2, 9), (15, 4), (0, 6), (40, 61)])
def test_mcnemar_is_the_exact_binomial(only_a, only_b):
    both = 20
    a = np.r_[np.ones(both, bool), np.ones(only_a, bool), np.zeros(only_b, bool), np.zeros(7, bool)]
    b = np.r_[np.ones(both, bool), np.zeros(only_a, bool), np.ones(only_b, bool), np.zeros(7, bool)]
    n, k = only_a + only_b, min(only_a, only_b)
    # written out: twice the smaller tail of Binomial(n, 1/2), capped at 1 (symmetric, so no likelihood ordering)
    expect = 1.0 if n == 0 else min(1.0, 2 * sum(math.comb(n, i) for i in range(k + 1)) / 2 ** n)
    assert stats.mcnemar_exact(a, b) == pytest.approx(expect, rel=1e-9)


def test_holm_by_hand():
    # sorted: 0.005 x4 = 0.02; 0.01 x3 = 0.03; 0.03 x2 = 0.06; 0.04 x1 = 0.04 -> kept at 0.06 (monotone)
    assert stats.holm([0.01, 0.04, 0.03, 0.005]) == pytest.approx([0.03, 0.06, 0.06, 0.02])
    assert stats.holm({"MELD": 0.5, "MOSI": 0.4}) == pytest.approx({"MELD": 0.8, "MOSI": 0.8})
    assert stats.holm([0.7]) == [0.7]
    assert stats.holm([0.6, 0.9, 0.2]) == pytest.approx([1.0, 1.0, 0.6])


def test_bootstrap_p():
    assert stats.bootstrap_p(np.zeros(100)) == 1.0
    assert stats.bootstrap_p(np.r_[np.full(990, 0.1), np.full(10, -0.1)]) == pytest.approx(0.02)
    assert stats.bootstrap_p(np.r_[np.full(10, 0.1), np.full(990, -0.1)]) == pytest.approx(0.02)


def test_calibration_by_hand():
    probs = np.array([[0.9, 0.1], [0.8, 0.2], [0.3, 0.7], [0.45, 0.55]])
    gold = np.array([0, 1, 1, 0])
    c = stats.calibration(probs, gold)
    # bins of the top probability: 0.9 -> [0.9, 1] (right), 0.8 -> [0.8, 0.9) (wrong), 0.7 -> [0.7, 0.8) (right),
    # 0.55 -> [0.5, 0.6) (wrong): |1-0.9| + |0-0.8| + |1-0.7| + |0-0.55|, over 4
    assert c["ECE"] == pytest.approx((0.1 + 0.8 + 0.3 + 0.55) / 4)
    brier = ((0.1 ** 2 + 0.1 ** 2) + (0.8 ** 2 + 0.8 ** 2) + (0.3 ** 2 + 0.3 ** 2) + (0.55 ** 2 + 0.55 ** 2)) / 4
    assert c["Brier"] == pytest.approx(brier)
    bins = stats.reliability(probs.max(1), probs.argmax(1) == gold)
    assert [b["n"] for b in bins] == [0, 0, 0, 0, 0, 1, 0, 1, 1, 1]
