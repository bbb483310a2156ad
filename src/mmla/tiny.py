"""Test and benchmark models: tiny random-init text models (`build_tiny_model`), configs of the paper's
real-size models (`real_size_config`, `real_size_video_config`), and tiny video-LLMs of several
transformers-native architectures, for tests and benchmarks.

`build_tiny_video_model(arch, out_dir)` writes a model (text hidden 64, 2 layers; a vision tower of depth 2,
width 32) built from the stock config/model classes, plus a processor assembled offline from the stock
image/video processor classes, SmolLM2's tokenizer with the architecture's special tokens added, and a chat
template that mirrors the real checkpoint's (video part included). `AutoConfig`, `AutoProcessor` and
`AutoModelForImageTextToText.from_pretrained(out_dir)` load it with no network and no remote code.

What generic code needs (transformers 5.24, measured on these models; tests/test_tiny.py is the recipe):

Chat text. `processor.apply_chat_template([{"role": "user", "content": [{"type": "video"}, {"type": "text",
"text": p}]}], tokenize=False, add_generation_prompt=True)` works for all; it leaves ONE placeholder:
  qwen2-vl / qwen2.5-vl  "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n<|im_start|>user\n
                         <|vision_start|><|video_pad|><|vision_end|>{p}<|im_end|>\n<|im_start|>assistant\n"
  qwen3-vl               same without the default system turn
  llava-onevision        "<|im_start|>user <video>\n{p}<|im_end|><|im_start|>assistant\n" (videos before text)
  internvl               "<|im_start|>user\n<video>\n{p}<|im_end|>\n<|im_start|>assistant\n"
The processor expands it: Qwen2/2.5 <|video_pad|> x t*h*w/4; Qwen3 "<{s:.1f} seconds><|vision_start|>
<|video_pad|> x h*w/4<|vision_end|>" per temporal patch, but 5.24 keeps the template's own outer
<|vision_start|>...<|vision_end|> too (the reference replaced the whole triple); LLaVA-OV <video> x
(frames * ceil(p/2)^2 + 1) for p = image_size/patch_size; InternVL "Frame{i}: <img><IMG_CONTEXT> x
image_seq_length</img>" joined by "\n".

Processor call. `processor(text=[chat], videos=[frames (T,H,W,3) uint8], video_metadata=[{"fps", "frames_indices",
"total_num_frames", "duration"}], do_sample_frames=False, add_special_tokens=False, return_tensors="pt")`:
  - do_sample_frames=False: Qwen3-VL samples frames by default (the others default to False); the `fps`
    kwarg is then ignored.
  - video_metadata: without it Qwen2.5-VL and Qwen3-VL assume 24 fps (second_per_grid_ts = 2/24, timestamps
    of frame_index/24). With it, second_per_grid_ts = temporal_patch / (len(indices)/total_frames*fps).
  - size: the Qwen video processors (they have `patch_size` and `merge_size`: 14x2, Qwen3 16x2) round sides
    to multiples of patch*merge; Qwen2/2.5 also upscale frames under 128*28*28 px (140x252 -> 252x448),
    Qwen3 bounds the whole clip instead (280x504 -> 288x512, 140x252 -> 128x256). Give them frames already
    sized to multiples of patch*merge and do_resize=False (Qwen3 raises on sides not multiples of 32);
    cap_pixels_per_frame=False silences a warning. LLaVA-OV / InternVL resize to their
    fixed square (config size); never pass do_resize=False there. Unknown kwargs are ignored by all.
  Keys (per row; L tokens, T frames):
    qwen2-vl     input_ids, attention_mask, mm_token_type_ids (1,L); pixel_values_videos (t*h*w, 3*2*14*14);
                 video_grid_thw (1,3)
    qwen2.5-vl   the same + second_per_grid_ts (1,)
    qwen3-vl     as qwen2-vl, pixel_values_videos (t*h*w, 3*2*16*16)
    llava-ov     input_ids, attention_mask (1,L); pixel_values_videos (1,T,3,S,S)
    internvl     input_ids, attention_mask (1,L); pixel_values (T,3,S,S) (videos go in `pixel_values`)
  Batching: per-token tensors (input_ids with pad id, attention_mask and mm_token_type_ids with 0) are
  left-padded; everything else is concatenated along dim 0. LLaVA-OV needs the same T in a batch (one
  (B,T,...) tensor); rows of InternVL (4+6 frames -> pixel_values (10,...)) and Qwen mix T freely. One
  processor call with several videos of different T fails for LLaVA-OV and InternVL (it stacks them). The saved
  tokenizer loads with padding_side "right": pad yourself or set it.

Generation. `model.generate(**row)` works; a left-padded batch of 2 (different clip sizes and prompt
lengths) gives the same greedy tokens as each row alone (fp32) for every arch.

Manual decoding. Prefill `model(**batch, position_ids=P, cache=DynamicCache(config=model.config.
get_text_config()), use_cache=True, logits_to_keep=1)`, then steps with input_ids (B,1), the mask extended
by a column of ones and positions given, reproduces generate exactly. `cache` is the 5.24 name
(`past_key_values` still works with a deprecation warning, removal planned in 5.40).
  - Qwen family (`hasattr(model.model, "get_rope_index")`): P, deltas = model.model.get_rope_index(input_ids,
    mm_token_type_ids, image_grid_thw=None, video_grid_thw=None, [second_per_grid_ts (2.5 only; the others
    swallow it in **kwargs)], attention_mask=None) -> P (3,B,L), deltas (B,1); each decode step
    P = (mask.sum(-1, keepdim=True) - 1 + deltas) expanded to (3,B,1). mm_token_type_ids is not needed
    after the prefill. Same for Qwen3-VL.
  - Others: P = (mask.cumsum(-1) - 1).clamp(min=0), then mask.sum(-1, keepdim=True) - 1 per step.

LoRA on the language model only. `model.get_decoder() is model.model.language_model` for all five; its
Linear layers are model.language_model.layers.N.{self_attn.[qkvo]_proj, mlp.(gate|up|down)_proj}. The
vision side also has q_proj/k_proj/v_proj (SigLIP, InternViT) or mlp.*_proj (Qwen2.5-VL), so target by the
full-name regex LM_LORA_TARGET (peft fullmatches a string target_modules),
never by bare names. lm_head is top-level.

Not here: SmolVLM (its processor needs the `num2words` package, not installed).
"""

