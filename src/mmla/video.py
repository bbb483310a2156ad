"""Video clips: where they are, which frames a model sees, decoding with a disk cache, and `mmla check-data`.

Clips. The release stores `<root>/<DATASET>/video/<DATASET>_<id>.mp4`, with a few names spelt differently
(../shared/data/PROVENANCE.md): `MUSTARD_` / `MUStARD_`, MELD-DA and IEMOCAP-DA clips named `MELD_` /
`IEMOCAP_` or `MELD-DA_` / `IEMOCAP-DA_`, Ch-sims ids `csbgs2_*` in the TSVs but `csbdgs2_*` on disk.
`ClipFinder` tries the canonical name, then these variants, then a case-insensitive match in the folder.
A clip that cannot be found or decoded is a per-sample `ClipError` with its reason; runs record it and go on.
Every path goes through `data.safe_path`, so an id can never point outside the data root.

Frames. A `FrameSetting` says which frames and at what size; two are named after the official code
(../shared/paper/hyperparams.md sections 2.3 and 2.5):
  official-infer  4 frames at np.linspace(0, total-1, 4), each resized (PIL bicubic) to the Qwen2-VL
                  smart_resize of max_pixels 360*420 = 151,200 (multiples of 28), fps 1: the zero-shot
                  `infer.py` (also used for the test inference after SFT and IT).
  official-train  2 fps (floor(duration * 2)), capped by 64 and the clip's frame count, clamped to 4..50
                  frames, rounded down to an even count (Qwen2-VL), each frame resized so max(H, W) <= 128
                  and then to multiples of 28: the LLaMA-Factory fine-tuning.
The other models of the paper have their own official frames (../shared/OFFICIAL_MODELS.md):
  qwen2-vl-infer     official-infer plus the JPEG round trip of the official script (PIL default quality)
  llava-infer        4 frames at linspace -> int, squashed to 384x384 (PIL bicubic, aspect ignored): LLaVA-NeXT
  videollama2-infer  8 segment centres round(seg*(i+0.5)+1e-6), seg=(n-1)/8; shortest side 336, 336 centre crop
  minicpm-infer      range(0, n, round(avg_fps)) (about 1 fps), uniformly subsampled to <= 64 by int(i*gap+gap/2)
Each takes overrides (num_frames, fps, max_pixels); the resolved setting is recorded with every run.
Decoding uses TorchCodec where it works, else PyAV (mmla.decode), with our sample indices. The resized
uint8 frames are cached on disk ($MMLA_FRAME_CACHE, else $MMLA_CACHE/frames, else ~/.cache/mmla/frames)
under a key of clip path + size + mtime + setting, so a second run (or a second model) never decodes again;
entries are written whole (a unique temporary file renamed into place), so decode workers and data-parallel
ranks can fill one cache at once.

The official Qwen2-VL inference wrote its 4 frames to JPEG files and read them back; `qwen2-vl-infer` does the
same round trip in memory. VideoLLaMA2 and MiniCPM-V decode with decord, mmla with PyAV or TorchCodec: on a clip whose container
states another frame count than decord counts, the indices can differ.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import os
import sys
import tempfile
import threading
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from . import data as data_mod
from .decode import read_frames
from .tasks import SPLITS, VIDEO_DATASETS, get_task

# ---------------------------------------------------------------- frame settings


@dataclass(frozen=True)
class FrameSetting:
    """Which frames of a clip the model sees, and at what size. Recorded in every run."""

    name: str
    num_frames: int | None = 4  # fixed count, np.linspace(0, total-1, n); None: sample at `fps`
    fps: float = 1.0  # sampling rate when num_frames is None; always the fps the model is told (Qwen2.5-VL time)
    min_frames: int = 4  # fps sampling: at least this many (when the clip has them)
    max_frames: int = 50  # fps sampling: at most this many
    max_len: int = 64  # fps sampling: LLaMA-Factory's video_maxlen cap
    even: bool = False  # fps sampling: round the count down to an even number (Qwen2-VL in LLaMA-Factory)
    max_side: int | None = None  # first resize so that max(H, W) <= max_side (LLaMA-Factory video_resolution)
    min_pixels: int = 56 * 56
    max_pixels: int = 360 * 420
    factor: int = 28  # patch size x spatial merge: frame sides are multiples of it
    sampler: str = "linspace"  # linspace | segments (VideoLLaMA2) | fps-gap (MiniCPM-V via ms-swift)
    resize: str = "smart"  # smart (Qwen2-VL smart_resize) | squash (size x size) | short-crop (side, centre crop)
    #                        | none (the model's own processor sizes them: MiniCPM-V's slicer)
    size: int | None = None  # squash / short-crop side
    jpeg: bool = False  # JPEG round trip (PIL default quality) before resizing, as the official Qwen2-VL script

    def record(self) -> dict:
        return dataclasses.asdict(self)

    def decode_key(self) -> dict:
        """What determines the cached pixels (the name does not)."""
        d = self.record()
        d.pop("name")
        return d


FRAME_SETTINGS: dict[str, FrameSetting] = {
    "official-infer": FrameSetting("official-infer", num_frames=4, fps=1.0, max_pixels=360 * 420),
    # Qwen2-VL-7B-Instruct's processor bounds (min 56*56, max 12,845,056 px) around LLaMA-Factory's 128 px frames.
    "official-train": FrameSetting("official-train", num_frames=None, fps=2.0, min_frames=4, max_frames=50,
                                   max_len=64, even=True, max_side=128, max_pixels=12845056),
    "qwen2-vl-infer": FrameSetting("qwen2-vl-infer", num_frames=4, fps=1.0, max_pixels=360 * 420, jpeg=True),
    "llava-infer": FrameSetting("llava-infer", num_frames=4, fps=1.0, resize="squash", size=384),
    "videollama2-infer": FrameSetting("videollama2-infer", num_frames=8, fps=1.0, sampler="segments",
                                      resize="short-crop", size=336),
    "minicpm-infer": FrameSetting("minicpm-infer", num_frames=None, fps=1.0, sampler="fps-gap", max_len=64,
                                  min_frames=1, max_frames=64, resize="none"),
}


def frame_setting(name: str | FrameSetting = "official-infer", *, num_frames: int | None = None,
                  fps: float | None = None, max_pixels: int | None = None, factor: int | None = None) -> FrameSetting:
    """A named setting with overrides. `fps` alone switches to fps sampling; `num_frames` to a fixed count."""
    if isinstance(name, FrameSetting):
        s = name
    elif name in FRAME_SETTINGS:
        s = FRAME_SETTINGS[name]
    else:
        raise ValueError(f"unknown frame setting '{name}' (known: {', '.join(FRAME_SETTINGS)})")
    changes: dict = {}
    if num_frames is not None:
        if int(num_frames) < 1:
            raise ValueError(f"--num-frames must be a positive integer, got {num_frames}")
        changes["num_frames"] = int(num_frames)
    if fps is not None:
        if float(fps) <= 0:
            raise ValueError(f"--fps must be positive, got {fps}")
        changes["fps"] = float(fps)
        if num_frames is None:
            changes["num_frames"] = None
    if max_pixels is not None:
        if int(max_pixels) < 1:
            raise ValueError(f"--max-pixels must be a positive integer, got {max_pixels}")
        changes["max_pixels"] = int(max_pixels)
    if factor is not None:
        changes["factor"] = int(factor)
    if changes:
        s = dataclasses.replace(s, **changes)
        if s.min_pixels > s.max_pixels:
            s = dataclasses.replace(s, min_pixels=s.max_pixels)
    return s


def segment_indices(total: int, n: int) -> np.ndarray:
    """VideoLLaMA2's "uniform" sampler (mm_utils.py): the centre of each of n equal segments of [0, total-1]."""
    seg = (total - 1) / n
    return np.array([int(np.round(seg * (i + 0.5) + 1e-6)) for i in range(n)])


