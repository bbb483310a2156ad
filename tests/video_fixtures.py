"""A fake release with clips (real ones from ../shared/data/videos and synthetic ones), for the video tests of the
trainer and the experiment runner."""

import shutil
from pathlib import Path

from test_video import REAL, write_clip, write_corrupt


def make_video_root(r: Path, videos_dir: Path) -> Path:
    """MELD test (2 real clips, one under a variant name, 1 synthetic, 1 missing, 1 corrupt), MELD train (4
    synthetic clips and one row whose clip is missing) and dev (2 synthetic clips), MUStARD test with MUSTARD_
    names."""
    v = r / "MELD" / "video"
    test = [("1_1", "Hi there.", "joy"), ("1_2", "No way!", "surprise"), ("1_3", "Fine.", "neutral"),
            ("1_4", "Gone.", "sadness"), ("1_5", "Broken.", "anger")]
    train = [(f"9_{i}", t, l) for i, (t, l) in enumerate(
        [("Great!", "joy"), ("Oh no.", "sadness"), ("What?", "surprise"), ("Okay.", "neutral"), ("Lost.", "fear")])]
    dev = [("8_0", "Wow.", "surprise"), ("8_1", "Sure.", "neutral")]
    for split, rows in (("test", test), ("train", train), ("dev", dev)):
        (r / "MELD").mkdir(parents=True, exist_ok=True)
        (r / "MELD" / f"{split}.tsv").write_text("id\ttext\tlabel\n" + "".join(f"{a}\t{b}\t{c}\n" for a, b, c in rows))
    v.mkdir(parents=True)
    shutil.copy(videos_dir / REAL[1], v / "MELD_1_1.mp4")
    shutil.copy(videos_dir / REAL[2], v / "MELD-DA_1_2.mp4")
    write_clip(v / "MELD_1_3.mp4", seed=3)
    write_corrupt(v / "MELD_1_5.mp4")
    for k, (i, _, _) in enumerate(train[:4] + dev):  # train 9_4 has no clip
        write_clip(v / f"MELD_{i}.mp4", seed=10 + k)
    (r / "MUStARD" / "video").mkdir(parents=True)
    (r / "MUStARD" / "test.tsv").write_text("id\ttext\tlabel\n1_60\tOh, sure.\tsarcastic\n2_10\tThanks.\tsincere\n")
    write_clip(r / "MUStARD/video/MUSTARD_1_60.mp4", seed=5)
    shutil.copy(videos_dir / REAL[0], r / "MUStARD/video/MUStARD_2_10.mp4")
    return r