from __future__ import annotations

import os
from pathlib import Path

TINY_VIDEO_ARCHS = ("qwen2-vl", "qwen2.5-vl", "qwen3-vl", "llava-onevision", "internvl")

# peft target_modules for LoRA on the language model only (peft fullmatches a string against module names).
LM_LORA_TARGET = r"^model\.language_model\..*\.(q|k|v|o|gate|up|down)_proj$"
QWEN_VISION_TOKENS = ("<|vision_start|>", "<|vision_end|>", "<|image_pad|>", "<|video_pad|>")

# Qwen2-VL-7B-Instruct / Qwen2.5-VL-7B-Instruct: a default system prompt when the first turn is not one.
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

# Qwen3-VL-*-Instruct (tools and reasoning branches left out): no default system prompt; the processor turns
# the single <|video_pad|> into "<t seconds><|vision_start|><|video_pad|>*n<|vision_end|>" per temporal patch.
QWEN3_VL_CHAT_TEMPLATE = (
    "{%- if messages[0].role == 'system' %}{{- '<|im_start|>system\\n' }}{%- if messages[0].content is string %}"
    "{{- messages[0].content }}{%- else %}{%- for content in messages[0].content %}{%- if 'text' in content %}"
    "{{- content.text }}{%- endif %}{%- endfor %}{%- endif %}{{- '<|im_end|>\\n' }}{%- endif %}"
    "{%- set image_count = namespace(value=0) %}{%- set video_count = namespace(value=0) %}"
    "{%- for message in messages %}{%- if message.role == 'user' or message.role == 'assistant' %}"
    "{{- '<|im_start|>' + message.role + '\\n' }}{%- if message.content is string %}{{- message.content }}"
    "{%- else %}{%- for content in message.content %}"
    "{%- if content.type == 'image' or 'image' in content or 'image_url' in content %}"
    "{%- set image_count.value = image_count.value + 1 %}{%- if add_vision_id %}Picture {{ image_count.value }}: "
    "{% endif -%}<|vision_start|><|image_pad|><|vision_end|>"
    "{%- elif content.type == 'video' or 'video' in content %}{%- set video_count.value = video_count.value + 1 %}"
    "{%- if add_vision_id %}Video {{ video_count.value }}: {% endif -%}<|vision_start|><|video_pad|><|vision_end|>"
    "{%- elif 'text' in content %}{{- content.text }}{%- endif %}{%- endfor %}{%- endif %}{{- '<|im_end|>\\n' }}"
    "{%- endif %}{%- endfor %}{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}"
)