def fps_gap_indices(total: int, video_fps: float, cap: int = 64) -> np.ndarray:
    """ms-swift's MiniCPM-V video loader: every round(avg_fps)-th frame (about 1 fps), then, over `cap`, the
    middle of each of `cap` equal gaps."""
    idx = list(range(0, total, max(1, round(video_fps))))
    if len(idx) > cap:
        gap = len(idx) / cap
        idx = [idx[int(i * gap + gap / 2)] for i in range(cap)]
    return np.array(idx)


def sample_indices(setting: FrameSetting, total: int, duration: float | None,
                   video_fps: float | None = None) -> np.ndarray:
    """Frame indices to decode, in order (may repeat when the clip has fewer frames than asked)."""
    if total < 1:
        raise ClipError("the clip reports no video frames")
    if setting.sampler == "segments":
        return segment_indices(total, setting.num_frames or 8)
    if setting.sampler == "fps-gap":
        fps = video_fps or (total / duration if duration else 1.0)
        return fps_gap_indices(total, fps, setting.max_len)
    if setting.num_frames is not None:
        n = setting.num_frames
    else:
        n = math.floor((duration or 0.0) * setting.fps)
        n = min(n, setting.max_len, total)
        n = max(n, min(setting.min_frames, total))
        n = min(n, setting.max_frames)
        if setting.even and n > 1:
            n -= n % 2
        n = max(n, 1)
    return np.linspace(0, total - 1, n).astype(int)


