"""Zero-shot speed: the official one-at-a-time loop against mmla's batched engine, on the same real prompts.

In one run, over the same N test prompts (the first N/k rows of each of k datasets, clean text prompts,
chat-wrapped), same model, dtype, threads and max_new_tokens:
  official  one sample at a time through `model.generate`, greedy (what the official infer.py does)
  generate  mmla.engine.generate (greedy, continuous batching: rows leave at EOS, new prompts join)
  score     mmla.engine.score (rank the label answers by log-likelihood)
  prefill   mmla.engine.prefill_only (one plain forward per prompt: what reading any answer costs at least)
and prints JSON: samples/s, ratios, how many outputs and parsed predictions official and ours share.

The CPU here is shared with other jobs, so the prompts are split into rounds (each a mix of all datasets)
and every method runs on each round in turn, in a rotating order: a busy spell slows all methods alike.
OpenMP threads sleep rather than spin while waiting (OMP_WAIT_POLICY=PASSIVE unless set): spinning
threads of two busy processes on 2 cores slow each other down several-fold.

    PYTHONPATH=src .venv/bin/python bench/zeroshot.py      # CPU: SmolLM2-135M, fp32, 2 threads, 64 prompts
    PYTHONPATH=src python bench/zeroshot.py --arch qwen2-1.5b --random-init --batch-size 64 --rounds 1
        # GPU: real-size random-init model, bf16 (no EOS: every row runs max_new_tokens); --tokenizer DIR
        # and --data DIR where the smollm2-135m alias or ../shared are not available
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import platform
import shlex
import sys
import time
from pathlib import Path

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # before torch starts its thread pool
import torch  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))
from mmla import engine  # noqa: E402
from mmla.evaluation import parse_output  # noqa: E402
from mmla.prompts import candidates, chat_text, render  # noqa: E402
from mmla.tasks import get_task  # noqa: E402
from mmla.models import load_model, load_tokenizer, pick_device, pick_dtype, resolve  # noqa: E402
from mmla.tiny import real_size_config  # noqa: E402

DATA = os.environ.get("MMLA_DATA") or str(Path(__file__).resolve().parents[2] / "shared" / "data" / "mmla")
DATASETS = "MELD,IEMOCAP,MOSI,Ch-sims,UR-FUNNY,MUStARD,AnnoMi-client,MELD-DA"


# ---------------------------------------------------------------- prompts, labels, parser
# The package's own: the clean text prompt family, chat-wrapped by the tokenizer's template.


def prompt_of(tok, ds: str, text: str) -> str:
    return chat_text(tok, render(ds, "clean", text), "clean")


def read_rows(root: str, ds: str, k: int) -> list[dict]:
    with open(Path(root) / ds / "test.tsv", encoding="utf-8", newline="") as f:
        return list(csv.DictReader(f, delimiter="\t"))[:k]


# ---------------------------------------------------------------- methods


@torch.inference_mode()
def official_loop(model, tok, prompts: list[str], max_new_tokens: int) -> list[tuple[str, int]]:
    """One sample at a time, `model.generate` greedy, as the official zero-shot scripts do: (text, new tokens)."""
    out = []
    for p in prompts:
        enc = tok(p, return_tensors="pt", add_special_tokens=False).to(model.device)
        gen = model.generate(**enc, max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=tok.pad_token_id)
        new = gen[0, enc["input_ids"].shape[1]:]
        out.append((tok.decode(new, skip_special_tokens=True), len(new)))
    return out


def timed(fn):
    """(result, wall seconds, CPU seconds of this process)."""
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    t, c = time.perf_counter(), time.process_time()
    result = fn()
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    return result, time.perf_counter() - t, time.process_time() - c


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--arch", choices=("qwen2-1.5b", "llama3-8b"), help="real-size architecture (with --random-init)")
    ap.add_argument("--random-init", action="store_true", help="random weights of --arch; SmolLM2's tokenizer")
    ap.add_argument("--tokenizer", help="tokenizer directory for --random-init (default: the smollm2-135m alias)")
    ap.add_argument("--data", default=DATA, help="MMLA data root (default: $MMLA_DATA, else ../shared/data/mmla)")
    ap.add_argument("--datasets", default=DATASETS)
    ap.add_argument("--n", type=int, default=64, help="prompts in all, split evenly over the datasets")
    ap.add_argument("--batch-size", type=int, default=32, help="rows decoded together (and prompts per scoring batch)")
    ap.add_argument("--max-new-tokens", type=int, default=64)
    ap.add_argument("--threads", type=int, default=2, help="torch threads on CPU")
    ap.add_argument("--dtype", default="auto")
    ap.add_argument("--device", default="auto")
    ap.add_argument("--rounds", type=int, default=2, help="interleave the methods over this many slices of the prompts")
    ap.add_argument("--skip-official", action="store_true", help="leave out the slow one-at-a-time loop")
    ap.add_argument("--out", help="also write the JSON here")
    args = ap.parse_args(argv)

    device = pick_device(args.device)
    if device.type == "cpu":
        torch.set_num_threads(args.threads)
    if args.random_init:
        if not args.arch:
            ap.error("--random-init needs --arch")
        dtype = pick_dtype(args.dtype, device)
        torch.manual_seed(0)
        with torch.device(device):
            from transformers import AutoModelForCausalLM

            model = AutoModelForCausalLM.from_config(real_size_config(args.arch), dtype=dtype).eval()
        tok = load_tokenizer(args.tokenizer or resolve("smollm2-135m"))
        model_name = f"{args.arch} (random init)"
    else:
        model, tok = load_model(args.model, dtype=args.dtype, device=args.device)
        model_name = args.model

    datasets = [d.strip() for d in args.datasets.split(",") if d.strip()]
    k = -(-args.n // len(datasets))  # rows per dataset, rounded up
    per_ds = [[(ds, r) for r in read_rows(args.data, ds, k)] for ds in datasets]
    rows = [x for group in zip(*per_ds) for x in group]  # dataset by dataset, row by row: every slice is a mix
    prompts = [prompt_of(tok, ds, r["text"]) for ds, r in rows]
    cands = [candidates(ds, "clean") for ds, _ in rows]  # e.g. "emotion: joy"
    labels = [get_task(ds).labels for ds, _ in rows]
    n = len(prompts)
    m, bs = args.max_new_tokens, args.batch_size

    # Warm-up, untimed: first-call allocations and kernel choices. On a GPU a full batch, so that the
    # caching allocator already holds blocks of the sizes a full batch needs.
    warm = slice(0, bs if device.type == "cuda" else 2)
    engine.generate(model, tok, prompts[warm], max_new_tokens=m if device.type == "cuda" else 4, batch_size=bs)
    engine.score(model, tok, prompts[warm], cands[warm], batch_size=bs)
    official_loop(model, tok, prompts[:1], 4)

    methods = {
        "official": lambda ix: official_loop(model, tok, [prompts[i] for i in ix], m),
        "generate": lambda ix: engine.generate(model, tok, [prompts[i] for i in ix], max_new_tokens=m, batch_size=bs),
        "score": lambda ix: engine.score(model, tok, [prompts[i] for i in ix], [cands[i] for i in ix], batch_size=bs),
        "prefill": lambda ix: engine.prefill_only(model, tok, [prompts[i] for i in ix], batch_size=bs),
    }
    if args.skip_official:
        del methods["official"]
    seconds = {name: 0.0 for name in methods}
    cpu_seconds = {name: 0.0 for name in methods}
    per_round = []
    results = {name: [None] * n for name in methods}
    slices = [list(range(r, n, args.rounds)) for r in range(args.rounds)]
    for r, ix in enumerate(slices):
        names = list(methods)[r % len(methods):] + list(methods)[: r % len(methods)]  # rotate who goes first
        this = {}
        for name in names:
            out, this[name], cpu = timed(lambda: methods[name](ix))
            seconds[name] += this[name]
            cpu_seconds[name] += cpu
            if isinstance(out, list):
                for i, o in zip(ix, out):
                    results[name][i] = o
        per_round.append({k: round(len(ix) / s, 3) for k, s in this.items()})
    outputs = {"generate": results["generate"]}
    if "official" in results:
        outputs["official"] = [text for text, _ in results["official"]]
        new_tokens = [count for _, count in results["official"]]
    else:  # counted again from the text: close, not exact
        new_tokens = [len(x) for x in tok(outputs["generate"], add_special_tokens=False)["input_ids"]]
    scored = results["score"]

    rate = {k: round(n / s, 3) for k, s in seconds.items()}
    ours = outputs["generate"]
    preds = {k: [parse_output(o, l) for o, l in zip(v, labels)] for k, v in outputs.items()}
    gold = [r["label"].lower() for _, r in rows]
    preds["score"] = [l[s.best] for s, l in zip(scored, labels)]
    prompt_tokens = [len(x) for x in tok(prompts, add_special_tokens=False)["input_ids"]]
    result = {
        "command": "PYTHONPATH=src " + shlex.join([sys.executable.replace(str(Path.cwd()) + "/", ""), *sys.argv]),
        "device": (torch.cuda.get_device_name() if device.type == "cuda"
                   else f"cpu ({platform.processor() or platform.machine()}), {torch.get_num_threads()} threads"),
        "torch": torch.__version__,
        "model": model_name,
        "dtype": str(model.dtype).replace("torch.", ""),
        "datasets": datasets,
        "n": n,
        "batch_size": bs,
        "max_new_tokens": m,
        "prompt_tokens_mean": round(sum(prompt_tokens) / n, 1),
        "generated_tokens_mean": round(sum(new_tokens) / n, 1),  # EOS included
        "rows_hitting_max_new_tokens": sum(t >= m for t in new_tokens),
        "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY"),
        "rounds": args.rounds,
        "seconds": {k: round(s, 2) for k, s in seconds.items()},
        # CPU time of this process: on a shared machine it moves less than wall time with the load.
        "cpu_seconds": {k: round(s, 2) for k, s in cpu_seconds.items()},
        "samples_per_s": rate,
        "samples_per_s_by_round": per_round,
        "ratios": {"score/prefill": round(rate["score"] / rate["prefill"], 3)},
        "accuracy": {k: round(sum(p == g for p, g in zip(v, gold)) / n, 4) for k, v in preds.items()},
    }
    if "official" in rate:
        result["ratios"] = {
            "generate/official": round(rate["generate"] / rate["official"], 3),
            "score/official": round(rate["score"] / rate["official"], 3),
            **result["ratios"],
        }
        result["identical_outputs"] = f"{sum(a == b for a, b in zip(outputs['official'], ours))}/{n}"
        result["same_predictions"] = f"{sum(a == b for a, b in zip(preds['official'], preds['generate']))}/{n}"
    text = json.dumps(result, indent=2)
    print(text)
    if args.out:
        Path(args.out).write_text(text + "\n")
    return result


if __name__ == "__main__":
    main()
