"""Peer: the whole `mmla predict --mode score` process against lm-evaluation-harness on the same multiple-choice work.

In one run, on the same N real test prompts (the first N/k rows of each of k datasets), the same chat-wrapped
prompt strings, the same candidate answers, the same model directory (the embedded SmolLM2-135M-Instruct, HF
format), fp32, CPU, 2 threads, batch size 32:
  mmla    `mmla predict --mode score --protocol clean ...` into a fresh run directory
  lmeval  `lm_eval --model hf --tasks <a local multiple_choice task> ...` (lm-eval 0.4.13, its own virtualenv)
Each is one subprocess timed from start to exit (imports, model load, data, scoring, writing, evaluation).
The bench prints JSON: samples/s of both, the ratio (and the ratio of the processes' CPU seconds, which a busy
neighbour on the shared CPU moves much less than the wall time), where mmla's time went (its env.json: seconds_prepare,
seconds_model; the rest is import, load, reading data, writing and evaluating), and how many picks agree
(mmla's predictions.jsonl `output` against lm-eval's argmax of the summed log-likelihoods, per document).

The lm-eval task is written under a temporary directory: a JSONL file (one document per prompt: `context` is the
chat-wrapped string mmla builds, `choices` are mmla.prompts.candidates) and a YAML task with
`target_delimiter: ""`, so lm-eval scores tokenizer(context + choice) exactly as mmla does.

lm-eval lives in its own virtualenv (never the project's): created on first use at --lmeval-venv (default
$MMLA_CACHE/lmeval-venv, else ~/.cache/mmla/lmeval-venv) with torch pinned in the same pip command so that no other
torch build is pulled; reused afterwards.

With --repeats R the pair runs R times, in alternating order (mmla first, then lmeval first, ...): the CPU here is
shared, and a busy spell should not always fall on the same side.

    PYTHONPATH=src .venv/bin/python bench/peer_lmeval.py --data ../shared/data/mmla        # 200 prompts, MELD+MIntRec
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))
from mmla.data import data_root, load_split  # noqa: E402
from mmla.inputs import TextInputs  # noqa: E402
from mmla.models import cache_root, load_tokenizer, resolve  # noqa: E402
from mmla.prompts import candidates, render, target  # noqa: E402

LMEVAL_PINS = ["lm-eval[hf]==0.4.13", "torch==2.14.1", "torchvision==0.29.1", "transformers==5.24.0"]
TASK = "mmla_peer"
ACCEPT_RATIO = 4.5


# ---------------------------------------------------------------- lm-eval's own virtualenv


def venv_versions(venv: Path) -> dict | None:
    """Versions of lm-eval, torch and transformers inside `venv`, or None when it is not usable."""
    py = venv / "bin" / "python"
    if not py.exists():
        return None
    code = ("import json, importlib.metadata as m, lm_eval, accelerate; "
            "print(json.dumps({p: m.version(p) for p in ('lm_eval', 'torch', 'transformers', 'accelerate')}))")
    r = subprocess.run([str(py), "-c", code], capture_output=True, text=True, env=_clean_env())
    return json.loads(r.stdout) if r.returncode == 0 else None


def ensure_venv(venv: Path) -> dict:
    return provision(venv, LMEVAL_PINS, venv_versions, ("lm_eval", "0.4.13"), "lm-eval")


def provision(venv: Path, pins: list[str], versions_of, wanted: tuple[str, str], what: str) -> dict:
    """A peer's own virtualenv at `venv` with `pins` installed (reused when `versions_of(venv)[name]` is the
    wanted version); the versions found in it."""
    versions = versions_of(venv)
    if versions and versions[wanted[0]] == wanted[1]:
        return versions
    print(f"creating {what}'s virtualenv at {venv} (a few minutes)", file=sys.stderr)
    if not (venv / "bin" / "python").exists():
        subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    # torch in the same command: otherwise the peer's requirements could pull another torch build
    subprocess.run([str(venv / "bin" / "pip"), "install", "-q", *pins], check=True, env=_clean_env())
    versions = versions_of(venv)
    if not versions:
        raise SystemExit(f"{venv}: {what} does not import after installing; remove the directory and retry")
    return versions


def _clean_env(env: dict | None = None) -> dict:
    """The environment without the project's sources or virtualenv on the path (lm-eval must not see them)."""
    return {k: v for k, v in (env or os.environ).items() if k not in ("PYTHONPATH", "VIRTUAL_ENV", "PYTHONHOME")}


