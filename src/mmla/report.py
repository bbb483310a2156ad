"""Reports: tables, figures and one HTML page from run directories, next to the paper's numbers.

A run directory (written by `mmla predict` or by training) holds config.yaml, env.json, predictions.jsonl,
metrics.json and, for trained runs, train_log.jsonl. The report needs nothing else: the paper's numbers come
from the packaged reference data (mmla.paper).

Output layout of `build_report(run_dirs, out_dir)`:
    report.html         one self-contained page (figures embedded as base64)
    report.md           the same tables, figures linked
    summary.csv         one row per run
    comparison.csv/png  ACC per dataset across runs (with 2+ runs)
    pairs/<A>--vs--<B>/ confusion matrices of each later run and the first, side by side, over their shared rows
    runs/<label>/       table.csv, table.md and the run's PNG figures
"""

from __future__ import annotations

import csv
import json
import re
import sys
from dataclasses import dataclass
from datetime import datetime, timezone
from importlib import resources
from itertools import cycle
from pathlib import Path

import yaml
from jinja2 import Environment

from . import __version__, paper, report_stats, tasks
from .plots import confusion_counts, plot_confusion, plt  # noqa: F401  (confusion_counts: the API)
from .plots import image as _image
from .plots import save as _save
from .runs import read_jsonl, write_text, writing


METRICS = ("ACC", "F1", "Precision", "Recall", "WF1", "WP")
OURS_COLOR, PAPER_COLOR = "#3b6fb6", "#b9bec7"
OUTSIDE_MARK = "◆"  # beside a paper figure that lies outside our 95% interval

# Columns of the rendered per-run table: (header, row key, kind). Paper columns are dropped for runs the
# paper has no numbers for. The CSV keeps every metric with its paper value and difference.
DISPLAY_COLUMNS = [
    ("dataset", "dataset", "text"), ("n", "n_shown", "text"),
    ("ACC", "ACC", "num"), ("paper ACC", "paper_ACC_shown", "paper"), ("Δ ACC", "delta_ACC", "delta"),
    ("ACC 95% CI", "ci_ACC_shown", "ci"),
    ("WF1", "WF1", "num"), ("paper WF1", "paper_WF1_shown", "paper"), ("Δ WF1", "delta_WF1", "delta"),
    ("WF1 95% CI", "ci_WF1_shown", "ci"),
    ("F1", "F1", "num"), ("Precision", "Precision", "num"), ("Recall", "Recall", "num"), ("WP", "WP", "num"),
    ("strict ACC", "strict_ACC", "num"), ("strict F1", "strict_F1", "num"), ("unparsed %", "unparsed", "num"),
]


@dataclass
class RunDir:
    path: Path
    label: str
    config: dict
    env: dict
    metrics: dict
    predictions: list[dict]
    train_log: list[dict]

    @property
    def reference(self) -> tuple[str, str] | None:
        return paper_reference(self.config)


# ---------------------------------------------------------------------------------------------- loading

def _read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as err:
        raise ValueError(f"{path}: not valid JSON ({err})") from None


def load_run(run_dir: Path) -> RunDir:
    """Read one run directory; ValueError naming the file when a required one is missing."""
    run_dir = Path(run_dir)
    for required in ("metrics.json", "predictions.jsonl"):
        if not (run_dir / required).is_file():
            raise ValueError(f"{run_dir / required} is missing: {run_dir} is not a finished run directory")
    config_path, env_path = run_dir / "config.yaml", run_dir / "env.json"
    config = (yaml.safe_load(config_path.read_text(encoding="utf-8")) or {}) if config_path.is_file() else {}
    env = _read_json(env_path) if env_path.is_file() else {}
    predictions, _ = read_jsonl(run_dir / "predictions.jsonl")
    train_log, _ = read_jsonl(run_dir / "train_log.jsonl")
    metrics = _read_json(run_dir / "metrics.json")
    if not isinstance(metrics.get("per_dataset"), dict):
        raise ValueError(f"{run_dir / 'metrics.json'}: no 'per_dataset' table")
    metrics = report_stats.fill_intervals(metrics, predictions)
    return RunDir(run_dir, run_label(config, run_dir), config, env, metrics, predictions, train_log)


def run_label(config: dict, run_dir: Path) -> str:
    """config's `name`, else "<model> <setting>", else the directory name."""
    if config.get("name"):
        return str(config["name"])
    # the model that ran, not the paper model it is compared with
    model = Path(str(config.get("model") or "")).name or config.get("paper_model")
    parts = [p for p in (model, config.get("setting")) if p]
    return " ".join(parts) if parts else run_dir.name