def smart_resize(height: int, width: int, factor: int = 28, min_pixels: int = 56 * 56,
                 max_pixels: int = 14 * 14 * 4 * 1280) -> tuple[int, int]:
    """Qwen2-VL's target size: both sides multiples of `factor`, area within [min_pixels, max_pixels]."""
    if max(height, width) / min(height, width) > 200:
        raise ClipError(f"aspect ratio {max(height, width) / min(height, width):.0f} is over 200")
    h_bar = round(height / factor) * factor
    w_bar = round(width / factor) * factor
    if h_bar * w_bar > max_pixels:
        beta = math.sqrt((height * width) / max_pixels)
        h_bar = max(factor, math.floor(height / beta / factor) * factor)
        w_bar = max(factor, math.floor(width / beta / factor) * factor)
    elif h_bar * w_bar < min_pixels:
        beta = math.sqrt(min_pixels / (height * width))
        h_bar = math.ceil(height * beta / factor) * factor
        w_bar = math.ceil(width * beta / factor) * factor
    return h_bar, w_bar


def _resize(frames: np.ndarray, height: int, width: int) -> np.ndarray:
    from PIL import Image

    return np.stack([np.asarray(Image.fromarray(f).resize((width, height), Image.Resampling.BICUBIC))
                     for f in frames])


def _jpeg(frames: np.ndarray) -> np.ndarray:
    import io

    from PIL import Image

    out = []
    for f in frames:
        buf = io.BytesIO()
        Image.fromarray(f).save(buf, format="JPEG")  # PIL's default quality (75), as frame.save("x.jpg")
        out.append(np.asarray(Image.open(buf).convert("RGB")))
    return np.stack(out)


