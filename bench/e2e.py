"""End to end: the whole `mmla predict` command, start to exit, against the plain-forward ceiling, in one run.

  command   `python -m mmla.cli predict ... --mode score|generate` as a user types it (a subprocess: interpreter
            start, imports, data reading and checking, model load, prompt rendering and chat wrapping, tokenising,
            the model, predictions.jsonl, evaluation, metrics.json), timed from start to exit.
  ceiling   one plain forward per prompt (no KV cache, no shared prefix, same batch size) over the same
            chat-wrapped prompts, in this process, model already loaded (`engine.prefill_only`): what any method
            that reads the model's answer from the prompt must at least do.
  generate_batch  (--mode generate) transformers' built-in continuous batching (`model.generate_batch`, paged
            attention) on the same prompts, greedy, same max_new_tokens: the library's own loop as a baseline.
The command and the ceiling alternate over --rounds (the machine is shared; the best of each is kept). Prints JSON:
samples/s of each, command / ceiling, where the command's time went (from its env.json), and the command line that
reproduces the run.

    .venv/bin/python bench/e2e.py                                    # CPU: embedded model, fp32, 2 threads, 384 prompts
    .venv/bin/python bench/e2e.py --mode generate --n 96 --max-new-tokens 32
    python bench/e2e.py --arch qwen2-1.5b --random-init --n 15741 --batch-size 64   # GPU: all 12 test splits
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shlex
import subprocess
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # before torch starts its thread pool
import torch  # noqa: E402

SRC = Path(__file__).resolve().parents[1] / "src"
sys.path.insert(0, str(SRC))
from results import emit  # noqa: E402  (bench/results.py)
from mmla import engine  # noqa: E402
from mmla.data import load_split  # noqa: E402
from mmla.inputs import TextInputs  # noqa: E402
from mmla.models import load_model, load_tokenizer, pick_device, pick_dtype, resolve  # noqa: E402
from mmla.tiny import real_size_config  # noqa: E402
from mmla.prompts import render  # noqa: E402
from mmla.tasks import DATASETS as ALL  # noqa: E402

DATA = os.environ.get("MMLA_DATA") or str(Path(__file__).resolve().parents[2] / "shared" / "data" / "mmla")


def random_init_dir(arch: str, tokenizer: str, dtype, out: Path) -> Path:
    """A real-size random-init model saved as a model directory, so the command loads it as a user's checkpoint."""
    from transformers import AutoModelForCausalLM

    config = real_size_config(arch)
    tok = load_tokenizer(tokenizer)
    config.eos_token_id = tok.eos_token_id  # random weights rarely emit it: rows run to max_new_tokens
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    model.save_pretrained(out)
    tok.save_pretrained(out)
    return out


