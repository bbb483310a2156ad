"""mmla.report: tables equal metrics.json, paper columns hold the paper's numbers, files and CLI behave."""

import base64
import csv
import json
import re

import pytest
from report_fixtures import make_run

from mmla import paper, tasks
from mmla.cli import main
from mmla.report import build_report, confusion_counts, load_run, paper_reference, slug

METRICS = ("ACC", "F1", "Precision", "Recall", "WF1", "WP")


def read_csv(path):
    with open(path, newline="", encoding="utf-8") as f:
        return list(csv.DictReader(f))


def as_float(cell):
    return float(cell) if cell != "" else None


@pytest.fixture
def two_runs(tmp_path):
    """A paper model (Qwen2-1.5B zero-shot) and a model the paper does not have."""
    runs = tmp_path / "runs"
    qwen = make_run(runs, "qwen zs", seed=0)
    smol = make_run(runs, "smol", model="smollm2-135m", paper_model=None, seed=1, skill=0.3)
    html = build_report([qwen, smol], tmp_path / "out")
    return qwen, smol, html


def test_table_numbers_equal_metrics_json(two_runs):
    qwen, _, html = two_runs
    metrics = json.loads((qwen / "metrics.json").read_text())
    rows = {r["dataset"]: r for r in read_csv(html.parent / "runs" / "qwen-zs" / "table.csv")}
    for dataset, ours in metrics["per_dataset"].items():
        row = rows[dataset]
        for metric in METRICS:
            assert as_float(row[metric]) == ours[metric]
            assert as_float(row[f"strict_{metric}"]) == ours["strict"][metric]
        assert as_float(row["unparsed"]) == ours["unparsed"]
        assert int(row["n"]) == ours["n"]
    average = rows["average"]
    for metric in (*METRICS, "unparsed"):
        assert as_float(average[metric]) == metrics["average"][metric]
    assert int(average["n"]) == metrics["average"]["n"]


def test_paper_column_holds_the_paper_number(two_runs):
    qwen, _, html = two_runs
    rows = {r["dataset"]: r for r in read_csv(html.parent / "runs" / "qwen-zs" / "table.csv")}
    assert as_float(rows["MELD"]["paper_ACC"]) == 43.56
    assert as_float(rows["MOSI"]["paper_ACC"]) == 80.17
    assert as_float(rows["MIntRec2.0"]["paper_ACC"]) == 20.31
    assert as_float(rows["MELD"]["paper_WF1"]) == paper.paper_value("Qwen2-1.5B", "zero-shot", "MELD", "WF1").value
    for dataset in ("MELD", "MOSI", "MIntRec2.0"):
        row = rows[dataset]
        assert as_float(row["delta_ACC"]) == pytest.approx(as_float(row["ACC"]) - as_float(row["paper_ACC"]))
    # the Markdown table shows them side by side
    markdown = (html.parent / "runs" / "qwen-zs" / "table.md").read_text()
    meld_line = next(line for line in markdown.splitlines() if line.startswith("| MELD |"))
    assert f"| {as_float(rows['MELD']['ACC']):.2f} | 43.56 |" in meld_line
    assert "20 / 2610" in meld_line  # a 20-row run is marked as a subset of the test set


def test_run_without_paper_numbers_has_no_paper_columns(two_runs):
    _, smol, html = two_runs
    rows = read_csv(html.parent / "runs" / "smol" / "table.csv")
    assert all(r["paper_ACC"] == "" for r in rows)
    assert "paper ACC" not in (html.parent / "runs" / "smol" / "table.md").read_text()


