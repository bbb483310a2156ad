"""The modality ablation: one model run zero-shot on text, video, audio and av, and what each modality adds.

`mmla run` writes it when an experiment lists `modalities` (configs/qwen2.5-omni-7b-ablation.yaml): one run
directory per modality (`<out>/zero-shot-<modality>/`), then `<out>/ablation.md`, `ablation.json`, `ablation.png`.

The modalities are compared on the same rows: a row whose clip is missing or unreadable in any of the runs is left
out of all of them (text has no clip; clips without sound are not left out: they run with silence, mmla.audio), so a
difference is the modality's, not a different sample. Per dataset, per dimension (the task: intent, emotion, ...)
and overall: ACC per modality, with a 95% interval, and the differences
  +video          video - text
  +audio          audio - text
  +audio to video  av - video   (what the sound adds to the picture)
  +video to audio  av - audio   (what the picture adds to the sound)
Intervals: a run's own `ci95` block in metrics.json (per dataset, key ACC: [low, high]) when the comparison keeps
all of that run's rows; otherwise a percentile bootstrap of ACC over the compared rows (2,000 resamples, seed 0).
"""

from __future__ import annotations

import textwrap
from pathlib import Path

import numpy as np

from .evaluation import evaluate_samples
from .inference import dedupe, key
from .runs import PREDICTION_KEYS, read_json, read_jsonl, write_json, write_text
from .tasks import get_task

MODALITY_ORDER = ("text", "video", "audio", "av")
DELTAS = (("+video", "video", "text"), ("+audio", "audio", "text"), ("+audio to video", "av", "video"),
          ("+video to audio", "av", "audio"))
BOOTSTRAP = 2000


def _bootstrap(correct: np.ndarray, seed: int = 0) -> list[float] | None:
    if len(correct) == 0:
        return None
    rng = np.random.default_rng(seed)
    means = correct[rng.integers(0, len(correct), size=(BOOTSTRAP, len(correct)))].mean(1) * 100
    return [round(float(np.percentile(means, 2.5)), 2), round(float(np.percentile(means, 97.5)), 2)]


def _own_ci(metrics: dict, dataset: str) -> list[float] | None:
    block = (metrics.get("per_dataset", {}).get(dataset) or {}).get("ci95")
    ci = block.get("ACC") if isinstance(block, dict) else None
    if isinstance(ci, dict):
        ci = [ci.get("low", ci.get("lo")), ci.get("high", ci.get("hi"))]
    return [float(ci[0]), float(ci[1])] if isinstance(ci, (list, tuple)) and len(ci) == 2 and None not in ci else None


def _acc(records: list[dict]) -> np.ndarray:
    return np.array([r["pred"] == str(r["label"]).lower() for r in records], dtype=float)


def ablation_table(run_dirs: dict[str, Path]) -> dict:
    """{"modalities", "rows": [{"dataset" | "dimension" | "average", "n", "ACC": {m: v}, "ci95": {m: [lo, hi]},
    "delta": {name: v}}], "left_out": {m: n}} over the rows every run has a usable clip for."""
    mods = [m for m in MODALITY_ORDER if m in run_dirs]
    recs, metrics = {}, {}
    for m in mods:
        path = Path(run_dirs[m]) / "predictions.jsonl"
        if not path.is_file():
            raise ValueError(f"{run_dirs[m]}: no predictions.jsonl (run the {m} predictions first)")
        recs[m] = {key(r): r for r in dedupe(read_jsonl(path, PREDICTION_KEYS)[0])}
        mpath = Path(run_dirs[m]) / "metrics.json"
        metrics[m] = read_json(mpath) if mpath.is_file() else {}
    common = set.intersection(*({k for k, r in recs[m].items() if not r.get("clip_error")} for m in mods))
    left_out = {m: len(recs[m]) - len(common) for m in mods}
    kept = {m: [r for k, r in recs[m].items() if k in common] for m in mods}
    per = {m: evaluate_samples(kept[m])["per_dataset"] if kept[m] else {} for m in mods}
    datasets = sorted({ds for m in mods for ds in per[m]}, key=lambda d: (get_task(d).task, d))

    def row(label: dict, select) -> dict:
        acc, ci, n = {}, {}, 0
        for m in mods:
            rows = [r for r in kept[m] if select(r["dataset"])]
            if not rows:
                continue
            correct = _acc(rows)
            acc[m], n = round(float(correct.mean() * 100), 2), len(rows)
            own = _own_ci(metrics[m], label.get("dataset", "")) if left_out[m] == 0 and "dataset" in label else None
            ci[m] = own or _bootstrap(correct)
        delta = {name: round(acc[a] - acc[b], 2) for name, a, b in DELTAS if a in acc and b in acc}
        return {**label, "n": n, "ACC": acc, "ci95": ci, "delta": delta}

    rows = [row({"dataset": ds}, lambda d, ds=ds: d == ds) for ds in datasets]
    for dim in sorted({get_task(ds).task for ds in datasets}):
        rows.append(row({"dimension": dim}, lambda d, dim=dim: get_task(d).task == dim))
    rows.append(row({"average": "all rows"}, lambda d: True))
    return {"modalities": mods, "rows": rows, "left_out": left_out, "compared_rows": len(common),
            "runs": {m: str(run_dirs[m]) for m in mods}}