def _unique_labels(runs: list[RunDir]) -> None:
    """Two runs of the same model and setting would collide in tables and folder names: number them."""
    used = set()
    for run in runs:
        label, k = run.label, 1
        while slug(label) in used:
            k += 1
            label = f"{run.label} #{k}"
        run.label = label
        used.add(slug(label))


def slug(label: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "-", label).strip("-") or "run"


def paper_reference(config: dict) -> tuple[str, str] | None:
    """(paper model, setting) when the paper reports numbers for them, else None.

    `paper_model` is set by the run when it reproduces a paper model; older configs without the key fall back
    to recognising the checkpoint name.
    """
    if "paper_model" in config:
        model = config["paper_model"]
    else:
        model = paper.paper_model_name(str(config.get("model") or ""))
    setting = config.get("setting")
    if model and setting and paper.paper_accuracies(model, setting):
        return model, setting
    return None


# ----------------------------------------------------------------------------------------------- tables

def ordered_datasets(names) -> list[str]:
    """Paper order first (grouped by dimension), then anything else alphabetically."""
    names = set(names)
    return [d for d in tasks.DATASETS if d in names] + sorted(names - set(tasks.DATASETS))


def _dimension(dataset: str) -> str:
    return paper.dimension(dataset) if dataset in tasks.DATASETS else "Other"


def _diff(ours, theirs) -> float | None:
    return None if ours is None or theirs is None else round(ours - theirs, 2)


def dataset_rows(run: RunDir) -> list[dict]:
    """One row per dataset: our metrics, strict metrics, unparsed rate, n, and per metric the paper's value
    and our difference (ours - paper) where the paper has one."""
    ref, sizes, split = run.reference, paper.test_sizes(), run.config.get("split", "test")
    per = run.metrics["per_dataset"]
    rows = []
    for ds in ordered_datasets(per):
        m = per[ds]
        row = {"dataset": ds, "dimension": _dimension(ds), "n": m.get("n"), "test_size": sizes.get(ds),
               "unparsed": m.get("unparsed")}
        # A quick run on the first rows of the test set is not comparable with the paper: show "20 / 2610".
        full = split != "test" or sizes.get(ds) in (None, m.get("n"))
        row["n_shown"] = str(m.get("n")) if full else f"{m.get('n')} / {sizes[ds]}"
        for metric in METRICS:
            cell = paper.paper_value(ref[0], ref[1], ds, metric) if ref else None
            row[metric] = m.get(metric)
            row[f"paper_{metric}"] = cell.value if cell else None
            row[f"delta_{metric}"] = _diff(m.get(metric), row[f"paper_{metric}"])
            row[f"strict_{metric}"] = (m.get("strict") or {}).get(metric)
        _interval(row, m.get("ci95") or {})
        acc_cell = paper.paper_value(ref[0], ref[1], ds, "ACC") if ref else None
        row["paper_ACC_note"] = acc_cell.note if acc_cell else ""
        row["paper_ACC_alt"] = acc_cell.alt_value if acc_cell else None
        row["paper_ACC_shown"] = (_fmt(row["paper_ACC"]) + ("†" if acc_cell and acc_cell.conflict else "")
                                  + (f" {OUTSIDE_MARK}" if row.get("outside_ACC") else ""))
        rows.append(row)
    return rows


def _interval(row: dict, ci: dict) -> None:
    """Per metric the 95% interval (`ci_<metric>`, shown as lo–hi) and whether the paper's figure lies outside
    it (`outside_<metric>`)."""
    for metric in METRICS:
        lo_hi = ci.get(metric)
        row[f"ci_{metric}"] = lo_hi
        row[f"ci_{metric}_shown"] = f"{lo_hi[0]:.2f}–{lo_hi[1]:.2f}" if lo_hi else None
        paper_value = row.get(f"paper_{metric}")
        row[f"outside_{metric}"] = (None if not lo_hi or paper_value is None
                                    else not lo_hi[0] <= paper_value <= lo_hi[1])
        row[f"paper_{metric}_shown"] = _fmt(paper_value) + (f" {OUTSIDE_MARK}" if row[f"outside_{metric}"] else "")


