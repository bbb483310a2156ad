"""mmla compare: the figures recomputed from the two predictions.jsonl files with scikit-learn and scipy, a run
against itself, rows present in one run only, and bad input in one line."""

import json
import subprocess
import sys

import pytest
from report_fixtures import make_run
from scipy.stats import binomtest
from sklearn.metrics import accuracy_score, f1_score

from mmla import stats
from mmla.compare import compare_runs, read_run
from mmla.evaluation import METRICS, parse_output
from mmla.tasks import get_task

KEYS = ["a", "b", "diff", "ci95", "p", "p_holm"]


def _cli(*args):
    return subprocess.run([sys.executable, "-m", "mmla.cli", "compare", *map(str, args)], capture_output=True,
                          text=True, timeout=300)


@pytest.fixture
def two(tmp_path):
    return (make_run(tmp_path, "a", skill=0.35, seed=0, rows=40),
            make_run(tmp_path, "b", skill=0.65, seed=1, rows=40))


def test_json_recomputed_from_the_predictions(two):
    a, b = two
    done = _cli(a, b, "--json", "--resamples", "2000")
    assert done.returncode == 0, done.stderr
    assert done.stderr.strip() == "compared all 120 rows (both runs have the same rows)"
    out = json.loads(done.stdout)
    assert set(out["per_dataset"]) == {"MELD", "MOSI", "MIntRec2.0"}
    recs = {name: {(r["dataset"], r["id"]): r for r in map(json.loads, (path / "predictions.jsonl").open())}
            for name, path in (("a", a), ("b", b))}
    for ds, block in out["per_dataset"].items():
        labels = get_task(ds).labels
        keys = [k for k in recs["a"] if k[0] == ds]
        gold = [recs["a"][k]["label"].lower() for k in keys]
        pa = [parse_output(recs["a"][k]["output"], labels) for k in keys]
        pb = [parse_output(recs["b"][k]["output"], labels) for k in keys]
        for m in METRICS:
            assert list(block[m]) == KEYS + (["mcnemar_p"] if m == "ACC" else [])
            c = block[m]
            assert c["diff"] == round(c["b"] - c["a"], 2)
            assert c["ci95"][0] <= c["ci95"][1]
            assert 0 <= c["p"] <= c["p_holm"] <= 1
        assert block["ACC"]["a"] == round(100 * accuracy_score(gold, pa), 2)
        assert block["F1"]["b"] == round(100 * f1_score(gold, pb, average="macro", zero_division=0), 2)
        only_a = sum(x == g != y for g, x, y in zip(gold, pa, pb))
        only_b = sum(y == g != x for g, x, y in zip(gold, pa, pb))
        expect = binomtest(only_b, only_a + only_b, 0.5).pvalue if only_a + only_b else 1.0
        assert block["ACC"]["mcnemar_p"] == pytest.approx(expect)
        assert block["agreement"] == round(100 * sum(x == y for x, y in zip(pa, pb)) / len(keys), 2)
    for m in METRICS:  # Holm across the three datasets
        ps = {ds: out["per_dataset"][ds][m]["p"] for ds in out["per_dataset"]}
        assert {ds: out["per_dataset"][ds][m]["p_holm"] for ds in ps} == pytest.approx(stats.holm(ps))
    avg = out["average"]
    assert list(avg["ACC"]) == KEYS + ["mcnemar_p"]
    assert avg["ACC"]["a"] == json.loads((a / "metrics.json").read_text())["average"]["ACC"]
    assert avg["ACC"]["p_holm"] == avg["ACC"]["p"]
    assert out["bootstrap"]["resamples"] == 2000 and out["bootstrap"]["seed"] == 0


def test_a_run_against_itself_differs_by_exactly_zero(two):
    a, _ = two
    out = compare_runs(read_run(a), read_run(a / "predictions.jsonl"), resamples=500)
    for block in (*out["per_dataset"].values(), out["average"]):
        assert block["agreement"] == 100.0
        for m in METRICS:
            assert block[m]["diff"] == 0 and block[m]["ci95"] == [0.0, 0.0]
            assert block[m]["p"] == 1.0 and block[m]["p_holm"] == 1.0
        assert block["ACC"]["mcnemar_p"] == 1.0


def test_same_seed_same_result_and_rows_left_out(two, tmp_path):
    a, b = two
    lines = (b / "predictions.jsonl").read_text().splitlines()
    short = tmp_path / "short.jsonl"
    short.write_text("\n".join(lines[5:]) + "\n")  # B lacks the first 5 MELD rows
    first = _cli(a, short, "--json", "--resamples", "1000", "--seed", "3")
    again = _cli(a, short, "--json", "--resamples", "1000", "--seed", "3")
    assert first.returncode == 0, first.stderr
    assert first.stdout == again.stdout
    assert first.stderr.strip() == "compared the 115 rows both runs share; left out 5 (5 only in A, 0 only in B)"
    out = json.loads(first.stdout)
    assert out["rows"] == {"shared": 115, "only_a": 5, "only_b": 0}
    assert out["per_dataset"]["MELD"]["n"] == 35
    table = _cli(a, short, "--resamples", "500")
    assert table.returncode == 0 and "McNemar" in table.stdout and "average (n-weighted)" in table.stdout


def test_bad_input_is_one_line(two, tmp_path):
    a, _ = two
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"dataset": "MELD"\n')
    done = _cli(a, bad)
    assert done.returncode == 2 and done.stderr.strip() == f"mmla: error: {bad}: line 1: not valid JSON " \
                                                          "(Expecting ',' delimiter)"
    other = tmp_path / "other.jsonl"
    other.write_text(json.dumps({"dataset": "MOSI", "split": "test", "id": "nope", "label": "positive",
                                 "output": "x"}) + "\n")
    done = _cli(a, other)
    assert done.returncode == 2 and "share no row" in done.stderr and len(done.stderr.splitlines()) == 1
    missing = _cli(a, tmp_path / "nothing")
    assert missing.returncode == 2 and "file not found" in missing.stderr
