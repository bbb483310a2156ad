"""The MMLA paper's reference numbers, shipped as package data.

The CSVs under ``mmla/resources/paper/`` are copies of ../shared/paper/ (see the README there for where each
number comes from). This module only reads them; nothing here is computed from our own runs.

Conventions, as in the paper:
* accuracies and the other metrics are percentages;
* settings are "zero-shot", "sft" (one LoRA adapter per dataset) and "it" (one adapter on all datasets);
* the headline average over datasets is ACC weighted by test-set size (pooled accuracy), not a simple mean.
"""

from __future__ import annotations

import csv
import io
from dataclasses import dataclass
from functools import lru_cache
from importlib import resources
from pathlib import PurePosixPath, PureWindowsPath

from . import tasks

PAPER_SETTINGS = ("zero-shot", "sft", "it")  # the paper's experiments (mmla.training trains sft and it)

# The paper's table order is the dataset registry's (mmla.tasks): grouped by dimension, as in its figures and the
# repo's data folders. A dimension is a task's name as the paper writes it ("dialogue_act" -> "Dialogue Act").
DIMENSION_TITLES = tuple(dict.fromkeys(t.task.replace("_", " ").title() for t in tasks.TASKS.values()))

# Our metrics.json spells precision and recall out; the paper's tables write P and R.
METRIC_ALIASES = {"Precision": "P", "Recall": "R"}
PAPER_METRICS = ("ACC", "WF1", "WP", "F1", "R", "P")


@dataclass(frozen=True)
class PaperValue:
    """One number from the paper, with where it came from.

    ``alt_value`` is set where the paper contradicts itself (appendix table vs figure); ``note`` then starts
    with "CONFLICT" and ``value`` is the one the leaderboard averages reproduce from.
    """

    value: float
    source: str
    alt_value: float | None = None
    alt_source: str | None = None
    note: str = ""

    @property
    def conflict(self) -> bool:
        return self.note.startswith("CONFLICT")


def _float_or_none(cell: str) -> float | None:
    return float(cell) if cell.strip() else None


@lru_cache(maxsize=None)
def read_table(name: str) -> tuple[dict[str, str], ...]:
    """Rows of one packaged CSV (e.g. "models.csv") as dicts of strings."""
    text = (resources.files("mmla") / "resources" / "paper" / name).read_text(encoding="utf-8")
    return tuple(csv.DictReader(io.StringIO(text)))


@lru_cache(maxsize=None)
def _acc_index() -> dict[tuple[str, str, str], PaperValue]:
    index = {}
    for row in read_table("paper_acc_best.csv"):
        index[row["model"], row["setting"], row["dataset"]] = PaperValue(
            value=float(row["value"]),
            source=row["source"],
            alt_value=_float_or_none(row["alt_value"]),
            alt_source=row["alt_source"] or None,
            note=row["note"],
        )
    return index


@lru_cache(maxsize=None)
def _other_metrics_index() -> dict[tuple[str, str, str, str], PaperValue]:
    # paper_results.csv has ACC twice for many cells (table and figure); ACC comes from paper_acc_best.csv,
    # which settles those. The other metrics only exist in the appendix tables, once each.
    return {
        (row["model"], row["setting"], row["dataset"], row["metric"]): PaperValue(float(row["value"]), row["source"])
        for row in read_table("paper_results.csv")
        if row["metric"] != "ACC"
    }


def paper_value(model: str, setting: str, dataset: str, metric: str = "ACC") -> PaperValue | None:
    """The paper's number for one cell, or None where the paper has none (or it was not retrievable)."""
    metric = METRIC_ALIASES.get(metric, metric)
    if metric == "ACC":
        return _acc_index().get((model, setting, dataset))
    return _other_metrics_index().get((model, setting, dataset, metric))


def paper_accuracies(model: str, setting: str) -> dict[str, float]:
    """{dataset: ACC} for the datasets the paper reports for this model and setting (maybe empty)."""
    values = {}
    for dataset in tasks.DATASETS:
        cell = paper_value(model, setting, dataset)
        if cell is not None:
            values[dataset] = cell.value
    return values


