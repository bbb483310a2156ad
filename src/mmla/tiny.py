"""Tiny random-init video-LLMs of real architectures, built offline with stock transformers classes, for tests.

`build_tiny_video_model(arch, out_dir)` writes a model (text hidden 64, 2 layers; a tiny vision tower) and a
processor assembled in code from the stock image/video processors, SmolLM2's tokenizer with the model's special
tokens added and a chat template that mirrors the real checkpoint's; `mmla.models.load_model(out_dir,
modality="video")` loads it through AutoModelForImageTextToText + AutoProcessor like a real checkpoint.
"""

from __future__ import annotations

import os
from pathlib import Path

MLLM_CLASSES = {"qwen2_vl": "Qwen2VLForConditionalGeneration", "qwen2_5_vl": "Qwen2_5_VLForConditionalGeneration"}
VISION_SPECIAL_TOKENS = ("<|vision_start|>", "<|vision_end|>", "<|image_pad|>", "<|video_pad|>")

# Qwen2-VL-7B-Instruct's chat template (used for the tiny test models; real checkpoints bring their own).
QWEN2_VL_CHAT_TEMPLATE = (
    "{% set image_count = namespace(value=0) %}{% set video_count = namespace(value=0) %}"
    "{% for message in messages %}{% if loop.first and message['role'] != 'system' %}"
    "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n{% endif %}"
    "<|im_start|>{{ message['role'] }}\n{% if message['content'] is string %}{{ message['content'] }}<|im_end|>\n"
    "{% else %}{% for content in message['content'] %}"
    "{% if content['type'] == 'image' or 'image' in content or 'image_url' in content %}"
    "{% set image_count.value = image_count.value + 1 %}{% if add_vision_id %}Picture {{ image_count.value }}: "
    "{% endif %}<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif content['type'] == 'video' or 'video' in content %}{% set video_count.value = video_count.value + 1 %}"
    "{% if add_vision_id %}Video {{ video_count.value }}: {% endif %}<|vision_start|><|video_pad|><|vision_end|>"
    "{% elif 'text' in content %}{{ content['text'] }}{% endif %}{% endfor %}<|im_end|>\n{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def _tiny_configs(arch: str, tok) -> object:
    from transformers import Qwen2VLConfig, Qwen2_5_VLConfig

    ids = tok.convert_tokens_to_ids(list(VISION_SPECIAL_TOKENS))
    text = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                num_key_value_heads=2, vocab_size=len(tok), max_position_embeddings=4096,
                rope_parameters={"rope_type": "default", "rope_theta": 1000000.0, "mrope_section": [2, 3, 3]},
                bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    special = dict(vision_start_token_id=ids[0], vision_end_token_id=ids[1], image_token_id=ids[2],
                   video_token_id=ids[3])
    if arch == "qwen2-vl":
        vision = dict(depth=2, embed_dim=32, hidden_size=64, num_heads=2, mlp_ratio=2, patch_size=14,
                      spatial_merge_size=2, temporal_patch_size=2)
        return Qwen2VLConfig(text_config=text, vision_config=vision, **special)
    if arch == "qwen2.5-vl":
        vision = dict(depth=2, hidden_size=32, intermediate_size=64, num_heads=2, out_hidden_size=64, patch_size=14,
                      spatial_merge_size=2, temporal_patch_size=2, window_size=56, fullatt_block_indexes=[1],
                      tokens_per_second=2)
        return Qwen2_5_VLConfig(text_config=text, vision_config=vision, **special)
    raise ValueError(f"unknown tiny video architecture '{arch}' (use qwen2-vl or qwen2.5-vl)")


def tiny_processor(arch: str = "qwen2-vl"):
    """A Qwen2-VL processor assembled in code: stock image + video processors, SmolLM2's tokenizer with the
    four vision tokens added, Qwen2-VL's chat template."""
    from transformers import (AutoTokenizer, Qwen2_5_VLProcessor, Qwen2VLImageProcessor, Qwen2VLProcessor,
                              Qwen2VLVideoProcessor)

    from .models import resolve as resolve_text

    tok = AutoTokenizer.from_pretrained(resolve_text("smollm2-135m"))
    tok.add_special_tokens({"additional_special_tokens": list(VISION_SPECIAL_TOKENS)})
    tok.padding_side = "left"
    cls = Qwen2_5_VLProcessor if arch == "qwen2.5-vl" else Qwen2VLProcessor
    return cls(image_processor=Qwen2VLImageProcessor(), tokenizer=tok, video_processor=Qwen2VLVideoProcessor(),
               chat_template=QWEN2_VL_CHAT_TEMPLATE)


def build_tiny_video_model(arch: str, out_dir: str | os.PathLike, seed: int = 0) -> Path:
    """Write a tiny random-init Qwen2-VL / Qwen2.5-VL (text hidden 64, 2 layers, mrope [2,3,3]; vision depth 2,
    width 32) with its processor to `out_dir`; `load_mllm(out_dir)` loads it."""
    import torch
    import transformers

    processor = tiny_processor(arch)
    config = _tiny_configs(arch, processor.tokenizer)
    torch.manual_seed(seed)
    model = getattr(transformers, MLLM_CLASSES[config.model_type])(config).eval()
    out = Path(out_dir)
    model.save_pretrained(out)
    processor.save_pretrained(out)
    return out


