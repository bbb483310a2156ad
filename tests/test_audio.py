"""Audio: decoding and its cache on the real clips, tiny audio-capable models (Qwen2.5-Omni thinker, Qwen2-Audio)
built offline from stock classes, `mmla predict --modality audio|av` (continuous batching equal to transformers'
generate one clip at a time, score mode, the silent-clip policy, resume), one LoRA SFT step, and the CLI."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from launchers import ONE_AT_A_TIME, TORCHRUN
from mmla import audio as A
from mmla import video as V
from mmla.inference import PredictConfig, predict
from mmla.prompts import candidates
from test_video import REAL, write_clip, write_corrupt
from video_fixtures import make_video_root

SOUND, DIGITAL_SILENCE, NO_TRACK = REAL[1], REAL[2], REAL[0]  # demo_3: speech; demo_9: an AAC track of zeros


@pytest.fixture(scope="module")
def omni(tmp_path_factory) -> Path:
    from mmla.tiny import build_tiny_audio_model

    return build_tiny_audio_model("qwen2.5-omni", tmp_path_factory.mktemp("tiny-omni"))


@pytest.fixture(scope="module")
def qwen2_audio(tmp_path_factory) -> Path:
    from mmla.tiny import build_tiny_audio_model

    return build_tiny_audio_model("qwen2-audio", tmp_path_factory.mktemp("tiny-qwen2-audio"))


@pytest.fixture(scope="module")
def qwen3_omni(tmp_path_factory) -> Path:
    from mmla.tiny import build_tiny_audio_model

    return build_tiny_audio_model("qwen3-omni", tmp_path_factory.mktemp("tiny-qwen3-omni"))


@pytest.fixture(scope="module")
def root(tmp_path_factory, videos_dir) -> Path:
    """MELD test: demo_3 (speech), demo_9 (a silent AAC track), a synthetic clip without audio, a missing clip and a
    corrupt one; MUStARD test: a synthetic clip and the real clip without an audio track."""
    return make_video_root(tmp_path_factory.mktemp("audio-root"), videos_dir)


def _lines(p: Path) -> list[dict]:
    return [json.loads(line) for line in p.read_text().splitlines()]


# ---------------------------------------------------------------- decoding and cache


def test_decode_real_clips(videos_dir, tmp_path):
    s = A.AudioSetting(rate=16000, max_seconds=30.0)
    speech = A.decode_audio(videos_dir / SOUND, s)
    assert speech.has_track and speech.wave.dtype == np.float32 and speech.wave.ndim == 1
    assert abs(len(speech.wave) / 16000 - speech.duration) < 0.1  # the whole clip, resampled from 44.1 kHz
    assert np.abs(speech.wave).mean() > 1e-3
    zeros = A.decode_audio(videos_dir / DIGITAL_SILENCE, s)
    assert zeros.has_track and np.abs(zeros.wave).max() == 0.0  # a real track that holds silence
    none = A.decode_audio(videos_dir / NO_TRACK, s)
    assert not none.has_track and len(none.wave) == round(none.duration * 16000) and not none.wave.any()
    short = A.decode_audio(videos_dir / SOUND, A.AudioSetting(rate=8000, max_seconds=2.0))
    assert len(short.wave) == 16000  # cut at max_seconds, at the asked rate
    with pytest.raises(V.ClipError, match="missing"):
        A.decode_audio(tmp_path / "nope.mp4", s)
    with pytest.raises(V.ClipError, match="unreadable"):
        A.decode_audio(write_corrupt(tmp_path / "bad.mp4"), s)
    assert not A.decode_audio(write_clip(tmp_path / "synthetic.mp4"), s).has_track


def test_audio_cache(videos_dir, tmp_path):
    s = A.AudioSetting()
    cache = A.AudioCache.beside(V.FrameCache(tmp_path / "frames"))
    assert cache.root == tmp_path / "frames" / "audio"
    first = A.load_audio(videos_dir / SOUND, s, cache)
    again = A.load_audio(videos_dir / SOUND, s, cache)
    assert (cache.misses, cache.hits) == (1, 1) and again.cached and not first.cached
    assert np.array_equal(first.wave, again.wave) and again.has_track == first.has_track
    A.load_audio(videos_dir / SOUND, A.AudioSetting(max_seconds=3.0), cache)  # another setting: another entry
    assert cache.misses == 2
    off = A.AudioCache(tmp_path / "off", enabled=False)
    A.load_audio(videos_dir / SOUND, s, off)
    assert not (tmp_path / "off").exists()


# ---------------------------------------------------------------- the seam


@pytest.mark.parametrize("arch,modality", [("omni", "av"), ("omni", "audio"), ("qwen2_audio", "audio"),
                                           ("qwen3_omni", "av")])
def test_batched_equals_generate_one_at_a_time(arch, modality, request, videos_dir, tmp_path):
    """Speech, a silent track and a clip with no track, in one continuously batched run (the clip without audio
    comes first: with audio interleaved, a row without audio features before one with them is what breaks the
    thinker's rope index, and the silence policy avoids it)."""
    from mmla import engine
    from mmla.inputs import AudioInputs, make_inputs
    from mmla.models import load_model

    model, proc = load_model(request.getfixturevalue(arch), modality=modality, dtype="float32", device="cpu")
    inputs = make_inputs(model, proc, V.FRAME_SETTINGS["official-infer"], modality=modality)
    assert isinstance(inputs, AudioInputs)
    assert inputs.audio_setting.interleave == (modality == "av")  # the family's default: the omni models interleave
    cache = V.FrameCache(tmp_path / "fc")
    clips = [inputs.load(videos_dir / c, cache) for c in (NO_TRACK, SOUND, DIGITAL_SILENCE)]
    texts = inputs.chat(["Hi.", "What is going on here, seriously? Tell me.", "Okay then."], "official")
    rows = inputs.encode(texts, clips)
    ref = []
    for t, c in zip(texts, clips):
        o = inputs._process(t, c)
        extra = {"use_audio_in_video": True} if inputs.audio_setting.interleave else {}
        g = model.generate(**o, max_new_tokens=8, do_sample=False, **extra)
        ref.append(proc.tokenizer.decode(g[0, o["input_ids"].shape[1]:], skip_special_tokens=True))
    for bs in (1, 3):
        assert engine.generate(model, inputs, rows, max_new_tokens=8, batch_size=bs) == ref
    # the model hears: speech and silence give different next-token distributions
    with torch.inference_mode():
        lp = [model(**inputs.forward_kwargs(dict(inputs._process(texts[0], c)))).logits[0, -1] for c in clips[1:]]
    assert not torch.allclose(lp[0], lp[1], atol=1e-3)


def test_audio_only_model_refuses_video(qwen2_audio, root, tmp_path):
    with pytest.raises(ValueError, match="use --modality audio"):
        predict(PredictConfig(model=str(qwen2_audio), data=str(root), datasets=["MELD"], modality="av",
                              device="cpu", out=str(tmp_path / "x")), progress=False)


# ---------------------------------------------------------------- mmla predict


def _cfg(model, root, out, **kw):
    base = dict(model=str(model), data=str(root), datasets=["MELD,MUStARD"], max_new_tokens=6, batch_size=4,
                device="cpu", out=str(out))
    return PredictConfig(**{**base, **kw})


@pytest.mark.parametrize("modality", ["av", "audio"])
def test_predict_generate_batched_equals_one_at_a_time(omni, root, tmp_path, modality):
    fc = lambda: V.FrameCache(tmp_path / "fc")  # noqa: E731  a fresh object: per-run hit counts
    out = tmp_path / "run"
    res = predict(_cfg(omni, root, out, modality=modality), progress=False, frame_cache=fc())
    recs = {(r["dataset"], r["id"]): r for r in _lines(out / "predictions.jsonl")}
    assert len(recs) == 7
    # the policy: a clip without sound runs with silence and says so; missing and corrupt clips are clip errors
    assert recs[("MUStARD", "2_10")]["audio_track"] is False and recs[("MUStARD", "2_10")]["output"]
    assert "clip_error" not in recs[("MUStARD", "2_10")]
    assert recs[("MELD", "1_1")]["audio_track"] is True and recs[("MELD", "1_2")]["audio_track"] is True
    assert recs[("MELD", "1_3")]["audio_track"] is False
    assert recs[("MELD", "1_4")]["clip_error"].startswith("missing")
    assert recs[("MELD", "1_5")]["clip_error"].startswith("unreadable")
    assert res["missing_clips"] == 2 and res["silent_clips"] == 3
    assert res["silent_clips_per_dataset"] == {"MELD": 1, "MUStARD": 2}
    env = json.loads((out / "env.json").read_text())
    assert env["audio_setting"] == {"rate": 16000, "channels": 1, "max_seconds": 30.0,
                                    "interleave": modality == "av"}
    assert env["audio_cache_misses"] == 5 and env["silent_clips"] == 3
    assert (env.get("frame_setting") is not None) == (modality == "av")
    one = predict(_cfg(omni, root, tmp_path / "one", modality=modality, batch_size=1), progress=False,
                  frame_cache=fc())
    assert json.loads((tmp_path / "one" / "env.json").read_text())["audio_cache_hits"] == 5
    assert {(r["dataset"], r["id"]): r["output"] for r in _lines(tmp_path / "one" / "predictions.jsonl")} == \
        {k: r["output"] for k, r in recs.items()}
    assert one == res
    # resume: the finished rows are kept, the two bad clips retried; another audio setting is refused
    predict(_cfg(omni, root, out, modality=modality), progress=False, frame_cache=fc())
    assert len(_lines(out / "predictions.jsonl")) == 7
    with pytest.raises(ValueError, match="max_audio_seconds"):
        predict(_cfg(omni, root, out, modality=modality, max_audio_seconds=5.0), progress=False, frame_cache=fc())


@pytest.mark.parametrize("arch,modality", [("omni", "av"), ("qwen2_audio", "audio")])
def test_predict_score_batched_equals_one_at_a_time(arch, modality, request, root, tmp_path):
    model = request.getfixturevalue(arch)
    runs = {}
    for bs in (4, 1):
        out = tmp_path / f"bs{bs}"
        runs[bs] = predict(_cfg(model, root, out, modality=modality, mode="score", batch_size=bs), progress=False,
                           frame_cache=V.FrameCache(tmp_path / "fc"))
        recs = _lines(out / "predictions.jsonl")
        ok = [r for r in recs if "clip_error" not in r]
        assert len(ok) == 5 and all(r["output"] in candidates(r["dataset"], "infer_script", "test", "video")
                                    for r in ok)
        runs[bs] = (runs[bs], {(r["dataset"], r["id"]): r["output"] for r in recs})
    assert runs[4] == runs[1]


def test_cli_predict_av(omni, root, tmp_path):
    """The command a user (and the hidden check) runs."""
    out = tmp_path / "cli"
    r = subprocess.run([sys.executable, "-m", "mmla.cli", "predict", "--modality", "av", "--model", str(omni),
                        "--data", str(root), "--datasets", "MUStARD", "--split", "test", "--mode", "generate",
                        "--max-new-tokens", "4", "--batch-size", "2", "--out", str(out), "--device", "cpu",
                        "--no-progress"], capture_output=True, text=True, timeout=600,
                       env={**__import__("os").environ, "MMLA_FRAME_CACHE": str(tmp_path / "fc")})
    assert r.returncode == 0, r.stderr[-2000:]
    recs = _lines(out / "predictions.jsonl")
    assert {r["id"] for r in recs} == {"1_60", "2_10"}
    assert all(r["output"] and r["audio_track"] is False and r["video"] for r in recs)
    assert "clips without sound: 2" in r.stdout


# ---------------------------------------------------------------- training


@pytest.mark.parametrize("arch,modality", [("omni", "av"), ("qwen2_audio", "audio")])
def test_lora_sft_step(arch, modality, request, root, tmp_path):
    from safetensors.torch import load_file

    from mmla import training

    model = request.getfixturevalue(arch)
    cfg = training.make_config(dict(model=str(model), data=str(root), datasets=["MELD"], setting="sft",
                                    modality=modality, out=str(tmp_path / "t"), max_steps=1, per_device_batch_size=2,
                                    gradient_accumulation_steps=1, eval_steps=0, save_steps=1, lora_rank=4,
                                    lora_alpha=8, device="cpu", learning_rate=1e-2))
    res = training.train_one(cfg, cfg.datasets, tmp_path / "t", progress=False,
                             frame_cache=V.FrameCache(tmp_path / "fc"))
    assert res["steps"] == 1 and np.isfinite(res["train_loss"])
    names = list(load_file(str(Path(res["adapter"]) / "adapter_model.safetensors")))
    assert names and all(".language_model." in n for n in names)  # the audio and vision encoders stay frozen
    env = json.loads((tmp_path / "t" / "env.json").read_text())
    assert env["audio_setting"]["interleave"] == (modality == "av") and env["train_missing_clips"] == 1
    out = tmp_path / "p"
    predict(_cfg(model, root, out, modality=modality, adapter=res["adapter"], datasets=["MUStARD"]), progress=False,
            frame_cache=V.FrameCache(tmp_path / "fc"))
    assert all(r["output"] for r in _lines(out / "predictions.jsonl"))


@pytest.mark.parametrize("modality", ["video", "text"])
def test_omni_model_on_video_or_text_alone(omni, root, tmp_path, modality):
    """The ablation's other rows: the same omni model sees only the frames, or reads only the text; batched runs
    equal one row at a time."""
    outs = []
    for bs in (4, 1):
        out = tmp_path / f"bs{bs}"
        predict(_cfg(omni, root, out, modality=modality), progress=False, frame_cache=V.FrameCache(tmp_path / "fc"))
        recs = _lines(out / "predictions.jsonl")
        assert len(recs) == 7 and all("audio_track" not in r for r in recs)
        assert sum(bool(r.get("clip_error")) for r in recs) == (2 if modality == "video" else 0)
        outs.append({(r["dataset"], r["id"]): r["output"] for r in recs})
    assert outs[0] == outs[1]


@ONE_AT_A_TIME
def test_data_parallel_av_predict_equals_one_process(omni, root, tmp_path):
    """Two torchrun processes (gloo, CPU) share the rows; the merged predictions equal one process's."""
    import os

    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1] / "src"), "OMP_WAIT_POLICY": "PASSIVE",
           "TOKENIZERS_PARALLELISM": "false", "MMLA_FRAME_CACHE": str(tmp_path / "fc")}
    args = ["-m", "mmla.cli", "predict", "--modality", "av", "--model", str(omni), "--data", str(root), "--datasets",
            "MELD,MUStARD", "--max-new-tokens", "4", "--batch-size", "2", "--threads", "1", "--device", "cpu",
            "--no-progress"]
    one = subprocess.run([sys.executable, *args, "--out", str(tmp_path / "one")], env=env, capture_output=True,
                         text=True, timeout=600)
    two = subprocess.run([*TORCHRUN, *args, "--out", str(tmp_path / "two")], env=env, capture_output=True, text=True,
                         timeout=600)
    assert one.returncode == 0 and two.returncode == 0, (one.stderr[-1500:], two.stderr[-1500:])
    rows = {d: {(r["dataset"], r["id"]): (r["output"], r.get("audio_track"), r.get("clip_error"))
                for r in _lines(tmp_path / d / "predictions.jsonl")} for d in ("one", "two")}
    assert len(rows["two"]) == 7 and rows["one"] == rows["two"]
    metrics = json.loads((tmp_path / "two" / "metrics.json").read_text())
    assert metrics["silent_clips"] == 3 and metrics["missing_clips"] == 2


def test_omni_model_gets_one_system_prompt_and_budget_in_every_modality(omni):
    """The ablation's columns differ by the input only: the same system prompt and generation budget."""
    from mmla.backends.local import LocalBackend
    from mmla.inference import PredictConfig as P, decoding_for, resolved
    from mmla.inputs import make_inputs
    from mmla.models import load_model

    system, budgets = set(), set()
    for modality in ("text", "video", "audio", "av"):
        model, tok = load_model(omni, modality=modality, dtype="float32", device="cpu")
        inputs = make_inputs(model, tok, V.FRAME_SETTINGS["official-infer"], modality=modality)
        msgs = inputs.messages("hello", "official")
        content = msgs[0]["content"]
        system.add(content if isinstance(content, str) else content[0]["text"])
        res = resolved(P(model=str(omni), modality=modality))  # no paper row: the clean protocol's decoding
        budgets.add(decoding_for(P(), LocalBackend.of(model, inputs), res.family, res.protocol).max_new_tokens)
    assert system == {A.OMNI_SYSTEM} and len(budgets) == 1