def _weighted_over(rows: list[dict], key: str) -> float | None:
    """Average of one column weighted by each row's n (our samples), None if any value is missing."""
    values = {r["dataset"]: r[key] for r in rows}
    if not values or any(v is None for v in values.values()):
        return None
    return round(paper.weighted_average(values, {r["dataset"]: r["n"] for r in rows}), 2)


def _average_row(label: str, rows: list[dict], ours: dict) -> dict:
    """A table row with our averages (`ours`) and the paper's, weighted by the same n over `rows`."""
    row = {"dataset": label, "dimension": "", "n": ours.get("n"), "n_shown": str(ours.get("n", "")),
           "test_size": None, "unparsed": ours.get("unparsed")}
    for metric in METRICS:
        row[metric] = ours.get(metric)
        row[f"paper_{metric}"] = _weighted_over(rows, f"paper_{metric}")
        row[f"delta_{metric}"] = _diff(row[metric], row[f"paper_{metric}"])
    _interval(row, ours.get("ci95") or {})
    row["paper_ACC_shown"] = _fmt(row["paper_ACC"]) + (f" {OUTSIDE_MARK}" if row.get("outside_ACC") else "")
    return row


def average_rows(run: RunDir, rows: list[dict]) -> list[dict]:
    """The weighted average from metrics.json, next to the paper's numbers averaged with the same weights.

    When the paper lacks some datasets (Qwen2-1.5B SFT has 9 of 12), a second row averages ours and the
    paper's over the datasets both have, so the comparison stays like for like.
    """
    result = [_average_row("average", rows, run.metrics.get("average") or {})]
    known = [r for r in rows if r["paper_ACC"] is not None]
    if 0 < len(known) < len(rows):
        ours = {key: _weighted_over(known, key) for key in (*METRICS, "unparsed")}
        ours["n"] = sum(r["n"] for r in known)
        result.append(_average_row(f"average over the {len(known)} with paper ACC", known, ours))
    return result


def _fmt(value, signed: bool = False) -> str:
    if value is None:
        return "–"
    if isinstance(value, str):
        return value
    if isinstance(value, int):
        return str(value)
    return f"{value:+.2f}" if signed else f"{value:.2f}"


def display_table(rows: list[dict], with_paper: bool) -> tuple[list[str], list[list[str]]]:
    """Headers and formatted cells of the rendered per-run table (Markdown and HTML share it)."""
    columns = [c for c in DISPLAY_COLUMNS if with_paper or c[2] not in ("paper", "delta")]
    cells = [[_fmt(r.get(key), signed=kind == "delta") for _, key, kind in columns] for r in rows]
    return [c[0] for c in columns], cells


def markdown_table(headers: list[str], cells: list[list[str]]) -> str:
    lines = ["| " + " | ".join(headers) + " |", "|" + "|".join("---" for _ in headers) + "|"]
    lines += ["| " + " | ".join(row) + " |" for row in cells]
    return "\n".join(lines) + "\n"


def write_csv(path: Path, rows: list[dict]) -> None:
    fields = list(dict.fromkeys(k for row in rows for k in row if not k.endswith("_shown")))
    with writing(path), path.open("w", newline="", encoding="utf-8") as f:
        writer = csv.DictWriter(f, fieldnames=fields, extrasaction="ignore")
        writer.writeheader()
        writer.writerows(rows)


def summary_row(run: RunDir) -> dict:
    """One line per run for summary.csv and the overview table."""
    avg, cfg, ref = run.metrics.get("average") or {}, run.config, run.reference
    rows = dataset_rows(run)
    paper_acc = _weighted_over(rows, "paper_ACC") if ref else None
    return {
        "run": run.label, "run_dir": str(run.path), "model": cfg.get("model"),
        "model_shown": Path(str(cfg.get("model"))).name if cfg.get("model") else None,  # full id in the run section
        "adapter": cfg.get("adapter"),
        "paper_model": ref[0] if ref else cfg.get("paper_model"), "setting": cfg.get("setting"),
        "protocol": cfg.get("protocol"), "family": cfg.get("family"), "mode": cfg.get("mode"),
        "split": cfg.get("split"), "datasets": len(rows), "n": avg.get("n"),
        "ACC": avg.get("ACC"), "F1": avg.get("F1"), "WF1": avg.get("WF1"), "unparsed": avg.get("unparsed"),
        "paper_ACC": paper_acc, "delta_ACC": _diff(avg.get("ACC"), paper_acc),
        "paper_leaderboard_ACC": paper.reported_average(*ref) if ref else None,
    }


