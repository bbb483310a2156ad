"""Uncertainty of the benchmark's figures: bootstrap intervals, paired tests, multiple-testing correction and
calibration. numpy and scipy only; knows nothing of datasets or runs (mmla.evaluation and mmla.compare feed it
label indices).

The bootstrap resamples utterances with replacement. Resampling n rows uniformly puts a multinomial(n, c / n) number
of draws on each group of c identical rows, so it draws those counts directly over the distinct (gold, prediction)
cells (or (gold, prediction A, prediction B) triples for a paired test): every resample's confusion counts come from
one matrix product, with no loop over resamples or rows. This is the ordinary row bootstrap, not an approximation.

Metrics on resampled counts follow scikit-learn exactly (tests/test_stats.py checks them against it): macro
averages over the labels present in the resample's gold or predictions (or over a fixed label list: the strict
figures), zero where a ratio is 0/0, weights = gold support.
"""

from __future__ import annotations

import zlib

import numpy as np

METRICS = ("ACC", "F1", "Precision", "Recall", "WF1", "WP")
RESAMPLES = 10_000
SEED = 0
LEVEL = 0.95
ECE_BINS = 10
_CHUNK = 2_000  # resamples per block: bounds memory at ~chunk x distinct cells counts


def rng_for(seed: int, key: str) -> np.random.Generator:
    """One generator per (seed, dataset): a dataset's interval does not depend on which others are evaluated."""
    return np.random.default_rng([int(seed), zlib.crc32(key.encode("utf-8"))])


# ------------------------------------------------------------------------------------------- metrics on counts


def class_counts(cells: np.ndarray, gold: np.ndarray, pred: np.ndarray, k: int):
    """Per-class true positives, gold support and predicted counts for each row of `cells`.

    cells: (B, U) counts of U distinct (gold, pred) cells; gold, pred: (U,) label indices in 0..k-1.
    Returns three (B, k) float arrays."""
    onehot_g = np.zeros((len(gold), k))
    onehot_g[np.arange(len(gold)), gold] = 1
    onehot_p = np.zeros((len(pred), k))
    onehot_p[np.arange(len(pred)), pred] = 1
    cells = np.asarray(cells, dtype=float)
    return cells @ (onehot_g * (gold == pred)[:, None]), cells @ onehot_g, cells @ onehot_p


def _ratio(num: np.ndarray, den: np.ndarray) -> np.ndarray:
    return np.divide(num, den, out=np.zeros_like(num, dtype=float), where=den > 0)


