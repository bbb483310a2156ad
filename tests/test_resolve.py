"""The model-family table and the one resolver (mmla.resolve) against ../shared/OFFICIAL_MODELS.md: prompt variants and
chat text byte for byte, frame indices on the real clips against the official formulas, pixel shapes and visual
tokens per frame, decoding, output cleanup; then the paper's configs (configs/paper/) parse, resolve and run."""

import csv
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from transformers import GenerationConfig, LlamaConfig, Qwen2Config

from mmla import tiny, video
from mmla.inputs import make_inputs
from mmla.prompts import LLAMA3_SYSTEM, QWEN_SYSTEM, Decoding, render
from mmla.resolve import (MODEL_FAMILIES, PAPER_MODELS, clean_output, decoding_for, family_for, resolve_model)

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared"
PAPER_CONFIGS = sorted((REPO / "configs" / "paper").glob("*.yaml"))
NINE = ("qwen2", "llama3", "llama3.1", "internlm2.5", "qwen2-vl", "llava-onevision", "llava-video", "videollama2",
        "minicpm-v-2.6")

X = "I mean, why not?"
# The official strings, written out (OFFICIAL_MODELS.md section 0).
P_A = ("You are presented with a video in which the speaker says: I mean, why not?. Based on the text, video, and "
       "audio content, what is the sentiment of this speaker?\nThe candidate labels for sentiment are: "
       "[positive, negative].Respond in the format: 'sentiment: [label]'.  Only one label should be provided.")
P_B = ("You are presented with a video in which the speaker says: I mean, why not?. Based on the text, video, and "
       "audio content, what is the sentiment of this speaker?\nThe candidate labels for sentiment are: "
       "[neutral, positive, negative].Respond in the format: 'sentiment: [label]'. Only one label should be provided.")
P_C_MELD = ("You are presented with a video in which the speaker says: I mean, why not? Based on the text, video, and "
            "audio content, what is the emotion of this speaker?\nThe candidate labels for emotion are: [neutral, "
            "surprise, fear, sadness, joy, anger, disgust]. Respond in the format: 'emotion: [label]'. Only one label "
            "should be provided.")
P_C_AB = ("You are presented with a video in which the speaker says: I mean, why not? Based on the text, video, and "
          "audio content, what is the communication_behavior of this speaker?\nThe candidate labels for "
          "communication_behavior are: [neutral, change, sustain]. Respond in the format: 'communication_behavior: "
          "[label]'. Only one label should be provided.")
P_C_PRIME = ("You are presented with a video in which the speaker says: I mean, why not?.Based on the text, what is the "
             "emotion of this speaker?\nThe candidate labels for emotion are: [angry, happy, sad, neutral, frustrated, "
             "excited]. Respond in the format: 'emotion: [label]'.Only one label should be provided.")


# ---------------------------------------------------------------- the table


def test_the_table_covers_the_nine_families_and_every_paper_model():
    assert set(NINE) <= set(MODEL_FAMILIES)
    with open(SHARED / "paper" / "models.csv") as f:
        paper = [r["model"] for r in csv.DictReader(f)]
    assert set(paper) - set(PAPER_MODELS) == {"GPT-4o"}  # the API model has no official script
    prompts = {n: MODEL_FAMILIES[n].prompt for n in NINE}
    assert prompts == {"qwen2": "P-A", "llama3": "P-A", "llama3.1": "P-A", "internlm2.5": "P-A", "qwen2-vl": "P-A",
                       "llava-onevision": "P-B", "llava-video": "P-B", "videollama2": "P-A", "minicpm-v-2.6": "P-C"}
    routes = {n: MODEL_FAMILIES[n].route for n in NINE}
    assert routes["internlm2.5"] == routes["minicpm-v-2.6"] == "remote-code" and routes["videollama2"] == "unsupported"