# ---------------------------------------------------------------- the shared work


def build_work(data: Path, datasets: list[str], per_dataset: int, model_dir: str) -> list[dict]:
    """One document per prompt, built by mmla's own code: the chat-wrapped prompt string and the candidates."""
    tok = load_tokenizer(model_dir)
    inputs = TextInputs(None, tok)  # chat wrapping reads only the tokenizer
    docs = []
    for ds in datasets:
        examples = load_split(data, ds, "test").examples[:per_dataset]
        prompts = [render(ds, "clean", e.text, "test", "text") for e in examples]
        cands = candidates(ds, "clean", "test", "text")
        for e, p, ctx in zip(examples, prompts, inputs.chat(prompts, "clean")):
            gold = target(ds, "clean", e.label, "test", "text")
            docs.append({"dataset": ds, "id": e.id, "prompt": p, "context": ctx, "choices": cands,
                         "gold": cands.index(gold) if gold in cands else 0})
    return docs


def write_task(task_dir: Path, docs: list[dict]) -> None:
    task_dir.mkdir(parents=True, exist_ok=True)
    data_file = task_dir / "docs.jsonl"
    with open(data_file, "w", encoding="utf-8") as f:
        for d in docs:
            f.write(json.dumps(d, ensure_ascii=False) + "\n")
    # Field names (not Jinja templates) for text, choices and target: lm-eval then takes the strings verbatim.
    (task_dir / f"{TASK}.yaml").write_text(
        f"task: {TASK}\n"
        "dataset_path: json\n"
        "dataset_kwargs:\n"
        f"  data_files:\n    test: {json.dumps(str(data_file))}\n"
        "test_split: test\n"
        "output_type: multiple_choice\n"
        "doc_to_text: context\n"
        "doc_to_choice: choices\n"
        "doc_to_target: gold\n"
        'target_delimiter: ""\n'
        "num_fewshot: 0\n"
        "metric_list:\n  - metric: acc\n"
    )


# ---------------------------------------------------------------- the two processes


def timed_run(cmd: list[str], env: dict, log: Path) -> tuple[float, float]:
    """(wall seconds from start to exit, CPU seconds the process used). On a shared CPU the wall time of either
    side moves with the neighbours' load; the CPU seconds much less, so both are reported."""
    t = time.perf_counter()
    with open(log, "w") as f:
        proc = subprocess.Popen(cmd, env=env, stdout=f, stderr=subprocess.STDOUT)
        _, status, usage = os.wait4(proc.pid, 0)
    seconds = time.perf_counter() - t
    proc.returncode = os.waitstatus_to_exitcode(status)
    if proc.returncode != 0:
        tail = log.read_text(errors="replace")[-3000:]
        raise SystemExit(f"{shlex.join(cmd)} exited with {proc.returncode}; the end of {log}:\n{tail}")
    return seconds, usage.ru_utime + usage.ru_stime


def mmla_cmd(a, datasets: list[str], per_dataset: int, out: Path) -> list[str]:
    script = Path(sys.executable).parent / "mmla"
    head = [str(script)] if script.exists() else [sys.executable, "-m", "mmla.cli"]
    return [*head, "predict", "--model", "smollm2-135m", "--data", str(a.data), "--datasets", ",".join(datasets),
            "--split", "test", "--limit", str(per_dataset), "--mode", "score", "--protocol", "clean",
            "--batch-size", str(a.batch_size), "--threads", str(a.threads), "--dtype", "float32", "--device", "cpu",
            "--no-progress", "--out", str(out)]