# llava-hf/llava-onevision-qwen2-*-hf: images, then videos, then "\n" + each text part.
LLAVA_ONEVISION_CHAT_TEMPLATE = (
    "{% for message in messages %}{{'<|im_start|>' + message['role'] + ' '}}"
    "{% for content in message['content'] | selectattr('type', 'equalto', 'image') %}{{ '<image>' }}{% endfor %}"
    "{% for content in message['content'] | selectattr('type', 'equalto', 'video') %}{{ '<video>' }}{% endfor %}"
    "{% if message['role'] != 'assistant' %}"
    "{% for content in message['content'] | selectattr('type', 'equalto', 'text') %}{{ '\\n' + content['text'] }}"
    "{% endfor %}{% else %}{% for content in message['content'] | selectattr('type', 'equalto', 'text') %}"
    "{% generation %}{{ '\\n' + content['text'] }}{% endgeneration %}{% endfor %}{% endif %}{{'<|im_end|>'}}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)

# OpenGVLab/InternVL3-*-hf (transformers' conversion script): "<video>\n" before the text.
INTERNVL_CHAT_TEMPLATE = (
    "{% for message in messages %}{{'<|im_start|>' + message['role'] + '\\n'}}"
    "{% if message['content'] is string %}{{ message['content'] }}{% else %}"
    "{% for content in message['content'] %}{% if content['type'] == 'image' %}{{ '<IMG_CONTEXT>\\n' }}"
    "{% elif content['type'] == 'video' %}{{ '<video>\\n' }}{% elif content['type'] == 'text' %}"
    "{{ content['text'] }}{% endif %}{% endfor %}{% endif %}{{'<|im_end|>\\n'}}{% endfor %}"
    "{% if add_generation_prompt %}{{'<|im_start|>assistant\\n' }}{% endif %}"
)
INTERNVL_TOKENS = {"start_image_token": "<img>", "end_image_token": "</img>",
                   "context_image_token": "<IMG_CONTEXT>", "video_token": "<video>"}


def _tokenizer(extra: list[str] | None = None, named: dict[str, str] | None = None):
    """SmolLM2's tokenizer with the architecture's special tokens added (named ones become attributes)."""
    from transformers import AutoTokenizer

    from .models import resolve

    tok = AutoTokenizer.from_pretrained(resolve("smollm2-135m"), extra_special_tokens=named or None)
    tokens = list(extra or []) + list((named or {}).values())
    tok.add_special_tokens({"extra_special_tokens": tokens}, replace_extra_special_tokens=False)
    tok.padding_side = "left"
    return tok


def _text(tok, **extra) -> dict:
    return dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                num_key_value_heads=2, vocab_size=len(tok), max_position_embeddings=4096,
                bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id,
                **extra)