def test_prompt_variants_byte_for_byte():
    fam = {n: MODEL_FAMILIES[n].prompt_family for n in NINE}
    assert render("Ch-sims", fam["qwen2-vl"], X) == render("Ch-sims", fam["videollama2"], X) == P_A
    assert render("Ch-sims", fam["llava-onevision"], X) == render("Ch-sims", fam["llava-video"], X) == P_B
    assert render("MELD", fam["minicpm-v-2.6"], X) == P_C_MELD
    assert render("AnnoMi-client", fam["minicpm-v-2.6"], X) == P_C_AB  # underscores kept
    assert render("IEMOCAP", fam["minicpm-v-2.6"], X) == P_C_PRIME


def _gc(**kw):
    return GenerationConfig(**kw)


def test_decoding_per_family_against_the_fact_sheet():
    qwen2 = _gc(do_sample=True, temperature=0.7, top_p=0.8, top_k=20, repetition_penalty=1.05)  # Qwen2-Instruct (ext)
    llama31 = _gc(do_sample=True, temperature=0.6, top_p=0.9)  # (ext)
    qvl = _gc(do_sample=True, top_k=1, top_p=0.001, temperature=0.1, repetition_penalty=1.05)  # Qwen2-VL (ext)
    llava = _gc(do_sample=True, temperature=0.7, top_k=20, top_p=0.8, repetition_penalty=1.05)  # LLaVA (ext)
    d = lambda name, g=None: decoding_for(MODEL_FAMILIES[name], "official", g, max_length=32768)  # noqa: E731
    assert d("qwen2", qwen2) == Decoding(True, 0.7, 0.8, 20, 1.05, 1024)
    assert d("llama3", qwen2) == Decoding(True, 0.6, 0.9, None, None, 256)
    assert d("llama3.1", llama31) == Decoding(True, 0.6, 0.9, None, None, 256)
    assert d("internlm2.5") == Decoding(True, 0.8, 0.8, None, None, 1024)
    assert d("qwen2-vl", qvl) == Decoding(True, 0.1, 0.001, 1, 1.05, 128)
    assert d("llava-onevision", llava) == d("llava-video", llava) == Decoding(False, None, None, None, 1.05, 1024)
    assert d("videollama2") == Decoding(False, None, None, None, None, 2048)
    assert d("minicpm-v-2.6") == Decoding(False, None, None, None, None, 32768)  # swift: up to the model's length
    assert decoding_for(MODEL_FAMILIES["qwen2"], "clean", qwen2) == Decoding()
    assert decoding_for(MODEL_FAMILIES["qwen2"], "official", qwen2, max_new_tokens=8).max_new_tokens == 8


def test_output_cleanup_and_the_whole_sequence_defect():
    head = "<|begin_of_text|><|start_header_id|>user<|end_header_id|>\n\nWhat?<|eot_id|>"
    out = clean_output(MODEL_FAMILIES["llama3.1"], "official", "\nsentiment: positive\n", head)
    assert out == "<|begin_of_text|><|start_header_id|>user<|end_header_id|>What?<|eot_id|>sentiment: positive"
    assert clean_output(MODEL_FAMILIES["internlm2.5"], "official", "Sentiment:\nPositive") == "sentiment:positive"
    assert clean_output(MODEL_FAMILIES["llava-video"], "official", " sentiment: positive\n") == "sentiment: positive"
    assert clean_output(MODEL_FAMILIES["qwen2-vl"], "official", " a\n") == " a\n"
    assert clean_output(MODEL_FAMILIES["llama3.1"], "clean", "x", head) == "x"


# ---------------------------------------------------------------- choosing a row