def resize_frames(frames: np.ndarray, setting: FrameSetting) -> np.ndarray:
    """(T, H, W, 3) uint8 -> the setting's size (sides multiples of `factor`), PIL bicubic as the official code."""
    if setting.jpeg:
        frames = _jpeg(frames)
    _, h, w, _ = frames.shape
    if setting.resize == "none":
        return np.ascontiguousarray(frames)
    if setting.resize == "squash":  # SigLipImageProcessor: resize to size x size, aspect ignored
        return np.ascontiguousarray(_resize(frames, setting.size, setting.size))
    if setting.resize == "short-crop":  # CLIPImageProcessor: shortest side to size, then the centre size x size
        short, long_ = (h, w) if h <= w else (w, h)
        long_ = int(setting.size * long_ / short)
        th, tw = (setting.size, long_) if h <= w else (long_, setting.size)
        frames = _resize(frames, th, tw) if (th, tw) != (h, w) else frames
        top, left = (th - setting.size) // 2, (tw - setting.size) // 2
        return np.ascontiguousarray(frames[:, top:top + setting.size, left:left + setting.size])
    if setting.max_side and max(h, w) > setting.max_side:
        scale = setting.max_side / max(h, w)
        h, w = max(1, int(h * scale)), max(1, int(w * scale))
        frames = _resize(frames, h, w)
    th, tw = smart_resize(h, w, setting.factor, setting.min_pixels, setting.max_pixels)
    if (th, tw) != (h, w):
        frames = _resize(frames, th, tw)
    return np.ascontiguousarray(frames)


# ---------------------------------------------------------------- decoding + cache


class ClipError(Exception):
    """A clip that cannot be used; the message is the reason recorded with the sample."""


@dataclass
class Frames:
    array: np.ndarray  # (T, H, W, 3) uint8, already at the setting's size
    indices: list[int]  # frame index of each row
    total_frames: int
    video_fps: float
    duration: float
    cached: bool = False  # read from the disk cache


def cache_dir() -> Path:
    """$MMLA_FRAME_CACHE, else $MMLA_CACHE/frames, else ~/.cache/mmla/frames."""
    if os.environ.get("MMLA_FRAME_CACHE"):
        return Path(os.environ["MMLA_FRAME_CACHE"]).expanduser()
    base = os.environ.get("MMLA_CACHE") or str(Path.home() / ".cache" / "mmla")
    return Path(base).expanduser() / "frames"


class NpzCache:
    """Decoded media as .npz files keyed by clip path + size + mtime + the setting that made them (its decode_key).
    Entries are written whole: a temporary file of its own (decode workers and data-parallel ranks may write the
    same entry at once), renamed into place, so a reader sees the whole entry or none."""

    what = "cache"  # for the warning a failed write prints

    def __init__(self, root: str | os.PathLike, enabled: bool = True):
        self.root = Path(root)
        self.enabled = enabled
        self.hits = self.misses = 0
        self._count = threading.Lock()  # decode workers count hits and misses at once
        self.before_miss = None  # called (from any decode worker) before an entry that is not there is decoded

    def counted(self, hit: bool) -> None:
        with self._count:
            if hit:
                self.hits += 1
            else:
                self.misses += 1

    def path_for(self, clip: Path, setting) -> Path:
        st = os.stat(clip)
        raw = json.dumps([str(Path(clip).resolve()), st.st_size, st.st_mtime_ns, setting.decode_key()], sort_keys=True)
        h = hashlib.sha256(raw.encode()).hexdigest()
        return self.root / h[:2] / f"{h}.npz"

    def read(self, clip: Path, setting, key: str) -> tuple[np.ndarray, dict] | None:
        """The entry's array `key` and its metadata, or None (no entry, the cache off, a torn or foreign file)."""
        if not self.enabled:
            return None
        p = self.path_for(clip, setting)
        if not p.is_file():
            return None
        try:
            with np.load(p, allow_pickle=False) as z:
                return z[key], json.loads(str(z["meta"]))
        except Exception:  # a torn or foreign file: decode again and overwrite it
            return None

    def through(self, clip: Path, setting, decode):
        """The entry for (clip, setting) if there is one, else `decode(clip, setting)`, stored for the next time
        (a full or read-only cache never stops a run)."""
        hit = self.get(clip, setting)
        if hit is None and self.before_miss is not None:
            self.before_miss()  # another process may be writing this very entry (mmla.prefetch): let it finish
            hit = self.get(clip, setting)
        if hit is not None:
            self.counted(True)
            return hit
        made = decode(clip, setting)
        self.counted(False)
        try:
            self.put(clip, setting, made)
        except OSError as e:
            print(f"warning: {self.what} not written ({e})", file=sys.stderr)
        return made

    def write(self, clip: Path, setting, key: str, array: np.ndarray, meta: dict) -> None:
        if not self.enabled:
            return
        p = self.path_for(clip, setting)
        p.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{p.name}.", suffix=".tmp", dir=p.parent)
        try:
            os.fchmod(fd, 0o644)  # as open() would make it, not mkstemp's owner-only
            with os.fdopen(fd, "wb") as f:
                np.savez(f, **{key: array}, meta=np.array(json.dumps({**meta, "clip": str(clip)})))
            os.replace(tmp, p)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise


class FrameCache(NpzCache):
    """Decoded, resized frames, keyed by clip and frame setting."""

    what = "frame cache"

    def __init__(self, root: str | os.PathLike | None = None, enabled: bool = True):
        super().__init__(root if root is not None else cache_dir(), enabled)

    def get(self, clip: Path, setting: FrameSetting) -> Frames | None:
        hit = self.read(clip, setting, "frames")
        if hit is None:
            return None
        array, meta = hit
        return Frames(array, meta["indices"], meta["total_frames"], meta["video_fps"], meta["duration"], cached=True)

    def put(self, clip: Path, setting: FrameSetting, fr: Frames) -> None:
        self.write(clip, setting, "frames", fr.array, {"indices": [int(i) for i in fr.indices],
                                                      "total_frames": fr.total_frames, "video_fps": fr.video_fps,
                                                      "duration": fr.duration})


def decode_frames(path: str | os.PathLike, setting: FrameSetting, decoder: str | None = None) -> Frames:
    """Decode the setting's frames of one clip (TorchCodec, else PyAV: mmla.decode) and resize them."""
    path = Path(path)
    if not path.is_file():
        raise ClipError(f"missing: {path}")
    asked: dict = {}

    def pick(metadata, **_):
        dur = metadata.duration or (metadata.total_num_frames / metadata.fps if metadata.fps else 0.0)
        idx = sample_indices(setting, int(metadata.total_num_frames or 0), dur, metadata.fps)
        asked["indices"] = idx
        asked["meta"] = (int(metadata.total_num_frames or 0), float(metadata.fps or 0.0), float(dur or 0.0))
        return np.unique(idx)  # the decoder keeps each frame once; repeats are restored below

    try:
        video = read_frames(str(path), pick, decoder)
    except ClipError:
        raise
    except Exception as e:  # corrupt container, unsupported codec, truncated stream, ...
        msg = str(e).strip().splitlines()[0] if str(e).strip() else ""
        raise ClipError(f"unreadable: {type(e).__name__}: {msg}"[:300]) from None
    idx = asked["indices"]
    uniq = np.unique(idx)
    if video.ndim != 4 or len(video) == 0:
        raise ClipError("unreadable: no frame could be decoded")
    if len(video) < len(uniq):  # the container overstated its frame count: repeat the last decoded frame
        video = np.concatenate([video, np.repeat(video[-1:], len(uniq) - len(video), axis=0)])
    video = video[np.searchsorted(uniq, idx)]
    total, vfps, dur = asked["meta"]
    return Frames(resize_frames(video, setting), [int(i) for i in idx], total, vfps, dur)


def load_frames(path: str | os.PathLike, setting: FrameSetting, cache: FrameCache | None = None) -> Frames:
    """Frames from the cache, else decoded (and cached). Raises ClipError with the reason."""
    path = Path(path)
    if not path.is_file():
        raise ClipError(f"missing: {path}")
    return cache.through(path, setting, decode_frames) if cache is not None else decode_frames(path, setting)


