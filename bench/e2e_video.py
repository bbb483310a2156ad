"""End to end on video: the whole `mmla predict --modality video` command against its limit, in one run.

Samples: the first --n MELD test utterances, each with its own copy of one of the three real clips in
../shared/data/videos (bench/video.py's data root), so every row decodes a clip of its own.

  command        `python -m mmla.cli predict --modality video ...` as a user types it (a subprocess, from start to
                 exit: interpreter, imports, model load, decoding, the model, predictions.jsonl, metrics.json),
                 with an empty frame cache.
  prepare_alone  decode-and-prepare only, in this process: the same clips and frame setting, an empty frame
                 cache, the decode pool at full width (`mmla.decode.DecodePool()`), each row's prompt chat-wrapped
                 and run through the processor as its frames arrive. No model.
  model_alone    the model only, in this process: the same greedy decoding and batch size over the rows that
                 prepare_alone made (`engine.generate`).
The limit is the larger of the two parts: a command that hides decoding behind the model takes about that long
(plus its start-up). On a CPU the parts also share the cores, so a second bound is printed beside it: their CPU
seconds together over the cores (`cpu_floor_seconds`), under which no overlap can bring the wall time. Prints JSON:
the seconds of each, their CPU seconds, command / limit and command / CPU floor, where the command's time went (its
env.json) and the command line that reproduces the run.

    PYTHONPATH=src .venv/bin/python bench/e2e_video.py                    # CPU: tiny random Qwen2-VL, fp32, 2 threads
    PYTHONPATH=src .venv/bin/python bench/e2e_video.py --arch qwen2.5-vl --n 48
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import shlex
import shutil
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
from video import SHARED, make_root  # noqa: E402  (bench/video.py: the data root over the real clips)
from mmla import engine, inference, tiny  # noqa: E402
from mmla import video as V  # noqa: E402
from mmla.data import load_split  # noqa: E402
from mmla.decode import DecodePool, decoder_name  # noqa: E402
from mmla.inputs import make_inputs  # noqa: E402
from mmla.backends.local import LocalBackend  # noqa: E402
from mmla.models import load_model, pick_device  # noqa: E402
from mmla.prompts import render  # noqa: E402


def command(args, model_dir: str, root: str, out: str) -> list[str]:
    cmd = [sys.executable, "-m", "mmla.cli", "predict", "--modality", "video", "--model", model_dir, "--data", root,
           "--datasets", "MELD", "--split", "test", "--batch-size", str(args.batch_size), "--max-new-tokens",
           str(args.max_new_tokens), "--dtype", args.dtype, "--no-progress", "--out", out]
    if args.threads:
        cmd += ["--threads", str(args.threads)]
    if args.decode_workers:
        cmd += ["--decode-workers", str(args.decode_workers)]
    return cmd


def _children_cpu() -> float:
    """User + system CPU seconds of the children this process has waited for (the command and its own child)."""
    r = resource.getrusage(resource.RUSAGE_CHILDREN)
    return r.ru_utime + r.ru_stime


def sync(device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def prepare_alone(cfg, inputs, examples, cache: V.FrameCache, workers: int | None) -> list:
    """Every row's model input, clips decoded on the pool at full width, encoded in order as they arrive."""
    finder = V.ClipFinder(cfg.data)
    with DecodePool(workers) as pool:
        loading = [pool.submit(V.load_frames, finder.find(e.dataset, e.id).path, inputs.setting, cache)
                   for e in examples]
        texts = inputs.chat([render(e.dataset, cfg.family, e.text, cfg.split, "video") for e in examples],
                            cfg.protocol)
        return [inputs.encode([t], [f.result()])[0] for t, f in zip(texts, loading)]


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", help="a video-LLM directory (default: a tiny random one of --arch)")
    ap.add_argument("--arch", default="qwen2-vl", choices=tiny.TINY_VIDEO_ARCHS, help="the tiny model's architecture")
    ap.add_argument("--n", type=int, default=24, help="rows (clips)")
    ap.add_argument("--batch-size", type=int, default=4)
    ap.add_argument("--max-new-tokens", type=int, default=16)
    ap.add_argument("--threads", type=int, default=2 if not torch.cuda.is_available() else None)
    ap.add_argument("--decode-workers", type=int, help="the command's and prepare_alone's pool (default: the cores)")
    ap.add_argument("--dtype", default="float32")
    ap.add_argument("--rounds", type=int, default=1, help="command, prepare and model alternate; the best of each")
    ap.add_argument("--data", default=str(SHARED / "mmla"), help="where MELD/test.tsv is read from")
    ap.add_argument("--videos", default=str(SHARED / "videos"))
    ap.add_argument("--out", help="also write the JSON here")
    args = ap.parse_args(argv)

    device = pick_device("auto")
    if args.threads:
        torch.set_num_threads(args.threads)
    tmp = Path(tempfile.mkdtemp(prefix="mmla-e2e-video-"))
    try:
        model_dir = args.model or str(tiny.build_tiny_video_model(args.arch, tmp / "model"))
        name = args.model or f"tiny random {args.arch}"
        root = make_root(tmp, args.n, Path(args.data), Path(args.videos))
        cfg = inference.resolve(inference.PredictConfig(model=model_dir, data=str(root), datasets=["MELD"],
                                                        modality="video", batch_size=args.batch_size,
                                                        max_new_tokens=args.max_new_tokens, dtype=args.dtype,
                                                        out=str(tmp / "unused")))
        model, proc = load_model(model_dir, dtype=args.dtype, modality="video")
        res = inference.resolved(cfg)  # the frames and decoding the command resolves to
        inputs = make_inputs(model, proc, V.frame_setting(inference.default_frames(res)), res.family)
        decoding = inference.decoding_for(cfg, LocalBackend.of(model, inputs), res.family, res.protocol)
        examples = load_split(root, "MELD", "test").examples
        n = len(examples)
        warm = prepare_alone(cfg, inputs, examples[:2], V.FrameCache(enabled=False), 1)  # untimed warm-up
        engine.generate(model, inputs, warm, decoding=decoding, batch_size=2)

        env = {**os.environ, "PYTHONPATH": str(SRC) + os.pathsep + os.environ.get("PYTHONPATH", "")}
        seconds: dict[str, list[float]] = {"command": [], "prepare_alone": [], "model_alone": []}
        cpu: dict[str, list[float]] = {k: [] for k in seconds}  # CPU seconds (all threads; the command's children)
        record: dict = {}
        for r in range(args.rounds):
            out = tmp / f"run{r}"
            cmd = command(args, model_dir, str(root), str(out))
            t, c = time.perf_counter(), _children_cpu()
            done = subprocess.run(cmd, env={**env, "MMLA_FRAME_CACHE": str(tmp / f"cache-cmd{r}")},
                                  capture_output=True, text=True)
            seconds["command"].append(time.perf_counter() - t)
            cpu["command"].append(_children_cpu() - c)
            if done.returncode != 0:
                raise SystemExit(f"the command failed: {done.stderr.strip().splitlines()[-1]}")
            record = json.loads((out / "env.json").read_text())
            assert len((out / "predictions.jsonl").read_text().splitlines()) == n

            cache = V.FrameCache(tmp / f"cache-alone{r}")
            t, c = time.perf_counter(), time.process_time()
            rows = prepare_alone(cfg, inputs, examples, cache, args.decode_workers)
            seconds["prepare_alone"].append(time.perf_counter() - t)
            cpu["prepare_alone"].append(time.process_time() - c)
            assert cache.misses == n, cache.misses
            sync(device)
            t, c = time.perf_counter(), time.process_time()
            engine.generate(model, inputs, rows, decoding=decoding, batch_size=args.batch_size)
            sync(device)
            seconds["model_alone"].append(time.perf_counter() - t)
            cpu["model_alone"].append(time.process_time() - c)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)

    best = {k: min(v) for k, v in seconds.items()}
    limit = max(best["prepare_alone"], best["model_alone"])
    # On a CPU the two parts share the cores: together they cannot take less wall time than their CPU seconds
    # over the cores, whatever overlaps. (On a GPU the model's part leaves the cores to decoding.)
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    floor = (min(cpu["prepare_alone"]) + min(cpu["model_alone"])) / cores if device.type == "cpu" else None
    parts = {k.removeprefix("seconds_"): record.get(k) for k in
             ("seconds_load", "seconds_prepare", "seconds_model", "seconds_run", "seconds_evaluate",
                       "seconds_predict")}
    parts["start_and_imports"] = round(seconds["command"][-1] - (record.get("seconds_predict") or 0), 2)
    result = {
        "command": "PYTHONPATH=src " + shlex.join([sys.executable.replace(str(Path.cwd()) + "/", ""), *sys.argv]),
        "device": torch.cuda.get_device_name() if device.type == "cuda"
        else f"cpu ({platform.processor() or platform.machine()}), {torch.get_num_threads()} threads, "
             f"{os.cpu_count()} cores",
        "model": name, "dtype": args.dtype, "n": n, "batch_size": args.batch_size,
        "max_new_tokens": args.max_new_tokens, "frames": inputs.setting.record()["name"],
        "video_decoder": record.get("video_decoder") or decoder_name(announce=False),
        "decode_workers": record.get("decode_workers"),
        "seconds": {k: [round(x, 2) for x in v] for k, v in seconds.items()},
        "limit_seconds": round(limit, 2),
        "limit_is": "prepare_alone" if best["prepare_alone"] >= best["model_alone"] else "model_alone",
        "command_over_limit": round(best["command"] / limit, 3),
        "cpu_seconds": {k: [round(x, 2) for x in v] for k, v in cpu.items()},
        "cpu_floor_seconds": round(floor, 2) if floor else None,  # both parts' CPU seconds / the cores
        "command_over_cpu_floor": round(best["command"] / floor, 3) if floor else None,
        # the command also starts an interpreter and loads the model, which neither part does
        "command_run_over_limit": round((record.get("seconds_run") or 0) / limit, 3),  # its decode + model phase
        "command_seconds_breakdown_last_round": parts,
        "frame_cache_misses_last_round": record.get("frame_cache_misses"),
        "user_command": shlex.join(command(args, "MODEL_DIR", "DATA_ROOT", "RUN")),
    }
    return emit(result, args.out)


if __name__ == "__main__":
    main()