def test_summary_comparison_and_files(two_runs):
    qwen, smol, html = two_runs
    out = html.parent
    summary = {r["run"]: r for r in read_csv(out / "summary.csv")}
    assert as_float(summary["qwen zs"]["ACC"]) == json.loads((qwen / "metrics.json").read_text())["average"]["ACC"]
    assert summary["qwen zs"]["paper_model"] == "Qwen2-1.5B"
    assert as_float(summary["qwen zs"]["paper_leaderboard_ACC"]) == 40.61
    assert summary["smol"]["paper_ACC"] == ""
    comparison = {r["dataset"]: r for r in read_csv(out / "comparison.csv")}
    assert as_float(comparison["MELD"]["paper Qwen2-1.5B zero-shot"]) == 43.56
    assert as_float(comparison["MELD"]["smol"]) == json.loads((smol / "metrics.json").read_text())[
        "per_dataset"]["MELD"]["ACC"]
    for name in ("report.md", "comparison.png", "runs/qwen-zs/acc_vs_paper.png", "runs/qwen-zs/dimensions.png",
                 "runs/smol/confusion_MELD.png", "runs/smol/confusion_MIntRec2.0.png"):
        assert (out / name).is_file(), name
    assert not (out / "runs" / "qwen-zs" / "training.png").exists()  # no train_log.jsonl
    for link in re.findall(r"\]\(([^)]+\.png)\)", (out / "report.md").read_text()):
        assert (out / link).is_file(), link


def test_html_is_self_contained(two_runs):
    _, _, html = two_runs
    page = html.read_text()
    sources = re.findall(r'<img src="([^"]+)"', page)
    # comparison; per run: ACC, dimensions, 3 confusion matrices; the pair: both runs' 3 matrices side by side
    assert len(sources) == 1 + 2 * (2 + 3) + 2 * 3
    for src in sources:
        assert src.startswith("data:image/png;base64,")
        assert base64.b64decode(src.split(",", 1)[1])[:8] == b"\x89PNG\r\n\x1a\n"
    assert "Qwen/Qwen2-1.5B-Instruct" in page and "transformers" in page  # config and versions


def test_missing_sub_dataset_gets_a_matched_average_and_conflicts_are_flagged(tmp_path):
    # Qwen2-1.5B SFT: the paper has 9 of the 12 datasets. Llama-3-8B zero-shot MUStARD: table and figure differ.
    sft = make_run(tmp_path, "sft", setting="sft", datasets=tasks.DATASETS, rows=5, train_log=True)
    llama = make_run(tmp_path, "llama", model="meta-llama/Meta-Llama-3-8B-Instruct", paper_model="Llama-3-8B",
                     datasets=("MUStARD",), rows=5)
    out = build_report([sft, llama], tmp_path / "out")
    rows = read_csv(out.parent / "runs" / "sft" / "table.csv")
    matched = next(r for r in rows if r["dataset"].startswith("average over the 9 with paper ACC"))
    known = [r for r in rows if r["dataset"] in tasks.DATASETS and r["paper_ACC"]]
    assert len(known) == 9
    assert as_float(matched["paper_ACC"]) == pytest.approx(
        sum(as_float(r["paper_ACC"]) for r in known) / 9, abs=0.01)  # equal n per dataset here
    assert (out.parent / "runs" / "sft" / "training.png").is_file()
    assert "59.40†" in (out.parent / "runs" / "llama" / "table.md").read_text()
    assert "appendix table gives 52.90" in out.read_text()


def test_full_test_set_average_matches_the_leaderboard(tmp_path):
    """A run with the paper's own per-dataset ACC on full test sets averages to the leaderboard number."""
    run = tmp_path / "full"
    run.mkdir()
    accs, sizes = paper.paper_accuracies("Qwen2-1.5B", "zero-shot"), paper.test_sizes()
    per = {d: {**{m: accs[d] for m in METRICS}, "unparsed": 0.0, "n": sizes[d]} for d in accs}
    average = {m: round(paper.weighted_average(accs), 2) for m in METRICS}
    (run / "metrics.json").write_text(json.dumps({"per_dataset": per, "average": {**average, "n": 15741}}))
    (run / "predictions.jsonl").write_text("")
    (run / "config.yaml").write_text("model: Qwen/Qwen2-1.5B-Instruct\nsetting: zero-shot\n")  # no paper_model key
    out = build_report([run], tmp_path / "out")
    run_out = out.parent / "runs" / slug("Qwen2-1.5B-Instruct zero-shot")  # label: model name and setting
    rows = {r["dataset"]: r for r in read_csv(run_out / "table.csv")}
    assert as_float(rows["average"]["paper_ACC"]) == pytest.approx(40.61, abs=0.05)
    assert abs(as_float(rows["average"]["delta_ACC"])) <= 0.01
    assert "| MELD | 2610 |" in (run_out / "table.md").read_text()  # full test set: n, not "n / size"