def test_rows_come_from_the_config_then_the_paper_model():
    real_llama3 = LlamaConfig(vocab_size=128256)
    real_llama31 = LlamaConfig(vocab_size=128256, rope_parameters={"rope_type": "llama3", "rope_theta": 5e5,
                                                                  "factor": 8.0, "low_freq_factor": 1.0,
                                                                  "high_freq_factor": 4.0,
                                                                  "original_max_position_embeddings": 8192})
    assert family_for(real_llama3).name == "llama3" and family_for(real_llama31).name == "llama3.1"
    assert family_for(Qwen2Config(vocab_size=151936)).name == "qwen2"
    small = LlamaConfig(vocab_size=49152)  # a test model with SmolLM2's tokenizer is not Llama-3 by itself
    assert family_for(small) is None
    assert family_for(small, "Llama-3.2-1B").name == "llama3.1"
    assert family_for(None, "Qwen2-1.5B").name == "qwen2"
    assert family_for(real_llama3, "Qwen2-VL-7B").name == "llama3"  # the config wins over another architecture
    assert family_for(None, "GPT-4o") is None and family_for(None, "not-a-paper-model") is None


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    made = {}

    def get(arch, real_size=False):
        key = (arch, real_size)
        if key not in made:
            out = tmp_path_factory.mktemp(arch.replace(".", "_"))
            if arch in ("llama", "qwen2"):
                from mmla.tiny import build_tiny_model

                made[key] = build_tiny_model(arch, out)
            else:
                made[key] = tiny.build_tiny_video_model(arch, out, real_size=real_size)
        return made[key]

    return get


def test_resolver_for_tiny_models(tiny_dir):
    r = resolve_model(tiny_dir("qwen2-vl"))
    assert (r.modality, r.family.name, r.protocol, r.prompt_family, r.note) == \
        ("video", "qwen2-vl", "official", "infer_script", None)
    r = resolve_model(tiny_dir("llava-onevision"))
    assert (r.family.name, r.prompt_family) == ("llava-onevision", "infer_script_llava")
    assert resolve_model(tiny_dir("llava-onevision"), paper_model="LLaVA-Video-7B").family.name == "llava-video"
    r = resolve_model(tiny_dir("internvl"))  # no paper row: official falls back to clean, and says so
    assert (r.protocol, r.prompt_family, r.family.name, r.family.official) == ("clean", "clean", "internvl", False)
    assert "no official setting" in r.note and "internvl" in r.note
    r = resolve_model(tiny_dir("llama"), paper_model="Llama-3-8B")
    assert (r.modality, r.family.name, r.protocol) == ("text", "llama3", "official")
    assert resolve_model(tiny_dir("llama"), protocol="clean", paper_model="Llama-3-8B").prompt_family == "clean"


# ---------------------------------------------------------------- chat text, byte for byte


def _load(path, video_model=True):
    from mmla.models import load_model

    return load_model(str(path), device="cpu", modality="video" if video_model else "text")


def test_text_chat_byte_for_byte(tiny_dir):
    model, tok = _load(tiny_dir("qwen2"), video_model=False)
    inputs = make_inputs(model, tok, None, MODEL_FAMILIES["qwen2"])
    # SmolLM2's template is ChatML, as Qwen2-Instruct's: the official Qwen2 script's text
    assert inputs.chat([P_A], "official") == [f"<|im_start|>system\n{QWEN_SYSTEM}<|im_end|>\n<|im_start|>user\n{P_A}"
                                              f"<|im_end|>\n<|im_start|>assistant\n"]
    # the messages each official LLM script hands to its chat template
    msgs = lambda name: make_inputs(model, tok, None, MODEL_FAMILIES[name]).messages(P_A, "official")  # noqa: E731
    assert msgs("llama3") == [{"role": "system", "content": LLAMA3_SYSTEM}, {"role": "user", "content": P_A}]
    assert msgs("llama3.1") == [{"role": "user", "content": P_A}]
    assert msgs("qwen2")[0]["content"] == QWEN_SYSTEM


def test_video_chat_byte_for_byte(tiny_dir):
    model, proc = _load(tiny_dir("qwen2-vl"))
    inputs = make_inputs(model, proc, video.FRAME_SETTINGS["qwen2-vl-infer"])
    assert inputs.chat([P_A], "official") == [
        "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n<|im_start|>user\n"
        f"<|vision_start|><|video_pad|><|vision_end|>{P_A}<|im_end|>\n<|im_start|>assistant\n"]
    model, proc = _load(tiny_dir("llava-onevision"))
    for name in ("llava-onevision", "llava-video"):
        inputs = make_inputs(model, proc, video.FRAME_SETTINGS["llava-infer"], MODEL_FAMILIES[name])
        official = ("<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n<|im_start|>user\n<image>"
                    f"{P_B}<|im_end|>\n<|im_start|>assistant\n")  # LLaVA-NeXT conv_qwen, <image> straight before
        # transformers' class takes the clip under the processor's video token where LLaVA-NeXT has <image>
        assert inputs.chat([P_B], "official") == [official.replace("<image>", proc.video_token)]
        assert inputs.chat([P_B], "clean")[0].startswith("<|im_start|>user <video>\n")  # the checkpoint's template


