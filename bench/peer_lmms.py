"""Peer: the whole `mmla predict --modality video` process against lmms-eval 0.7.3 on the same video work.

In one run, on the same N rows (the first N MELD test utterances, each with its own copy of one of the three real
clips in ../shared/data/videos: bench/video.py's data root), the same model directory (a tiny random Qwen2-VL,
`mmla.tiny.build_tiny_video_model`, safetensors), fp32, CPU, 2 threads, batch size 4, greedy, 16 new tokens:
  mmla   `python -m mmla.cli predict --modality video ...` into a fresh run directory, with an empty frame cache
  lmms   `lmms-eval --model qwen2_vl --tasks <a local generate_until task> ...` (its own virtualenv)
Each is one subprocess timed from start to exit (imports, model load, data, video decoding, the model, writing,
evaluation), both with cold caches (a fresh MMLA_FRAME_CACHE; a fresh HF datasets cache for lmms-eval, which has no
frame cache). The bench prints JSON: the seconds of both, the ratio lmms/mmla (and of the processes' CPU seconds,
which a busy neighbour moves less than the wall time), where mmla's time went (its env.json seconds_*), and how
many of the N outputs are equal (mmla's predictions.jsonl `output`, stripped, against lmms-eval's logged response,
which lmms-eval strips).

The lmms-eval task is written under a temporary directory: a JSONL file (one document per row: id, the clip path
mmla's ClipFinder resolves, the user text mmla renders for the row: `mmla.prompts.render("MELD", <the family the
resolver gives>, text, "test", "video")`) and a YAML task whose doc_to_visual returns the clip path and doc_to_text
the text verbatim. lmms-eval's qwen2_vl then builds [system "You are a helpful assistant.", user [video, text]]
and applies the processor's chat template: the same string mmla's VideoInputs.chat makes (checked per run:
`chat_identical`).

Frames. mmla's default for Qwen2-VL is official-infer: 4 frames at np.linspace(0, total-1, 4) (floored), resized
(PIL bicubic, uint8) to the smart_resize of max_pixels 360*420. lmms-eval's qwen2_vl hands the clip path to
qwen-vl-utils' process_vision_info, which samples at 2 fps (at least 4 frames) and resizes, and then cuts only the
first video of each batch to `max_num_frames` (a bug: the other videos of a batch keep every 2-fps frame).
With --lmms-frames equal (the default) the peer's interpreter gets a sitecustomize (written into the temporary
directory, put on its PYTHONPATH) that sets qwen-vl-utils' FPS_MAX_FRAMES to 4 when that module loads, so every clip
gets 4 frames, as max_num_frames=4 asks; nothing else of lmms-eval or qwen-vl-utils is touched. --lmms-frames stock
runs lmms-eval untouched (more frames for 3 of every 4 clips: more decoding and more vision tokens on its side).
Both sides get max_pixels=151200 (lmms-eval: model_args max_pixels, min_pixels 3136).
Padding. lmms-eval 0.7.3's qwen2_vl pads a batch on the tokenizer's side (its qwen2_5_vl and qwen3_vl set left; this
one does not), and the tiny model's tokenizer saves "right": the shorter rows of a batch then generate after their
pads. With --padding left (the default) the bench writes padding_side "left" into the model's tokenizer_config.json;
mmla pads left whatever the file says, so only lmms-eval's side changes. --padding checkpoint leaves the file.
Differences that remain (the outputs of a random model follow them):
  - frame indices: qwen-vl-utils rounds torch.linspace(0, total-1, 4), mmla floors np.linspace: one of the 4
    frames is the next frame (on these clips: 32 vs 31 of 96, 97 vs 96 of 146, 73 vs 72 of 219);
  - resizing: qwen-vl-utils resizes uint8 tensors with torchvision (bicubic, antialias) and hands floats to the
    processor (which then resizes again to the same size, a no-op); mmla resizes with PIL bicubic and passes
    do_resize=False: the pixels differ by rounding;
  - decoders: lmms-eval decord (its qwen2_vl imports it; qwen-vl-utils picks decord when TorchCodec is absent),
    mmla TorchCodec where it works, else PyAV;
  - batching: lmms-eval sorts the requests by prompt length (longest first) and pads fixed batches of 4; mmla keeps
    the data order with continuous batching (finished rows leave, queued rows join). Greedy outputs of a row can
    differ between batch compositions by padding and float rounding.

lmms-eval lives in its own virtualenv (never the project's): created on first use at --lmms-venv (default
$MMLA_CACHE/lmms-venv, else ~/.cache/mmla/lmms-venv) with torch, torchvision, transformers and decord pinned in the
same pip command; reused afterwards. With --repeats R the pair runs R times in alternating order.

    PYTHONPATH=src .venv/bin/python bench/peer_lmms.py                 # 96 rows, batch 4
    PYTHONPATH=src .venv/bin/python bench/peer_lmms.py --n 24
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
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))
sys.path.insert(0, str(ROOT / "bench"))
from results import emit  # noqa: E402  (bench/results.py)
from video import SHARED, make_root  # noqa: E402  (bench/video.py: the data root over the real clips)
from peer_lmeval import _clean_env, _float, provision, timed_run  # noqa: E402  (as the text peer does)
from mmla import inference, tiny  # noqa: E402
from mmla import video as V  # noqa: E402
from mmla.data import load_split  # noqa: E402
from mmla.models import cache_root  # noqa: E402
from mmla.prompts import render  # noqa: E402

LMMS_VERSION = "0.7.3"
# decord: lmms-eval's qwen2_vl imports it at the top (it is not among lmms-eval's requirements).
# filelock < 4: lmms-eval 0.7.3's evaluator imports filelock._api, which filelock 4 removed (unpinned, pip takes 4.x).
LMMS_PINS = [f"lmms-eval=={LMMS_VERSION}", "torch==2.14.1", "torchvision==0.29.1", "transformers==5.24.0",
             "decord==0.6.0", "qwen-vl-utils==0.0.14", "filelock<4"]
TASK = "mmla_peer_video"
ACCEPT_RATIO = 3.0


# ---------------------------------------------------------------- lmms-eval's own virtualenv


def venv_versions(venv: Path) -> dict | None:
    py = venv / "bin" / "python"
    if not py.exists():
        return None
    code = ("import json, importlib.metadata as m, lmms_eval, decord, qwen_vl_utils, filelock._api; print(json.dumps({p: m.version(p) "
            "for p in ('lmms_eval', 'torch', 'torchvision', 'transformers', 'decord', 'qwen-vl-utils', "
            "'filelock')}))")
    r = subprocess.run([str(py), "-c", code], capture_output=True, text=True, env=_clean_env())
    return json.loads(r.stdout.strip().splitlines()[-1]) if r.returncode == 0 else None


def ensure_venv(venv: Path) -> dict:
    return provision(venv, LMMS_PINS, venv_versions, ("lmms_eval", LMMS_VERSION), "lmms-eval")


# ---------------------------------------------------------------- the shared work


def set_padding_side(model_dir: Path, side: str) -> None:
    """The tiny model's tokenizer saves padding_side "right" (as Qwen2-VL's processor defaults). lmms-eval 0.7.3's
    qwen2_vl pads a batch with whatever the tokenizer says and generates after the pads of the shorter rows (its
    qwen2_5_vl / qwen3_vl set left for batches; qwen2_vl does not), so those rows' outputs are garbage. mmla pads
    left whatever the file says: this changes only lmms-eval's side."""
    path = model_dir / "tokenizer_config.json"
    cfg = json.loads(path.read_text())
    cfg["padding_side"] = side
    path.write_text(json.dumps(cfg, indent=2))


