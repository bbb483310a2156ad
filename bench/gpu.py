"""Every GPU item of the benchmarks in one process, one JSON (run through bench/gpu.sh, which says what to carry).

Items (real-size random-init models: a lent device has no weights; SmolLM2's tokenizer):
  e2e           the whole `mmla predict` command against prefill over the 15,741 test prompts, Qwen2-1.5B
                (bench/e2e.py --arch qwen2-1.5b --random-init --datasets all --n 15741)
  greedy        greedy generation as a share of prefill, same model and prompts (bench/zeroshot.py, no official loop)
  train         LoRA SFT tokens/s, official configuration against the fast preset (bench/train.py)
  concurrent    10 adapters trained concurrently over one base against one after another (bench/train.py
                --concurrent 10 --concurrent-rows 40)
  video         Qwen2-VL-7B: the official one-clip loop against mmla, cold and warm frame cache, decode pool
                (bench/video.py --arch qwen2-vl-7b --random-init)
--dry-run runs the same items with tiny models and a few rows on the CPU (tests/test_gpu_bench.py), so the script
cannot rot between lent devices. An item that fails is recorded with its error and the others still run; the JSON is
written again after each item, so a run stopped at its time limit keeps what finished (--only reruns the rest).

    python bench/gpu.py --out gpu.json            # on the device (bench/gpu.sh)
    python bench/gpu.py --dry-run --out dry.json  # CPU, under a minute
"""

from __future__ import annotations

import argparse
import gc
import importlib.util
import json
import os
import platform
import shlex
import sys
import tempfile
import time
import traceback
from pathlib import Path

BENCH = Path(__file__).resolve().parent
SRC = BENCH.parent / "src"
sys.path[:0] = [str(BENCH), str(SRC)]
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")


def items(data: str, videos: str, tiny: str | None) -> list[tuple[str, str, list[str]]]:
    """(name, bench script, argv without --out). tiny: a tiny Llama directory for the dry run."""
    if tiny is None:
        real = ["--arch", "qwen2-1.5b", "--random-init"]
        return [  # the video item first: it is what a short lease must not lose
            ("video", "video.py", ["--arch", "qwen2-vl-7b", "--random-init", "--n", "24", "--batch-size", "8",
                                   "--max-new-tokens", "32", "--data", data, "--videos", videos]),
            ("e2e", "e2e.py", [*real, "--datasets", "all", "--n", "15741", "--batch-size", "64", "--rounds", "1",
                               "--data", data]),
            ("greedy", "zeroshot.py", [*real, "--datasets", "all", "--n", "2048", "--batch-size", "64",
                                       "--max-new-tokens", "32", "--rounds", "1", "--skip-official", "--data", data]),
            ("train", "train.py", [*real, "--datasets", "MELD,MUStARD", "--steps", "10", "--warmup", "2",
                                   "--batches", "16,64", "--no-progress", "--data", data]),
            ("concurrent", "train.py", ["--concurrent", "10", *real, "--steps", "6", "--warmup", "2",
                                        "--concurrent-rows", "40", "--no-progress", "--data", data]),
        ]
    return [
        ("e2e", "e2e.py", ["--model", tiny, "--datasets", "MELD,MUStARD", "--n", "8", "--batch-size", "4",
                           "--rounds", "1", "--data", data]),
        ("greedy", "zeroshot.py", ["--model", tiny, "--datasets", "MELD,MUStARD", "--n", "4", "--batch-size", "4",
                                   "--max-new-tokens", "4", "--rounds", "1", "--skip-official", "--data", data]),
        ("train", "train.py", ["--model", tiny, "--datasets", "MUStARD", "--steps", "2", "--warmup", "1",
                               "--limit", "8", "--no-progress", "--data", data]),
        ("concurrent", "train.py", ["--concurrent", "2", "--model", tiny, "--datasets", "MELD,MUStARD", "--steps",
                                    "2", "--warmup", "1", "--concurrent-rows", "4", "--no-progress", "--data", data]),
        ("video", "video.py", ["--n", "2", "--batch-size", "2", "--max-new-tokens", "4", "--data", data,
                               "--videos", videos]),
    ]


def _load(script: str):
    name = Path(script).stem
    if name in sys.modules:
        return sys.modules[name]
    spec = importlib.util.spec_from_file_location(name, BENCH / script)
    mod = importlib.util.module_from_spec(spec)
    sys.modules[name] = mod
    spec.loader.exec_module(mod)
    return mod