def test_paper_reference():
    assert paper_reference({"model": "x", "paper_model": "Qwen2-1.5B", "setting": "sft"}) == ("Qwen2-1.5B", "sft")
    assert paper_reference({"model": "Qwen/Qwen2-1.5B-Instruct", "paper_model": None, "setting": "sft"}) is None
    assert paper_reference({"model": "Qwen/Qwen2-1.5B-Instruct", "setting": "zero-shot"}) == (
        "Qwen2-1.5B", "zero-shot")
    assert paper_reference({"paper_model": "Qwen2-1.5B", "setting": "it"}) is None  # not in the paper


def test_confusion_counts_keep_unknown_and_multi(tmp_path):
    run = load_run(make_run(tmp_path, "r", datasets=("MELD",), rows=20, skill=0.2, seed=3))
    gold, columns, counts = confusion_counts(run.predictions, "MELD")
    assert columns[-2:] == ["unknown", "multi"]
    assert columns[: len(gold)] == gold
    assert sum(map(sum, counts)) == 20
    unparsed = sum(p["pred"] in ("unknown", "multi") for p in run.predictions)
    assert sum(row[-1] + row[-2] for row in counts) == unparsed


@pytest.mark.parametrize("missing", ["metrics.json", "predictions.jsonl"])
def test_missing_file_is_a_one_line_value_error(tmp_path, missing):
    run = make_run(tmp_path, "r", datasets=("MOSI",), rows=3)
    (run / missing).unlink()
    with pytest.raises(ValueError, match=re.escape(missing)) as err:
        build_report([run], tmp_path / "out")
    assert "\n" not in str(err.value)


def test_cli(tmp_path, capsys):
    run = make_run(tmp_path, "r", datasets=("MOSI",), rows=3)
    assert main(["report", str(run), "--out", str(tmp_path / "out")]) == 0
    assert (tmp_path / "out" / "report.html").is_file()
    assert main(["report", str(tmp_path / "nothing"), "--out", str(tmp_path / "out2")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("mmla: error: ") and "metrics.json" in err and err.count("\n") == 1


def test_same_labels_get_distinct_folders_and_bad_json_is_named(tmp_path):
    first = make_run(tmp_path / "a", "same", datasets=("MOSI",), rows=3)
    second = make_run(tmp_path / "b", "same", datasets=("MOSI",), rows=3, seed=1)
    out = build_report([first, second], tmp_path / "out").parent
    assert (out / "runs" / "same" / "table.csv").is_file() and (out / "runs" / "same-2" / "table.csv").is_file()
    (second / "metrics.json").write_text("{not json")
    with pytest.raises(ValueError, match="metrics.json: not valid JSON"):
        load_run(second)


def test_a_run_from_before_intervals_gets_them_from_its_predictions(tmp_path):
    run = make_run(tmp_path / "runs", "old", seed=3)
    metrics = json.loads((run / "metrics.json").read_text())
    old = {"per_dataset": {ds: {k: v for k, v in m.items() if k != "ci95"} for ds, m in metrics["per_dataset"].items()},
           "average": {k: v for k, v in metrics["average"].items() if k != "ci95"}}
    (run / "metrics.json").write_text(json.dumps(old))
    loaded = load_run(run)
    assert loaded.metrics["per_dataset"]["MELD"]["ci95"] == metrics["per_dataset"]["MELD"]["ci95"]
    assert loaded.metrics["average"]["ci95"] == metrics["average"]["ci95"]