def build_work(root: Path, model_dir: str, batch_size: int, max_new_tokens: int) -> tuple[list[dict], dict]:
    """One document per row, built by mmla's own code (the resolver's family, render, ClipFinder), and what the
    resolver gives for this model: family, protocol, frames, decoding."""
    cfg = inference.resolve(inference.PredictConfig(model=model_dir, data=str(root), datasets=["MELD"],
                                                    modality="video", batch_size=batch_size,
                                                    max_new_tokens=max_new_tokens, dtype="float32",
                                                    out=str(root / "unused")))
    res = inference.resolved(cfg)
    setting = V.frame_setting(inference.default_frames(res))
    finder = V.ClipFinder(root)
    docs = [{"dataset": e.dataset, "id": e.id, "video": str(finder.find(e.dataset, e.id).path),
             "text": render(e.dataset, cfg.family, e.text, cfg.split, "video"), "label": e.label}
            for e in load_split(root, "MELD", "test").examples]
    info = {"family": res.family.name if res.family else None, "prompt_family": cfg.family,
            "protocol": res.protocol, "frames": setting.record()}
    return docs, info


TASK_UTILS = '''"""doc_to_visual / doc_to_text of the mmla peer task: the clip path and mmla's text, verbatim."""


def doc_to_visual(doc):
    return [doc["video"]]


def doc_to_text(doc, lmms_eval_specific_kwargs=None):
    return doc["text"]
'''