# ---------------------------------------------------------------- frames on the real clips


def _meta(path):
    import av

    with av.open(str(path)) as c:
        s = c.streams.video[0]
        return s.frames, float(s.average_rate)


def _official_indices(name, total, fps):
    if name in ("llava-infer", "qwen2-vl-infer"):  # LNX L140-162, QVL L149
        return np.linspace(0, total - 1, 4).astype(int).tolist()
    if name == "videollama2-infer":  # mm_utils.py L107-122
        seg = (total - 1) / 8
        return [int(np.round(seg * (i + 0.5) + 1e-6)) for i in range(8)]
    idx = list(range(0, total, round(fps)))  # ms-swift load_video_minicpmv_mplug_owl3
    if len(idx) > 64:
        gap = len(idx) / 64
        idx = [idx[int(i * gap + gap / 2)] for i in range(64)]
    return idx


def _raw_frame(path, index):
    import av

    with av.open(str(path)) as c:
        for i, f in enumerate(c.decode(video=0)):
            if i == index:
                return f.to_ndarray(format="rgb24")


@pytest.mark.parametrize("name", ["llava-infer", "videollama2-infer", "minicpm-infer", "qwen2-vl-infer"])
def test_frame_indices_and_sizes_on_real_clips(name, videos_dir):
    from PIL import Image

    setting = video.FRAME_SETTINGS[name]
    for clip in sorted(videos_dir.glob("*.mp4")):
        total, fps = _meta(clip)
        fr = video.decode_frames(clip, setting)
        assert fr.indices == _official_indices(name, total, fps), (clip.name, fr.indices)
        raw = _raw_frame(clip, fr.indices[1])
        h, w = raw.shape[:2]
        if name == "llava-infer":  # SigLipImageProcessor: 384x384, aspect ignored, PIL bicubic
            assert fr.array.shape == (4, 384, 384, 3)
            want = np.asarray(Image.fromarray(raw).resize((384, 384), Image.Resampling.BICUBIC))
            assert np.array_equal(fr.array[1], want)
        elif name == "videollama2-infer":  # CLIP: shortest side 336, then the centre 336x336
            assert fr.array.shape == (8, 336, 336, 3)
            th, tw = (336, int(336 * w / h)) if h <= w else (int(336 * h / w), 336)
            big = np.asarray(Image.fromarray(raw).resize((tw, th), Image.Resampling.BICUBIC))
            top, left = (th - 336) // 2, (tw - 336) // 2
            assert np.array_equal(fr.array[1], big[top:top + 336, left:left + 336])
        elif name == "minicpm-infer":  # full frames: MiniCPM-V's own slicer sizes them
            assert fr.array.shape == (len(fr.indices), h, w, 3) and np.array_equal(fr.array[1], raw)
        else:  # Qwen2-VL: a JPEG round trip, then <= 151,200 px in multiples of 28
            _, fh, fw, _ = fr.array.shape
            assert fh % 28 == 0 and fw % 28 == 0 and fh * fw <= 151200
            plain = video.decode_frames(clip, video.FRAME_SETTINGS["official-infer"])
            assert plain.array.shape == fr.array.shape and not np.array_equal(plain.array, fr.array)


# ---------------------------------------------------------------- pixel shapes and visual tokens per frame


def _row(inputs, clip, setting, prompt=P_B):
    fr = video.decode_frames(clip, setting)
    return fr, inputs.encode(inputs.chat([prompt], "official"), [fr])[0]