def _name(row: dict) -> str:
    if "dataset" in row:
        return row["dataset"]
    return f"{row['dimension'].replace('_', ' ')} (dimension)" if "dimension" in row else "average (all rows)"


def markdown(table: dict, title: str) -> str:
    mods = table["modalities"]
    deltas = [d for d, a, b in DELTAS if a in mods and b in mods]
    head = ["", "n"] + [f"{m} ACC [95% CI]" for m in mods] + deltas
    lines = [f"# {title}", "", "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in table["rows"]:
        cells = [_name(r), str(r["n"])]
        for m in mods:
            v, ci = r["ACC"].get(m), r["ci95"].get(m)
            cells.append("-" if v is None else f"{v:.2f}" + (f" [{ci[0]:.1f}, {ci[1]:.1f}]" if ci else ""))
        cells += [f"{r['delta'][d]:+.2f}" if d in r["delta"] else "-" for d in deltas]
        lines.append("| " + " | ".join(cells) + " |")
    lines += ["", f"ACC in %, over the {table['compared_rows']} rows every run has a usable clip for (left out per "
                  f"run: {', '.join(f'{m} {n}' for m, n in table['left_out'].items())}). Dimension and average rows "
                  f"pool their datasets' rows. Runs: " + ", ".join(f"{m} {p}" for m, p in table["runs"].items())]
    return "\n".join(lines) + "\n"


def plot(table: dict, title: str, path: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")  # no display on servers and in CI
    import matplotlib.pyplot as plt

    mods, rows = table["modalities"], table["rows"]
    colors = {"text": "#8c96a6", "video": "#3b6fb6", "audio": "#d08a2e", "av": "#3f9b5a"}
    x = np.arange(len(rows))
    width = 0.8 / max(len(mods), 1)
    fig, ax = plt.subplots(figsize=(max(6.0, 0.9 * len(rows) + 2), 4.2))
    for k, m in enumerate(mods):
        vals = [r["ACC"].get(m, np.nan) for r in rows]
        lo = [v - r["ci95"][m][0] if r["ci95"].get(m) else 0 for v, r in zip(vals, rows)]
        hi = [r["ci95"][m][1] - v if r["ci95"].get(m) else 0 for v, r in zip(vals, rows)]
        ax.bar(x + (k - (len(mods) - 1) / 2) * width, vals, width, label=m, color=colors.get(m),
               yerr=[np.maximum(lo, 0), np.maximum(hi, 0)], capsize=2, error_kw={"elinewidth": 0.8})
    ax.set_xticks(x)
    ax.set_xticklabels([_name(r).replace(" (dimension)", "\n(dim.)") for r in rows], rotation=45, ha="right",
                       fontsize=8)
    ax.set_ylabel("ACC (%)")
    ax.set_title(textwrap.fill(title, 90), fontsize=9)
    ax.legend(fontsize=8, ncols=len(mods))
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def write_ablation(run_dirs: dict[str, Path], out: Path, title: str) -> str:
    """ablation.md, ablation.json and ablation.png in `out`; returns the markdown."""
    table = ablation_table(run_dirs)
    text = markdown(table, title)
    write_text(out / "ablation.md", text + "\n![what each modality adds](ablation.png)\n")
    write_json(out / "ablation.json", table)
    plot(table, title, out / "ablation.png")
    return text
