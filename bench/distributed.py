"""Data-parallel predict on this machine: the whole `mmla predict` command as 2 processes x 1 thread (torchrun,
gloo) against 1 process x 2 threads, on the same rows, in fresh run directories. Prints wall seconds, samples/s,
each rank's model seconds, and whether the merged predictions equal the single process's row for row.

    .venv/bin/python bench/distributed.py --data ../shared/data/mmla [--limit 16] [--mode generate]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def run(cmd: list[str], out: Path) -> dict:
    env = {**os.environ, "PYTHONPATH": str(REPO / "src"), "TOKENIZERS_PARALLELISM": "false",
           "OMP_WAIT_POLICY": "PASSIVE"}
    t0 = time.perf_counter()
    r = subprocess.run(cmd, env=env, capture_output=True, text=True)
    wall = time.perf_counter() - t0
    if r.returncode != 0:
        sys.exit(r.stderr[-3000:])
    info = json.loads((out / "env.json").read_text())
    rows = {(j["dataset"], j["id"]): j["output"] for j in map(json.loads, (out / "predictions.jsonl").open())}
    return {"wall_s": wall, "rows": rows, "env": info}


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--data", required=True)
    p.add_argument("--datasets", default="MELD,MOSI,MUStARD")
    p.add_argument("--limit", type=int, default=16)
    p.add_argument("--mode", default="generate", choices=("generate", "score"))
    p.add_argument("--max-new-tokens", type=int, default=16)
    a = p.parse_args()
    base = ["-m", "mmla.cli", "predict", "--model", "smollm2-135m", "--data", a.data, "--datasets", a.datasets,
            "--limit", str(a.limit), "--mode", a.mode, "--protocol", "clean", "--max-new-tokens",
            str(a.max_new_tokens), "--batch-size", "32", "--no-progress"]
    with tempfile.TemporaryDirectory() as tmp:
        one = run([sys.executable, *base, "--threads", "2", "--out", f"{tmp}/one"], Path(tmp, "one"))
        two = run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", *base, "--threads", "1",
                   "--out", f"{tmp}/two"], Path(tmp, "two"))
    n = len(one["rows"])
    for name, r in (("1 process x 2 threads", one), ("2 processes x 1 thread", two)):
        ranks = r["env"].get("ranks") or [{"rank": 0, "rows": n, **r["env"]}]
        per = ", ".join(f"rank {x['rank']}: {x['rows']} rows, model {x.get('seconds_model', 0):.1f} s" for x in ranks)
        print(f"{name:24s} wall {r['wall_s']:6.1f} s  {n / r['wall_s']:5.2f} samples/s  ({per})")
    print(f"speed-up of 2 processes: {one['wall_s'] / two['wall_s']:.2f}x;  merged predictions equal the single "
          f"process's row for row: {one['rows'] == two['rows']}")


if __name__ == "__main__":
    main()