def paper_models() -> list[str]:
    return [row["model"] for row in read_table("models.csv")]


@lru_cache(maxsize=None)
def leaderboard() -> tuple[dict, ...]:
    """Leaderboard rows: model, setting, reported_avg_acc (None when not on the leaderboard), rank, notes."""
    return tuple(
        {
            "model": row["model"],
            "setting": row["setting"],
            "reported_avg_acc": _float_or_none(row["reported_avg_acc"]),
            "rank": int(row["rank_within_setting"]) if row["rank_within_setting"] else None,
            "n_datasets_available": int(row["n_datasets_available"]),
            "notes": row["notes"],
        }
        for row in read_table("paper_averages.csv")
    )


def reported_average(model: str, setting: str) -> float | None:
    """The leaderboard's average ACC (test-size weighted over all 12 datasets), or None."""
    for row in leaderboard():
        if row["model"] == model and row["setting"] == setting:
            return row["reported_avg_acc"]
    return None


def _task_rows() -> list[dict[str, str]]:
    # dataset_stats.csv ends with a TOTAL row that is not a dataset.
    return [row for row in read_table("dataset_stats.csv") if row["dataset"] in tasks.DATASETS]


def test_sizes() -> dict[str, int]:
    """{dataset: number of test utterances} (paper Table 1); they sum to 15,741."""
    return {row["dataset"]: int(row["test"]) for row in _task_rows()}


# pytest would otherwise try to collect test_sizes as a test when a test module imports it.
test_sizes.__test__ = False


def dimension(dataset: str) -> str:
    """The paper's dimension of a dataset, e.g. "Dialogue Act" for MELD-DA."""
    for row in _task_rows():
        if row["dataset"] == dataset:
            return row["dimension"]
    raise ValueError(f"unknown dataset '{dataset}' (known: {', '.join(tasks.DATASETS)})")


def baselines(dataset: str) -> list[dict]:
    """Dashed lines of the paper's figures for one dataset: [{"method", "kind", "value"}] (SOTA, human)."""
    return [
        {"method": row["method"], "kind": row["kind"], "value": float(row["value"])}
        for row in read_table("baselines.csv")
        if row["dataset"] == dataset
    ]


def weighted_average(values: dict[str, float], sizes: dict[str, int] | None = None) -> float:
    """Average of per-dataset values weighted by dataset size (paper test sizes by default).

    This is how the paper's leaderboard averages ACC: equal to the accuracy over the pooled test utterances.
    """
    if not values:
        raise ValueError("weighted_average of no values")
    sizes = test_sizes() if sizes is None else sizes
    missing = [d for d in values if d not in sizes]
    if missing:
        raise KeyError(f"no size for dataset(s) {', '.join(missing)}")
    total = sum(sizes[d] for d in values)
    return sum(values[d] * sizes[d] for d in values) / total


def _checkpoint_id(cell: str) -> str:
    # models.csv sometimes adds a remark after the id: "meta-llama/Meta-Llama-3-8B-Instruct (README link ...)";
    # GPT-4o has a description instead of an id.
    first = cell.split(" ")[0]
    return first if "/" in first else ""


def _last_path_part(name: str) -> str:
    name = name.rstrip("/\\")
    return PureWindowsPath(PurePosixPath(name).name).name


def paper_model_name(model: str) -> str | None:
    """The paper's model name for a HF id, a local checkpoint path or an alias; None if not a paper model.

    Qwen/Qwen2-1.5B-Instruct, /models/Qwen2-1.5B-Instruct, Qwen2_1_5B_Instruct and qwen2-1.5b all give
    "Qwen2-1.5B". Matching is case-insensitive; a path matches on its last component.
    """
    wanted = {model.strip().lower(), _last_path_part(model.strip()).lower()}
    for row in read_table("models.csv"):
        checkpoint = _checkpoint_id(row["checkpoint"])
        names = {row["model"], checkpoint, checkpoint.split("/")[-1], row["repo_script_name"]}
        if wanted & {n.lower() for n in names if n}:
            return row["model"]
    return None