def test_llava_pixels_and_tokens_per_frame(tiny_dir, videos_dir):
    """OneVision: 4 x 196 + 1 newline; LLaVA-Video's own pooling: 4 x 182 (13 x 13 + a newline per row); the model
    takes exactly as many features as the processor placed tokens (a forward checks it)."""
    import torch

    from mmla.llava_video import use_llava_video_pooling

    clip = sorted(videos_dir.glob("*.mp4"))[0]
    setting = video.FRAME_SETTINGS["llava-infer"]
    for name, per_frame, extra in (("llava-onevision", 196, 1), ("llava-video", 182, 0)):
        model, proc = _load(tiny_dir("llava-onevision", real_size=True))
        if name == "llava-video":
            use_llava_video_pooling(model, proc)
        inputs = make_inputs(model, proc, setting, MODEL_FAMILIES[name])
        fr, row = _row(inputs, clip, setting)
        pixels = row.media["pixel_values_videos"]
        assert tuple(pixels.shape) == (1, 4, 3, 384, 384)
        want = torch.from_numpy(fr.array).permute(0, 3, 1, 2).float() / 255 * 2 - 1  # mean = std = 0.5, no resize
        assert torch.allclose(pixels[0], want, atol=1e-5)
        n = sum(t == proc.video_token_id for t in row.ids)
        assert n == 4 * per_frame + extra, name
        feats = model.model.get_video_features(pixel_values_videos=pixels).pooler_output
        assert feats.shape[1] == n
        with torch.no_grad():
            model(input_ids=torch.tensor([row.ids]), pixel_values_videos=pixels)