def comparison_rows(runs: list[RunDir]) -> list[dict]:
    """ACC per dataset (rows) for every run and every distinct paper reference (columns)."""
    refs = list(dict.fromkeys(r.reference for r in runs if r.reference))
    datasets = ordered_datasets({d for r in runs for d in r.metrics["per_dataset"]})
    rows = []
    for ds in datasets:
        row = {"dataset": ds}
        for run in runs:
            row[run.label] = run.metrics["per_dataset"].get(ds, {}).get("ACC")
        for model, setting in refs:
            cell = paper.paper_value(model, setting, ds)
            row[f"paper {model} {setting}"] = cell.value if cell else None
        rows.append(row)
    average = {"dataset": "average (weighted)"}
    for run in runs:
        average[run.label] = (run.metrics.get("average") or {}).get("ACC")
    for model, setting in refs:  # paper columns: test-size weighted, like the leaderboard
        values = {r["dataset"]: r[f"paper {model} {setting}"] for r in rows}
        known = None not in values.values() and all(d in tasks.DATASETS for d in values)
        average[f"paper {model} {setting}"] = round(paper.weighted_average(values), 2) if known else None
    return rows + [average]


# ---------------------------------------------------------------------------------------------- figures

def _bars(ax, names: list[str], series: list[tuple]) -> list[list[float]]:
    """Grouped bars: series = [(legend label, values (None = no bar), colour[, 95% intervals as [lo, hi] or None,
    drawn as whiskers])]. Returns each series' bar positions."""
    width = 0.8 / len(series)
    positions = []
    for i, (label, values, color, *ci) in enumerate(series):
        xs = [j + (i - (len(series) - 1) / 2) * width for j in range(len(names))]
        ax.bar([x for x, v in zip(xs, values) if v is not None], [v for v in values if v is not None],
               width, label=label, color=color)
        whiskers = [(x, v, c) for x, v, c in zip(xs, values, ci[0] if ci else []) if v is not None and c]
        if whiskers:
            ax.errorbar([x for x, _, _ in whiskers], [v for _, v, _ in whiskers], fmt="none", ecolor="#1f2328",
                        elinewidth=1, capsize=2.5, label="95% interval",
                        yerr=[[v - c[0] for _, v, c in whiskers], [c[1] - v for _, v, c in whiskers]])
        positions.append(xs)
    ax.set_xticks(range(len(names)), names, rotation=35, ha="right")
    ax.set_ylabel("ACC (%)")
    ax.set_ylim(0, 100)
    ax.grid(axis="y", alpha=0.3)
    ax.set_axisbelow(True)
    ax.legend(frameon=False, fontsize=8, loc="upper left", ncols=min(len(series) + 1, 4))
    return positions


def plot_accuracy_vs_paper(rows: list[dict], title: str, path: Path) -> Path:
    """Our ACC with its 95% interval as whiskers, the paper's beside it; a paper figure outside our interval is
    marked (a red triangle above its bar)."""
    names = [r["dataset"] for r in rows]
    series = [("this run", [r["ACC"] for r in rows], OURS_COLOR, [r.get("ci_ACC") for r in rows])]
    if any(r["paper_ACC"] is not None for r in rows):
        series.append(("paper", [r["paper_ACC"] for r in rows], PAPER_COLOR))
    fig, ax = plt.subplots(figsize=(max(5.0, 0.55 * len(names) + 2), 3.4))
    positions = _bars(ax, names, series)
    outside = [(x, r["paper_ACC"]) for x, r in zip(positions[-1], rows) if r.get("outside_ACC")]
    if outside:
        ax.scatter([x for x, _ in outside], [min(v + 4, 97) for _, v in outside], marker="v", color="#cf222e",
                   s=22, zorder=4, label=f"paper outside our 95% interval {OUTSIDE_MARK}")
        ax.legend(frameon=False, fontsize=8, loc="upper left", ncols=4)
    ax.set_title(title, fontsize=10)
    return _save(fig, path)


def dimension_rows(rows: list[dict]) -> list[dict]:
    """n-weighted ACC per dimension, ours and the paper's (the latter only if all its datasets are known)."""
    out = []
    for dim in list(paper.DIMENSION_TITLES) + ["Other"]:
        group = [r for r in rows if r["dimension"] == dim]
        if group:
            out.append({"dimension": dim, "ACC": _weighted_over(group, "ACC"),
                        "paper_ACC": _weighted_over(group, "paper_ACC")})
    return out