def command(args, model_dir: str, out: Path) -> list[str]:
    cmd = [sys.executable, "-m", "mmla.cli", "predict", "--model", model_dir, "--data", args.data, "--datasets",
           args.datasets, "--split", "test", "--limit", str(args.limit), "--mode", args.mode, "--protocol", "clean",
           "--batch-size", str(args.batch_size), "--no-progress", "--out", str(out)]
    if args.mode == "generate":
        cmd += ["--max-new-tokens", str(args.max_new_tokens)]
    if args.threads:
        cmd += ["--threads", str(args.threads)]
    if args.dtype != "auto":
        cmd += ["--dtype", args.dtype]
    return cmd


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--arch", choices=("qwen2-1.5b", "llama3-8b"), help="real-size architecture (--random-init)")
    ap.add_argument("--random-init", action="store_true")
    ap.add_argument("--tokenizer", default="smollm2-135m", help="tokenizer for --random-init")
    ap.add_argument("--data", default=DATA)
    ap.add_argument("--datasets", default="MELD,MOSI,MUStARD,AnnoMi-client",
                    help="comma list, or all (the 12 test splits)")
    ap.add_argument("--n", type=int, default=384, help="prompts in all, split evenly over the datasets")
    ap.add_argument("--mode", default="score", choices=("score", "generate"))
    ap.add_argument("--max-new-tokens", type=int, default=32)
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--threads", type=int, default=2 if not torch.cuda.is_available() else None)
    ap.add_argument("--dtype", default="auto")
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--out", help="also write the JSON here")
    args = ap.parse_args(argv)
    names = list(ALL) if args.datasets == "all" else args.datasets.split(",")
    args.datasets = ",".join(names)
    args.limit = -(-args.n // len(names))

    device = pick_device("auto")
    dtype = pick_dtype(args.dtype, device)
    if args.threads:
        torch.set_num_threads(args.threads)
    tmp = Path(tempfile.mkdtemp(prefix="mmla-e2e-"))
    if args.random_init:
        if not args.arch:
            ap.error("--random-init needs --arch")
        model_dir = str(random_init_dir(args.arch, resolve(args.tokenizer), dtype, tmp / "model"))
        name = f"{args.arch} (random init)"
    else:
        model_dir, name = resolve(args.model), args.model
    model, tok = load_model(model_dir, dtype=args.dtype)
    inputs = TextInputs(model, tok)
    examples = [e for ds in names for e in load_split(Path(args.data), ds, "test").examples[: args.limit]]
    prompts = inputs.chat([render(e.dataset, "clean", e.text) for e in examples], "clean")
    rows = inputs.encode(prompts)
    n = len(rows)
    engine.prefill_only(model, inputs, rows[: args.batch_size], batch_size=args.batch_size)  # warm-up

    def sync():
        if device.type == "cuda":
            torch.cuda.synchronize()

    env = {**os.environ, "PYTHONPATH": str(SRC) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    seconds: dict[str, list[float]] = {"command": [], "ceiling": []}
    record = {}
    for r in range(args.rounds):
        sync()
        t = time.perf_counter()
        engine.prefill_only(model, inputs, rows, batch_size=args.batch_size)
        sync()
        seconds["ceiling"].append(time.perf_counter() - t)
        out = tmp / f"run{r}"
        cmd = command(args, model_dir, out)
        t = time.perf_counter()
        done = subprocess.run(cmd, env=env, capture_output=True, text=True)
        seconds["command"].append(time.perf_counter() - t)
        if done.returncode != 0:
            raise SystemExit(f"the command failed: {done.stderr.strip().splitlines()[-1]}")
        record = json.loads((out / "env.json").read_text())
        lines = (out / "predictions.jsonl").read_text().splitlines()
        assert len(lines) == n, (len(lines), n)
    if args.mode == "generate":  # transformers' own continuous batching, same prompts, greedy
        from transformers import GenerationConfig

        gc = GenerationConfig(max_new_tokens=args.max_new_tokens, do_sample=False, eos_token_id=engine.eos_ids(model, tok),
                              pad_token_id=inputs.pad_id)
        sync()
        t = time.perf_counter()
        with torch.inference_mode():
            model.generate_batch([r.ids for r in rows], generation_config=gc, progress_bar=False)
        sync()
        seconds["generate_batch"] = [time.perf_counter() - t]

    best = {k: min(v) for k, v in seconds.items()}
    rate = {k: round(n / s, 3) for k, s in best.items()}
    total = best["command"]
    parts = {k.removeprefix("seconds_"): record.get(k) for k in
             ("seconds_load", "seconds_prepare", "seconds_model", "seconds_evaluate", "seconds_predict")}
    parts["start_and_imports"] = round(seconds["command"][-1] - (record.get("seconds_predict") or 0), 2)
    result = {
        "command": "PYTHONPATH=src " + shlex.join([sys.executable.replace(str(Path.cwd()) + "/", ""), *sys.argv]),
        "device": torch.cuda.get_device_name() if device.type == "cuda"
        else f"cpu ({platform.processor() or platform.machine()}), {torch.get_num_threads()} threads",
        "model": name, "dtype": str(dtype).replace("torch.", ""), "mode": args.mode, "n": n,
        "datasets": names, "batch_size": args.batch_size,
        "prompt_tokens_mean": round(sum(len(r.ids) for r in rows) / n, 1),
        "seconds": {k: [round(x, 2) for x in v] for k, v in seconds.items()},
        "samples_per_s": rate,
        "command_over_ceiling": round(rate["command"] / rate["ceiling"], 3),
        "command_seconds_breakdown_last_round": parts,
        "user_command": shlex.join(command(args, model_dir if not args.random_init else "MODEL_DIR", Path("RUN"))),
        "total_seconds_best_command": round(total, 2),
    }
    if "generate_batch" in rate:
        result["command_over_generate_batch"] = round(rate["command"] / rate["generate_batch"], 3)
    return emit(result, args.out)


if __name__ == "__main__":
    main()