def per_class(tp: np.ndarray, t: np.ndarray, p: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Precision, recall, F1 per class (0 where undefined, scikit-learn's zero_division=0)."""
    return _ratio(tp, p), _ratio(tp, t), _ratio(2 * tp, t + p)


def metrics_from_counts(tp, t, p, labels: np.ndarray | None = None) -> dict[str, np.ndarray]:
    """The six paper metrics (fractions, not x100) from per-class counts of shape (..., k).

    labels=None: macro averages over the classes present in gold or predictions (scikit-learn's default label
    set, so `unknown` / `multi` count when predicted). labels: a boolean mask of the classes to average over
    (the strict figures: the task's gold label list)."""
    tp, t, p = (np.asarray(x, dtype=float) for x in (tp, t, p))
    prec, rec, f1 = per_class(tp, t, p)
    mask = (t + p > 0) if labels is None else np.broadcast_to(np.asarray(labels, bool), t.shape)
    m = mask.astype(float)
    n_lab = np.maximum(m.sum(-1), 1)
    support = (t * m).sum(-1)
    n = t.sum(-1)
    w = t * m / np.maximum(support, 1)[..., None]  # every gold label is in the averaged set, so support = n
    return {
        "ACC": _ratio(tp.sum(-1), n),
        "F1": (f1 * m).sum(-1) / n_lab,
        "Precision": (prec * m).sum(-1) / n_lab,
        "Recall": (rec * m).sum(-1) / n_lab,
        "WF1": (f1 * w).sum(-1),
        "WP": (prec * w).sum(-1),
    }


# ------------------------------------------------------------------------------------------------- bootstrap


def distinct(*columns: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Distinct rows of the stacked integer columns and how often each occurs: (U, len(columns)), (U,)."""
    stacked = np.stack([np.asarray(c, dtype=np.int64) for c in columns], axis=1)
    keys, counts = np.unique(stacked, axis=0, return_counts=True)
    return keys, counts


def resample_counts(counts: np.ndarray, resamples: int, rng: np.random.Generator):
    """Blocks of bootstrap counts over groups of identical rows: yields (b, U) int arrays, `resamples` rows in all.
    Each row is multinomial(n, counts / n): the number of draws on each group when n rows are drawn with
    replacement."""
    n = int(counts.sum())
    pv = counts / n
    done = 0
    while done < resamples:
        b = min(_CHUNK, resamples - done)
        yield rng.multinomial(n, pv, size=b)
        done += b


def bootstrap_metrics(gold: np.ndarray, pred: np.ndarray, k: int, strict: np.ndarray | None, *,
                      resamples: int = RESAMPLES, rng: np.random.Generator) -> dict[str, np.ndarray]:
    """Bootstrap distributions (fractions) of the six metrics, and of the strict ones under 'strict/<metric>'.
    gold, pred: label indices (0..k-1) of one dataset's rows; strict: boolean mask of the gold label list."""
    keys, counts = distinct(gold, pred)
    out: dict[str, list] = {}
    for block in resample_counts(counts, resamples, rng):
        tp, t, p = class_counts(block, keys[:, 0], keys[:, 1], k)
        for name, v in metrics_from_counts(tp, t, p).items():
            out.setdefault(name, []).append(v)
        if strict is not None:
            for name, v in metrics_from_counts(tp, t, p, strict).items():
                out.setdefault(f"strict/{name}", []).append(v)
    return {name: np.concatenate(v) for name, v in out.items()}


def paired_bootstrap(gold: np.ndarray, pred_a: np.ndarray, pred_b: np.ndarray, k: int, *,
                     resamples: int = RESAMPLES, rng: np.random.Generator) -> dict:
    """The paired bootstrap of two runs over the same rows: each resample draws rows (gold, A's answer, B's answer)
    together. Returns per metric the distributions of A and B (fractions, shape (resamples,)), and 'f1_a', 'f1_b':
    per-class F1 distributions (resamples, k)."""
    keys, counts = distinct(gold, pred_a, pred_b)
    res: dict[str, list] = {}
    for block in resample_counts(counts, resamples, rng):
        for side, col in (("a", 1), ("b", 2)):
            tp, t, p = class_counts(block, keys[:, 0], keys[:, col], k)
            for name, v in metrics_from_counts(tp, t, p).items():
                res.setdefault(f"{name}_{side}", []).append(v)
            res.setdefault(f"f1_{side}", []).append(per_class(tp, t, p)[2])
    return {name: np.concatenate(v) for name, v in res.items()}


def percentile_interval(values: np.ndarray, level: float = LEVEL) -> tuple[float, float]:
    """The percentile bootstrap interval: the (1-level)/2 and (1+level)/2 quantiles of the resampled values."""
    lo, hi = np.percentile(values, [50 * (1 - level), 50 * (1 + level)], axis=0)
    return float(lo), float(hi)


def bootstrap_p(diffs: np.ndarray) -> float:
    """Two-sided bootstrap p-value of a paired difference: 2 x the smaller of the shares of resampled differences
    <= 0 and >= 0, capped at 1. It is the smallest alpha at which the percentile interval of level 1 - alpha
    leaves out 0 (so p < 0.05 when the 95% interval excludes 0); identical runs get p = 1."""
    diffs = np.asarray(diffs)
    return float(min(1.0, 2 * min(np.mean(diffs <= 0), np.mean(diffs >= 0))))


# ------------------------------------------------------------------------------------------ tests and corrections


def mcnemar_exact(a_right: np.ndarray, b_right: np.ndarray) -> float:
    """Exact McNemar test: two-sided binomial test (p = 1/2) on the discordant pairs (rows where exactly one run is
    right). 1.0 when there are none."""
    a_right, b_right = np.asarray(a_right, bool), np.asarray(b_right, bool)
    return mcnemar_counts(int(np.sum(a_right & ~b_right)), int(np.sum(~a_right & b_right)))


def mcnemar_counts(only_a: int, only_b: int) -> float:
    """Exact McNemar from the discordant counts: rows only A got right, rows only B got right."""
    from scipy.stats import binomtest

    if only_a + only_b == 0:
        return 1.0
    return float(binomtest(only_b, only_a + only_b, 0.5, alternative="two-sided").pvalue)


def holm(pvalues: dict[str, float] | list[float]):
    """Holm's step-down adjustment: sort p ascending, multiply the i-th smallest (from 0) by m - i, carry the
    running maximum, cap at 1. Returns the same shape as given (dict or list)."""
    items = list(pvalues.items()) if isinstance(pvalues, dict) else list(enumerate(pvalues))
    m = len(items)
    adjusted, running = {}, 0.0
    for i, (key, p) in enumerate(sorted(items, key=lambda kv: kv[1])):
        running = max(running, min(1.0, (m - i) * p))
        adjusted[key] = running
    if isinstance(pvalues, dict):
        return {key: adjusted[key] for key in pvalues}
    return [adjusted[i] for i in range(m)]


# ------------------------------------------------------------------------------------------------- calibration


def reliability(confidence: np.ndarray, correct: np.ndarray, bins: int = ECE_BINS) -> list[dict]:
    """Equal-width bins over the top candidate's probability, [0, 1/bins), ..., [1 - 1/bins, 1]: per bin its
    edges, number of rows, mean confidence and accuracy (None for an empty bin)."""
    confidence, correct = np.asarray(confidence, float), np.asarray(correct, float)
    idx = np.minimum((confidence * bins).astype(int), bins - 1)
    out = []
    for b in range(bins):
        sel = idx == b
        n = int(sel.sum())
        out.append({"lo": b / bins, "hi": (b + 1) / bins, "n": n,
                    "confidence": float(confidence[sel].mean()) if n else None,
                    "accuracy": float(correct[sel].mean()) if n else None})
    return out


def calibration(probs: np.ndarray, gold: np.ndarray, bins: int = ECE_BINS) -> dict:
    """Expected calibration error and Brier score of candidate probabilities (rows sum to 1) against gold indices.

    ECE: over `bins` equal-width bins of the top probability, sum of (rows in bin / n) x |accuracy - mean
    confidence| (fraction). Brier: mean over rows of sum_k (p_k - [k = gold])^2 (the multi-class form, 0..2)."""
    probs, gold = np.asarray(probs, float), np.asarray(gold, int)
    top = probs.argmax(1)
    conf = probs[np.arange(len(probs)), top]
    correct = top == gold
    ece = sum(b["n"] * abs(b["accuracy"] - b["confidence"]) for b in reliability(conf, correct, bins) if b["n"])
    onehot = np.zeros_like(probs)
    onehot[np.arange(len(gold)), gold] = 1
    return {"ECE": float(ece / len(probs)), "Brier": float(((probs - onehot) ** 2).sum(1).mean())}
