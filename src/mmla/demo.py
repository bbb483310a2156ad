"""`make demo`: the whole pipeline on the embedded model, beside the paper's numbers, ending with a report.

1. zero-shot on all 12 datasets (the first LIMIT test rows of each) under the official protocol;
2. the packaged demo config (`configs/demo.yaml` in a checkout) through `mmla run`: zero-shot and LoRA SFT on MUStARD, each evaluated on its full test split;
3. `mmla report` over the three run directories.

The embedded SmolLM2-135M-Instruct stands in for the paper's Qwen2-1.5B-Instruct (no model hub is reachable
here); the tables print the paper's Qwen2-1.5B numbers beside ours. Rerunning resumes every stage.
"""

from __future__ import annotations

import os
from pathlib import Path

from .evaluation import format_table
from .inference import PredictConfig, predict

LIMIT = int(os.environ.get("MMLA_DEMO_LIMIT", "20"))  # test rows per dataset in step 1
OUT = Path(os.environ.get("MMLA_DEMO_OUT", "demo-out"))
# package data, so that `mmla demo` runs from any install (configs/demo.yaml in a checkout links to it)
CONFIG = Path(__file__).resolve().parent / "resources" / "configs" / "demo.yaml"


def run() -> int:
    from . import paper
    from .experiment import load_experiment, run_experiment
    from .report import build_report

    # 1. zero-shot, 12 datasets
    zs = PredictConfig(
        model="smollm2-135m", datasets=["all"], split="test", mode="generate", protocol="official",
        limit=LIMIT, batch_size=32, max_new_tokens=32, threads=os.cpu_count(), setting="zero-shot",
        paper_model="Qwen2-1.5B", name="SmolLM2-135M zero-shot, 12 datasets", out=str(OUT / "zeroshot-12"),
    )
    print(f"[1/3] zero-shot: {zs.model}, {LIMIT} test rows of each of the 12 datasets -> {zs.out}", flush=True)
    result = predict(zs)
    print("\nZero-shot, SmolLM2-135M (ours) vs the paper's Qwen2-1.5B-Instruct (paper ACC column):")
    print(format_table(result, paper.paper_accuracies("Qwen2-1.5B", "zero-shot")), flush=True)

    # 2. the experiment config: zero-shot and SFT on MUStARD
    exp = load_experiment(str(CONFIG), [f"out={OUT / 'run'}"])
    print(f"\n[2/3] mmla run {CONFIG.name}: stages {', '.join(exp.stages)} on {exp.datasets} -> {exp.out}", flush=True)
    print(run_experiment(exp), flush=True)

    # 3. the report
    runs = [Path(zs.out)] + [Path(exp.out) / s for s in exp.stages if (Path(exp.out) / s / "metrics.json").exists()]
    html = build_report(runs, OUT / "report")
    print(f"\n[3/3] report: {html}")
    return 0
