import json
import subprocess
import sys

import pytest

from mmla.evaluation import compute_metrics, evaluate_records, parse_output, weighted_average
from mmla.tasks import get_task

# (dataset, raw model output, parsed label) under the official eval.py semantics
TRICKY = [
    ("MELD", "emotion: sadness", "sadness"),
    ("MELD", "Emotion: SADNESS.", "sadness"),
    ("MELD", "The emotion of this speaker is sad.", "unknown"),  # 'sad' is not a MELD label
    ("IEMOCAP", "The emotion of this speaker is sad.", "sad"),
    ("IEMOCAP", "sadness", "unknown"),  # 'sad' inside a longer word does not count
    ("MELD", "joy... definitely joy", "joy"),  # the same label twice is one label
    ("MELD", "neutral or joy", "multi"),
    ("MELD", "angry", "unknown"),
    ("MELD", "", "unknown"),
    ("MELD", "non-neutral", "neutral"),  # '-' is not a word character
    ("MOSI", "The candidate labels for sentiment are: [positive, negative].", "multi"),  # echoing the list
    ("MOSI", "Positive!", "positive"),
    ("UR-FUNNY", "He is seriously funny", "unknown"),
    ("MELD-DA", "dialogue act: statement-non-opinion", "statement-non-opinion"),
    ("MELD-DA", "statement-opinion", "statement-opinion"),
    ("MELD-DA", "questions", "unknown"),
    ("MELD-DA", "greetings and a question", "question"),
    ("AnnoMi-therapist", "therapist_input", "therapist_input"),
    ("AnnoMi-therapist", "input from the therapist", "unknown"),  # '_' is a word character
    ("AnnoMi-therapist", "communication behavior: other", "other"),
    ("AnnoMi-client", "no change", "change"),
    ("MIntRec", "intent: Ask for help", "ask for help"),
    ("MIntRec", "asking for help", "unknown"),
    ("MIntRec", "thanks", "unknown"),
    ("MIntRec", "thank you", "thank"),
    ("MIntRec2.0", "I disagree", "unknown"),  # 'agree' preceded by a letter
    ("MIntRec2.0", "asking for opinions", "asking for opinions"),
    ("MIntRec2.0", "ask for help, or asking for opinions", "multi"),
    ("Ch-sims", "Sentiment: Neutral", "neutral"),
    ("MUStARD", "speaking_style: sarcastic", "sarcastic"),
    ("MUStARD", "insincere", "unknown"),
]


@pytest.mark.parametrize("ds,output,expected", TRICKY)
def test_official_parser(ds, output, expected):
    assert parse_output(output, get_task(ds).labels) == expected


def test_metrics_by_hand():
    # classes a, b and the extra class 'unknown'; worked out by hand
    m = compute_metrics(["a", "a", "b", "b"], ["a", "unknown", "b", "a"], labels=("a", "b"))
    assert (m["ACC"], m["Precision"], m["Recall"], m["F1"], m["WF1"], m["WP"]) == (50.0, 50.0, 33.33, 38.89, 58.33, 75.0)
    assert m["unparsed"] == 25.0 and m["n"] == 4
    assert (m["strict"]["F1"], m["strict"]["Precision"], m["strict"]["Recall"]) == (58.33, 75.0, 50.0)


def test_weighted_average_is_pooled_accuracy():
    per = {"A": {"ACC": 50.0, "F1": 0, "Precision": 0, "Recall": 0, "WF1": 0, "WP": 0, "unparsed": 0, "n": 100},
           "B": {"ACC": 80.0, "F1": 0, "Precision": 0, "Recall": 0, "WF1": 0, "WP": 0, "unparsed": 10, "n": 300}}
    avg = weighted_average(per)
    assert avg["ACC"] == 72.5 and avg["unparsed"] == 7.5 and avg["n"] == 400


def test_gold_labels_are_normalised():
    r = evaluate_records([{"dataset": "MELD", "label": "Emotion: Neutral", "output": "neutral"},
                          {"dataset": "MELD", "label": "JOY", "output": "joy"}])
    assert r["per_dataset"]["MELD"]["ACC"] == 100.0


def test_evaluate_cli_json(tmp_path):
    p = tmp_path / "preds.jsonl"
    rows = [{"dataset": "MOSI", "label": "positive", "output": "sentiment: positive"},
            {"dataset": "MOSI", "label": "negative", "output": "positive"},
            {"dataset": "MELD", "label": "joy", "output": "joy"}]
    p.write_text("".join(json.dumps(r) + "\n" for r in rows))
    out = subprocess.run([sys.executable, "-m", "mmla.cli", "evaluate", str(p), "--json"],
                         capture_output=True, text=True, check=True).stdout
    res = json.loads(out)
    assert res["per_dataset"]["MOSI"]["ACC"] == 50.0 and res["per_dataset"]["MOSI"]["n"] == 2
    assert set(res["per_dataset"]["MOSI"]) >= {"ACC", "F1", "Precision", "Recall", "WF1", "WP", "unparsed", "n"}
    assert res["average"]["ACC"] == round((50 * 2 + 100) / 3, 2)
    table = subprocess.run([sys.executable, "-m", "mmla.cli", "evaluate", str(p)],
                           capture_output=True, text=True, check=True).stdout
    assert "MOSI" in table and "average" in table


def test_evaluate_prints_seeded_intervals(tmp_path):
    """metrics carry a 95% interval per figure, per dataset and pooled; the seed and resamples are recorded and the
    same seed gives the same intervals; the table prints them."""
    import random

    rng = random.Random(0)
    labels = ["neutral", "joy", "sadness", "anger"]
    rows = [{"dataset": "MELD", "split": "test", "id": str(i), "label": (g := rng.choice(labels)),
             "output": g if rng.random() < 0.5 else rng.choice(labels + ["no idea"])} for i in range(80)]
    rows += [{"dataset": "MOSI", "split": "test", "id": str(i), "label": (g := rng.choice(["positive", "negative"])),
              "output": g if rng.random() < 0.7 else "positive"} for i in range(40)]
    p = tmp_path / "preds.jsonl"
    p.write_text("".join(json.dumps(r) + "\n" for r in rows))

    def run(*extra):
        return subprocess.run([sys.executable, "-m", "mmla.cli", "evaluate", str(p), *extra],
                              capture_output=True, text=True, check=True).stdout

    first, again = json.loads(run("--json", "--seed", "4", "--resamples", "3000")), json.loads(
        run("--json", "--seed", "4", "--resamples", "3000"))
    assert first == again
    assert first["bootstrap"]["seed"] == 4 and first["bootstrap"]["resamples"] == 3000
    for block in (*first["per_dataset"].values(), first["average"]):
        for m in ("ACC", "F1", "Precision", "Recall", "WF1", "WP"):
            lo, hi = block["ci95"][m]
            assert lo <= block[m] <= hi and hi - lo > 0
            assert block["ci95"]["strict"][m][0] <= block["strict"][m] <= block["ci95"]["strict"][m][1]
    table = run("--resamples", "3000", "--seed", "4")
    meld = first["per_dataset"]["MELD"]["ci95"]["ACC"]
    assert "95% intervals" in table and f"{meld[0]:.2f}-{meld[1]:.2f}" in table
