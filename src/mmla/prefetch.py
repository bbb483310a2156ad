"""Clips decoded while the process starts: a child process fills the frame cache as the parent imports and loads.

A fresh `mmla predict` on video spends its first seconds importing torch and transformers and loading the model,
on one core, holding the GIL. Those seconds are free for decoding on another core, but not in a thread of the same
process (a decode thread waits for the GIL between frames). So, before torch is imported, the parent forks one
child that decodes the run's clips, in row order, into the frame cache, and goes on until the parent's own decode
pool starts (`Prefetch.stop`). The parent then finds those clips as cache hits.

The child knows the frame setting before the model is loaded only by guessing it from the model directory's JSON
files (the resolver needs transformers' config classes, which is what is being waited for). A wrong guess costs
time, never results: the cache keys on the setting, so frames of another setting are simply not found.

Nothing is prefetched when it cannot help or could hurt: torch already imported (a library caller: forking a
process with torch's threads is unsafe, and the imports are not ahead anyway), the frame cache off, a data-parallel
rank (each rank decodes only its share), a served model, or no model directory to read.
"""

from __future__ import annotations

import json
import multiprocessing
import os
import signal
import sys
from pathlib import Path

from . import video as video_mod
from .data import data_root, load_split
from .resolve import MODEL_FAMILIES
from .runs import PREDICTION_KEYS, read_jsonl
from .tasks import parse_datasets

_VISUAL = ("video", "av")


def guess_frames(cfg) -> video_mod.FrameSetting | None:
    """The frame setting the run will have (inference.default_frames with the user's overrides and the processor's
    patch x merge factor, as inputs.VideoInputs makes it), read from JSON files only; None when unsure."""
    model = Path(cfg.model)
    try:
        config = json.loads((model / "config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    mt = config.get("model_type")
    if cfg.modality == "auto" and not ("vision_config" in config or "thinker_config" in config):
        return None
    name = cfg.frames
    if name is None:
        rows = [r for r in MODEL_FAMILIES.values() if mt in r.model_types and r.modality == "video"]
        names = {(r.frames if r.official and cfg.protocol == "official" else None) or "official-infer" for r in rows}
        if len(names) > 1:
            return None
        name = names.pop() if names else "official-infer"
    try:
        setting = video_mod.frame_setting(name, num_frames=cfg.num_frames, fps=cfg.fps, max_pixels=cfg.max_pixels)
    except ValueError:
        return None
    factor = _factor(model)
    return video_mod.frame_setting(setting, factor=factor) if factor else setting


def _factor(model: Path) -> int | None:
    """The video processor's patch_size x merge_size, from the files AutoProcessor reads."""
    for name, key in (("processor_config.json", "video_processor"), ("video_preprocessor_config.json", None),
                      ("preprocessor_config.json", None)):
        try:
            d = json.loads((model / name).read_text(encoding="utf-8"))
        except (OSError, ValueError):
            continue
        d = d.get(key, {}) if key else d
        if d.get("patch_size") and d.get("merge_size"):
            return int(d["patch_size"]) * int(d["merge_size"])
    return None


def _clips(cfg) -> list[Path]:
    """The run's clip paths in row order (rows already predicted left out), or [] when anything is unclear."""
    try:
        spec = cfg.datasets if len(cfg.datasets) != 1 else cfg.datasets[0]
        datasets = parse_datasets("video" if spec == "all" else spec)
        done = {(r["dataset"], r["split"], r["id"]) for r in
                read_jsonl(Path(cfg.out) / "predictions.jsonl", PREDICTION_KEYS)[0] if not r.get("clip_error")}
        root = data_root(cfg.data)
        finder = video_mod.ClipFinder(root)
        paths = []
        for ds in datasets:
            examples = load_split(root, ds, cfg.split, skip_bad_rows=True).examples
            for e in examples[: cfg.limit] if cfg.limit else examples:
                if (e.dataset, e.split, e.id) not in done:
                    clip = finder.find(e.dataset, e.id)
                    if clip.path is not None:
                        paths.append(clip.path)
        return paths
    except Exception:  # the parent reads the same data and says what is wrong with it, in one line
        return []


def _work(cfg, setting: video_mod.FrameSetting, count, halt) -> None:
    """The child: decode every clip of the run into the frame cache, quietly (the parent reports errors), until
    the parent's own decode pool starts, the parent is gone, or the clips are done."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the parent's to handle: it stops this child
    parent = os.getppid()
    try:
        from . import decode

        decode.decoder_name(announce=False)  # the parent says which decoder, once
        cache = video_mod.FrameCache()
        for path in _clips(cfg):
            if halt.is_set() or os.getppid() != parent:
                return
            try:
                video_mod.load_frames(path, setting, cache)
            except Exception:  # a bad clip: the parent meets it again and records it per row
                continue
            with count.get_lock():
                count.value += 1
    except Exception:  # whatever goes wrong here, the parent decodes the clips itself
        return


class Prefetch:
    """The child process (or nothing). `stop()` asks it to end after the clip in hand (no cache entry is left half
    written); `close()` waits for it and says how many clips it decoded or found cached."""

    def __init__(self, process=None, count=None, halt=None):
        self.process, self.count, self.halt = process, count, halt
        self.done: int | None = None

    @classmethod
    def start(cls, cfg) -> Prefetch:
        if ("torch" in sys.modules or cfg.no_frame_cache or cfg.modality not in (*_VISUAL, "auto")
                or cfg.backend != "local" or int(os.environ.get("WORLD_SIZE", "1") or 1) > 1
                or os.environ.get("MMLA_PREFETCH", "1") == "0" or "fork" not in multiprocessing.get_all_start_methods()):
            return cls()
        setting = guess_frames(cfg)
        if setting is None:
            return cls()
        ctx = multiprocessing.get_context("fork")
        count, halt = ctx.Value("i", 0), ctx.Event()
        process = ctx.Process(target=_work, args=(cfg, setting, count, halt), name="mmla-prefetch", daemon=True)
        process.start()
        return cls(process, count, halt)

    def stop(self) -> None:
        if self.halt is not None:
            self.halt.set()

    def close(self) -> int | None:
        if self.process is None:
            return self.done
        self.stop()
        self.process.join(timeout=10)
        if self.process.is_alive():  # a very long clip in hand (the run failed early): its entry is not needed
            self.process.terminate()
            self.process.join()
        self.process, self.done = None, int(self.count.value)
        return self.done