def probe_clip(path: str | os.PathLike) -> str | None:
    """None if the clip opens, has a video stream and its first frame decodes; else the reason."""
    import av

    try:
        with av.open(str(path)) as c:
            if not c.streams.video:
                return "unreadable: no video stream"
            for _ in c.decode(video=0):
                return None
        return "unreadable: no frame could be decoded"
    except Exception as e:
        msg = str(e).strip().splitlines()[0] if str(e).strip() else ""
        return f"unreadable: {type(e).__name__}: {msg}"[:300]


# ---------------------------------------------------------------- finding clips

# File-name prefixes tried after the dataset's own name (PROVENANCE.md section 5).
PREFIX_VARIANTS = {
    "MUStARD": ("MUSTARD",),
    "MELD-DA": ("MELD",),
    "IEMOCAP-DA": ("IEMOCAP",),
    "MELD": ("MELD-DA",),
    "IEMOCAP": ("IEMOCAP-DA",),
}
# id spellings: (written in the TSV, written on disk), tried both ways.
ID_VARIANTS = {"Ch-sims": (("csbgs2_", "csbdgs2_"),)}
VIDEO_DIR = "video"
VIDEO_EXT = ".mp4"


def clip_names(dataset: str, id_: str) -> list[str]:
    """File names to try for one clip, canonical first."""
    task = get_task(dataset)
    ids = [id_]
    for a, b in ID_VARIANTS.get(task.name, ()):
        for x, y in ((a, b), (b, a)):
            if id_.startswith(x):
                ids.append(y + id_[len(x):])
    names = []
    for prefix in (task.name, *PREFIX_VARIANTS.get(task.name, ())):
        for i in ids:
            n = f"{prefix}_{i}{VIDEO_EXT}"
            if n not in names:
                names.append(n)
    return names


@dataclass
class Clip:
    dataset: str
    id: str
    path: Path | None
    error: str | None = None  # why there is no usable clip
    variant: bool = False  # found under another spelling than <DATASET>_<id>.mp4

    def record(self, root: Path) -> str | None:
        """The clip path relative to the data root (for predictions.jsonl)."""
        if self.path is None:
            return None
        try:
            return str(self.path.relative_to(Path(root).resolve()))
        except ValueError:
            return str(self.path)


class ClipFinder:
    """Resolves (dataset, id) to a clip path under one data root, tolerant of the release's spellings."""

    def __init__(self, root: str | os.PathLike):
        self.root = Path(root)
        self._listing: dict[str, dict[str, str] | None] = {}

    def video_dir(self, dataset: str) -> Path:
        return data_mod.safe_path(self.root, get_task(dataset).name, VIDEO_DIR)

    def _lower_listing(self, dataset: str) -> dict[str, str] | None:
        if dataset not in self._listing:
            d = self.video_dir(dataset)
            try:
                self._listing[dataset] = {n.lower(): n for n in os.listdir(d)}
            except OSError:
                self._listing[dataset] = None
        return self._listing[dataset]

    def find(self, dataset: str, id_: str) -> Clip:
        task = get_task(dataset)
        names = clip_names(task.name, id_)
        try:
            for k, name in enumerate(names):
                p = data_mod.safe_path(self.root, task.name, VIDEO_DIR, name)
                if p.is_file():
                    return Clip(task.name, id_, p, variant=k > 0)
            listing = self._lower_listing(task.name)
            if listing is None:
                return Clip(task.name, id_, None, f"missing: no folder {self.video_dir(task.name)}")
            for name in names:
                real = listing.get(name.lower())
                if real is not None:
                    p = data_mod.safe_path(self.root, task.name, VIDEO_DIR, real)
                    if p.is_file():
                        return Clip(task.name, id_, p, variant=True)
        except data_mod.DataError as e:
            return Clip(task.name, id_, None, f"refused: {e}")
        return Clip(task.name, id_, None, f"missing: none of {', '.join(names)} in {self.video_dir(task.name)}")


# ---------------------------------------------------------------- check-data