def lmeval_cmd(a, venv: Path, model_dir: str, task_dir: Path, out: Path) -> list[str]:
    return [str(venv / "bin" / "lm-eval"), "run", "--model", "hf", "--model_args", f"pretrained={model_dir},dtype=float32",
            "--tasks", TASK, "--include_path", str(task_dir), "--batch_size", str(a.batch_size), "--device", "cpu",
            "--log_samples", "--output_path", str(out)]


def mmla_picks(run: Path) -> tuple[dict, dict]:
    picks, prompts = {}, {}
    with open(run / "predictions.jsonl", encoding="utf-8") as f:
        for line in f:
            r = json.loads(line)
            picks[(r["dataset"], r["id"])] = r["output"]
            prompts[(r["dataset"], r["id"])] = r["prompt"]
    return picks, prompts


def lmeval_picks(out: Path) -> tuple[dict, dict]:
    """Per document: the choice with the highest summed log-likelihood (what lm-eval's `acc` takes), and the run's
    results (for its own evaluation time)."""
    samples = sorted(out.rglob(f"samples_{TASK}_*.jsonl"))
    results = sorted(out.rglob("results_*.json"))
    if not samples:
        raise SystemExit(f"{out}: lm-eval wrote no samples_{TASK}_*.jsonl (was --log_samples honoured?)")
    picks = {}
    with open(samples[-1], encoding="utf-8") as f:
        for line in f:
            s = json.loads(line)
            doc = s["doc"]
            # one (log-likelihood, is_greedy) pair per choice, written as strings by lm-eval's sample logger
            lls = [float(fr[0]) for fr in s["filtered_resps"]]
            picks[(doc["dataset"], doc["id"])] = doc["choices"][max(range(len(lls)), key=lls.__getitem__)]
    return picks, (json.loads(results[-1].read_text()) if results else {})


