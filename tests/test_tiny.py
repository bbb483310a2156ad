"""Tiny video models of every architecture in mmla.tiny: built offline, loaded through the Auto classes, fed
real decoded clips through the stock processor, and checked for batch invariance (left-padded batch of two
rows with different clip sizes and prompt lengths == each row alone) and for a hand-written prefill +
token-by-token decode loop reproducing `generate` (fp32 greedy).

The helpers here are the generic recipe the findings in mmla.tiny's docstring describe: nothing in them
names an architecture."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch

from mmla import tiny, video

PROMPTS = ["What is the emotion of the speaker?",
           "Choose one label from: happy, sad, angry, neutral, surprised, fearful, disgusted. Answer:"]
NEW_TOKENS = 6
# model_type, the placeholder in the chat text, the token the processor expands it into
EXPECTED = {"qwen2-vl": ("qwen2_vl", "<|video_pad|>", "<|video_pad|>"),
            "qwen2.5-vl": ("qwen2_5_vl", "<|video_pad|>", "<|video_pad|>"),
            "qwen3-vl": ("qwen3_vl", "<|video_pad|>", "<|video_pad|>"),
            "llava-onevision": ("llava_onevision", "<video>", "<video>"),
            "internvl": ("internvl", "<video>", "<IMG_CONTEXT>")}
LM_LINEAR = re.compile(r"^model\.language_model\.layers\.\d+\.(self_attn\.[qkvo]_proj|mlp\.(gate|up|down)_proj)$")

@pytest.fixture(scope="module")
def real_clips(videos_dir) -> list[Path]:
    """Two real clips of ../shared/data/videos (conftest: missing under CI is a failure, not a skip)."""
    clips = sorted(videos_dir.glob("*.mp4"))
    assert len(clips) >= 2, f"need two clips in {videos_dir}"
    return clips


def clips_for(processor, real_clips: list[Path]) -> tuple[list[video.Frames], dict]:
    """Two clips at two sizes, so vision token counts differ. Processors with a patch grid (Qwen family:
    `patch_size` x `merge_size` on the video processor) get frames sized by mmla to multiples of it and
    do_resize=False (their own default would upscale small frames to >= 128 merged patches); fixed-size
    processors (SigLIP, InternViT) resize the frames themselves."""
    vp = processor.video_processor
    factor = vp.patch_size * vp.merge_size if getattr(vp, "merge_size", None) else None
    settings = [video.FRAME_SETTINGS["official-infer"], video.frame_setting("official-infer", max_pixels=200 * 200)]
    if factor:
        settings = [video.frame_setting(s, factor=factor) for s in settings]
    frames = [video.load_frames(c, s) for c, s in zip(real_clips, settings)]
    return frames, ({"do_resize": False, "cap_pixels_per_frame": False} if factor else {})


def encode(processor, frames: video.Frames, prompt: str, **kwargs) -> dict:
    """One row: chat text with the video part, the stock processor on the decoded frames."""
    msgs = [{"role": "user", "content": [{"type": "video"}, {"type": "text", "text": prompt}]}]
    chat = processor.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)
    # Without metadata the processors assume 24 fps (Qwen2.5-VL time positions, Qwen3-VL timestamps).
    meta = {"fps": frames.video_fps, "frames_indices": frames.indices, "total_num_frames": frames.total_frames,
            "duration": frames.duration}
    return dict(processor(text=[chat], videos=[frames.array], video_metadata=[meta], do_sample_frames=False,
                          add_special_tokens=False, return_tensors="pt", **kwargs))


def pad_rows(rows: list[dict], pad_id: int) -> dict:
    """Per-token tensors (same length as input_ids) are left-padded; everything else is per video and
    concatenated along dim 0."""
    width = max(r["input_ids"].shape[1] for r in rows)
    out = {}
    for key in rows[0]:
        vals = [r[key] for r in rows]
        if all(v.ndim == 2 and v.shape[1] == r["input_ids"].shape[1] for v, r in zip(vals, rows)):
            fill = pad_id if key == "input_ids" else 0
            out[key] = torch.cat([torch.nn.functional.pad(v, (width - v.shape[1], 0), value=fill) for v in vals])
        else:
            out[key] = torch.cat(vals)
    return out


def greedy_loop(model, batch: dict, steps: int) -> list[list[int]]:
    """Prefill with explicit positions and a DynamicCache, then one token per step."""
    from transformers import DynamicCache

    mask = batch["attention_mask"]
    rope = getattr(model.model, "get_rope_index", None)
    if rope is not None:  # Qwen-VL family: 3-D (temporal, height, width) positions + a per-row offset
        kw = {k: batch[k] for k in ("mm_token_type_ids", "video_grid_thw", "second_per_grid_ts") if k in batch}
        positions, deltas = rope(batch["input_ids"], attention_mask=mask, **kw)
    else:
        positions, deltas = (mask.cumsum(-1) - 1).clamp(min=0), None
    cache = DynamicCache(config=model.config.get_text_config())
    inputs = dict(batch)
    tokens = []
    with torch.no_grad():
        for _ in range(steps):
            logits = model(**inputs, position_ids=positions, cache=cache, use_cache=True, logits_to_keep=1).logits
            tokens.append(logits[:, -1].argmax(-1))
            mask = torch.cat([mask, mask.new_ones(mask.shape[0], 1)], dim=1)
            positions = mask.sum(-1, keepdim=True) - 1
            if deltas is not None:
                positions = (positions + deltas).unsqueeze(0).expand(3, -1, -1)
            inputs = {"input_ids": tokens[-1][:, None], "attention_mask": mask}
    return torch.stack(tokens, dim=1).tolist()


@pytest.mark.parametrize("arch", tiny.TINY_VIDEO_ARCHS)
def test_tiny_video_model(arch, tmp_path, real_clips):
    from transformers import AutoConfig, AutoModelForImageTextToText, AutoProcessor

    torch.manual_seed(0)
    path = tiny.build_tiny_video_model(arch, tmp_path / arch)
    config = AutoConfig.from_pretrained(path)
    processor = AutoProcessor.from_pretrained(path)
    model = AutoModelForImageTextToText.from_pretrained(path, dtype=torch.float32).eval()
    model_type, _, expanded = EXPECTED[arch]
    assert config.model_type == model_type
    assert config.get_text_config().hidden_size == 64 and config.get_text_config().num_hidden_layers == 2

    clips, kwargs = clips_for(processor, real_clips)
    rows = [encode(processor, fr, p, **kwargs) for fr, p in zip(clips, PROMPTS)]
    if kwargs:  # the processor kept mmla's frame size: grid (t, h, w) in patches of the frames given
        patch = processor.video_processor.patch_size
        for r, fr in zip(rows, clips):
            assert [int(x) * patch for x in r["video_grid_thw"][0][1:]] == list(fr.array.shape[1:3])
    assert rows[0]["input_ids"].shape[1] != rows[1]["input_ids"].shape[1]
    vision_id = processor.tokenizer.convert_tokens_to_ids(expanded)
    for r in rows:
        assert r["input_ids"].shape == r["attention_mask"].shape
        assert int((r["input_ids"] == vision_id).sum()) >= 16  # one placeholder became the clip's tokens
    alone = [model.generate(**r, max_new_tokens=NEW_TOKENS, do_sample=False)[0, r["input_ids"].shape[1]:].tolist()
             for r in rows]
    batch = pad_rows(rows, processor.tokenizer.pad_token_id)
    out = model.generate(**batch, max_new_tokens=NEW_TOKENS, do_sample=False)
    batched = out[:, batch["input_ids"].shape[1]:].tolist()
    assert batched == alone
    assert greedy_loop(model, batch, NEW_TOKENS) == batched

    # LoRA on the language model only: its linear layers sit under model.language_model.
    from peft import LoraConfig, get_peft_model

    lm_linear = [n for n, m in model.named_modules() if isinstance(m, torch.nn.Linear) and LM_LINEAR.match(n)]
    assert len(lm_linear) == 2 * 7
    assert model.get_decoder() is model.model.language_model
    lora = get_peft_model(model, LoraConfig(r=4, target_modules=tiny.LM_LORA_TARGET))
    trained = [n for n, p in lora.named_parameters() if p.requires_grad]
    assert len(trained) == 2 * len(lm_linear) and all(".language_model.layers." in n for n in trained)


@pytest.mark.parametrize("arch", tiny.TINY_VIDEO_ARCHS)
def test_chat_text_has_one_video_placeholder(arch):
    _, processor = tiny.tiny_video_parts(arch)
    msgs = [{"role": "user", "content": [{"type": "video"}, {"type": "text", "text": "Which emotion?"}]}]
    chat = processor.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)
    assert chat.count(EXPECTED[arch][1]) == 1 and chat.rstrip().endswith("assistant")
    assert "Which emotion?" in chat


def test_unknown_arch_names_the_known_ones(tmp_path):
    with pytest.raises(ValueError, match="llava-onevision"):
        tiny.build_tiny_video_model("gpt-vision", tmp_path)


@pytest.fixture(scope="module")
def sft_root(tmp_path_factory, videos_dir):
    from video_fixtures import make_video_root

    return make_video_root(tmp_path_factory.mktemp("sft-data"), videos_dir)


@pytest.mark.parametrize("arch", tiny.TINY_VIDEO_ARCHS)
def test_every_architecture_trains_a_lora_step(arch, tmp_path, sft_root):
    """No code per model for training either: one LoRA SFT step on real-size-shaped inputs of real clips, through
    the one trainer; only the language model's linear layers get adapter weights."""
    from safetensors.torch import load_file

    from mmla import training
    from mmla.video import FrameCache

    path = tiny.build_tiny_video_model(arch, tmp_path / arch)
    cfg = training.make_config({"model": str(path), "data": str(sft_root), "datasets": "MELD", "max_steps": 1,
                                "per_device_batch_size": 2, "gradient_accumulation_steps": 1, "learning_rate": 5e-3,
                                "warmup_ratio": 0, "eval_steps": 0, "save_steps": 100, "device": "cpu",
                                "threads": 1, "out": str(tmp_path / "sft")})
    assert cfg.modality == "video"
    res = training.train(cfg, progress=False, frame_cache=FrameCache(tmp_path / "frames"))["MELD"]
    assert res["steps"] == 1 and res["train_loss"] > 0
    weights = load_file(tmp_path / "sft" / "adapter" / "adapter_model.safetensors")
    assert weights and all("language_model" in k for k in weights), sorted(weights)[:3]
    assert any(k.endswith("lora_B.weight") and v.abs().sum() > 0 for k, v in weights.items())
