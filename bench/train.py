"""Training throughput: the official configuration against the `fast` preset, on the same data in one run.

official  micro-batch 1 x gradient accumulation 4, padded batches, full-vocabulary logits, fp32 on CPU
          (bf16 on a GPU), i.e. LLaMA-Factory's SFT setting (the `paper` preset).
fast      the same optimiser steps (same examples per step, same lr schedule and LoRA) with the effective batch
          in one micro-batch (right padding, causal attention without a mask), lm_head only at the answer
          positions, and bf16 matmuls (on a CPU: bf16 frozen matmuls, everything else fp32) (the `fast` preset).

Both run through `mmla.training.train_one` (the real Trainer path) for --steps optimiser steps from the same
LoRA initialisation and data order, so their per-step losses are comparable: the script prints both curves and
their mean absolute difference, tokens/s (median over the steps after --warmup) and the speed-up, then one JSON
object and the command that reproduces it.

    python bench/train.py                                  # SmolLM2-135M on MUStARD, CPU
    python bench/train.py --arch qwen2-1.5b --random-init --datasets MELD,MUStARD --batches 16,32,64 --grouped  # GPU

--concurrent K: K adapters (the first K datasets of --datasets, default ten) trained concurrently over one frozen
base (mmla.multilora) against the same K trained one after another (train_one), `paper` preset, --steps optimiser
steps each, in one run. Aggregate tokens/s = all adapters' tokens / training time, leaving out each run's first
--warmup steps (the data order is the same in both, so the tokens are too).

    python bench/train.py --concurrent 4 --steps 6 --threads 2     # CPU, SmolLM2-135M
    python bench/train.py --concurrent 10 --arch qwen2-1.5b --random-init --steps 8 --concurrent-rows 40  # GPU
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))


def _model(args):
    """(model, tokenizer): the named model, or a random-init real-size architecture with SmolLM2's tokenizer."""
    import torch
    from transformers import AutoModelForCausalLM

    from mmla.models import load_model, load_tokenizer, resolve
    from mmla.tiny import real_size_config

    if not args.random_init:
        return load_model(args.model, dtype="bfloat16" if args.load_bf16 else "float32", device="cpu")
    tok = load_tokenizer(args.tokenizer or resolve("smollm2-135m"))
    torch.manual_seed(0)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = torch.bfloat16 if args.load_bf16 else torch.float32
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(real_size_config(args.arch), dtype=dtype)
    return model, tok


def run_variant(args, name: str, preset: str, overrides: dict, workdir: Path) -> dict:
    from mmla.training import make_config, train_one

    values = {"model": args.model if not args.random_init else args.arch, "data": args.data,
              "datasets": args.datasets, "setting": "sft", "preset": preset, "max_steps": args.steps,
              "eval_steps": 0, "save_steps": 10**6, "logging_steps": 1, "limit": args.limit, "seed": args.seed,
              "threads": args.threads, **({"modality": "text"} if args.random_init else {}), **overrides}
    cfg = make_config(values)
    ds = cfg.datasets
    import torch

    args.load_bf16 = cfg.precision == "bf16" or (cfg.precision == "auto" and torch.cuda.is_available())
    model = _model(args)
    out = workdir / name
    t0 = time.time()
    train_one(cfg, ds, out, progress=not args.no_progress, model=model)
    wall = time.time() - t0
    log = [json.loads(l) for l in (out / "train_log.jsonl").read_text().splitlines()]
    steps = [r for r in log if "loss" in r]
    measured = [r["tokens_per_s"] for r in steps[args.warmup:]] or [r["tokens_per_s"] for r in steps]
    env = json.loads((out / "env.json").read_text())
    del model
    import gc

    gc.collect()
    if torch.cuda.is_available():
        peak = torch.cuda.max_memory_allocated() / 2**30
        torch.cuda.reset_peak_memory_stats()
        torch.cuda.empty_cache()
    else:
        peak = None
    return {"name": name, "per_device_batch_size": cfg.per_device_batch_size,
            "gradient_accumulation_steps": cfg.gradient_accumulation_steps, "batching": cfg.batching,
            "answer_logits_only": cfg.answer_logits_only, "precision": env["precision"],
            "tokens_per_s": round(statistics.median(measured), 1),
            "tokens_per_s_mean": round(statistics.fmean(measured), 1), "tokens_per_s_best": round(max(measured), 1),
            "wall_s": round(wall, 1),
            "peak_gpu_gib": round(peak, 2) if peak is not None else None,
            "losses": [round(r["loss"], 5) for r in steps]}