def test_qwen2_vl_pixels_and_tokens_per_frame(tiny_dir, videos_dir):
    model, proc = _load(tiny_dir("qwen2-vl"))
    inputs = make_inputs(model, proc, video.FRAME_SETTINGS["qwen2-vl-infer"])
    for clip in sorted(videos_dir.glob("*.mp4")):
        fr, row = _row(inputs, clip, inputs.setting, P_A)
        _, h, w, _ = fr.array.shape
        assert row.media["video_grid_thw"].tolist() == [[2, h // 14, w // 14]]  # 4 frames -> 2 temporal patches
        assert tuple(row.media["pixel_values_videos"].shape) == (2 * (h // 14) * (w // 14), 3 * 2 * 14 * 14)
        assert sum(t == proc.video_token_id for t in row.ids) == 2 * (h // 28) * (w // 28)


def test_clean_protocol_gives_qwen25_vl_the_clips_real_frame_rate(tiny_dir, videos_dir):
    model, proc = _load(tiny_dir("qwen2.5-vl"))
    inputs = make_inputs(model, proc, video.FRAME_SETTINGS["official-infer"])
    clip = sorted(videos_dir.glob("*.mp4"))[0]
    fr = video.decode_frames(clip, inputs.setting)
    official = inputs.encode(["<|video_pad|>x"], [fr])[0].media["second_per_grid_ts"].item()
    inputs.time_from_clip = True
    clean = inputs.encode(["<|video_pad|>x"], [fr])[0].media["second_per_grid_ts"].item()
    assert official == pytest.approx(2.0)  # told 1 fps whatever the clip
    assert clean == pytest.approx(2 / (4 / fr.total_frames * fr.video_fps), rel=1e-4)  # 4 frames over its duration


# ---------------------------------------------------------------- mmla predict --protocol official


@pytest.fixture(scope="module")
def chsims_root(tmp_path_factory, videos_dir):
    root = tmp_path_factory.mktemp("chsims")
    clips = sorted(videos_dir.glob("*.mp4"))
    for ds, rows in (("Ch-sims", [("a_1", "我很好。", "positive"), ("a_2", "还行吧", "neutral")]),
                     ("MELD", [("1_1", "Hi there.", "joy"), ("1_2", "No way!", "surprise")])):
        (root / ds / "video").mkdir(parents=True)
        (root / ds / "test.tsv").write_text("id\ttext\tlabel\n" + "".join(f"{i}\t{t}\t{l}\n" for i, t, l in rows))
        for k, (i, _, _) in enumerate(rows):
            shutil.copy(clips[k], root / ds / "video" / f"{ds}_{i}.mp4")
    return root


def _predict(model, root, out, **kw):
    from mmla.inference import PredictConfig, predict
    from mmla.video import FrameCache

    predict(PredictConfig(model=str(model), data=str(root), datasets=["Ch-sims"], max_new_tokens=3, threads=1,
                          device="cpu", out=str(out), **kw), progress=False, frame_cache=FrameCache(enabled=False))
    recs = [json.loads(line) for line in (out / "predictions.jsonl").read_text().splitlines()]
    return recs, json.loads((out / "env.json").read_text())


def test_predict_official_llava_renders_p_b_and_qwen2_vl_p_a(tiny_dir, chsims_root, tmp_path):
    recs, env = _predict(tiny_dir("llava-onevision"), chsims_root, tmp_path / "ov")
    assert recs[0]["prompt"] == render("Ch-sims", "infer_script_llava", recs[0]["text"])
    assert "[neutral, positive, negative]. Only one" not in recs[0]["prompt"]  # P-B: "].Respond", one space
    assert "[neutral, positive, negative].Respond in the format: 'sentiment: [label]'. Only one" in recs[0]["prompt"]
    assert (env["model_family"], env["protocol_applied"], env["frame_setting"]["name"]) == \
        ("llava-onevision", "official", "llava-infer")
    assert set(env["decoding"]) == {"do_sample", "temperature", "top_p", "top_k", "repetition_penalty",
                                    "max_new_tokens"} and env["decoding"]["do_sample"] is False
    assert all(r["output"] == r["output"].strip() for r in recs)  # the LLaVA script strips
    recs, env = _predict(tiny_dir("qwen2-vl"), chsims_root, tmp_path / "qvl")
    assert recs[0]["prompt"] == render("Ch-sims", "infer_script", recs[0]["text"])
    assert "[positive, negative].Respond in the format: 'sentiment: [label]'.  Only one" in recs[0]["prompt"]
    assert (env["model_family"], env["frame_setting"]["name"]) == ("qwen2-vl", "official-infer")


def test_predict_official_without_a_row_runs_clean_and_says_so(tiny_dir, chsims_root, tmp_path, capsys):
    recs, env = _predict(tiny_dir("internvl"), chsims_root, tmp_path / "ivl")
    err = capsys.readouterr().err
    assert sum("no official setting" in line for line in err.splitlines()) == 1
    assert env["protocol_applied"] == "clean" and "clean" in env["protocol_note"]
    assert recs[0]["prompt"] == render("Ch-sims", "clean", recs[0]["text"], modality="video")


# ---------------------------------------------------------------- configs/paper


def test_seventeen_paper_configs_parse_and_resolve():
    from mmla import paper
    from mmla.experiment import load_experiment

    assert len(PAPER_CONFIGS) == 17
    seen = set()
    for path in PAPER_CONFIGS:
        cfg = load_experiment(str(path))
        assert cfg.paper_model in paper.paper_models(), path.name
        seen.add(cfg.paper_model)
        served = cfg.predict.get("backend") == "openai"
        r = resolve_model(cfg.model, modality=cfg.predict["modality"], paper_model=cfg.paper_model, local=False,
                          trust_remote_code=bool(cfg.predict.get("trust_remote_code")))
        if cfg.paper_model == "GPT-4o":
            assert r.protocol == "clean" and r.note and served
            continue
        row = r.family
        assert r.protocol == "official" and cfg.paper_model in row.paper_models, path.name
        assert r.modality == row.modality == cfg.predict["modality"]
        assert cfg.stages[0] == "zero-shot" and set(cfg.stages) <= {"zero-shot", "sft", "it"}
        assert served == (row.route == "unsupported" or row.name == "minicpm-v-2.6"), path.name
        assert bool(cfg.predict.get("trust_remote_code")) == (row.route == "remote-code"), path.name
    with open(SHARED / "paper" / "models.csv") as f:
        assert seen == {r["model"] for r in csv.DictReader(f)}


NATIVE = {  # config -> the tiny architecture that stands in for its checkpoint
    "qwen2-0.5b.yaml": "qwen2", "qwen2-1.5b.yaml": "qwen2", "qwen2-7b.yaml": "qwen2", "llama-3-8b.yaml": "llama",
    "llama-3.1-8b.yaml": "llama", "llama-3.2-1b.yaml": "llama", "llama-3.2-3b.yaml": "llama",
    "qwen2-vl-7b.yaml": "qwen2-vl", "qwen2-vl-72b.yaml": "qwen2-vl", "llava-ov-7b.yaml": "llava-onevision",
    "llava-ov-72b.yaml": "llava-onevision", "llava-video-7b.yaml": "llava-onevision",
    "llava-video-72b.yaml": "llava-onevision",
}


@pytest.mark.parametrize("name", sorted(NATIVE))
def test_native_paper_config_runs_its_zero_shot_stage(name, tiny_dir, chsims_root, data_root, tmp_path):
    from mmla.experiment import load_experiment, run_zero_shot

    arch = NATIVE[name]
    text = arch in ("qwen2", "llama")
    over = [f"model={tiny_dir(arch, real_size=arch == 'llava-onevision')}", f"out={tmp_path}",
            f"data={data_root if text else chsims_root}", "datasets=Ch-sims", "stages=zero-shot", "predict.limit=2",
            "predict.max_new_tokens=3", "predict.threads=1", "predict.device=cpu", "predict.no_frame_cache=true"]
    cfg = load_experiment(str(REPO / "configs" / "paper" / name), over)
    run_zero_shot(cfg, progress=False)
    env = json.loads((tmp_path / "zero-shot" / "env.json").read_text())
    recs = [json.loads(x) for x in (tmp_path / "zero-shot" / "predictions.jsonl").read_text().splitlines()]
    row = MODEL_FAMILIES[PAPER_MODELS[cfg.paper_model]]
    assert len(recs) == 2
    assert (env["model_family"], env["protocol_applied"]) == (row.name, "official")
    assert all(r["prompt"] == render("Ch-sims", row.prompt_family, r["text"]) for r in recs)
    assert all(not r.get("clip_error") for r in recs)


def test_internlm_hello_turn_is_sampled_per_row_and_kept_in_the_context(tiny_dir, data_root, tmp_path):
    """InternLM2.5's official script chats "hello" first and keeps the sampled reply; the answer is lower-cased with
    newlines removed. The tiny Llama stands in (its config names no row: --paper-model picks InternLM's)."""
    from mmla.inference import PredictConfig, predict

    model, tok = _load(tiny_dir("llama"), video_model=False)
    inputs = make_inputs(model, tok, None, MODEL_FAMILIES["internlm2.5"])
    text = inputs.chat([P_A], "official", histories=[[("hello", "Hi!")]])[0]
    assert text == tok.apply_chat_template(
        [{"role": "system", "content": MODEL_FAMILIES["internlm2.5"].system}, {"role": "user", "content": "hello"},
         {"role": "assistant", "content": "Hi!"}, {"role": "user", "content": P_A}],
        tokenize=False, add_generation_prompt=True)
    outs = {}
    for batch in (1, 4):
        out = tmp_path / f"b{batch}"
        predict(PredictConfig(model=str(tiny_dir("llama")), data=str(data_root), datasets=["MOSI"], limit=3,
                              paper_model="InternLM2.5-7B", max_new_tokens=6, batch_size=batch, threads=1,
                              device="cpu", out=str(out)), progress=False)
        recs = [json.loads(x) for x in (out / "predictions.jsonl").read_text().splitlines()]
        env = json.loads((out / "env.json").read_text())
        assert env["model_family"] == "internlm2.5" and env["decoding"]["do_sample"] is True
        assert all(r["history"][0][0] == "hello" and r["history"][0][1] for r in recs)
        assert all(r["output"] == r["output"].lower() and "\n" not in r["output"] for r in recs)
        outs[batch] = {r["id"]: (r["history"][0][1], r["output"]) for r in recs}
    assert outs[1] == outs[4]  # seeded per row: the same replies and answers whatever the batch
    assert len({h for h, _ in outs[1].values()}) > 1  # sampled per row, not once for all
