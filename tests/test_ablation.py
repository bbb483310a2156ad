"""The modality ablation: `mmla run` with `modalities` on a tiny random Qwen2.5-Omni thinker over real clips (one
with speech, one without an audio track), then the table and figure; and the table's arithmetic on hand-made
run directories (same rows across modalities, deltas, dimension rows, a run's own ci95 block)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from mmla.ablation import ablation_table, markdown
from video_fixtures import make_video_root


def _write_run(d: Path, rows: list[tuple], metrics: dict | None = None) -> Path:
    d.mkdir(parents=True)
    with open(d / "predictions.jsonl", "w") as f:
        for ds, id_, label, pred, err in rows:
            rec = {"dataset": ds, "split": "test", "id": id_, "text": "t", "label": label, "prompt": "p",
                   "output": pred, "pred": pred}
            if err:
                rec["clip_error"] = err
            f.write(json.dumps(rec) + "\n")
    (d / "metrics.json").write_text(json.dumps(metrics or {}))
    return d


def test_table_compares_the_same_rows(tmp_path):
    text = _write_run(tmp_path / "text", [("MELD", "1", "joy", "joy", None), ("MELD", "2", "anger", "joy", None),
                                          ("MUStARD", "3", "sarcastic", "sincere", None)])
    av = _write_run(tmp_path / "av", [("MELD", "1", "joy", "joy", None), ("MELD", "2", "anger", "", "missing: x"),
                                      ("MUStARD", "3", "sarcastic", "sarcastic", None)])
    t = ablation_table({"text": text, "av": av})
    rows = {r.get("dataset") or r.get("dimension") or "avg": r for r in t["rows"]}
    assert t["compared_rows"] == 2 and t["left_out"] == {"text": 1, "av": 1}  # row 2 has no clip in av: out of both
    assert rows["MELD"]["ACC"] == {"text": 100.0, "av": 100.0} and rows["MELD"]["n"] == 1
    assert rows["MUStARD"]["ACC"] == {"text": 0.0, "av": 100.0}
    assert rows["speaking_style"]["ACC"]["av"] == 100.0 and rows["avg"]["ACC"] == {"text": 50.0, "av": 100.0}
    assert rows["avg"]["delta"] == {}  # +video / +audio need the video / audio runs
    lo, hi = rows["avg"]["ci95"]["text"]
    assert 0.0 <= lo <= 50.0 <= hi <= 100.0


def test_own_ci95_is_used_when_no_row_is_left_out(tmp_path):
    ci = {"per_dataset": {"MELD": {"ACC": 50.0, "ci95": {"ACC": [10.0, 90.0]}}}}
    text = _write_run(tmp_path / "text", [("MELD", "1", "joy", "joy", None), ("MELD", "2", "anger", "joy", None)], ci)
    audio = _write_run(tmp_path / "audio", [("MELD", "1", "joy", "anger", None), ("MELD", "2", "anger", "anger", None)])
    t = ablation_table({"audio": audio, "text": text})
    meld = t["rows"][0]
    assert t["modalities"] == ["text", "audio"] and meld["ci95"]["text"] == [10.0, 90.0]
    assert meld["delta"] == {"+audio": 0.0}
    md = markdown(t, "x")
    assert "| MELD | 2 | 50.00 [10.0, 90.0] | 50.00 [" in md and "+audio" in md


def test_mmla_run_modality_ablation_on_a_tiny_omni_model(tmp_path, videos_dir):
    from mmla.tiny import build_tiny_audio_model

    model = build_tiny_audio_model("qwen2.5-omni", tmp_path / "omni")
    root = make_video_root(tmp_path / "root", videos_dir)
    out = tmp_path / "abl"
    cfg = Path(__file__).resolve().parents[1] / "configs" / "qwen2.5-omni-7b-ablation.yaml"
    r = subprocess.run([sys.executable, "-m", "mmla.cli", "run", str(cfg), f"model={model}", f"data={root}",
                        "datasets=MUStARD", f"out={out}", "predict.mode=score", "predict.device=cpu",
                        "predict.batch_size=2", "--no-progress"], capture_output=True, text=True, timeout=900,
                       env={**__import__("os").environ, "MMLA_FRAME_CACHE": str(tmp_path / "fc")})
    assert r.returncode == 0, r.stderr[-2000:]
    assert "ablation:" in r.stdout and "| MUStARD | 2 |" in r.stdout
    table = json.loads((out / "ablation.json").read_text())
    assert table["modalities"] == ["text", "video", "audio", "av"] and table["compared_rows"] == 2
    assert (out / "ablation.png").stat().st_size > 1000
    for m in ("text", "video", "audio", "av"):
        cfg_m = (out / f"zero-shot-{m}" / "config.yaml").read_text()
        assert f"modality: {m}" in cfg_m
    env = json.loads((out / "zero-shot-av" / "env.json").read_text())
    assert env["audio_setting"]["interleave"] is True and env["silent_clips"] == 2
    # rerun: every stage is done, the table is written again from the run directories
    r2 = subprocess.run(r.args, capture_output=True, text=True, timeout=900, env={**__import__("os").environ,
                                                                                   "MMLA_FRAME_CACHE": str(tmp_path / "fc")})
    assert r2.returncode == 0 and "zero-shot av: done" in r2.stderr
    with pytest.raises(ValueError, match="modalities: unknown"):
        from mmla.experiment import load_experiment, run_experiment

        run_experiment(load_experiment(str(cfg), [f"model={model}", f"data={root}", "modalities=[text,smell]",
                                                  f"out={tmp_path / 'bad'}"]), progress=False)