def _qwen(arch: str):
    import transformers as tf

    tok = _tokenizer(list(QWEN_VISION_TOKENS))
    ids = tok.convert_tokens_to_ids(list(QWEN_VISION_TOKENS))
    special = dict(vision_start_token_id=ids[0], vision_end_token_id=ids[1], image_token_id=ids[2],
                   video_token_id=ids[3])
    rope = {"rope_type": "default", "rope_theta": 1000000.0, "mrope_section": [2, 3, 3]}
    if arch == "qwen3-vl":
        text = _text(tok, head_dim=16, rope_parameters={**rope, "mrope_interleaved": True})
        vision = dict(depth=2, hidden_size=32, intermediate_size=64, num_heads=2, out_hidden_size=64, patch_size=16,
                      spatial_merge_size=2, temporal_patch_size=2, num_position_embeddings=64,
                      deepstack_visual_indexes=[0])
        config = tf.Qwen3VLConfig(text_config=text, vision_config=vision, **special)
        processor = tf.Qwen3VLProcessor(image_processor=tf.Qwen2VLImageProcessor(
            patch_size=16, image_mean=[0.5] * 3, image_std=[0.5] * 3), tokenizer=tok,
                                        video_processor=tf.Qwen3VLVideoProcessor(),
                                        chat_template=QWEN3_VL_CHAT_TEMPLATE)
        return config, processor
    text = _text(tok, rope_parameters=rope)
    if arch == "qwen2-vl":
        vision = dict(depth=2, embed_dim=32, hidden_size=64, num_heads=2, mlp_ratio=2, patch_size=14,
                      spatial_merge_size=2, temporal_patch_size=2)
        config, cls = tf.Qwen2VLConfig(text_config=text, vision_config=vision, **special), tf.Qwen2VLProcessor
    else:
        vision = dict(depth=2, hidden_size=32, intermediate_size=64, num_heads=2, out_hidden_size=64, patch_size=14,
                      spatial_merge_size=2, temporal_patch_size=2, window_size=56, fullatt_block_indexes=[1],
                      tokens_per_second=2)
        config, cls = tf.Qwen2_5_VLConfig(text_config=text, vision_config=vision, **special), tf.Qwen2_5_VLProcessor
    processor = cls(image_processor=tf.Qwen2VLImageProcessor(), tokenizer=tok,
                    video_processor=tf.Qwen2VLVideoProcessor(), chat_template=QWEN2_VL_CHAT_TEMPLATE)
    return config, processor


