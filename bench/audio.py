"""Audio + video (av) zero-shot speed: a one-at-a-time `generate` loop against mmla's batched av path, same clips.

Samples: the first --n MELD test utterances (real text), each with its own copy of one of the three real demo
clips in ../shared/data/videos (cycled: one with speech, one with a silent AAC track, one with no audio track),
laid out as a data root as bench/video.py does.

  loop       one clip at a time, as the Qwen2.5-Omni model card runs the thinker: decode the 4 frames (the PyAV
             scan, mmla.decode's "scan") and the sound with PyAV every time, processor(text, videos, audio,
             load_audio_from_video=True), `model.generate(use_audio_in_video=True)` with batch 1, greedy.
  ours_cold  mmla's path (`inference._run`, what `predict --modality av` runs): a background thread decodes and
             encodes the next chunk while the model runs the current one, continuous batching of --batch-size
             rows; empty frame and audio caches (decodes + fills them).
  ours_warm  the same again, frames and sound read from the caches (a repeated run, or the ablation's second
             modality).
Same model, dtype, threads, frames, audio setting and max_new_tokens; prints JSON (samples/s, speed-ups, how many
outputs are identical to the loop's) and the command that reproduces it.

    PYTHONPATH=src .venv/bin/python bench/audio.py          # CPU, tiny random Qwen2.5-Omni thinker, fp32
"""

from __future__ import annotations

import argparse
import platform
import shlex
import shutil
import sys
import tempfile
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))
from results import emit  # noqa: E402  (bench/results.py)
from video import clip_args, make_root, ours, timed  # noqa: E402  (bench/video.py)
from mmla import audio as A  # noqa: E402
from mmla import tiny  # noqa: E402
from mmla import video as V  # noqa: E402
from mmla.inputs import make_inputs  # noqa: E402
from mmla.models import load_model, pick_device  # noqa: E402
from mmla.prompts import Decoding, render  # noqa: E402


@torch.inference_mode()
def loop(model, processor, root: Path, examples, seam, decoding) -> list[str]:
    """One sample at a time: frames and sound decoded every time, model.generate with batch 1."""
    tok = processor.tokenizer
    outs = []
    for e in examples:
        path = root / "MELD" / "video" / f"MELD_{e.id}.mp4"
        frames = V.decode_frames(path, seam.setting, decoder="scan")  # the official construction, not mmla's reader
        clip = A.AvClip(frames, A.decode_audio(path, seam.audio_setting))
        text = seam.chat([render("MELD", "infer_script", e.text, "test", "av")], "official")[0]
        inputs = dict(seam._process(text, clip))
        gen = model.generate(**inputs, max_new_tokens=decoding.max_new_tokens, do_sample=False,
                             use_audio_in_video=seam.audio_setting.interleave, pad_token_id=tok.pad_token_id)
        outs.append(tok.decode(gen[0, inputs["input_ids"].shape[1]:], skip_special_tokens=True))
    return outs


def run_ours(model, processor, root, examples, decoding, cache, batch_size):
    return ours(model, processor, root, examples, V.FRAME_SETTINGS["official-infer"], decoding, cache, batch_size,
                modality="av")


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", help="an omni checkpoint (default: a tiny random Qwen2.5-Omni thinker)")
    clip_args(ap)  # 128 new tokens: the budget the omni configs set
    args = ap.parse_args(argv)

    device = pick_device(args.device)
    if device.type == "cpu":
        torch.set_num_threads(args.threads)
    tmp = Path(tempfile.mkdtemp(prefix="mmla-bench-audio-"))
    try:
        path = args.model or tiny.build_tiny_audio_model("qwen2.5-omni", tmp / "tiny")
        model, processor = load_model(str(path), dtype=args.dtype, device=args.device, modality="av")
        name = args.model or "tiny random Qwen2.5-Omni thinker (text hidden 64, 2 layers; audio and vision 2 layers)"
        seam = make_inputs(model, processor, V.FRAME_SETTINGS["official-infer"], modality="av")
        decoding = Decoding(max_new_tokens=args.max_new_tokens)
        root = make_root(tmp, args.n, Path(args.data), Path(args.videos))
        from mmla.data import load_split

        examples = load_split(root, "MELD", "test").examples
        n = len(examples)
        run_ours(model, processor, root, examples[:2], Decoding(max_new_tokens=2), V.FrameCache(enabled=False), 2)

        outputs, seconds = {}, {}
        outputs["loop"], seconds["loop"] = timed(lambda: loop(model, processor, root, examples, seam, decoding))
        cache_dir = tmp / "cache"
        outputs["ours_cold"], seconds["ours_cold"] = timed(
            lambda: run_ours(model, processor, root, examples, decoding, V.FrameCache(cache_dir), args.batch_size))
        outputs["ours_warm"], seconds["ours_warm"] = timed(
            lambda: run_ours(model, processor, root, examples, decoding, V.FrameCache(cache_dir), args.batch_size))
        rate = {k: round(n / s, 3) for k, s in seconds.items()}
        result = {
            "command": "PYTHONPATH=src " + shlex.join([sys.executable.replace(str(Path.cwd()) + "/", ""), *sys.argv]),
            "device": torch.cuda.get_device_name() if device.type == "cuda"
            else f"cpu ({platform.processor() or platform.machine()}), {torch.get_num_threads()} threads",
            "torch": torch.__version__,
            "model": name,
            "dtype": str(model.dtype).replace("torch.", ""),
            "frames": seam.setting.record(),
            "audio": seam.audio_setting.record(),
            "n": n,
            "batch_size": args.batch_size,
            "max_new_tokens": args.max_new_tokens,
            "seconds": {k: round(s, 2) for k, s in seconds.items()},
            "samples_per_s": rate,
            "speedup_vs_loop": {k: round(rate[k] / rate["loop"], 2) for k in ("ours_cold", "ours_warm")},
            "identical_outputs_vs_loop": {k: sum(a == b for a, b in zip(outputs[k], outputs["loop"]))
                                          for k in ("ours_cold", "ours_warm")},
        }
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return emit(result, args.out)


if __name__ == "__main__":
    main()