def plot_dimensions(rows: list[dict], title: str, path: Path) -> Path:
    dims = dimension_rows(rows)
    series = [("this run", [d["ACC"] for d in dims], OURS_COLOR)]
    if any(d["paper_ACC"] is not None for d in dims):
        series.append(("paper", [d["paper_ACC"] for d in dims], PAPER_COLOR))
    fig, ax = plt.subplots(figsize=(max(4.0, 0.7 * len(dims) + 1.5), 3.4))
    _bars(ax, [d["dimension"] for d in dims], series)
    ax.set_title(title, fontsize=10)
    return _save(fig, path)


def plot_training(train_log: list[dict], path: Path) -> Path:
    """Training loss and dev accuracies (eval_*accuracy) against the step; one line per dataset if logged."""
    fig, (loss_ax, acc_ax) = plt.subplots(1, 2, figsize=(8, 3))
    groups = sorted({str(e.get("dataset", "")) for e in train_log})
    for group in groups:
        entries = [e for e in train_log if str(e.get("dataset", "")) == group and "step" in e]
        prefix = f"{group} " if group else ""
        losses = [(e["step"], e["loss"]) for e in entries if "loss" in e]
        if losses:
            loss_ax.plot(*zip(*losses), label=f"{prefix}loss")
        for key in sorted({k for e in entries for k in e if k.startswith("eval_") and k.endswith("accuracy")}):
            points = [(e["step"], 100 * e[key]) for e in entries if key in e]
            acc_ax.plot(*zip(*points), marker="o", markersize=3, label=prefix + key)
    loss_ax.set(title="training loss", xlabel="step")
    acc_ax.set(title="dev accuracy (%)", xlabel="step")
    for ax in (loss_ax, acc_ax):
        ax.grid(alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(frameon=False, fontsize=7)
    return _save(fig, path)


def plot_comparison(rows: list[dict], columns: list[str], path: Path) -> Path:
    """Grouped bars per dataset: runs in colours, paper references in greys."""
    names = [r["dataset"] for r in rows]
    run_colors = cycle(["#3b6fb6", "#e08a2c", "#4a9a5a", "#b5475a", "#7a5fb0", "#8a6d3b"])
    paper_colors = cycle([PAPER_COLOR, "#858b94", "#dcdfe4"])
    series = [(c, [r.get(c) for r in rows], next(paper_colors if c.startswith("paper ") else run_colors))
              for c in columns]
    fig, ax = plt.subplots(figsize=(max(6.0, (0.35 + 0.18 * len(columns)) * len(names) + 2), 3.8))
    _bars(ax, names, series)
    ax.set_title("ACC per dataset across runs", fontsize=10)
    return _save(fig, path)


# ----------------------------------------------------------------------------------------------- report

def _run_section(run: RunDir, out_dir: Path) -> dict:
    """Write the run's tables and figures under runs/<label>/ and return what the templates show."""
    run_dir = out_dir / "runs" / slug(run.label)
    run_dir.mkdir(parents=True, exist_ok=True)
    rows = dataset_rows(run)
    all_rows = rows + average_rows(run, rows)
    headers, cells = display_table(all_rows, with_paper=run.reference is not None)
    write_csv(run_dir / "table.csv", all_rows)
    write_text(run_dir / "table.md", markdown_table(headers, cells))

    figures = [
        _image(plot_accuracy_vs_paper(rows, f"{run.label}: ACC per dataset", run_dir / "acc_vs_paper.png"),
               out_dir, "ACC per dataset" + (" vs the paper" if run.reference else "")
               + (", 95% intervals as whiskers" if any(r.get("ci_ACC") for r in rows) else "")),
        _image(plot_dimensions(rows, f"{run.label}: ACC per dimension", run_dir / "dimensions.png"),
               out_dir, "ACC per dimension (weighted by n)"),
    ]
    if run.train_log:
        figures.append(_image(plot_training(run.train_log, run_dir / "training.png"), out_dir,
                              "training loss and dev accuracy"))
    scored = {p["dataset"] for p in run.predictions if {"dataset", "label", "pred"} <= p.keys()}
    confusions = [
        _image(plot_confusion(run.predictions, ds, run_dir / f"confusion_{slug(ds)}.png"), out_dir, ds)
        for ds in ordered_datasets(scored)
    ]
    notes = [f"† {r['dataset']}: the paper's appendix table gives {r['paper_ACC_alt']:.2f}; the figure value "
             "is shown because the leaderboard averages reproduce from it." for r in rows
             if r["paper_ACC_note"].startswith("CONFLICT")]
    ref = run.reference
    reported = paper.reported_average(*ref) if ref else None
    if ref:
        notes.append("The paper's averages in this table are weighted by this run's n, like ours, so they compare "
                     "like for like" + (f"; the leaderboard (12 datasets, weighted by test-set size) gives "
                                        f"{reported:.2f}." if reported is not None else "."))
    if ref is None and run.config.get("paper_model"):
        notes.append(f"The paper reports no numbers for {run.config['paper_model']} in the "
                     f"'{run.config.get('setting')}' setting.")
    notes += report_stats.interval_notes(all_rows, run.metrics, OUTSIDE_MARK)
    packages = run.env.get("packages") or {}
    return {
        "label": run.label, "anchor": slug(run.label), "path": str(run.path), "reference": ref,
        "n_datasets": len(rows),
        "headers": headers, "cells": cells, "markdown": markdown_table(headers, cells), "notes": notes,
        "figures": figures, "confusions": confusions,
        "calibration": report_stats.calibration_section(run, run_dir, out_dir),
        "facts": [(k, run.config.get(k)) for k in ("model", "adapter", "paper_model", "setting", "protocol",
                                                    "family", "mode", "split")],
        "versions": [("mmla", run.env.get("mmla")), ("python", run.env.get("python")),
                     *sorted(packages.items()), ("git", run.env.get("git_revision")),
                     ("device", run.env.get("device")), ("platform", run.env.get("platform"))],
        "config_yaml": yaml.safe_dump(run.config, sort_keys=False, allow_unicode=True),
    }


def _template(name: str):
    text = (resources.files("mmla") / "resources" / "templates" / name).read_text(encoding="utf-8")
    env = Environment(autoescape=name.endswith(".html.j2"), trim_blocks=True, lstrip_blocks=True)
    return env.from_string(text)


def build_report(run_dirs: list[Path], out_dir: Path) -> Path:
    """Write the report for one or more run directories into out_dir; returns the path of report.html."""
    if not run_dirs:
        raise ValueError("no run directory given")
    runs = [load_run(Path(d)) for d in run_dirs]
    _unique_labels(runs)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)

    summary = [summary_row(r) for r in runs]
    write_csv(out_dir / "summary.csv", summary)
    summary_columns = [("run", "run"), ("model", "model_shown"), ("setting", "setting"), ("protocol", "protocol"),
                       ("family", "family"), ("datasets", "datasets"), ("n", "n"), ("ACC", "ACC"),
                       ("paper ACC", "paper_ACC"), ("Δ ACC", "delta_ACC"),
                       ("paper leaderboard", "paper_leaderboard_ACC"), ("unparsed %", "unparsed")]
    summary_headers = [header for header, _ in summary_columns]
    summary_cells = [[_fmt(row[key], signed=key == "delta_ACC") for _, key in summary_columns] for row in summary]

    comparison = None
    if len(runs) > 1:
        rows = comparison_rows(runs)
        write_csv(out_dir / "comparison.csv", rows)
        columns = [c for c in rows[0] if c != "dataset"]
        figure = plot_comparison(rows[:-1], columns, out_dir / "comparison.png")
        cells = [[r["dataset"]] + [_fmt(r[c]) for c in columns] for r in rows]
        comparison = {"headers": ["dataset"] + columns, "cells": cells,
                      "markdown": markdown_table(["dataset"] + columns, cells),
                      "figure": _image(figure, out_dir, "ACC per dataset across runs")}

    pairs = []
    for other in runs[1:]:  # each run against the first, over the rows both have
        try:
            pairs.append(report_stats.pair_section(runs[0], other, out_dir))
        except ValueError as err:  # no shared rows, or different gold labels: said, not drawn
            print(f"mmla report: {runs[0].label} vs {other.label}: not compared ({err})", file=sys.stderr)

    context = {
        "title": "MMLA report", "version": __version__,
        "generated": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "summary": {"headers": summary_headers, "cells": summary_cells,
                    "markdown": markdown_table(summary_headers, summary_cells)},
        "comparison": comparison, "runs": [_run_section(r, out_dir) for r in runs], "pairs": pairs,
    }
    write_text(out_dir / "report.md", _template("report.md.j2").render(context))
    html_path = out_dir / "report.html"
    write_text(html_path, _template("report.html.j2").render(context))
    return html_path