def _llava_onevision(real_size: bool = False):
    import transformers as tf

    tok = _tokenizer(["<image>", "<video>"])
    side, patch = 64, 8  # SigLIP 8x8 patches per frame, pooled 2x2 -> 16 video tokens per frame
    if real_size:  # the checkpoints' geometry: 384 px SigLIP, 14 px patches, 27x27 features, mean = std = 0.5
        side, patch = 384, 14
    vision = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                  image_size=side, patch_size=patch)
    config = tf.LlavaOnevisionConfig(
        text_config={"model_type": "qwen2", **_text(tok, tie_word_embeddings=False)},
        vision_config={"model_type": "siglip_vision_model", **vision},
        image_token_index=tok.convert_tokens_to_ids("<image>"), video_token_index=tok.convert_tokens_to_ids("<video>"),
        image_grid_pinpoints=[[side, side], [side, 2 * side], [2 * side, side], [2 * side, 2 * side]],
        vision_feature_select_strategy="full", vision_feature_layer=-1)
    size = {"height": side, "width": side}
    norm = dict(image_mean=[0.5] * 3, image_std=[0.5] * 3) if real_size else {}
    processor = tf.LlavaOnevisionProcessor(
        image_processor=tf.LlavaOnevisionImageProcessor(size=size, image_grid_pinpoints=config.image_grid_pinpoints,
                                                        **norm),
        video_processor=tf.LlavaOnevisionVideoProcessor(size=size, **norm), tokenizer=tok,
        num_image_tokens=(side // patch) ** 2, vision_feature_select_strategy="full",
        chat_template=LLAVA_ONEVISION_CHAT_TEMPLATE)
    return config, processor


def _internvl():
    import transformers as tf

    tok = _tokenizer(named=INTERNVL_TOKENS)
    side, patch = 64, 8  # 8x8 patches per frame, pixel-shuffled by 0.5 -> 16 tokens per frame
    vision = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                  image_size=[side, side], patch_size=[patch, patch])
    config = tf.InternVLConfig(
        text_config={"model_type": "qwen2", **_text(tok, tie_word_embeddings=False)}, vision_config=vision,
        image_token_id=tok.convert_tokens_to_ids("<IMG_CONTEXT>"), image_seq_length=(side // patch) ** 2 // 4,
        downsample_ratio=0.5, tie_word_embeddings=False)
    size = {"height": side, "width": side}
    processor = tf.InternVLProcessor(
        image_processor=tf.GotOcr2ImageProcessor(size=size), video_processor=tf.InternVLVideoProcessor(size=size),
        tokenizer=tok, image_seq_length=config.image_seq_length, chat_template=INTERNVL_CHAT_TEMPLATE)
    return config, processor


def tiny_video_parts(arch: str, real_size: bool = False):
    """(config, processor) of a tiny model of `arch` (one of TINY_VIDEO_ARCHS), nothing written. `real_size`
    (llava-onevision): the real checkpoints' image geometry, so that token counts per frame are the real ones."""
    if arch in ("qwen2-vl", "qwen2.5-vl", "qwen3-vl"):
        return _qwen(arch)
    if arch == "llava-onevision":
        return _llava_onevision(real_size)
    if arch == "internvl":
        return _internvl()
    raise ValueError(f"unknown tiny video architecture '{arch}' (known: {', '.join(TINY_VIDEO_ARCHS)})")


def build_tiny_video_model(arch: str, out_dir: str | os.PathLike, seed: int = 0, real_size: bool = False) -> Path:
    """Write a tiny random-init `arch` model and its processor to `out_dir` (fp32 safetensors)."""
    from transformers import AutoModelForImageTextToText

    return _save(AutoModelForImageTextToText, *tiny_video_parts(arch, real_size), out_dir, seed)


# ---------------------------------------------------------------- text models: tiny, and real-size configs


def real_size_config(arch: str):
    """Configs of the paper's text models, for random-init speed benchmarks (no weights needed)."""
    from transformers import LlamaConfig, Qwen2Config

    if arch == "qwen2-1.5b":  # Qwen2-1.5B-Instruct
        return Qwen2Config(
            hidden_size=1536, intermediate_size=8960, num_hidden_layers=28, num_attention_heads=12,
            num_key_value_heads=2, vocab_size=151936, tie_word_embeddings=True, max_position_embeddings=32768,
            rope_parameters={"rope_type": "default", "rope_theta": 1000000.0}, rms_norm_eps=1e-6,
            bos_token_id=151643, eos_token_id=151645,
        )
    if arch == "llama3-8b":  # Meta-Llama-3-8B-Instruct
        return LlamaConfig(
            hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
            num_key_value_heads=8, vocab_size=128256, tie_word_embeddings=False, max_position_embeddings=8192,
            rope_parameters={"rope_type": "default", "rope_theta": 500000.0}, rms_norm_eps=1e-5,
            bos_token_id=128000, eos_token_id=128009,
        )
    raise ValueError(f"unknown architecture '{arch}' (use qwen2-1.5b or llama3-8b)")


def real_size_video_config(arch: str = "qwen2-vl-7b"):
    """Qwen2-VL-7B-Instruct's architecture, for random-init speed benchmarks (no weights needed)."""
    from transformers import Qwen2VLConfig

    if arch != "qwen2-vl-7b":
        raise ValueError(f"unknown architecture '{arch}' (use qwen2-vl-7b)")
    return Qwen2VLConfig(
        text_config=dict(hidden_size=3584, intermediate_size=18944, num_hidden_layers=28, num_attention_heads=28,
                         num_key_value_heads=4, vocab_size=152064, max_position_embeddings=32768, rms_norm_eps=1e-6,
                         rope_parameters={"rope_type": "default", "rope_theta": 1000000.0,
                                          "mrope_section": [16, 24, 24]},
                         bos_token_id=151643, eos_token_id=151645),
        vision_config=dict(depth=32, embed_dim=1280, hidden_size=3584, num_heads=16, mlp_ratio=4, patch_size=14,
                           spatial_merge_size=2, temporal_patch_size=2),
        image_token_id=151655, video_token_id=151656, vision_start_token_id=151652, vision_end_token_id=151653,
    )


def build_tiny_model(arch: str, out_dir: str | os.PathLike, seed: int = 0, max_positions: int = 2048) -> Path:
    """Write a tiny random-init model (hidden 64, 2 layers, a context of `max_positions` tokens) with SmolLM2's
    tokenizer to `out_dir`. Every test model borrows that tokenizer: its 49152 ids also fit the real Qwen2 and
    Llama-3 vocabularies."""
    import torch
    from transformers import AutoModelForCausalLM, LlamaConfig, Qwen2Config

    from .models import load_tokenizer, resolve

    tokenizer = load_tokenizer(resolve("smollm2-135m"))
    common = dict(
        hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
        vocab_size=len(tokenizer), max_position_embeddings=max_positions, bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
    )
    if arch == "llama":
        config = LlamaConfig(**common)
    elif arch == "qwen2":
        config = Qwen2Config(**common, tie_word_embeddings=True)
    else:
        raise ValueError(f"unknown tiny architecture '{arch}' (use llama or qwen2)")
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    out = Path(out_dir)
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out


# ---------------------------------------------------------------- audio-capable models
# Qwen2.5-Omni-7B's thinker, Qwen3-Omni's thinker (MoE text model, 4 experts) and Qwen2-Audio-7B-Instruct, tiny: the stock config/model/processor classes, SmolLM2's
# tokenizer with the named audio/vision tokens the processors read as attributes. The audio encoders are
# initialised with std 0.2 (the stock 0.02 makes a 2-layer encoder's output nearly the same for speech and
# silence, so a test could not tell whether the audio reached the model).

TINY_AUDIO_ARCHS = ("qwen2.5-omni", "qwen3-omni", "qwen2-audio")
AUDIO_INIT_RANGE = 0.2

OMNI_TOKENS = {"image_token": "<|IMAGE|>", "audio_token": "<|AUDIO|>", "video_token": "<|VIDEO|>",
               "vision_bos_token": "<|vision_bos|>", "vision_eos_token": "<|vision_eos|>",
               "audio_bos_token": "<|audio_bos|>", "audio_eos_token": "<|audio_eos|>"}

# Qwen2.5-Omni-7B's chat template: audio, image and video parts in place, a default system turn.
QWEN2_5_OMNI_CHAT_TEMPLATE = (
    "{% for message in messages %}{% if loop.first and message['role'] != 'system' %}"
    "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n{% endif %}"
    "<|im_start|>{{ message['role'] }}\n{% if message['content'] is string %}{{ message['content'] }}<|im_end|>\n"
    "{% else %}{% for content in message['content'] %}"
    "{% if content['type'] == 'image' or 'image' in content or 'image_url' in content %}"
    "<|vision_bos|><|IMAGE|><|vision_eos|>"
    "{% elif content['type'] == 'audio' or 'audio' in content or 'audio_url' in content %}"
    "<|audio_bos|><|AUDIO|><|audio_eos|>"
    "{% elif content['type'] == 'video' or 'video' in content %}<|vision_bos|><|VIDEO|><|vision_eos|>"
    "{% elif content['type'] == 'text' %}{{ content['text'] }}{% endif %}{% endfor %}<|im_end|>\n{% endif %}"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)

# Qwen2-Audio-7B-Instruct's chat template ("Audio N: " before each clip); the type test is added so that a part
# written {"type": "audio"} (no file) renders too.
QWEN2_AUDIO_CHAT_TEMPLATE = (
    "{% set audio_count = namespace(value=0) %}{% for message in messages %}"
    "{% if loop.first and message['role'] != 'system' %}<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"
    "{% endif %}<|im_start|>{{ message['role'] }}\n{% if message['content'] is string %}"
    "{{ message['content'] }}<|im_end|>\n{% else %}{% for content in message['content'] %}"
    "{% if content['type'] == 'audio' or 'audio' in content or 'audio_url' in content %}"
    "{% set audio_count.value = audio_count.value + 1 %}Audio {{ audio_count.value }}: "
    "<|audio_bos|><|AUDIO|><|audio_eos|>\n{% elif 'text' in content %}{{ content['text'] }}{% endif %}{% endfor %}"
    "<|im_end|>\n{% endif %}{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def _audio_encoder(**extra) -> dict:
    return dict(num_mel_bins=128, encoder_layers=2, encoder_attention_heads=2, encoder_ffn_dim=64, d_model=32,
                initializer_range=AUDIO_INIT_RANGE, **extra)


def _qwen2_5_omni():
    import transformers as tf

    tok = _tokenizer(named=OMNI_TOKENS)
    tid = lambda name: tok.convert_tokens_to_ids(OMNI_TOKENS[name])  # noqa: E731
    text = _text(tok, rope_parameters={"rope_type": "default", "rope_theta": 1000000.0, "mrope_section": [2, 3, 3]})
    vision = dict(depth=2, hidden_size=32, intermediate_size=64, num_heads=2, out_hidden_size=64, patch_size=14,
                  spatial_merge_size=2, temporal_patch_size=2, window_size=56, fullatt_block_indexes=[1])
    config = tf.Qwen2_5OmniThinkerConfig(
        audio_config=_audio_encoder(max_source_positions=1500, n_window=100, output_dim=64), vision_config=vision,
        text_config=text, audio_token_index=tid("audio_token"), image_token_index=tid("image_token"),
        video_token_index=tid("video_token"), audio_start_token_id=tid("audio_bos_token"),
        audio_end_token_id=tid("audio_eos_token"), vision_start_token_id=tid("vision_bos_token"),
        vision_end_token_id=tid("vision_eos_token"), user_token_id=tok.convert_tokens_to_ids("user"))
    processor = tf.Qwen2_5OmniProcessor(
        image_processor=tf.Qwen2VLImageProcessor(), video_processor=tf.Qwen2VLVideoProcessor(),
        feature_extractor=tf.WhisperFeatureExtractor(feature_size=128, chunk_length=300), tokenizer=tok,
        chat_template=QWEN2_5_OMNI_CHAT_TEMPLATE)
    return config, processor


QWEN3_OMNI_TOKENS = {"image_token": "<|image_pad|>", "audio_token": "<|audio_pad|>", "video_token": "<|video_pad|>",
                     "vision_bos_token": "<|vision_start|>", "vision_eos_token": "<|vision_end|>",
                     "audio_bos_token": "<|audio_start|>", "audio_eos_token": "<|audio_end|>"}
# Qwen3-Omni's instruct template as far as mmla uses it: Qwen3-VL's, with audio parts.
QWEN3_OMNI_CHAT_TEMPLATE = QWEN3_VL_CHAT_TEMPLATE.replace(
    "{%- elif content.type == 'video'",
    "{%- elif content.type == 'audio' or 'audio' in content %}<|audio_start|><|audio_pad|><|audio_end|>"
    "{%- elif content.type == 'video'")


def _qwen3_omni():
    import transformers as tf

    tok = _tokenizer(named=QWEN3_OMNI_TOKENS)
    tid = lambda name: tok.convert_tokens_to_ids(QWEN3_OMNI_TOKENS[name])  # noqa: E731
    rope = {"rope_type": "default", "rope_theta": 1000000.0, "mrope_section": [2, 3, 3], "mrope_interleaved": True}
    text = _text(tok, head_dim=16, rope_parameters=rope, moe_intermediate_size=32, num_experts=4,
                 num_experts_per_tok=2, decoder_sparse_step=1)
    vision = dict(depth=2, hidden_size=32, intermediate_size=64, num_heads=2, out_hidden_size=64, patch_size=16,
                  spatial_merge_size=2, temporal_patch_size=2, num_position_embeddings=64, deepstack_visual_indexes=[0])
    config = tf.Qwen3OmniMoeThinkerConfig(
        audio_config=_audio_encoder(output_dim=64, downsample_hidden_size=16), vision_config=vision, text_config=text,
        audio_token_id=tid("audio_token"), image_token_id=tid("image_token"), video_token_id=tid("video_token"),
        audio_start_token_id=tid("audio_bos_token"), vision_start_token_id=tid("vision_bos_token"),
        user_token_id=tok.convert_tokens_to_ids("user"))
    processor = tf.Qwen3OmniMoeProcessor(
        image_processor=tf.Qwen2VLImageProcessor(patch_size=16), video_processor=tf.Qwen3VLVideoProcessor(),
        feature_extractor=tf.WhisperFeatureExtractor(feature_size=128), tokenizer=tok,
        chat_template=QWEN3_OMNI_CHAT_TEMPLATE)
    return config, processor


def _qwen2_audio():
    import transformers as tf

    tok = _tokenizer(named={k: OMNI_TOKENS[k] for k in ("audio_token", "audio_bos_token", "audio_eos_token")})
    config = tf.Qwen2AudioConfig(audio_config=_audio_encoder(), text_config={"model_type": "qwen2", **_text(tok)},
                                 audio_token_index=tok.convert_tokens_to_ids(OMNI_TOKENS["audio_token"]))
    processor = tf.Qwen2AudioProcessor(feature_extractor=tf.WhisperFeatureExtractor(feature_size=128),
                                       tokenizer=tok, chat_template=QWEN2_AUDIO_CHAT_TEMPLATE)
    return config, processor


def tiny_audio_parts(arch: str):
    """(config, processor) of a tiny audio-capable model of `arch` (one of TINY_AUDIO_ARCHS), nothing written."""
    if arch == "qwen2.5-omni":
        return _qwen2_5_omni()
    if arch == "qwen3-omni":
        return _qwen3_omni()
    if arch == "qwen2-audio":
        return _qwen2_audio()
    raise ValueError(f"unknown tiny audio architecture '{arch}' (known: {', '.join(TINY_AUDIO_ARCHS)})")


def build_tiny_audio_model(arch: str, out_dir: str | os.PathLike, seed: int = 0) -> Path:
    """Write a tiny random-init audio-capable `arch` model and its processor to `out_dir` (fp32 safetensors)."""
    from transformers import AutoModelForMultimodalLM

    return _save(AutoModelForMultimodalLM, *tiny_audio_parts(arch), out_dir, seed)


def _save(auto_class, config, processor, out_dir, seed: int) -> Path:
    """A random-init model of `config` (seeded, fp32) and its processor, written to `out_dir`."""
    import torch

    torch.manual_seed(seed)
    model = auto_class.from_config(config, dtype=torch.float32).eval()
    out = Path(out_dir)
    model.save_pretrained(out)
    processor.save_pretrained(out)
    return out
