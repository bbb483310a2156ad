"""Figures the report draws that other report parts share: matplotlib set up lazily, PNGs embedded as data URIs,
confusion matrices and reliability diagrams."""

from __future__ import annotations

import base64
from collections import Counter
from pathlib import Path

from .runs import writing

UNPARSED = ("unknown", "multi")


class _Pyplot:
    """matplotlib.pyplot, imported on first use: it costs about a second, which every `mmla` command would pay
    (cli registers `report` at start) though only a report draws."""

    def __getattr__(self, name):
        import matplotlib

        matplotlib.use("Agg")  # no display on servers and in CI
        import matplotlib.pyplot

        return getattr(matplotlib.pyplot, name)


plt = _Pyplot()


def save(fig, path: Path, dpi: int = 110) -> Path:
    try:
        with writing(path):
            fig.savefig(path, dpi=dpi, bbox_inches="tight")
    finally:
        plt.close(fig)
    return path


def confusion_counts(predictions: list[dict], dataset: str) -> tuple[list[str], list[str], list[list[int]]]:
    """Gold labels (rows), predicted labels (columns: gold labels, other predictions, unknown, multi), counts."""
    pairs = [(p["label"], p["pred"]) for p in predictions
             if p.get("dataset") == dataset and "label" in p and "pred" in p]
    gold = sorted({g for g, _ in pairs})
    extra = sorted({p for _, p in pairs} - set(gold) - set(UNPARSED))
    columns = gold + extra + list(UNPARSED)
    counts = Counter(pairs)
    return gold, columns, [[counts[g, c] for c in columns] for g in gold]


def plot_confusion(predictions: list[dict], dataset: str, path: Path, title: str | None = None) -> Path:
    rows, columns, counts = confusion_counts(predictions, dataset)
    # Colour by the share of each gold row, so rare classes stay visible next to frequent ones.
    shares = [[c / max(sum(row), 1) for c in row] for row in counts]
    fig, ax = plt.subplots(figsize=(max(3.5, 0.42 * len(columns) + 1.8), max(2.8, 0.36 * len(rows) + 1.6)))
    ax.imshow(shares, cmap="Blues", vmin=0, vmax=1, aspect="auto")
    small = 7 if len(columns) > 15 else 8
    for i, row in enumerate(counts):
        for j, count in enumerate(row):
            if count:
                ax.text(j, i, str(count), ha="center", va="center", fontsize=small,
                        color="white" if shares[i][j] > 0.6 else "black")
    ax.set_xticks(range(len(columns)), columns, rotation=45, ha="right", fontsize=small)
    ax.set_yticks(range(len(rows)), rows, fontsize=small)
    ax.set_xlabel("predicted")
    ax.set_ylabel("gold")
    ax.set_title(f"{title or dataset} (n={sum(map(sum, counts))})", fontsize=10)
    # A lower resolution than the bar charts: the page shows images at their natural size, so a 2-label
    # matrix comes out small and a 30-label one large, with the same font size in both.
    return save(fig, path, dpi=90)


def image(path: Path, out_dir: Path, caption: str) -> dict:
    data = base64.b64encode(path.read_bytes()).decode("ascii")
    return {"src": f"data:image/png;base64,{data}", "file": path.relative_to(out_dir).as_posix(),
            "caption": caption}


def plot_reliability(bins: list[dict], title: str, path: Path) -> Path:
    """Reliability diagram: accuracy against mean confidence per bin of the top probability (marker area ~ rows in
    the bin), the diagonal of perfect calibration, and below it how many rows fall in each bin."""
    fig, (ax, hist) = plt.subplots(2, 1, figsize=(4.2, 4.6), height_ratios=(3, 1), sharex=True)
    ax.plot([0, 1], [0, 1], color="#999", lw=1, ls="--", label="perfectly calibrated")
    full = [b for b in bins if b["n"]]
    total = sum(b["n"] for b in full) or 1
    ax.bar([(b["lo"] + b["hi"]) / 2 for b in full], [b["accuracy"] for b in full], width=bins[0]["hi"] - bins[0]["lo"],
           color="#3b6fb6", alpha=0.35, edgecolor="#3b6fb6", label="accuracy per bin")
    sizes = [20 + 200 * b["n"] / total for b in full]
    ax.scatter([b["confidence"] for b in full], [b["accuracy"] for b in full], s=sizes, color="#3b6fb6", zorder=3,
               label="(mean confidence, accuracy)")
    ax.set(xlim=(0, 1), ylim=(0, 1), ylabel="accuracy")
    ax.set_title(title, fontsize=10)
    ax.legend(frameon=False, fontsize=7, loc="upper left")
    ax.grid(alpha=0.3)
    hist.bar([(b["lo"] + b["hi"]) / 2 for b in bins], [b["n"] for b in bins], width=bins[0]["hi"] - bins[0]["lo"],
             color="#b9bec7", edgecolor="#858b94")
    hist.set(xlabel="confidence (probability of the top candidate)", ylabel="rows")
    return save(fig, path)