# Loaded into lmms-eval's interpreter (PYTHONPATH): when qwen_vl_utils.vision_process is imported, its 2-fps
# sampler is capped at NUM frames (module constant FPS_MAX_FRAMES, read at call time by smart_nframes).
SITECUSTOMIZE = '''import importlib.abc, importlib.util, sys

NUM = {num}


class _CapFrames(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name != "qwen_vl_utils.vision_process":
            return None
        sys.meta_path.remove(self)
        spec = importlib.util.find_spec(name)
        run = spec.loader.exec_module

        def exec_module(module):
            run(module)
            module.FPS_MAX_FRAMES = NUM

        spec.loader.exec_module = exec_module
        return spec


sys.meta_path.insert(0, _CapFrames())
'''


def write_task(task_dir: Path, docs: list[dict], max_new_tokens: int, eos: str) -> None:
    task_dir.mkdir(parents=True, exist_ok=True)
    data_file = task_dir / "docs.jsonl"
    with open(data_file, "w", encoding="utf-8") as f:
        for d in docs:
            f.write(json.dumps(d, ensure_ascii=False) + "\n")
    (task_dir / "mmla_peer_utils.py").write_text(TASK_UTILS)
    # until: the end-of-turn token only (lmms-eval's default would also cut at "\n\n"; mmla stops at EOS only)
    (task_dir / f"{TASK}.yaml").write_text(
        f"task: {TASK}\n"
        "dataset_path: json\n"
        "dataset_kwargs:\n"
        f"  data_files:\n    test: {json.dumps(str(data_file))}\n"
        "test_split: test\n"
        "output_type: generate_until\n"
        "doc_to_visual: !function mmla_peer_utils.doc_to_visual\n"
        "doc_to_text: !function mmla_peer_utils.doc_to_text\n"
        "doc_to_target: label\n"
        "generation_kwargs:\n"
        f"  max_new_tokens: {max_new_tokens}\n"
        "  temperature: 0\n"
        "  do_sample: false\n"
        "  num_beams: 1\n"
        f"  until: [{json.dumps(eos)}]\n"
        "metric_list:\n  - metric: exact_match\n    aggregation: mean\n    higher_is_better: true\n"
    )


# ---------------------------------------------------------------- the two processes


def mmla_cmd(a, model_dir: str, root: Path, out: Path) -> list[str]:
    return [sys.executable, "-m", "mmla.cli", "predict", "--modality", "video", "--model", model_dir,
            "--data", str(root), "--datasets", "MELD", "--split", "test", "--batch-size", str(a.batch_size),
            "--max-new-tokens", str(a.max_new_tokens), "--dtype", "float32", "--no-progress", "--out", str(out),
            "--threads", str(a.threads)]


def lmms_cmd(a, venv: Path, model_dir: str, task_dir: Path, out: Path, max_pixels: int) -> list[str]:
    model_args = (f"pretrained={model_dir},device_map=cpu,max_num_frames={a.frames},"
                  f"max_pixels={max_pixels},min_pixels=3136")
    return [str(venv / "bin" / "lmms-eval"), "--model", "qwen2_vl", "--model_args", model_args,
            "--tasks", TASK, "--include_path", str(task_dir), "--batch_size", str(a.batch_size), "--device", "cpu",
            "--log_samples", "--output_path", str(out)]


def mmla_outputs(run: Path) -> dict:
    with open(run / "predictions.jsonl", encoding="utf-8") as f:
        return {(r["dataset"], r["id"]): r["output"] for r in map(json.loads, f)}


def lmms_outputs(out: Path, docs: list[dict]) -> tuple[dict, dict]:
    """Per row, lmms-eval's logged response (its samples carry doc_id, the row's index in docs.jsonl)."""
    samples = sorted(out.rglob(f"*samples_{TASK}*.jsonl"))
    results = sorted(out.rglob("*results*.json"))
    if not samples:
        raise SystemExit(f"{out}: lmms-eval wrote no *samples_{TASK}*.jsonl (was --log_samples honoured?)")
    outs = {}
    with open(samples[-1], encoding="utf-8") as f:
        for s in map(json.loads, f):
            resp = s.get("filtered_resps", s.get("resps"))
            while isinstance(resp, list):  # [[text]] or [text]
                resp = resp[0] if resp else ""
            d = docs[int(s["doc_id"])]
            outs[(d["dataset"], d["id"])] = resp
    return outs, (json.loads(results[-1].read_text()) if results else {})