def one_round(a, order: list[str], docs: list[dict], datasets, per_dataset, venv, model_dir, work: Path, env):
    n = len(docs)
    task_dir = work / "task"
    write_task(task_dir, docs)
    res = {"load_average_1min_before": round(os.getloadavg()[0], 2)}
    for side in order:
        if side == "mmla":
            run = work / "mmla-run"
            e = {**env, "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT / "src"), os.environ.get("PYTHONPATH")]))}
            cmd = mmla_cmd(a, datasets, per_dataset, run)
            sec, cpu = timed_run(cmd, e, work / "mmla.log")
            info = json.loads((run / "env.json").read_text())
            prep, model = info.get("seconds_prepare"), info.get("seconds_model")
            res["mmla"] = {"seconds": round(sec, 2), "samples_per_s": round(n / sec, 3), "cpu_seconds": round(cpu, 2),
                           "seconds_prepare": prep, "seconds_model": model,
                           "seconds_other": round(sec - (prep or 0) - (model or 0), 2),
                           "model_samples_per_s": round(n / model, 3) if model else None}
        else:
            out = work / "lmeval-out"
            # a fresh datasets cache, so every run converts the JSONL as a first run of a new task does
            e = {**_clean_env(env), "HF_DATASETS_CACHE": str(work / "hf-datasets")}
            cmd = lmeval_cmd(a, venv, model_dir, task_dir, out)
            sec, cpu = timed_run(cmd, e, work / "lmeval.log")
            picks, results = lmeval_picks(out)
            res["lmeval"] = {"seconds": round(sec, 2), "samples_per_s": round(n / sec, 3), "cpu_seconds": round(cpu, 2),
                             "evaluation_seconds": _float(results.get("total_evaluation_time_seconds")),
                             "acc": results.get("results", {}).get(TASK, {}).get("acc,none")}
            res["_lmeval_picks"] = picks
    ours, prompts = mmla_picks(work / "mmla-run")
    theirs = res.pop("_lmeval_picks")
    keys = [(d["dataset"], d["id"]) for d in docs]
    res["order"] = order
    res["ratio"] = round(res["lmeval"]["seconds"] / res["mmla"]["seconds"], 2)
    res["cpu_ratio"] = round(res["lmeval"]["cpu_seconds"] / res["mmla"]["cpu_seconds"], 2)
    res["picks_identical"] = sum(ours.get(k) == theirs.get(k) for k in keys)
    res["picks_compared"] = len(keys)
    res["mmla_prompts_identical"] = sum(prompts.get(k) == d["prompt"] for k, d in zip(keys, docs))
    return res


def _float(v):
    try:
        return round(float(v), 2)
    except (TypeError, ValueError):
        return None


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--data", default=os.environ.get("MMLA_DATA") or str(ROOT.parent / "shared" / "data" / "mmla"))
    ap.add_argument("--datasets", default="MELD,MIntRec")
    ap.add_argument("--n", type=int, default=200, help="prompts in all (the first N/k rows of each of k datasets)")
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=1, help="run the pair R times, alternating which goes first")
    ap.add_argument("--lmeval-venv", default=str(cache_root() / "lmeval-venv"))
    ap.add_argument("--keep", help="keep the task files, run directories and logs under this directory")
    a = ap.parse_args()
    a.data = data_root(a.data)
    datasets = [d.strip() for d in a.datasets.split(",") if d.strip()]
    per_dataset = a.n // len(datasets)
    if per_dataset < 1:
        raise SystemExit(f"--n {a.n} is less than one prompt per dataset ({len(datasets)} datasets)")

    venv = Path(a.lmeval_venv).expanduser()
    lm_versions = ensure_venv(venv)
    model_dir = resolve("smollm2-135m")
    docs = build_work(a.data, datasets, per_dataset, model_dir)
    # Same threads for both: OpenMP (torch's pool in lm-eval, which has no thread option) and mmla's --threads.
    # Threads sleep rather than spin while idle: spinning threads of busy neighbours on 2 cores slow everyone.
    env = {**os.environ, "OMP_NUM_THREADS": str(a.threads), "MKL_NUM_THREADS": str(a.threads),
           "OMP_WAIT_POLICY": os.environ.get("OMP_WAIT_POLICY", "PASSIVE"),
           "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}

    base = Path(a.keep) if a.keep else Path(tempfile.mkdtemp(prefix="peer-lmeval-"))
    rounds = []
    try:
        for r in range(a.repeats):
            order = ["mmla", "lmeval"] if r % 2 == 0 else ["lmeval", "mmla"]
            work = base / f"round{r}"
            if work.exists():
                shutil.rmtree(work)  # mmla would resume an old run directory and do nothing
            work.mkdir(parents=True)
            rounds.append(one_round(a, order, docs, datasets, per_dataset, venv, model_dir, work, env))
            print(json.dumps({"round": r, **rounds[-1]}), file=sys.stderr)
    finally:
        if not a.keep:
            shutil.rmtree(base, ignore_errors=True)

    from importlib import metadata

    ratios = [x["ratio"] for x in rounds]
    cpu_ratios = [x["cpu_ratio"] for x in rounds]
    print(json.dumps({
        "n": len(docs), "datasets": datasets, "per_dataset": per_dataset, "batch_size": a.batch_size,
        "threads": a.threads, "dtype": "float32", "device": "cpu", "model": model_dir,
        "rounds": rounds,
        "ratio_min": min(ratios), "ratio_max": max(ratios), "cpu_ratio_min": min(cpu_ratios),
        "cpu_ratio_max": max(cpu_ratios), "load_average_1min_at_end": round(os.getloadavg()[0], 2),
        "acceptance": {"want_ratio_at_least": ACCEPT_RATIO, "met_every_round": all(x >= ACCEPT_RATIO for x in ratios),
                       "picks_all_identical": all(x["picks_identical"] == x["picks_compared"] for x in rounds)},
        "versions": {"mmla_side": {p: metadata.version(p) for p in ("torch", "transformers")}, "lmeval_side": lm_versions},
        "commands": {"mmla": shlex.join(mmla_cmd(a, datasets, per_dataset, Path("RUN"))),
                     "lmeval": shlex.join(lmeval_cmd(a, venv, model_dir, Path("TASK_DIR"), Path("OUT")))},
        "command": "PYTHONPATH=src " + shlex.join([sys.executable.replace(str(ROOT) + "/", ""), *sys.argv]),
    }, indent=2))


if __name__ == "__main__":
    main()