CHECKS = ("exists", "probe", "full")


def check_data(root: str | os.PathLike, datasets: list[str] | None = None, splits: list[str] | None = None,
               check: str = "probe", setting: FrameSetting | None = None, cache: FrameCache | None = None) -> dict:
    """Every clip the TSVs of `datasets` refer to: is it there, and does it decode?

    check: "exists" (the file only), "probe" (it opens and its first frame decodes) or "full" (the frames of
    `setting` decode, which reads the clip to its last sampled frame and fills the frame cache).

    Returns {"root", "datasets": {DS: {"ids", "found", "variant_spelling", "missing": [...], "unreadable": [...],
    "splits"}}, "problems"}; missing/unreadable entries are {"id", "split", "reason"}."""
    root = Path(root)
    if check not in CHECKS:
        raise ValueError(f"check must be one of {', '.join(CHECKS)}, got '{check}'")
    if not root.is_dir():
        raise ValueError(f"{root}: data root not found (set --data or $MMLA_DATA)")
    names = datasets or list(VIDEO_DATASETS)
    finder = ClipFinder(root)
    out = {"root": str(root), "datasets": {}, "problems": 0}
    for ds in names:
        task = get_task(ds)
        entry = {"ids": 0, "found": 0, "variant_spelling": 0, "missing": [], "unreadable": [], "splits": []}
        if not task.has_video:
            entry["note"] = "no videos released for this dataset"
            out["datasets"][task.name] = entry
            continue
        entry["video_dir"] = str(finder.video_dir(task.name))
        entry["no_video_dir"] = not Path(entry["video_dir"]).is_dir()
        for split in splits or SPLITS:
            if not data_mod.split_path(root, task.name, split).is_file():
                continue
            entry["splits"].append(split)
            for e in data_mod.load_split(root, task.name, split, skip_bad_rows=True).examples:
                entry["ids"] += 1
                clip = finder.find(task.name, e.id)
                if clip.path is None:
                    entry["missing"].append({"id": e.id, "split": split, "reason": clip.error})
                    continue
                reason = None
                if check == "probe":
                    reason = probe_clip(clip.path)
                elif check == "full":
                    try:
                        load_frames(clip.path, setting or FRAME_SETTINGS["official-infer"], cache)
                    except ClipError as err:
                        reason = str(err)
                if reason:
                    entry["unreadable"].append({"id": e.id, "split": split, "reason": reason})
                    continue
                entry["found"] += 1
                entry["variant_spelling"] += clip.variant
        out["problems"] += len(entry["missing"]) + len(entry["unreadable"])
        out["datasets"][task.name] = entry
    return out


def format_check(report: dict, show: int = 20) -> str:
    lines = [f"data root: {report['root']}",
             f"{'dataset':<18}{'clips':>8}{'found':>8}{'variant':>9}{'missing':>9}{'unreadable':>12}  splits"]
    for ds, e in report["datasets"].items():
        if "note" in e:
            lines.append(f"{ds:<18}  ({e['note']})")
            continue
        lines.append(f"{ds:<18}{e['ids']:>8}{e['found']:>8}{e['variant_spelling']:>9}{len(e['missing']):>9}"
                     f"{len(e['unreadable']):>12}  {','.join(e['splits']) or '-'}")
    for ds, e in report["datasets"].items():
        bad = e.get("missing", []) + e.get("unreadable", [])
        if e.get("no_video_dir") and bad:
            lines.append(f"{ds}: no folder {e['video_dir']} ({len(bad)} clips missing)")
            continue
        for b in bad[:show]:
            lines.append(f"{ds} {b['split']} {b['id']}: {b['reason']}")
        if len(bad) > show:
            lines.append(f"{ds}: ... {len(bad) - show} more (--show N or --json for all)")
    lines.append("all clips present and readable" if report["problems"] == 0
                 else f"{report['problems']} clip(s) missing or unreadable")
    return "\n".join(lines)
