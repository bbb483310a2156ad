"""How long the bootstrap intervals take on the full test set: 10,000 resamples of the six metrics (and the strict
ones) over 15,741 rows, per dataset and pooled, then a whole `mmla evaluate` of a 15,741-row predictions file.

Rows are synthetic with the real gold-label distribution of each test set (read from the data; no text is used):
each answer is right with probability --skill, otherwise another label, `unknown` or `multi`, as real runs fail.

    PYTHONPATH=src .venv/bin/python bench/stats.py            # 10,000 resamples, the 12 test sets
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import shlex
import subprocess
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))
from results import emit  # noqa: E402  (bench/results.py)
from mmla.data import load_split  # noqa: E402
from mmla.evaluation import intervals  # noqa: E402
from mmla.tasks import DATASETS, get_task  # noqa: E402

DATA = os.environ.get("MMLA_DATA") or str(Path(__file__).resolve().parents[2] / "shared" / "data" / "mmla")


def synthetic_records(data: str, skill: float, seed: int) -> list[dict]:
    rng = random.Random(seed)
    records = []
    for ds in DATASETS:
        task = get_task(ds)
        words = task.task_words
        for e in load_split(Path(data), ds, "test").examples:
            gold = e.label.lower()
            r = rng.random()
            if r < skill:
                out = f"{words}: {gold}"
            elif r < skill + 0.05:
                out = "I cannot tell."
            elif r < skill + 0.08:
                out = f"{gold} or {rng.choice(task.labels).lower()}"
            else:
                out = f"{words}: {rng.choice(task.labels).lower()}"
            records.append({"dataset": ds, "split": "test", "id": e.id, "label": e.label, "output": out})
    return records


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", default=DATA)
    ap.add_argument("--resamples", type=int, default=10_000)
    ap.add_argument("--skill", type=float, default=0.45)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", help="also write the JSON result here")
    args = ap.parse_args(argv)

    from mmla.evaluation import normalize_label, parse_output

    records = synthetic_records(args.data, args.skill, args.seed)
    by_ds: dict[str, tuple[list, list]] = {}
    for r in records:
        task = get_task(r["dataset"])
        g, p = by_ds.setdefault(r["dataset"], ([], []))
        g.append(normalize_label(r["label"], task.task))
        p.append(parse_output(r["output"], task.labels))
    t0 = time.perf_counter()
    per, avg = intervals(by_ds, args.seed, args.resamples)
    t_boot = time.perf_counter() - t0

    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "predictions.jsonl"
        path.write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")
        env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1] / "src")}
        t0 = time.perf_counter()
        done = subprocess.run([sys.executable, "-m", "mmla.cli", "evaluate", str(path), "--json"], env=env,
                              capture_output=True, text=True)
        t_eval = time.perf_counter() - t0
    if done.returncode:
        raise SystemExit(done.stderr)
    evaluated = json.loads(done.stdout)
    assert evaluated["average"]["ci95"] == avg, "mmla evaluate and the timed call disagree"
    result = {
        "bench": "stats", "rows": len(records), "datasets": len(by_ds), "resamples": args.resamples,
        "seconds_bootstrap": round(t_boot, 2), "seconds_mmla_evaluate": round(t_eval, 2),
        "average_ACC": evaluated["average"]["ACC"], "average_ACC_ci95": avg["ACC"],
        "cpus": os.cpu_count(), "platform": platform.platform(),
        "command": "PYTHONPATH=src " + shlex.join([sys.executable.replace(str(Path.cwd()) + "/", ""), *sys.argv]),
    }
    return emit(result, args.out)


if __name__ == "__main__":
    main()