def one_round(a, order, docs, venv, model_dir, root: Path, task_dir: Path, shim: Path | None, work: Path, env,
              max_pixels: int) -> dict:
    n = len(docs)
    res: dict = {"load_average_1min_before": round(os.getloadavg()[0], 2)}
    outs = {}
    for side in order:
        if side == "mmla":
            run = work / "mmla-run"
            e = {**env, "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT / "src"), os.environ.get("PYTHONPATH")])),
                 "MMLA_FRAME_CACHE": str(work / "frame-cache")}  # empty: a cold cache
            sec, cpu = timed_run(mmla_cmd(a, model_dir, root, run), e, work / "mmla.log")
            info = json.loads((run / "env.json").read_text())
            res["mmla"] = {"seconds": round(sec, 2), "cpu_seconds": round(cpu, 2),
                           **{k: v for k, v in info.items() if k.startswith("seconds_")},
                           "frame_cache_misses": info.get("frame_cache_misses"),
                           "video_decoder": info.get("video_decoder"), "decode_workers": info.get("decode_workers")}
            outs["mmla"] = mmla_outputs(run)
        else:
            out = work / "lmms-out"
            e = {**_clean_env(env), "HF_DATASETS_CACHE": str(work / "hf-datasets"), "FORCE_QWENVL_VIDEO_READER": "decord"}
            if shim:
                e["PYTHONPATH"] = str(shim)
            sec, cpu = timed_run(lmms_cmd(a, venv, model_dir, task_dir, out, max_pixels), e, work / "lmms.log")
            outs["lmms"], results = lmms_outputs(out, docs)
            res["lmms"] = {"seconds": round(sec, 2), "cpu_seconds": round(cpu, 2),
                           "evaluation_seconds": _float(results.get("total_evaluation_time_seconds"))}
    keys = [(d["dataset"], d["id"]) for d in docs]
    res["order"] = order
    res["ratio"] = round(res["lmms"]["seconds"] / res["mmla"]["seconds"], 2)
    res["cpu_ratio"] = round(res["lmms"]["cpu_seconds"] / res["mmla"]["cpu_seconds"], 2)
    res["outputs_equal"] = sum((outs["mmla"].get(k) or "").strip() == outs["lmms"].get(k) for k in keys)
    res["outputs_compared"] = n
    res["outputs_missing"] = {s: sum(k not in outs[s] for k in keys) for s in outs}
    return res


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--n", type=int, default=96, help="rows (clips)")
    ap.add_argument("--batch-size", type=int, default=4)
    ap.add_argument("--max-new-tokens", type=int, default=16)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--frames", type=int, default=4, help="lmms-eval's max_num_frames (mmla's official-infer: 4)")
    ap.add_argument("--lmms-frames", choices=("equal", "stock"), default="equal",
                    help="equal: cap qwen-vl-utils at --frames for every clip; stock: lmms-eval untouched")
    ap.add_argument("--padding", choices=("left", "checkpoint"), default="left",
                    help="left: write padding_side left into the model's tokenizer_config.json (lmms-eval's qwen2_vl "
                         "pads with the tokenizer's side; mmla always pads left); checkpoint: as the tiny model saves it")
    ap.add_argument("--repeats", type=int, default=1, help="run the pair R times, alternating which goes first")
    ap.add_argument("--lmms-venv", default=str(cache_root() / "lmms-venv"))
    ap.add_argument("--data", default=str(SHARED / "mmla"), help="where MELD/test.tsv is read from")
    ap.add_argument("--videos", default=str(SHARED / "videos"))
    ap.add_argument("--keep", help="keep the model, data, task, run directories and logs under this directory")
    ap.add_argument("--out", help="also write the JSON here")
    a = ap.parse_args()

    venv = Path(a.lmms_venv).expanduser()
    lmms_versions = ensure_venv(venv)
    base = Path(a.keep) if a.keep else Path(tempfile.mkdtemp(prefix="peer-lmms-"))
    base.mkdir(parents=True, exist_ok=True)
    try:
        model_dir = str(tiny.build_tiny_video_model("qwen2-vl", base / "model"))
        if a.padding == "left":
            set_padding_side(Path(model_dir), "left")
        if (base / "data").exists():
            shutil.rmtree(base / "data")
        root = make_root(base, a.n, Path(a.data), Path(a.videos))
        docs, info = build_work(root, model_dir, a.batch_size, a.max_new_tokens)
        frames = info["frames"]
        if frames.get("num_frames") != a.frames:
            print(f"note: mmla samples {frames.get('num_frames')} frames, lmms-eval --frames {a.frames}", file=sys.stderr)
        max_pixels = int(frames["max_pixels"])
        chat = _chat_check(model_dir, root, docs)

        from transformers import AutoTokenizer

        eos = AutoTokenizer.from_pretrained(model_dir).eos_token
        task_dir = base / "task"
        write_task(task_dir, docs, a.max_new_tokens, eos)
        shim = None
        if a.lmms_frames == "equal":
            shim = base / "shim"
            shim.mkdir(exist_ok=True)
            (shim / "sitecustomize.py").write_text(SITECUSTOMIZE.format(num=a.frames))
        # Same threads for both (OpenMP, and mmla's --threads); idle threads sleep rather than spin.
        env = {**os.environ, "OMP_NUM_THREADS": str(a.threads), "MKL_NUM_THREADS": str(a.threads),
               "OMP_WAIT_POLICY": os.environ.get("OMP_WAIT_POLICY", "PASSIVE"), "TOKENIZERS_PARALLELISM": "false",
               "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
        rounds = []
        for r in range(a.repeats):
            order = ["mmla", "lmms"] if r % 2 == 0 else ["lmms", "mmla"]
            work = base / f"round{r}"
            if work.exists():
                shutil.rmtree(work)  # mmla would resume an old run directory and do nothing
            work.mkdir(parents=True)
            rounds.append(one_round(a, order, docs, venv, model_dir, root, task_dir, shim, work, env, max_pixels))
            print(json.dumps({"round": r, **rounds[-1]}), file=sys.stderr)
    finally:
        if not a.keep:
            shutil.rmtree(base, ignore_errors=True)

    from importlib import metadata

    ratios = [x["ratio"] for x in rounds]
    result = {
        "n": len(docs), "batch_size": a.batch_size, "max_new_tokens": a.max_new_tokens, "threads": a.threads,
        "dtype": "float32", "device": "cpu", "cores": os.cpu_count(),
        "model": "tiny random Qwen2-VL (mmla.tiny.build_tiny_video_model)", "resolved": info,
        "lmms_frames": a.lmms_frames, "padding": a.padding, "lmms_max_num_frames": a.frames, "max_pixels": max_pixels,
        "chat_identical": chat, "rounds": rounds,
        "mmla_seconds": [x["mmla"]["seconds"] for x in rounds], "lmms_seconds": [x["lmms"]["seconds"] for x in rounds],
        "ratio_min": min(ratios), "ratio_max": max(ratios),
        "load_average_1min_at_end": round(os.getloadavg()[0], 2),
        "acceptance": {"want_ratio_at_least": ACCEPT_RATIO, "met_every_round": all(x >= ACCEPT_RATIO for x in ratios)},
        "versions": {"mmla_side": {p: metadata.version(p) for p in ("torch", "transformers")},
                     "lmms_side": lmms_versions},
        "commands": {"mmla": shlex.join(mmla_cmd(a, "MODEL_DIR", Path("DATA_ROOT"), Path("RUN"))),
                     "lmms": shlex.join(lmms_cmd(a, venv, "MODEL_DIR", Path("TASK_DIR"), Path("OUT"), max_pixels))},
        "command": "PYTHONPATH=src " + shlex.join([sys.executable.replace(str(ROOT) + "/", ""), *sys.argv]),
    }
    emit(result, a.out)


def _chat_check(model_dir: str, root: Path, docs: list[dict]) -> int:
    """How many rows' chat strings are identical: mmla's VideoInputs.chat against the template over lmms-eval
    qwen2_vl's message list (system turn, then the video, then the text)."""
    from mmla.inputs import make_inputs
    from mmla.models import load_model

    cfg = inference.resolve(inference.PredictConfig(model=model_dir, data=str(root), datasets=["MELD"],
                                                    modality="video", out=str(root / "unused")))
    res = inference.resolved(cfg)
    model, proc = load_model(model_dir, dtype="float32", modality="video")
    inputs = make_inputs(model, proc, V.frame_setting(inference.default_frames(res)), res.family)
    ours = inputs.chat([d["text"] for d in docs], cfg.protocol)
    theirs = [proc.apply_chat_template([{"role": "system", "content": "You are a helpful assistant."},
                                        {"role": "user", "content": [{"type": "video", "video": d["video"]},
                                                                     {"type": "text", "text": d["text"]}]}],
                                       tokenize=False, add_generation_prompt=True) for d in docs]
    return sum(x == y for x, y in zip(ours, theirs))


if __name__ == "__main__":
    main()
