"""RunDir directories for report tests, in the format `mmla predict` writes.

Utterances and gold labels are the first rows of the real test sets when ../shared/data is beside the
repository (nothing from it is stored in the repo); otherwise synthetic sentences with valid labels. Model
outputs are made up with a seeded RNG in the shapes real models produce (format followed, free text,
no label, several labels), then parsed and scored with mmla.evaluation like a real run.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

import yaml

from mmla import prompts
from mmla.data import load_split
from mmla.evaluation import evaluate_records, parse_output
from mmla.tasks import get_task

DATA_ROOT = Path(__file__).resolve().parents[1] / ".." / "shared" / "data" / "mmla"


def gold_rows(dataset: str, n: int, rng: random.Random) -> list[tuple[str, str, str]]:
    """(id, text, gold label) for n utterances of the dataset's test split."""
    if (DATA_ROOT / dataset / "test.tsv").is_file():
        examples = load_split(DATA_ROOT, dataset, "test").examples[:n]
        return [(e.id, e.text, e.label) for e in examples]
    labels = get_task(dataset).labels
    return [(f"{dataset}_{i}", f"synthetic utterance {i}", rng.choice(labels)) for i in range(n)]


def fake_output(task, gold: str, skill: float, rng: random.Random) -> str:
    """What a model might answer: right label with probability `skill`, otherwise a plausible failure."""
    words = task.task_words
    if rng.random() < skill:
        return rng.choice([f"{words}: {gold}", f"The {words} of this speaker is {gold}."])
    wrong = rng.choice([label for label in task.labels if label != gold] or [gold])
    return rng.choice([
        f"{words}: {wrong}",
        f"The speaker seems {wrong}.",
        "I cannot determine that from the text alone.",  # -> unknown
        f"It could be {gold} or {wrong}.",  # -> multi
    ])


def make_run(
    root: Path,
    name: str | None,
    *,
    model: str = "Qwen/Qwen2-1.5B-Instruct",
    paper_model: str | None = "Qwen2-1.5B",
    setting: str = "zero-shot",
    datasets: tuple[str, ...] = ("MELD", "MOSI", "MIntRec2.0"),
    rows: int = 20,
    skill: float = 0.5,
    seed: int = 0,
    train_log: bool = False,
) -> Path:
    """Write config.yaml, env.json, predictions.jsonl, metrics.json (and train_log.jsonl) into root/<name>."""
    rng = random.Random(seed)
    run_dir = root / (name or f"run{seed}")
    run_dir.mkdir(parents=True)
    records = []
    for dataset in datasets:
        task = get_task(dataset)
        for id_, text, gold in gold_rows(dataset, rows, rng):
            output = fake_output(task, gold, skill, rng)
            records.append({
                "dataset": dataset, "split": "test", "id": id_, "text": text, "label": gold,
                "prompt": prompts.render(task, "infer_script", text), "output": output,
                "pred": parse_output(output, task.labels),
            })
    config = {
        "model": model, "adapter": None if setting == "zero-shot" else "adapters/x", "datasets": list(datasets),
        "split": "test", "mode": "generate", "family": "infer_script", "protocol": "official",
        "setting": setting, "paper_model": paper_model, "name": name,
    }
    env = {"mmla": "0.1.0", "python": "3.11.2", "packages": {"torch": "2.14.1", "transformers": "5.24.0"},
           "git_revision": "0123abc", "platform": "Linux-x86_64", "device": "cpu"}
    (run_dir / "config.yaml").write_text(yaml.safe_dump(config, sort_keys=False))
    (run_dir / "env.json").write_text(json.dumps(env, indent=2))
    (run_dir / "predictions.jsonl").write_text(
        "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records), encoding="utf-8")
    (run_dir / "metrics.json").write_text(json.dumps(evaluate_records(records), indent=2))
    if train_log:
        lines = []
        for step in range(10, 110, 10):
            lines.append({"step": step, "epoch": step / 40, "loss": round(2.0 * 0.97 ** step, 4)})
            if step % 20 == 0:
                lines.append({"step": step, "eval_accuracy": round(0.3 + step / 250, 3),
                              "eval_gen_accuracy": round(0.25 + step / 300, 3)})
        (run_dir / "train_log.jsonl").write_text("".join(json.dumps(x) + "\n" for x in lines))
    return run_dir