CONCURRENT_DATASETS = "MUStARD,MOSI,MELD,IEMOCAP,MIntRec,MELD-DA,IEMOCAP-DA,Ch-sims,AnnoMi-client,AnnoMi-therapist"


def _read(path: Path) -> list[dict]:
    return [json.loads(l) for l in path.read_text().splitlines()]


def run_concurrent(args, workdir: Path) -> dict:
    """--concurrent K: concurrent vs sequential aggregate tokens/s, same adapters, same steps."""
    import torch

    from mmla.multilora import train_concurrent
    from mmla.training import make_config, train_one, with_preset

    names = [d for d in args.datasets.split(",") if d.strip()][: args.concurrent]
    if len(names) < args.concurrent:
        raise SystemExit(f"--concurrent {args.concurrent} needs {args.concurrent} datasets in --datasets")
    values = {"model": args.model if not args.random_init else args.arch, "data": args.data, "datasets": names,
              "setting": "sft", "preset": "paper", "max_steps": args.steps, "eval_steps": 0, "save_steps": 10**6,
              "limit": args.limit or 4 * args.steps, "seed": args.seed, "threads": args.threads,
              "concurrent_rows": args.concurrent_rows}
    if args.random_init:
        values["modality"] = "text"  # a bare architecture name has no config to read the modality from
    cfg = make_config(values)
    args.load_bf16 = cfg.precision == "bf16" or (cfg.precision == "auto" and torch.cuda.is_available())
    print(f"--- concurrent: {len(names)} adapters", file=sys.stderr, flush=True)
    con = workdir / "concurrent"
    t0 = time.time()
    train_concurrent(cfg, names, con, progress=not args.no_progress, model=_model(args),
                     preset=lambda ds: with_preset(cfg, ds))
    con_wall = time.time() - t0
    joint = _read(con / "joint_log.jsonl")[args.warmup:]
    con_tokens = sum(r["tokens"] for r in joint)
    con_time = sum(r["tokens"] / r["tokens_per_s"] for r in joint)
    seq_tokens, seq_time, seq_wall, per = 0, 0.0, 0.0, {}
    for ds in names:
        print(f"--- sequential: {ds}", file=sys.stderr, flush=True)
        model = _model(args)
        t0 = time.time()
        train_one(cfg, [ds], workdir / "sequential" / ds, progress=not args.no_progress, model=model)
        seq_wall += time.time() - t0
        del model
        tokens = {r["step"]: r["tokens"] for r in _read(con / ds / "train_log.jsonl")}  # same rows, same order
        steps = [r for r in _read(workdir / "sequential" / ds / "train_log.jsonl") if "loss" in r][args.warmup:]
        t = sum(tokens[r["step"]] / r["tokens_per_s"] for r in steps)
        n = sum(tokens[r["step"]] for r in steps)
        seq_tokens, seq_time = seq_tokens + n, seq_time + t
        per[ds] = round(n / t, 1)
    con_tps, seq_tps = con_tokens / con_time, seq_tokens / seq_time
    return {"adapters": len(names), "datasets": names, "steps": args.steps, "warmup": args.warmup,
            "concurrent_rows": args.concurrent_rows,
            "concurrent_tokens_per_s": round(con_tps, 1), "sequential_tokens_per_s": round(seq_tps, 1),
            "speedup": round(con_tps / seq_tps, 2), "sequential_per_dataset_tokens_per_s": per,
            "concurrent_wall_s": round(con_wall, 1), "sequential_wall_s": round(seq_wall, 1),
            "wall_speedup": round(seq_wall / con_wall, 2)}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--data", default=os.environ.get("MMLA_DATA", "../shared/data/mmla"))
    p.add_argument("--datasets", default="MUStARD")
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--arch", choices=("qwen2-1.5b", "llama3-8b"), help="with --random-init: a real-size architecture")
    p.add_argument("--random-init", action="store_true")
    p.add_argument("--tokenizer", help="tokenizer directory for --random-init (default: SmolLM2's)")
    p.add_argument("--steps", type=int, default=12, help="optimiser steps per variant")
    p.add_argument("--warmup", type=int, default=2, help="steps left out of the throughput")
    p.add_argument("--limit", type=int, help="train rows per dataset")
    p.add_argument("--seed", type=int, default=42)
    p.add_argument("--threads", type=int, help="torch CPU threads")
    p.add_argument("--fast-precision", default=None, choices=("fp32", "bf16", "mixed"),
                   help="override the fast preset's")
    p.add_argument("--batches", default="", help="extra fast variants at these micro-batch sizes, e.g. 16,32,64")
    p.add_argument("--grouped", action="store_true", help="also run each extra batch size length-grouped")
    p.add_argument("--packed", action="store_true", help="also run fast with packed (padding-free) rows")
    p.add_argument("--no-progress", action="store_true")
    p.add_argument("--json-out", help="also write the JSON here")
    p.add_argument("--concurrent", type=int, metavar="K",
                   help="K adapters trained concurrently vs one after another (paper preset)")
    p.add_argument("--concurrent-rows", type=int, metavar="N",
                   help="with --concurrent: rows per joint forward (default: one micro-batch per adapter)")
    args = p.parse_args(argv)
    if args.random_init and not args.arch:
        p.error("--random-init needs --arch")
    if args.concurrent:
        if args.datasets == "MUStARD":
            args.datasets = CONCURRENT_DATASETS
        with tempfile.TemporaryDirectory(prefix="mmla-bench-multilora.") as tmp:
            res = run_concurrent(args, Path(tmp))
        import torch

        res["device"] = (torch.cuda.get_device_name(0) if torch.cuda.is_available()
                         else f"cpu ({torch.get_num_threads()} threads)")
        res["model"] = args.arch if args.random_init else args.model
        res["command"] = "python bench/train.py " + " ".join(
            shlex.quote(a) for a in (argv if argv is not None else sys.argv[1:]))
        print(f"concurrent {res['concurrent_tokens_per_s']:.1f} tokens/s vs sequential "
              f"{res['sequential_tokens_per_s']:.1f} tokens/s: {res['speedup']:.2f}x ({res['adapters']} adapters, "
              f"{res['steps']} steps each; wall clock incl. setup {res['wall_speedup']:.2f}x)")
        print(json.dumps(res))
        if args.json_out:
            Path(args.json_out).write_text(json.dumps(res, indent=2) + "\n")
        return 0

    import torch

    fast = {"precision": args.fast_precision} if args.fast_precision else {}
    variants = [("official", "paper", {}), ("fast", "fast", fast)]
    if args.packed:
        variants.append(("fast-packed", "fast", {**fast, "batching": "packed"}))
    for b in [int(x) for x in args.batches.split(",") if x.strip()]:
        variants.append((f"fast-bs{b}", "fast", {**fast, "per_device_batch_size": b}))
        if args.grouped:
            variants.append((f"fast-bs{b}-grouped", "fast", {**fast, "per_device_batch_size": b,
                                                             "group_by_length": True}))
    results = []
    with tempfile.TemporaryDirectory(prefix="mmla-bench-train.") as tmp:
        for name, preset, over in variants:
            print(f"--- {name}", file=sys.stderr, flush=True)
            results.append(run_variant(args, name, preset, over, Path(tmp)))

    official, fastr = results[0], results[1]
    n = min(len(official["losses"]), len(fastr["losses"]))
    mad = statistics.fmean(abs(a - b) for a, b in zip(official["losses"][:n], fastr["losses"][:n]))
    print(f"\n{'step':>4} {'official loss':>14} {'fast loss':>10}")
    for i in range(n):
        print(f"{i + 1:>4} {official['losses'][i]:>14.4f} {fastr['losses'][i]:>10.4f}")
    print(f"\nmean |official - fast| loss over {n} steps: {mad:.4f}")
    for r in results:
        print(f"{r['name']:<20} {r['tokens_per_s']:>10.1f} tokens/s  (batch {r['per_device_batch_size']} x "
              f"{r['gradient_accumulation_steps']}, {r['precision']}, {r['batching']}, "
              f"answer-only logits={r['answer_logits_only']}"
              + (f", peak {r['peak_gpu_gib']} GiB" if r["peak_gpu_gib"] is not None else "") + ")")
    speedup = fastr["tokens_per_s"] / official["tokens_per_s"]
    best = fastr["tokens_per_s_best"] / official["tokens_per_s_best"]
    print(f"fast / official: {speedup:.2f}x (medians; {best:.2f}x on each one's best step, less sensitive to other "
          f"jobs on the machine)")
    device = torch.cuda.get_device_name(0) if torch.cuda.is_available() else f"cpu ({torch.get_num_threads()} threads)"
    command = "python bench/train.py " + " ".join(shlex.quote(a) for a in (argv if argv is not None else sys.argv[1:]))
    out = {"device": device, "model": args.arch if args.random_init else args.model, "datasets": args.datasets,
           "steps": args.steps, "warmup": args.warmup, "speedup": round(speedup, 2), "speedup_best_step": round(best, 2),
           "loss_mean_abs_diff": round(mad, 5),
           "variants": results, "command": command}
    print(json.dumps(out))
    print(f"reproduce: {command}")
    if args.json_out:
        Path(args.json_out).write_text(json.dumps(out, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
