"""`make demo`: zero-shot on all 12 datasets with the embedded model, beside the paper's numbers.

The embedded SmolLM2-135M-Instruct stands in for the paper's Qwen2-1.5B-Instruct (no model hub is
reachable here); the table prints the paper's Qwen2-1.5B zero-shot accuracy beside ours. A per-dataset
limit keeps the run within about 10 minutes on 2 CPU cores. Rerunning resumes the same run directory.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

from .evaluation import format_table
from .inference import PredictConfig, predict

LIMIT = int(os.environ.get("MMLA_DEMO_LIMIT", "40"))  # test rows per dataset
OUT = Path(os.environ.get("MMLA_DEMO_OUT", "demo-out"))


def main() -> int:
    from . import paper

    cfg = PredictConfig(
        model="smollm2-135m", datasets=["all"], split="test", mode="generate", protocol="official",
        limit=LIMIT, batch_size=16, max_new_tokens=32, threads=os.cpu_count(),
        setting="zero-shot", name="SmolLM2-135M zero-shot (demo)", out=str(OUT / "zeroshot"),
    )
    print(f"mmla demo: zero-shot, {LIMIT} test rows per dataset, model {cfg.model}, run dir {cfg.out}", flush=True)
    result = predict(cfg)
    print()
    print("Zero-shot accuracy, SmolLM2-135M (ours) vs the paper's Qwen2-1.5B-Instruct (paper ACC column):")
    print(format_table(result, paper.paper_accuracies("Qwen2-1.5B", "zero-shot")))

    try:
        from .report import build_report
    except ImportError:
        return 0
    html = build_report([Path(cfg.out)], OUT / "report")
    print(f"\nreport: {html}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