def run_item(script: str, argv: list[str], out: Path) -> dict:
    """One bench's main(argv) in this process (imports paid once); its JSON read back from its --out file."""
    flag = "--json-out" if script == "train.py" else "--out"
    mod = _load(script)
    saved = sys.argv
    sys.argv = [f"bench/{script}", *argv]  # each bench writes the command that reproduces it from sys.argv
    try:
        mod.main([*argv, flag, str(out)])
    finally:
        sys.argv = saved
    return json.loads(out.read_text())


def summary(results: dict) -> dict:
    """The figures the issue asks for, pulled out of each item's JSON (None where an item failed)."""
    def get(item, *path):
        v = results.get(item)
        for p in path:
            v = v.get(p) if isinstance(v, dict) else None
        return v

    gen, pre = get("greedy", "samples_per_s", "generate"), get("greedy", "samples_per_s", "prefill")
    return {
        "command_over_prefill": get("e2e", "command_over_ceiling"),
        "command_samples_per_s": get("e2e", "samples_per_s", "command"),
        "prefill_samples_per_s": get("e2e", "samples_per_s", "ceiling"),
        "greedy_share_of_prefill": round(gen / pre, 3) if gen and pre else None,
        "lora_sft_tokens_per_s": {r.get("name"): r.get("tokens_per_s") for r in get("train", "variants") or []}
        or None,
        "concurrent_tokens_per_s": get("concurrent", "concurrent_tokens_per_s"),
        "concurrent_speedup": get("concurrent", "speedup"),
        "video_samples_per_s": get("video", "samples_per_s"),
        "video_agreement_with_one_at_a_time": get("video", "agreement_with_one_at_a_time"),  # bf16 on a GPU
    }


def _write(args, argv, torch, t_all: float, seconds: dict, errors: dict, results: dict) -> dict:
    out = {
        "command": shlex.join(["bash", "bench/gpu.sh", *(argv if argv is not None else sys.argv[1:])]),
        "dry_run": args.dry_run,
        "device": torch.cuda.get_device_name() if torch.cuda.is_available() else f"cpu ({platform.machine()})",
        "torch": torch.__version__,
        "seconds_total": round(time.perf_counter() - t_all, 1),
        "seconds": seconds,
        "errors": errors,
        "summary": summary(results),
        "items": results,
    }
    Path(args.out).write_text(json.dumps(out, indent=2) + "\n")
    return out


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dry-run", action="store_true", help="CPU, tiny models, a few rows: checks the script runs")
    ap.add_argument("--data", default=os.environ.get("MMLA_DATA") or str(BENCH.parents[1] / "shared/data/mmla"))
    ap.add_argument("--videos", default=str(BENCH.parents[1] / "shared/data/videos"), help="the real clips")
    ap.add_argument("--only", help="comma list of items (default: all)")
    ap.add_argument("--out", required=True, help="the JSON")
    args = ap.parse_args(argv)
    import torch

    tmp = Path(tempfile.mkdtemp(prefix="mmla-gpu-"))
    tiny = None
    if args.dry_run:
        from mmla.tiny import build_tiny_model

        tiny = str(build_tiny_model("llama", tmp / "tiny-llama"))
    wanted = set(args.only.split(",")) if args.only else None
    results, seconds, errors = {}, {}, {}
    t_all = time.perf_counter()
    for name, script, item_argv in items(args.data, args.videos, tiny):
        if wanted and name not in wanted:
            continue
        print(f"== {name}: bench/{script} {shlex.join(item_argv)}", file=sys.stderr, flush=True)
        t = time.perf_counter()
        try:
            results[name] = run_item(script, item_argv, tmp / f"{name}.json")
        except BaseException as e:  # noqa: BLE001  one failed item must not lose the others' figures
            if isinstance(e, KeyboardInterrupt):
                raise
            errors[name] = f"{type(e).__name__}: {e}".strip()[:500]
            traceback.print_exc()
        seconds[name] = round(time.perf_counter() - t, 1)
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
        _write(args, argv, torch, t_all, seconds, errors, results)  # after each item: a timeout keeps the rest
    out = _write(args, argv, torch, t_all, seconds, errors, results)
    print(json.dumps({k: out[k] for k in ("device", "seconds_total", "seconds", "errors", "summary")}, indent=2))
    return out


if __name__ == "__main__":
    main()
