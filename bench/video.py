"""Video zero-shot speed: the official-style loop against mmla's batched video path, same clips, one run.

Samples: the first --n MELD test utterances (real text), each paired with its own copy of one of the three
real demo clips in ../shared/data/videos (cycled; copies, so no sample reuses another's decoded frames), laid
out as a data root (<tmp>/MELD/test.tsv, <tmp>/MELD/video/MELD_<id>.mp4).

  official   one clip at a time, as the official Qwen2-VL infer.py: decode 4 frames with the PyAV scan every time
             (every frame from the start, keeping the sampled ones: mmla.decode's "scan"; np.linspace(0, total-1,
             4), resized to 151,200 px), processor(text, videos), `model.generate` with batch 1, greedy.
  ours_cold  mmla's path (`inference._run` on the local backend, what `predict --modality video` runs): the decode pool
             (mmla.decode, TorchCodec where it works, else its fast PyAV reader) decodes the next chunks' clips and a
             background thread encodes them while the model runs the current one, continuous batching of
             --batch-size rows (finished rows leave, queued ones join); empty frame cache (decodes + fills it).
  ours_warm  the same again, every clip's frames read from the frame cache (a repeated run).
Same model, dtype, threads, frames and max_new_tokens; prints JSON (samples/s, speed-ups, how many
predictions are identical to the official loop's, the agreement rate of batched greedy with one-at-a-time
`model.generate` in this dtype) and the command that reproduces it.

    PYTHONPATH=src .venv/bin/python bench/video.py                                # CPU, tiny random Qwen2-VL, fp32
    PYTHONPATH=src python bench/video.py --arch qwen2-vl-7b --random-init         # GPU, Qwen2-VL-7B shape, bf16
"""

from __future__ import annotations

import argparse
import csv
import platform
import shlex
import shutil
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))
from results import emit  # noqa: E402  (bench/results.py)
from mmla import inference, tiny  # noqa: E402
from mmla.backends.local import LocalBackend  # noqa: E402
from mmla import video as V  # noqa: E402
from mmla.decode import decoder_name, default_workers  # noqa: E402
from mmla.evaluation import parse_output  # noqa: E402
from mmla.inputs import make_inputs  # noqa: E402
from mmla.models import load_model, pick_device, pick_dtype  # noqa: E402
from mmla.prompts import Decoding, render  # noqa: E402
from mmla.tasks import get_task  # noqa: E402
from mmla.tiny import real_size_video_config  # noqa: E402

SHARED = Path(__file__).resolve().parents[2] / "shared" / "data"
CLIPS = ("llava_next_demo_xU25MMA2N4aVtYay.mp4", "videollama2_sample_demo_3.mp4", "videollama2_sample_demo_9.mp4")


def make_root(tmp: Path, n: int, data: Path, videos: Path) -> Path:
    with open(data / "MELD" / "test.tsv", encoding="utf-8", newline="") as f:
        rows = list(csv.DictReader(f, delimiter="\t"))[:n]
    root = tmp / "data"
    (root / "MELD" / "video").mkdir(parents=True)
    with open(root / "MELD" / "test.tsv", "w", encoding="utf-8", newline="") as f:
        w = csv.writer(f, delimiter="\t", lineterminator="\n")
        w.writerow(["id", "text", "label"])
        for i, r in enumerate(rows):
            w.writerow([r["id"], r["text"], r["label"]])
            shutil.copy(videos / CLIPS[i % len(CLIPS)], root / "MELD" / "video" / f"MELD_{r['id']}.mp4")
    return root


@torch.inference_mode()
def official_loop(model, processor, root: Path, examples, setting, decoding) -> list[str]:
    """The official infer.py, one sample at a time (frames decoded every time, model.generate batch 1)."""
    tok = processor.tokenizer
    seam = make_inputs(model, processor, setting)
    outs = []
    for e in examples:
        frames = V.decode_frames(root / "MELD" / "video" / f"MELD_{e.id}.mp4", setting, decoder="scan").array
        text = seam.chat([render("MELD", "infer_script", e.text, "test", "video")], "official")[0]
        inputs = processor(text=[text], videos=[frames], padding=True, return_tensors="pt", add_special_tokens=False,
                           videos_kwargs=dict(do_resize=False, cap_pixels_per_frame=False)).to(model.device)
        inputs = seam.forward_kwargs(dict(inputs))
        gen = model.generate(**inputs, max_new_tokens=decoding.max_new_tokens, do_sample=False,
                             repetition_penalty=decoding.repetition_penalty, pad_token_id=tok.pad_token_id)
        outs.append(tok.decode(gen[0, inputs["input_ids"].shape[1]:], skip_special_tokens=True))
    return outs


class _Sink:
    def __init__(self):
        self.records = []

    def write(self, rec):
        self.records.append(rec)


def ours(model, processor, root: Path, examples, setting, decoding, cache, batch_size: int,
         decode_workers: int | None = None, modality: str = "video") -> list[str]:
    cfg = inference.PredictConfig(model="bench", data=str(root), datasets=["MELD"], family="infer_script",
                                  batch_size=batch_size, mode="generate", modality=modality, out="unused",
                                  decode_workers=decode_workers)
    sink = _Sink()
    todo = [(e, 0) for e in examples]  # (row, which draw): one greedy answer per row
    backend = LocalBackend.of(model, make_inputs(model, processor, setting, modality=modality))
    inference._run(cfg, backend, decoding, cache, todo, sink, progress=False)
    by_id = {r["id"]: r["output"] for r in sink.records}
    return [by_id[e.id] for e in examples]


def timed(fn):
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    t = time.perf_counter()
    out = fn()
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    return out, time.perf_counter() - t


def clip_args(ap) -> None:
    """The options every clip benchmark takes (this one and bench/audio.py)."""
    ap.add_argument("--n", type=int, default=12, help="samples (clips)")
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--max-new-tokens", type=int, default=128)  # the official Qwen2-VL infer.py
    ap.add_argument("--threads", type=int, default=2, help="torch threads on CPU")
    ap.add_argument("--dtype", default="auto")
    ap.add_argument("--device", default="auto")
    ap.add_argument("--data", default=str(SHARED / "mmla"), help="where MELD/test.tsv is read from")
    ap.add_argument("--videos", default=str(SHARED / "videos"))
    ap.add_argument("--out", help="also write the JSON here")


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", help="a Qwen2-VL / Qwen2.5-VL checkpoint (default: a tiny random Qwen2-VL)")
    ap.add_argument("--arch", choices=("qwen2-vl-7b",), help="real-size architecture (with --random-init)")
    ap.add_argument("--random-init", action="store_true", help="random weights of --arch; the tiny processor")
    clip_args(ap)
    ap.add_argument("--decode-workers", type=int, help="mmla's decode pool (default: the cores, at most 8)")
    args = ap.parse_args(argv)

    device = pick_device(args.device)
    if device.type == "cpu":
        torch.set_num_threads(args.threads)
    tmp = Path(tempfile.mkdtemp(prefix="mmla-bench-video-"))
    try:
        if args.random_init:
            if not args.arch:
                ap.error("--random-init needs --arch")
            import transformers

            _, processor = tiny.tiny_video_parts("qwen2-vl")
            config = real_size_video_config(args.arch)
            ids = processor.tokenizer.convert_tokens_to_ids(list(tiny.QWEN_VISION_TOKENS))
            config.vision_start_token_id, config.vision_end_token_id, config.image_token_id, config.video_token_id = ids
            config.text_config.eos_token_id = processor.tokenizer.eos_token_id
            torch.manual_seed(0)
            with torch.device(device):
                model = transformers.Qwen2VLForConditionalGeneration._from_config(
                    config, dtype=pick_dtype(args.dtype, device)).eval()
            model.generation_config.eos_token_id = processor.tokenizer.eos_token_id
            name = f"{args.arch} (random init)"
        else:
            path = args.model or tiny.build_tiny_video_model("qwen2-vl", tmp / "tiny")
            model, processor = load_model(str(path), dtype=args.dtype, device=args.device, modality="video")
            name = args.model or "tiny random Qwen2-VL (text hidden 64, 2 layers; vision depth 2, width 32)"
        setting = make_inputs(model, processor, V.FRAME_SETTINGS["official-infer"]).setting
        decoding = Decoding(max_new_tokens=args.max_new_tokens)  # greedy (the official config is top_k=1)

        # Outputs are compared as generated token ids: both paths decode through tok.decode, which here
        # writes the ids (a random model emits ids the small tokenizer cannot spell).
        tok = processor.tokenizer
        real_decode, special = tok.decode, set(tok.all_special_ids)

        def decode_ids(ids, skip_special_tokens=False, **_):
            ids = [int(t) for t in (ids.tolist() if hasattr(ids, "tolist") else ids)]
            return " ".join(str(t) for t in ids if not (skip_special_tokens and t in special))

        tok.decode = decode_ids
        root = make_root(tmp, args.n, Path(args.data), Path(args.videos))
        from mmla.data import load_split

        examples = load_split(root, "MELD", "test").examples
        n = len(examples)
        # warm-up (allocations, kernels), untimed
        ours(model, processor, root, examples[:2], setting, Decoding(max_new_tokens=2), V.FrameCache(enabled=False), 2)

        outputs, seconds = {}, {}
        outputs["official"], seconds["official"] = timed(
            lambda: official_loop(model, processor, root, examples, setting, decoding))
        cache_dir = tmp / "frame-cache"
        outputs["ours_cold"], seconds["ours_cold"] = timed(
            lambda: ours(model, processor, root, examples, setting, decoding, V.FrameCache(cache_dir), args.batch_size,
                         args.decode_workers))
        warm = V.FrameCache(cache_dir)
        outputs["ours_warm"], seconds["ours_warm"] = timed(
            lambda: ours(model, processor, root, examples, setting, decoding, warm, args.batch_size,
                         args.decode_workers))
        assert warm.hits == n and warm.misses == 0, (warm.hits, warm.misses)

        labels = get_task("MELD").labels
        texts = {k: [real_decode([int(t) for t in o.split()], skip_special_tokens=True) for o in v]
                 for k, v in outputs.items()}
        preds = {k: [parse_output(o, labels) for o in v] for k, v in texts.items()}
        rate = {k: round(n / s, 3) for k, s in seconds.items()}
        new_tokens = [len(o.split()) for o in outputs["official"]]
        result = {
            "command": "PYTHONPATH=src " + shlex.join([sys.executable.replace(str(Path.cwd()) + "/", ""), *sys.argv]),
            "device": torch.cuda.get_device_name() if device.type == "cuda"
            else f"cpu ({platform.processor() or platform.machine()}), {torch.get_num_threads()} threads",
            "torch": torch.__version__,
            "model": name,
            "dtype": str(model.dtype).replace("torch.", ""),
            "frames": setting.record(),
            "n": n,
            "batch_size": args.batch_size,
            "max_new_tokens": args.max_new_tokens,
            "generated_tokens_mean": round(sum(new_tokens) / n, 1),
            "seconds": {k: round(s, 2) for k, s in seconds.items()},
            "samples_per_s": rate,
            "speedup_vs_official": {k: round(rate[k] / rate["official"], 2) for k in ("ours_cold", "ours_warm")},
            "rows_hitting_max_new_tokens": sum(t >= args.max_new_tokens for t in new_tokens),
            "identical_token_ids_vs_official": {k: sum(a == b for a, b in zip(outputs[k], outputs["official"]))
                                              for k in ("ours_cold", "ours_warm")},
            "identical_predictions_vs_official": {k: sum(a == b for a, b in zip(preds[k], preds["official"]))
                                                  for k in ("ours_cold", "ours_warm")},
            # batched greedy against one-at-a-time model.generate: equal in fp32; bf16 rounds differently per
            # batch shape, so some rows part ways (the rate a GPU run's default dtype gives)
            "agreement_with_one_at_a_time": {
                "dtype": str(model.dtype).replace("torch.", ""), "n": n,
                "identical_token_ids": sum(a == b for a, b in zip(outputs["ours_cold"], outputs["official"])),
                "rate": round(sum(a == b for a, b in zip(outputs["ours_cold"], outputs["official"])) / n, 3)},
            "video_decoder": {"official": "scan", "ours": decoder_name(announce=False)},
            "decode_workers": args.decode_workers or default_workers(),
        }
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return emit(result, args.out)


if __name__ == "__main__":
    main()
