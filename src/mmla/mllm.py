"""Video + text models (Qwen2-VL, Qwen2.5-VL): loading, batched video inference, tiny test models, video LoRA.

Models load through transformers' native classes and `AutoProcessor` (never trust_remote_code). A prompt
becomes one user turn whose content is [{"type": "video"}, {"type": "text", "text": prompt}]; a prompt of
the `llamafactory_video` family starts with "<video>", and the video goes where that tag is (LLaMA-Factory
replaces the tag with the vision tokens), so the tag itself never reaches the model as text.

Inference (`predict_video`, the `mmla predict --modality video` recipe) mirrors `mmla.inference.predict`:
same run directory (config.yaml, env.json, predictions.jsonl appended and flushed, metrics.json), same
resume. Each record has a `video` field (the clip, relative to the data root); a clip that is missing or
does not decode gives a record with an empty output and a `clip_error` (counted as `missing_clips`), and
the run goes on. The frame setting (mmla.video) is recorded in config.yaml and env.json.

Batching. Each sample's chat text is tokenized once, its single <|video_pad|> expanded to the clip's
number of vision tokens (what the processor does), rows are left-padded and their videos concatenated.
Qwen2-VL's 3-D rotary positions (mrope) come from the model's own `get_rope_index` on the padded batch.
Greedy generation is a prefill + token-by-token loop that drops finished rows (as mmla.engine does for
text); the official decoding of Qwen2-VL-7B-Instruct (its generation config: do_sample with top_k=1,
repetition_penalty 1.05, max_new_tokens 128) is greedy with that repetition penalty, applied over each
row's own tokens (never over padding). Sampling with top_k != 1 goes through `model.generate`.
Score mode ranks the candidate answers by log-likelihood on top of one prefill per sample.

Fine-tuning (`train_video`): LoRA on the language model's linear layers only (the vision tower and merger
stay frozen), LLaMA-Factory defaults r 8 / alpha 16, the `llamafactory_video` prompts and the
`official-train` frames; the `paper` preset holds the per-dataset Qwen2-VL-7B table of the official yamls.
"""

from __future__ import annotations

import dataclasses
import inspect
import json
import os
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, NamedTuple

from . import data as data_mod
from . import video as video_mod
from .inference import PredictConfig
from .tasks import VIDEO_DATASETS, get_task

VIDEO_TAG = "<video>"
IGNORE = -100  # label of the tokens the loss skips (prompt, video, padding)
MLLM_CLASSES = {"qwen2_vl": "Qwen2VLForConditionalGeneration", "qwen2_5_vl": "Qwen2_5_VLForConditionalGeneration"}
PROCESSOR_CLASSES = {"qwen2_vl": "Qwen2VLProcessor", "qwen2_5_vl": "Qwen2_5_VLProcessor"}
ALIASES = {
    "qwen2-vl-7b": "Qwen/Qwen2-VL-7B-Instruct",
    "qwen2-vl-72b": "Qwen/Qwen2-VL-72B-Instruct",
    "qwen2.5-vl-7b": "Qwen/Qwen2.5-VL-7B-Instruct",
}
OFFICIAL_MAX_NEW_TOKENS = 128  # the official Qwen2-VL infer.py: generate(max_new_tokens=128)
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


# ---------------------------------------------------------------- loading


def resolve(name_or_path: str) -> str:
    return ALIASES.get(str(name_or_path), str(name_or_path))


def model_type(name_or_path: str) -> str | None:
    """The config's model_type, or None when there is no readable config."""
    from transformers import AutoConfig

    try:
        return AutoConfig.from_pretrained(resolve(name_or_path)).model_type
    except (OSError, ValueError):
        return None


def is_video_model(name_or_path: str) -> bool:
    return model_type(name_or_path) in MLLM_CLASSES


def load_processor(path: str):
    from transformers import AutoProcessor

    processor = AutoProcessor.from_pretrained(path)
    tok = processor.tokenizer
    tok.padding_side = "left"
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    return processor


def load_mllm(name_or_path: str, adapter: str | None = None, dtype: str = "auto", device: str = "auto"):
    """(model, processor) of a Qwen2-VL / Qwen2.5-VL checkpoint, eval mode, tokenizer padding on the left."""
    import transformers
    from transformers import AutoConfig

    from .models import pick_device, pick_dtype

    path = resolve(name_or_path)
    try:
        config = AutoConfig.from_pretrained(path)
    except (OSError, ValueError) as e:
        raise ValueError(f"model '{name_or_path}' not found: not an alias ({', '.join(ALIASES)}), a local model "
                         f"directory or a reachable Hugging Face id ({type(e).__name__})") from None
    if config.model_type not in MLLM_CLASSES:
        raise ValueError(f"model '{name_or_path}' is a {config.model_type}, not a video model "
                         f"(supported: Qwen2-VL, Qwen2.5-VL); use --modality text")
    dev = pick_device(device)
    cls = getattr(transformers, MLLM_CLASSES[config.model_type])
    model = cls.from_pretrained(path, dtype=pick_dtype(dtype, dev), use_safetensors=True).to(dev)
    if adapter is not None:
        from peft import PeftModel

        if not Path(adapter).is_dir():
            raise ValueError(f"adapter '{adapter}' not found (expected a directory saved by peft)")
        model = PeftModel.from_pretrained(model, str(adapter))
    model.eval()
    return model, load_processor(path)


def base_model(model):
    """The transformers model under a peft wrapper (LoRA layers are injected in place)."""
    return model.get_base_model() if hasattr(model, "get_base_model") else model


# ---------------------------------------------------------------- test and benchmark models


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


def build_tiny_mllm(arch: str, out_dir: str | os.PathLike, seed: int = 0) -> Path:
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


def real_size_config(arch: str = "qwen2-vl-7b"):
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


# ---------------------------------------------------------------- prompts -> model inputs


def video_messages(prompt: str, answer: str | None = None) -> list[dict]:
    """One user turn with the video where the prompt's "<video>" tag is (first if there is none)."""
    parts = prompt.split(VIDEO_TAG)
    if len(parts) > 2:
        raise ValueError(f"a prompt may hold one {VIDEO_TAG} tag, this one has {len(parts) - 1}")
    if len(parts) == 1:
        content = [{"type": "video"}, {"type": "text", "text": prompt}]
    else:
        content = ([{"type": "text", "text": parts[0]}] if parts[0] else []) + [{"type": "video"}] + (
            [{"type": "text", "text": parts[1]}] if parts[1] else [])
    msgs = [{"role": "user", "content": content}]
    if answer is not None:
        msgs.append({"role": "assistant", "content": [{"type": "text", "text": answer}]})
    return msgs


def chat_text(processor, prompt: str) -> str:
    """The model input string (one <|video_pad|> placeholder), ending with the assistant header.

    Under both protocols the Qwen2-VL inference sends the user turn only; the checkpoint's template adds
    its default system prompt ("You are a helpful assistant."), which is also LLaMA-Factory's qwen2_vl one."""
    return processor.apply_chat_template(video_messages(prompt), tokenize=False, add_generation_prompt=True)


def end_of_turn(processor) -> str:
    """What the chat template writes after an assistant answer (e.g. '<|im_end|>')."""
    head = processor.apply_chat_template(video_messages("x"), tokenize=False, add_generation_prompt=True)
    marker = "ANSWER-7f3a"
    full = processor.apply_chat_template(video_messages("x", marker), tokenize=False)
    if full.startswith(head) and marker in full[len(head):]:
        return full[len(head):].split(marker, 1)[1].rstrip()
    return processor.tokenizer.eos_token or ""


@dataclass
class VideoItem:
    ids: list[int]  # token ids with the video placeholder expanded
    pixel_values: object  # torch.Tensor (patches, channels * temporal_patch * patch * patch)
    grid: list[int]  # (t, h, w) in patches
    second_per_grid: float  # seconds per temporal patch (Qwen2.5-VL time positions)


def frame_setting_for(processor, setting: video_mod.FrameSetting) -> video_mod.FrameSetting:
    """The setting with its size factor taken from the processor (patch size x merge size)."""
    vp = processor.video_processor
    return video_mod.frame_setting(setting, factor=vp.patch_size * vp.merge_size)


def video_pixels(processor, frames, setting: video_mod.FrameSetting):
    """(pixel_values_videos, grid (t, h, w), seconds per temporal patch) of already-resized frames."""
    vp = processor.video_processor
    out = vp(videos=[frames], do_resize=False, do_sample_frames=False, cap_pixels_per_frame=False,
             return_tensors="pt")
    grid = out["video_grid_thw"][0].tolist()
    return out["pixel_values_videos"], grid, vp.temporal_patch_size / setting.fps


def expand_video(ids: list[int], video_token_id: int, n_tokens: int) -> list[int]:
    """Replace the one video placeholder with the clip's n_tokens placeholders (as the processor does)."""
    k = ids.count(video_token_id)
    if k != 1:
        raise ValueError(f"expected one video placeholder in the chat text, found {k}")
    i = ids.index(video_token_id)
    return ids[:i] + [video_token_id] * n_tokens + ids[i + 1:]


def encode(processor, ids: list[int], frames, setting: video_mod.FrameSetting) -> VideoItem:
    """Unexpanded token ids (with one placeholder) + resized frames -> one model-ready sample."""
    pixels, grid, spg = video_pixels(processor, frames, setting)
    n = grid[0] * grid[1] * grid[2] // processor.video_processor.merge_size ** 2
    return VideoItem(expand_video(ids, processor.video_token_id, n), pixels, grid, spg)


def tokenize(processor, texts: list[str]) -> list[list[int]]:
    return processor.tokenizer(texts, add_special_tokens=False)["input_ids"]


# ---------------------------------------------------------------- batches


def left_pad_batch(items: list[VideoItem], pad_id: int, video_token_id: int, device) -> dict:
    """Model inputs of a left-padded batch (one video per row)."""
    import torch

    width = max(len(it.ids) for it in items)
    ids = torch.full((len(items), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(items), width), dtype=torch.long)
    for r, it in enumerate(items):
        ids[r, width - len(it.ids):] = torch.tensor(it.ids, dtype=torch.long)
        mask[r, width - len(it.ids):] = 1
    mm = (ids == video_token_id).long() * 2  # text 0, image 1, video 2
    return {"input_ids": ids.to(device), "attention_mask": mask.to(device), "mm_token_type_ids": mm.to(device),
            "pixel_values_videos": torch.cat([it.pixel_values for it in items]).to(device),
            "video_grid_thw": torch.tensor([it.grid for it in items], dtype=torch.long, device=device),
            "second_per_grid_ts": torch.tensor([it.second_per_grid for it in items], device=device)}


def rope_positions(model, batch: dict):
    """3-D rotary positions (3, B, L) of a padded batch, from the model's own get_rope_index."""
    inner = base_model(model).model
    kw = dict(input_ids=batch["input_ids"], mm_token_type_ids=batch["mm_token_type_ids"],
              video_grid_thw=batch["video_grid_thw"], attention_mask=batch["attention_mask"])
    if "second_per_grid_ts" in inspect.signature(inner.get_rope_index).parameters:
        kw["second_per_grid_ts"] = batch["second_per_grid_ts"]
    positions, _ = inner.get_rope_index(**kw)
    return positions


def _forward_inputs(batch: dict, model) -> dict:
    """The batch keys the model's forward accepts (Qwen2-VL has no second_per_grid_ts)."""
    params = inspect.signature(base_model(model).forward).parameters
    return {k: v for k, v in batch.items() if k in params}


def _prefill(model, batch: dict, positions, cache):
    out = base_model(model)(**_forward_inputs(batch, model), position_ids=positions, cache=cache, use_cache=True,
                            logits_to_keep=1)
    return out.logits[:, -1]


def _penalize(logits, seen, penalty: float):
    """HF's repetition penalty over the tokens each row has seen (its own prompt and output, no padding)."""
    import torch

    pen = torch.where(logits < 0, logits * penalty, logits / penalty)
    return torch.where(seen, pen, logits)


def _greedy_batch(model, batch: dict, max_new_tokens: int, eos, repetition_penalty: float | None) -> list[list[int]]:
    """Greedy continuation of a left-padded video batch; rows leave the batch (and the KV cache) at EOS."""
    import torch
    from transformers import DynamicCache

    positions = rope_positions(model, batch)
    cache = DynamicCache(config=base_model(model).config)
    logits = _prefill(model, batch, positions, cache)
    mask = batch["attention_mask"]
    n = mask.shape[0]
    nxt = positions.amax(dim=(0, 2)) + 1  # (B,) each row's next position (text tokens: the same on all 3 axes)
    seen = None
    if repetition_penalty and repetition_penalty != 1.0:
        seen = torch.zeros((n, logits.shape[-1]), dtype=torch.bool, device=logits.device)
        rows, cols = mask.nonzero(as_tuple=True)
        seen[rows, batch["input_ids"][rows, cols]] = True
    rows = list(range(n))
    out: list[list[int]] = [[] for _ in range(n)]
    for step in range(max_new_tokens):
        if seen is not None:
            logits = _penalize(logits.float(), seen, repetition_penalty)
        token = logits.argmax(-1)
        for r, t in zip(rows, token.tolist()):
            out[r].append(t)
        done = torch.isin(token, eos)
        if step == max_new_tokens - 1 or bool(done.all()):
            break
        if seen is not None:
            seen[torch.arange(len(rows), device=seen.device), token] = True
        if bool(done.any()):
            keep = (~done).nonzero().squeeze(1)
            cache.batch_select_indices(keep)
            mask, nxt, token = mask[keep], nxt[keep], token[keep]
            seen = seen[keep] if seen is not None else None
            rows = [rows[i] for i in keep.tolist()]
        mask = torch.cat([mask, mask.new_ones((len(rows), 1))], dim=1)
        pos = nxt.view(1, -1, 1).expand(3, -1, 1)
        logits = base_model(model)(input_ids=token[:, None], attention_mask=mask, position_ids=pos, cache=cache,
                                   use_cache=True).logits[:, -1]
        nxt = nxt + 1
    return out


def eos_ids(model, tokenizer) -> list[int]:
    """The tokenizer's EOS plus the generation config's (Qwen2-VL-Instruct: <|im_end|> and <|endoftext|>)."""
    ids = {tokenizer.eos_token_id} if tokenizer.eos_token_id is not None else set()
    extra = getattr(getattr(base_model(model), "generation_config", None), "eos_token_id", None)
    ids.update(extra if isinstance(extra, (list, tuple)) else [extra] if extra is not None else [])
    return sorted(ids)


def is_greedy(decoding) -> bool:
    """Greedy, or sampling that keeps only the top token (Qwen2-VL-Instruct's shipped config: top_k=1)."""
    return not decoding.do_sample or decoding.top_k == 1


def generate_batch(model, processor, items: list[VideoItem], decoding, seed: int | None = None) -> list[str]:
    """One batch of video items -> generated texts (greedy loop, or model.generate when sampling)."""
    import torch

    tok = processor.tokenizer
    eos_list = eos_ids(model, tok)
    pad_id = tok.pad_token_id if tok.pad_token_id is not None else eos_list[0]
    batch = left_pad_batch(items, pad_id, processor.video_token_id, model.device)
    with torch.inference_mode():
        if is_greedy(decoding):
            eos = torch.tensor(eos_list, device=model.device)
            new = _greedy_batch(model, batch, decoding.max_new_tokens, eos, decoding.repetition_penalty)
        else:
            if seed is not None:
                torch.manual_seed(seed)
            gen = base_model(model).generate(
                **_forward_inputs(batch, model), max_new_tokens=decoding.max_new_tokens, do_sample=True,
                temperature=decoding.temperature, top_p=decoding.top_p, top_k=decoding.top_k,
                repetition_penalty=decoding.repetition_penalty, eos_token_id=eos_list, pad_token_id=pad_id)
            new = gen[:, batch["input_ids"].shape[1]:].tolist()
    texts = []
    for toks in new:
        cut = next((i for i, t in enumerate(toks) if t in eos_list), len(toks))
        texts.append(tok.decode(toks[:cut], skip_special_tokens=True))
    return texts


class Scored(NamedTuple):
    best: int
    scores: list[float]


def _common_prefix(seqs: list[list[int]]) -> int:
    """Length of the longest common token prefix, leaving every sequence at least one token of its own."""
    n = min(len(s) for s in seqs) - 1
    for k in range(n):
        if any(s[k] != seqs[0][k] for s in seqs):
            return k
    return n


def _feeds(rests: list[list[int]]) -> tuple[list[tuple[int, ...]], list[int | None]]:
    """Token rows a second pass must feed for one item's candidates, and which row serves each candidate
    (as mmla.engine): only maximal continuations get a row; single-token candidates need none (None)."""
    needed = sorted({tuple(r[:-1]) for r in rests if len(r) > 1}, key=len, reverse=True)
    feeds: list[tuple[int, ...]] = []
    for f in needed:
        if not any(g[: len(f)] == f for g in feeds):
            feeds.append(f)
    serve = [None if len(r) == 1 else next(j for j, g in enumerate(feeds) if g[: len(r) - 1] == tuple(r[:-1]))
             for r in rests]
    return feeds, serve


def score_prefix(processor, prompt_text: str, candidates: list[str]) -> tuple[list[int], list[list[int]]]:
    """Unexpanded ids of the chat text + the candidates' shared prefix, and each candidate's remaining ids."""
    joint = tokenize(processor, [prompt_text + c for c in candidates])
    k = _common_prefix(joint)
    return joint[0][:k], [s[k:] for s in joint]


def score_batch(model, processor, items: list[VideoItem], rests: list[list[list[int]]]) -> list[Scored]:
    """Log-likelihood of each item's candidate continuations (one prefill per item, as mmla.engine.score)."""
    import torch
    from transformers import DynamicCache

    tok = processor.tokenizer
    pad_id = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
    batch = left_pad_batch(items, pad_id, processor.video_token_id, model.device)
    with torch.inference_mode():
        positions = rope_positions(model, batch)
        cache = DynamicCache(config=base_model(model).config)
        first = torch.log_softmax(_prefill(model, batch, positions, cache).float(), dim=-1)
        scores = [[first[b, r[0]].item() for r in rests[b]] for b in range(len(items))]
        rows, picks = [], []  # rows: (batch row, tokens to feed); picks: (item, cand, row, position, target)
        for b in range(len(items)):
            if len({r[0] for r in rests[b]}) == len(rests[b]):
                continue  # the first own token already tells the candidates apart
            feeds, serve = _feeds(rests[b])
            for c, r in enumerate(rests[b]):
                if serve[c] is not None:
                    picks += [(b, c, len(rows) + serve[c], t, r[t + 1]) for t in range(len(r) - 1)]
            rows += [(b, f) for f in feeds]
        if rows:
            width = max(len(f) for _, f in rows)
            index = torch.tensor([b for b, _ in rows], device=model.device)
            ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
            for r, (_, f) in enumerate(rows):
                ids[r, :len(f)] = torch.tensor(f, dtype=torch.long)
            cache.batch_select_indices(index)
            mask = batch["attention_mask"]
            mask = torch.cat([mask[index], mask.new_ones((len(rows), width))], dim=1)
            start = (positions.amax(dim=(0, 2)) + 1)[index]
            pos = (start[:, None] + torch.arange(width, device=model.device)).unsqueeze(0).expand(3, -1, -1)
            logits = base_model(model)(input_ids=ids.to(model.device), attention_mask=mask, position_ids=pos,
                                       cache=cache, use_cache=True).logits
            row, at, target = (torch.tensor(x, device=model.device) for x in list(zip(*picks))[2:])
            logp = torch.log_softmax(logits[row, at].float(), dim=-1).gather(1, target[:, None]).squeeze(1)
            for (b, c, *_), v in zip(picks, logp.tolist()):
                scores[b][c] += v
    return [Scored(max(range(len(s)), key=s.__getitem__), s) for s in scores]


# ---------------------------------------------------------------- predict (mmla predict --modality video)

@dataclass
class VideoPredictConfig(PredictConfig):
    """PredictConfig plus the frame options (for as long as PredictConfig itself does not carry them)."""

    modality: str = "video"
    frames: str = "official-infer"  # frame setting name (mmla.video.SETTINGS)
    num_frames: int | None = None  # overrides of the setting
    fps: float | None = None
    max_pixels: int | None = None
    no_frame_cache: bool = False


def resolve_setting(cfg) -> video_mod.FrameSetting:
    """The frame setting of a PredictConfig (fields frames/num_frames/fps/max_pixels when it has them)."""
    return video_mod.frame_setting(getattr(cfg, "frames", None) or "official-infer",
                                   num_frames=getattr(cfg, "num_frames", None), fps=getattr(cfg, "fps", None),
                                   max_pixels=getattr(cfg, "max_pixels", None))


def official_video_decoding(generation_config):
    """The official Qwen2-VL infer.py: the checkpoint's generation config, max_new_tokens 128."""
    from .prompts import official_decoding

    d = official_decoding("qwen", generation_config)
    d.max_new_tokens = OFFICIAL_MAX_NEW_TOKENS
    return d


def _resolve_video_cfg(cfg):
    from . import inference

    cfg = dataclasses.replace(cfg)
    spec = cfg.datasets if isinstance(cfg.datasets, str) else (cfg.datasets[0] if len(cfg.datasets) == 1 else None)
    if spec == "all":  # MLLM experiments use the 9 datasets whose videos are released
        cfg.datasets = ["video"]
    cfg = inference.resolve(cfg)
    cfg.modality = "video"
    no_video = [ds for ds in cfg.datasets if not get_task(ds).has_video]
    if no_video:
        raise ValueError(f"no videos are released for {', '.join(no_video)}: use --datasets video "
                         f"({', '.join(VIDEO_DATASETS)}) or --modality text")
    return cfg


def _check_identity(out: Path, cfg, setting: video_mod.FrameSetting) -> None:
    from . import inference
    from .runs import read_config

    inference._open_run_dir(cfg)
    path = out / "config.yaml"
    if path.exists():
        old = read_config(path).get("frame_setting")
        if old is not None and old != setting.record():
            new = json.dumps(setting.record(), sort_keys=True)
            raise ValueError(f"{path}: this run directory was made with frame setting {old.get('name')!r} "
                             f"({json.dumps(old, sort_keys=True)}), not {new}; use another --out")


def _dedupe(records: list[dict]) -> list[dict]:
    """One record per (dataset, split, id): the last one written."""
    last = {}
    for r in records:
        last[(r["dataset"], r["split"], r["id"])] = r
    return list(last.values())


def predict_video(cfg, progress: bool = True, *, frame_cache: video_mod.FrameCache | None = None) -> dict:
    """`mmla.inference.predict` for video: the same run directory and resume, per-sample clip errors."""
    from . import inference
    from .evaluation import evaluate_records
    from .prompts import Decoding
    from .runs import JsonlAppender, environment, read_jsonl, write_config, write_json

    # ---- setup
    cfg = _resolve_video_cfg(cfg)
    setting = resolve_setting(cfg)
    examples, skipped = inference.load_examples(cfg)
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    _check_identity(out, cfg, setting)
    pred_path = out / "predictions.jsonl"
    done, torn = read_jsonl(pred_path)
    done = _dedupe(done)
    retry = [r for r in done if r.get("clip_error")]  # clips that failed before are tried again
    done = [r for r in done if not r.get("clip_error")]
    done_keys = {(r["dataset"], r["split"], r["id"]) for r in done}
    todo = [e for e in examples if (e.dataset, e.split, e.id) not in done_keys]
    if done_keys or retry:
        print(f"resuming: {len(examples) - len(todo)} of {len(examples)} done, {len(todo)} to go"
              f"{f' ({len(retry)} missing clips retried)' if retry else ''} ({pred_path})", file=sys.stderr)

    import torch

    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    model = processor = decoding = None
    if todo or cfg.max_new_tokens is None:
        model, processor = load_mllm(cfg.model, adapter=cfg.adapter, dtype=cfg.dtype, device=cfg.device)
        setting = frame_setting_for(processor, setting)
        decoding = official_video_decoding(base_model(model).generation_config) if cfg.protocol == "official" \
            else Decoding()
        cfg.max_new_tokens = cfg.max_new_tokens or decoding.max_new_tokens
        decoding.max_new_tokens = cfg.max_new_tokens
    _check_identity(out, cfg, setting)
    cache = frame_cache if frame_cache is not None else video_mod.FrameCache(
        enabled=not getattr(cfg, "no_frame_cache", False))
    write_config(out / "config.yaml", {**dataclasses.asdict(cfg), "frame_setting": setting.record()})
    env = {**environment(str(model.device) if model is not None else None),
           "decoding": dataclasses.asdict(decoding) if decoding else None,
           "greedy": is_greedy(decoding) if decoding else None, "frame_setting": setting.record(),
           "frame_cache": str(cache.root) if cache.enabled else None, "skipped_rows": skipped}
    write_json(out / "env.json", env)

    # ---- run
    stats = {}
    if todo:
        sink = JsonlAppender(pred_path, done, torn or bool(retry))
        try:
            stats = _run_video(cfg, model, processor, decoding, setting, cache, todo, sink, progress)
        finally:
            sink.close()

    # ---- save
    wanted = {(e.dataset, e.split, e.id) for e in examples}
    records = [r for r in _dedupe(read_jsonl(pred_path)[0]) if (r["dataset"], r["split"], r["id"]) in wanted]
    result = evaluate_records(records)
    result["skipped_rows"] = len(skipped)
    missing = [r for r in records if r.get("clip_error")]
    result["missing_clips"] = len(missing)
    result["missing_clips_per_dataset"] = {ds: sum(r["dataset"] == ds for r in missing)
                                           for ds in sorted({r["dataset"] for r in missing})}
    write_json(out / "metrics.json", result)
    env.update(missing_clips=len(missing), frame_cache_hits=cache.hits, frame_cache_misses=cache.misses, **stats)
    write_json(out / "env.json", env)
    return result


def _run_video(cfg, model, processor, decoding, setting, cache, todo, sink, progress: bool) -> dict:
    """Decode/encode the next batch in a background thread while the model runs the current one."""
    from tqdm.auto import tqdm

    from .evaluation import parse_output
    from .prompts import candidates, render

    finder = video_mod.ClipFinder(cfg.data)
    root = Path(cfg.data)
    prompts = [render(e.dataset, cfg.family, e.text, cfg.split, "video") for e in todo]
    bar = tqdm(total=len(todo), desc=f"{cfg.mode} {cfg.model} (video)", unit="sample", disable=not progress)
    t_prep = [0.0]

    def record(i: int, output: str, clip: video_mod.Clip, error: str | None = None) -> None:
        e = todo[i]
        rec = {"dataset": e.dataset, "split": e.split, "id": e.id, "text": e.text, "label": e.label,
               "prompt": prompts[i], "output": output, "pred": parse_output(output, get_task(e.dataset).labels),
               "video": clip.record(root) if clip.path is not None else None}
        if error:
            rec["clip_error"] = error
        sink.write(rec)
        bar.update(1)

    def prepare(idx: list[int]):
        t0 = time.perf_counter()
        ready = []  # (index, clip, item, rests)
        for i in idx:
            e = todo[i]
            clip = finder.find(e.dataset, e.id)
            if clip.path is None:
                ready.append((i, clip, None, clip.error))
                continue
            try:
                frames = video_mod.load_frames(clip.path, setting, cache)
            except video_mod.ClipError as err:
                ready.append((i, clip, None, str(err)))
                continue
            text = chat_text(processor, prompts[i])
            if cfg.mode == "score":
                ids, rests = score_prefix(processor, text, candidates(e.dataset, cfg.family, cfg.split, "video"))
            else:
                ids, rests = tokenize(processor, [text])[0], None
            ready.append((i, clip, (encode(processor, ids, frames.array, setting), rests), None))
        t_prep[0] += time.perf_counter() - t0
        return ready

    chunks = [list(range(s, min(s + cfg.batch_size, len(todo)))) for s in range(0, len(todo), cfg.batch_size)]
    t_model = 0.0
    with ThreadPoolExecutor(max_workers=1) as pool:
        pending = pool.submit(prepare, chunks[0]) if chunks else None
        for k in range(len(chunks)):
            ready = pending.result()
            pending = pool.submit(prepare, chunks[k + 1]) if k + 1 < len(chunks) else None
            ok = [(i, clip, item) for i, clip, item, err in ready if err is None]
            t0 = time.perf_counter()
            if ok and cfg.mode == "generate":
                texts = generate_batch(model, processor, [it[0] for _, _, it in ok], decoding, seed=cfg.seed)
                outputs = dict(zip([i for i, _, _ in ok], texts))
            elif ok:
                res = score_batch(model, processor, [it[0] for _, _, it in ok], [it[1] for _, _, it in ok])
                outputs = {i: candidates(todo[i].dataset, cfg.family, cfg.split, "video")[s.best]
                           for (i, _, _), s in zip(ok, res)}
            else:
                outputs = {}
            t_model += time.perf_counter() - t0
            for i, clip, item, err in ready:
                record(i, outputs.get(i, ""), clip, err)
    bar.close()
    return {"seconds_model": round(t_model, 2), "seconds_frames": round(t_prep[0], 2)}


# ---------------------------------------------------------------- fine-tuning (SFT / IT with LoRA)

# LoRA on the language model's linear layers only: the vision tower and the merger stay frozen
# (LLaMA-Factory: lora_target all, freeze_vision_tower and freeze_multi_modal_projector default to true).
LORA_TARGET = r".*language_model.*\.(q_proj|k_proj|v_proj|o_proj|gate_proj|up_proj|down_proj)$"

# Qwen2-VL-7B SFT, per dataset: the official LLaMA-Factory yamls (../shared/paper/hyperparams.md section 2.5):
# learning rate, epochs, warmup ratio, per-device batch, gradient accumulation.
PAPER_SFT_7B = {
    "MIntRec": (1.1e-4, 60, 0.1, 8, 4),
    "MIntRec2.0": (1.2e-4, 30, 0.3, 16, 8),
    "MELD": (1.1e-4, 30, 0.1, 16, 8),
    "IEMOCAP": (1.0e-4, 15, 0.2, 2, 4),
    "MELD-DA": (3.0e-4, 50, 0.1, 12, 4),
    "IEMOCAP-DA": (3.0e-4, 50, 0.1, 12, 4),
    "MOSI": (1.0e-4, 20, 0.1, 8, 4),
    "Ch-sims": (1.1e-4, 30, 0.1, 12, 4),
    "UR-FUNNY": (1.0e-3, 10, 0.2, 12, 6),
    "MUStARD": (1.0e-3, 10, 0.2, 2, 2),
    "AnnoMi-client": (1.0e-3, 10, 0.2, 8, 4),
    "AnnoMi-therapist": (1.0e-3, 10, 0.2, 8, 4),
}
# Qwen2-VL-7B IT on all tasks (IT/train_lora/Instruct_Qwen2-VL-7B-Instruct.yaml).
PAPER_IT_7B = (1.0e-4, 5, 0.3, 8, 4)
_PAPER_COMMON = dict(lr_scheduler="cosine", lora_rank=8, lora_alpha=16, lora_dropout=0.0, cutoff_len=1024,
                     max_grad_norm=1.0, weight_decay=0.0)


def _coerce(cls, key: str, value):
    """A YAML / key=value value as the type of dataclass `cls`'s field `key`; errors are one line."""
    import typing

    hints = typing.get_type_hints(cls)
    if key not in hints:
        raise ValueError(f"unknown config key '{key}' (known: {', '.join(f.name for f in dataclasses.fields(cls))})")
    args = [a for a in typing.get_args(hints[key]) if a is not type(None)]
    optional = type(None) in typing.get_args(hints[key])
    base = list if typing.get_origin(hints[key]) is list else (args[0] if optional else hints[key])
    if value is None or (optional and isinstance(value, str) and value.strip().lower() in ("", "null", "none")):
        if optional:
            return None
        raise ValueError(f"config key '{key}' cannot be empty")
    try:
        if base is list:
            items = value.split(",") if isinstance(value, str) else list(value)
            return [str(v).strip() for v in items if str(v).strip()]
        if base is bool:
            if isinstance(value, bool):
                return value
            return {"true": True, "yes": True, "1": True, "on": True,
                    "false": False, "no": False, "0": False, "off": False}[str(value).strip().lower()]
        if base is int:
            f = float(value)
            if f != int(f):
                raise ValueError
            return int(f)
        if base is float:
            return float(value)
        return str(value)
    except (TypeError, ValueError, KeyError):
        raise ValueError(f"config key '{key}' expects {getattr(base, '__name__', base)}, got {value!r}") from None


def _read_yaml(path: str | os.PathLike) -> dict:
    import yaml

    p = Path(path)
    if not p.is_file():
        raise ValueError(f"{p}: config file not found")
    try:
        raw = yaml.safe_load(p.read_text(encoding="utf-8")) or {}
    except yaml.YAMLError as e:
        raise ValueError(f"{p}: not valid YAML ({str(e).splitlines()[0]})") from None
    if not isinstance(raw, dict):
        raise ValueError(f"{p}: expected a mapping of config keys")
    return raw


def _save_adapter(model, dest: Path) -> None:
    """Save a peft adapter (safetensors) atomically: into a temporary sibling, then renamed over `dest`."""
    import shutil

    tmp = dest.with_name(f".{dest.name}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp, safe_serialization=True)
    old = dest.with_name(f".{dest.name}.old")
    shutil.rmtree(old, ignore_errors=True)
    if dest.exists():
        os.replace(dest, old)
    os.replace(tmp, dest)
    shutil.rmtree(old, ignore_errors=True)


def _last_checkpoint(ckpt_dir: Path) -> Path | None:
    """The newest complete Trainer checkpoint (trainer_state.json is written last)."""
    found = []
    for d in ckpt_dir.glob("checkpoint-*") if ckpt_dir.is_dir() else ():
        try:
            json.loads((d / "trainer_state.json").read_text())
            found.append((int(d.name.split("-")[1]), d))
        except (ValueError, OSError):
            continue
    return max(found)[1] if found else None


def paper_preset(setting: str, dataset: str | None = None) -> dict:
    """The official Qwen2-VL-7B hyper-parameters for SFT on `dataset` or for IT, as TrainVideoConfig keys."""
    if setting == "it":
        lr, ep, wu, bs, ga = PAPER_IT_7B
        steps = 10
    elif setting == "sft":
        if dataset not in PAPER_SFT_7B:
            raise ValueError(f"no paper SFT preset for '{dataset}'")
        lr, ep, wu, bs, ga = PAPER_SFT_7B[get_task(dataset).name]
        steps = 5
    else:
        raise ValueError(f"setting must be sft or it, got '{setting}'")
    return dict(_PAPER_COMMON, learning_rate=lr, num_epochs=float(ep), warmup_ratio=wu, per_device_batch_size=bs,
                gradient_accumulation_steps=ga, eval_steps=steps, save_steps=steps)


@dataclass
class VideoTrainConfig:
    model: str = "qwen2-vl-7b"
    data: str | None = None
    datasets: list[str] = field(default_factory=lambda: ["video"])
    setting: str = "auto"  # sft (one adapter per dataset) | it (one adapter on all) | auto: it for video/all
    preset: str = "paper"  # paper: the per-dataset table | none: only the values given
    out: str = "runs/train-video"
    family: str = "llamafactory_video"  # training prompts ("<video>" first), as the official MLLM training
    frames: str = "official-train"
    num_frames: int | None = None
    fps: float | None = None
    max_pixels: int | None = None
    limit: int | None = None  # first N train rows per dataset
    learning_rate: float = 1e-4
    num_epochs: float = 5.0
    max_steps: int | None = None
    per_device_batch_size: int = 8
    gradient_accumulation_steps: int = 4
    lr_scheduler: str = "cosine"
    warmup_ratio: float = 0.0
    weight_decay: float = 0.0
    max_grad_norm: float = 1.0
    cutoff_len: int = 1024
    seed: int = 42
    lora_rank: int = 8
    lora_alpha: int = 16
    lora_dropout: float = 0.0
    precision: str = "auto"  # auto (bf16 on a bf16 GPU, else fp32) | fp32 | bf16
    gradient_checkpointing: bool = False  # less memory, same updates (LLaMA-Factory turns it on by default)
    device: str = "auto"
    threads: int | None = None
    eval_steps: int = 5  # 0: no dev evaluation, the final adapter is kept
    eval_limit: int | None = None
    save_steps: int = 5
    logging_steps: int = 1
    explicit: list[str] = field(default_factory=list)  # keys set by the user (a preset never overrides them)


def make_train_config(values: dict | None = None, dataset: str | None = None) -> VideoTrainConfig:
    """defaults < paper preset (for the setting and `dataset`) < `values` (YAML / key=value, typed here)."""
    from .tasks import parse_datasets

    values = {k: _coerce(VideoTrainConfig, k, v) for k, v in dict(values or {}).items() if k != "explicit"}
    cfg = VideoTrainConfig(**values, explicit=sorted(values))
    spec = ",".join(cfg.datasets)
    if cfg.setting == "auto":
        cfg.setting = "it" if spec in ("video", "all") else "sft"
    if cfg.setting not in ("sft", "it"):
        raise ValueError(f"setting must be one of auto, sft, it, got '{cfg.setting}'")
    cfg.datasets = parse_datasets("video" if spec == "all" else spec)
    if cfg.preset not in ("paper", "none"):
        raise ValueError(f"preset must be paper or none, got '{cfg.preset}'")
    return with_preset(cfg, dataset or cfg.datasets[0])


def with_preset(cfg: VideoTrainConfig, dataset: str) -> VideoTrainConfig:
    """cfg with the paper preset of `dataset` (SFT) or of IT, except the keys the user set."""
    if cfg.preset != "paper":
        return cfg
    preset = paper_preset(cfg.setting, dataset)
    return dataclasses.replace(cfg, **{k: v for k, v in preset.items() if k not in cfg.explicit})


class VideoTrainData:
    """Train or dev rows as model inputs: chat(prompt with the video) + answer + end of turn; the prompt is
    masked from the loss. Frames come from the frame cache; rows whose clip is missing are left out (counted)."""

    def __init__(self, cfg: VideoTrainConfig, processor, datasets: list[str], split: str, limit: int | None,
                 setting: video_mod.FrameSetting, cache: video_mod.FrameCache | None = None):
        from .prompts import render, target

        self.processor, self.setting, self.cache, self.cutoff = processor, setting, cache, cfg.cutoff_len
        self.rows, self.missing = [], []
        finder = video_mod.ClipFinder(cfg.data)
        eot = end_of_turn(processor)
        for ds in datasets:
            ex = data_mod.load_split(Path(cfg.data), ds, split).examples
            for e in ex[:limit] if limit else ex:
                clip = finder.find(ds, e.id)
                if clip.path is None:
                    self.missing.append((ds, e.id, clip.error))
                    continue
                prompt = render(ds, cfg.family, e.text, split, "video")
                answer = target(ds, cfg.family, e.label, split, "video") + eot
                self.rows.append((clip.path, chat_text(processor, prompt), answer))

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, i: int) -> dict:
        path, prompt, answer = self.rows[i]
        frames = video_mod.load_frames(path, self.setting, self.cache)
        p, a = tokenize(self.processor, [prompt, answer])
        item = encode(self.processor, p, frames.array, self.setting)
        if len(item.ids) + len(a) > self.cutoff:  # keep the answer, cut the end of the prompt (LLaMA-Factory)
            keep = self.cutoff - len(a)
            video_end = len(item.ids) - item.ids[::-1].index(self.processor.video_token_id)
            if keep < video_end:
                raise ValueError(f"cutoff_len {self.cutoff} would cut into the video of {path}; raise cutoff_len")
            item.ids = item.ids[:keep]
        return {"input_ids": item.ids + a, "labels": [IGNORE] * len(item.ids) + a, "pixel_values": item.pixel_values,
                "grid": item.grid, "second_per_grid": item.second_per_grid}


@dataclass
class VideoCollator:
    """Right-padded rows with labels, mm_token_type_ids and the batch's videos concatenated in row order."""

    pad_id: int
    video_token_id: int
    with_second_per_grid: bool = False

    def __call__(self, items: list[dict]) -> dict:
        import torch

        width = max(len(it["input_ids"]) for it in items)
        ids = torch.full((len(items), width), self.pad_id, dtype=torch.long)
        labels = torch.full((len(items), width), IGNORE, dtype=torch.long)
        mask = torch.zeros((len(items), width), dtype=torch.long)
        for r, it in enumerate(items):
            n = len(it["input_ids"])
            ids[r, :n] = torch.tensor(it["input_ids"])
            labels[r, :n] = torch.tensor(it["labels"])
            mask[r, :n] = 1
        batch = {"input_ids": ids, "labels": labels, "attention_mask": mask,
                 "mm_token_type_ids": (ids == self.video_token_id).long() * 2,
                 "pixel_values_videos": torch.cat([it["pixel_values"] for it in items]),
                 "video_grid_thw": torch.tensor([it["grid"] for it in items], dtype=torch.long)}
        if self.with_second_per_grid:
            batch["second_per_grid_ts"] = torch.tensor([it["second_per_grid"] for it in items])
        return batch


def add_lora(model, rank: int = 8, alpha: int = 16, dropout: float = 0.0):
    """LoRA on the language model's linear layers; everything else (vision tower, merger, lm_head) frozen."""
    from peft import LoraConfig, get_peft_model

    return get_peft_model(model, LoraConfig(r=rank, lora_alpha=alpha, lora_dropout=dropout,
                                            target_modules=LORA_TARGET, task_type="CAUSAL_LM"))


def teacher_forced_accuracy(model, collator: VideoCollator, data: VideoTrainData, batch_size: int = 4) -> float:
    """LLaMA-Factory's compute_accuracy on dev: per example the share of answer tokens the argmax gets right
    under teacher forcing, averaged over examples (the official checkpoint-selection metric)."""
    import torch

    was = model.training
    model.eval()
    total, n = 0.0, 0
    with torch.no_grad():
        for s in range(0, len(data), batch_size):
            batch = collator([data[i] for i in range(s, min(s + batch_size, len(data)))])
            batch = {k: v.to(model.device) for k, v in batch.items()}
            labels = batch.pop("labels")
            pred = model(**batch).logits[:, :-1].argmax(-1)
            gold = labels[:, 1:]
            for r in range(gold.shape[0]):
                keep = gold[r] != IGNORE
                total += (pred[r][keep] == gold[r][keep]).float().mean().item()
                n += 1
    model.train(was)
    return total / max(n, 1)


def train_video(cfg: VideoTrainConfig, progress: bool = True, frame_cache: video_mod.FrameCache | None = None) -> dict:
    """SFT (one adapter per dataset, <out>/<DS>/adapter) or IT (one adapter, <out>/adapter) with LoRA on
    video + text; the best dev teacher-forced accuracy every eval_steps is kept (the official selection)."""
    cfg = dataclasses.replace(cfg)
    cfg.data = str(data_mod.data_root(cfg.data))
    have = [ds for ds in cfg.datasets if "train" in data_mod.available_splits(Path(cfg.data), ds)]
    if not have:
        raise ValueError(f"none of {', '.join(cfg.datasets)} has a train split in {cfg.data}")
    if cfg.setting == "it":
        return {"it": _train_one(cfg, have, Path(cfg.out), progress, frame_cache)}
    results = {}
    for ds in have:
        one = dataclasses.replace(with_preset(cfg, ds), datasets=[ds])
        out = Path(cfg.out) / ds if len(have) > 1 else Path(cfg.out)
        results[ds] = _train_one(one, [ds], out, progress, frame_cache)
    return results


def _train_one(cfg: VideoTrainConfig, datasets: list[str], out: Path, progress: bool,
               frame_cache: video_mod.FrameCache | None) -> dict:
    import torch
    from transformers import Trainer, TrainerCallback, TrainingArguments, set_seed

    from .models import pick_device
    from .runs import environment, write_config, write_json

    out.mkdir(parents=True, exist_ok=True)
    done = out / "train_result.json"
    if done.exists():
        print(f"already trained: {out / 'adapter'} (remove {done} to train again)", file=sys.stderr)
        return json.loads(done.read_text())
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    device = pick_device(cfg.device)
    precision = cfg.precision if cfg.precision != "auto" else (
        "bf16" if device.type == "cuda" and torch.cuda.is_bf16_supported() else "fp32")
    model, processor = load_mllm(cfg.model, dtype="bfloat16" if precision == "bf16" else "float32", device="cpu")
    setting = frame_setting_for(processor, video_mod.frame_setting(cfg.frames, num_frames=cfg.num_frames, fps=cfg.fps,
                                                                   max_pixels=cfg.max_pixels))
    cache = frame_cache if frame_cache is not None else video_mod.FrameCache()
    train = VideoTrainData(cfg, processor, datasets, "train", cfg.limit, setting, cache)
    dev = None
    if cfg.eval_steps > 0 and all("dev" in data_mod.available_splits(Path(cfg.data), ds) for ds in datasets):
        dev = VideoTrainData(cfg, processor, datasets, "dev", cfg.eval_limit, setting, cache)
    if len(train) == 0:
        raise ValueError(f"no train row of {', '.join(datasets)} has a usable clip")
    set_seed(cfg.seed)
    base_model(model).config.use_cache = False
    model.train()
    if cfg.gradient_checkpointing:
        model.enable_input_require_grads()
    model = add_lora(model, cfg.lora_rank, cfg.lora_alpha, cfg.lora_dropout)
    collator = VideoCollator(processor.tokenizer.pad_token_id, processor.video_token_id,
                             "second_per_grid_ts" in inspect.signature(base_model(model).forward).parameters)
    write_config(out / "config.yaml", {**dataclasses.asdict(cfg), "datasets": datasets,
                                       "frame_setting": setting.record()})
    write_json(out / "env.json", {**environment(str(device)), "precision": precision, "train_rows": len(train),
                                  "train_missing_clips": len(train.missing), "dev_rows": len(dev) if dev else 0,
                                  "frame_setting": setting.record(),
                                  "trainable_parameters": sum(p.numel() for p in model.parameters()
                                                              if p.requires_grad)})
    best_path = out / "best.json"  # survives a resume, so a worse later adapter never replaces a better one
    state = {"best": json.loads(best_path.read_text()) if best_path.exists() else None}

    class SelectBest(TrainerCallback):
        def on_step_end(self, args, st, control, **kw):
            if dev is None or st.global_step % cfg.eval_steps and st.global_step != st.max_steps:
                return
            acc = teacher_forced_accuracy(kw["model"], collator, dev)
            with open(out / "train_log.jsonl", "a") as f:
                f.write(json.dumps({"step": st.global_step, "eval_accuracy": acc}) + "\n")
            if state["best"] is None or acc > state["best"]["value"]:
                state["best"] = {"step": st.global_step, "metric": "eval_accuracy", "value": acc}
                _save_adapter(kw["model"], out / "adapter")
                write_json(best_path, state["best"])

    args = TrainingArguments(
        output_dir=str(out / "checkpoints"), per_device_train_batch_size=cfg.per_device_batch_size,
        gradient_accumulation_steps=cfg.gradient_accumulation_steps, num_train_epochs=cfg.num_epochs,
        max_steps=cfg.max_steps or -1, learning_rate=cfg.learning_rate, lr_scheduler_type=cfg.lr_scheduler,
        warmup_steps=cfg.warmup_ratio, weight_decay=cfg.weight_decay, max_grad_norm=cfg.max_grad_norm,
        seed=cfg.seed, bf16=precision == "bf16", use_cpu=device.type == "cpu", logging_steps=cfg.logging_steps,
        save_strategy="steps", save_steps=cfg.save_steps, save_total_limit=2, report_to="none",
        remove_unused_columns=False, dataloader_num_workers=0, disable_tqdm=not progress, log_level="warning",
        **({"gradient_checkpointing": True} if cfg.gradient_checkpointing else {}))
    trainer = Trainer(model=model, args=args, train_dataset=train, data_collator=collator, callbacks=[SelectBest()])
    t0 = time.time()
    ckpt = _last_checkpoint(out / "checkpoints")
    result = trainer.train(resume_from_checkpoint=str(ckpt) if ckpt else None)
    if dev is None:
        _save_adapter(model, out / "adapter")
    summary = {"adapter": str(out / "adapter"), "datasets": datasets, "steps": trainer.state.global_step,
               "train_loss": result.training_loss, "train_runtime_s": round(time.time() - t0, 1),
               "best": state["best"], "precision": precision, "train_missing_clips": len(train.missing)}
    write_json(done, summary)
    return summary


def cmd_train_video(a) -> int:
    values = _read_yaml(a.config) if a.config else {}
    values = dict(values["train"]) if isinstance(values.get("train"), dict) else values
    for key in ("model", "data", "datasets", "out"):
        if getattr(a, key) is not None:
            values[key] = getattr(a, key)
    for item in a.overrides:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise ValueError(f"override '{item}' is not key=value")
        values[key.strip()] = value
    cfg = make_train_config(values)
    for name, r in train_video(cfg, progress=not a.no_progress).items():
        print(f"{name}: {r['adapter']} ({r['steps']} steps)")
    return 0


def add_cli(subparsers) -> None:
    sp = subparsers.add_parser("train-video", help="LoRA SFT/IT of a Qwen2-VL model on video + text",
                               description="Video fine-tuning. Config: defaults < paper preset (per dataset) < "
                                           "--config YAML (its `train:` section if it has one) < flags < key=value.")
    sp.add_argument("overrides", nargs="*", metavar="key=value")
    sp.add_argument("--config")
    sp.add_argument("--model")
    sp.add_argument("--data")
    sp.add_argument("--datasets", help="one name or a comma list (SFT each) | video (IT on the 9)")
    sp.add_argument("--out")
    sp.add_argument("--no-progress", action="store_true")
    sp.set_defaults(func=cmd_train_video)

    sp = subparsers.add_parser("video-run", help="the MLLM experiments of one config: zero-shot, SFT, IT + test",
                               description="Run the stages of an MLLM experiment config (e.g. configs/qwen2-vl-7b.yaml)"
                                           "; rerun the same command to resume.")
    sp.add_argument("config")
    sp.add_argument("--data", help="data root (overrides the config)")
    sp.add_argument("--out", help="output directory (overrides the config)")
    sp.add_argument("--stages", help="comma list of zero-shot,sft,it (default: the config's)")
    sp.add_argument("--limit", type=int, help="first N rows per dataset and split (quick runs)")
    sp.add_argument("--no-progress", action="store_true")
    sp.set_defaults(func=cmd_video_run)


# ---------------------------------------------------------------- the MLLM experiments in one command
# The config format is `mmla run`'s (mmla.experiment: name, model, paper_model, data, out, datasets, stages and
# the sections predict / zero_shot / train / sft / it), and so is the layout of the output directory.

STAGES = ("zero-shot", "sft", "it")
SECTIONS = ("predict", "zero_shot", "train", "sft", "it")
_PREDICT_KEYS = {f.name for f in dataclasses.fields(VideoPredictConfig)}
_TRAIN_KEYS = {f.name for f in dataclasses.fields(VideoTrainConfig)} - {"explicit"}


@dataclass
class VideoExperiment:
    name: str
    model: str
    out: str
    data: str | None = None
    datasets: list[str] = field(default_factory=lambda: ["video"])  # test sets of every stage
    paper_model: str | None = None
    stages: list[str] = field(default_factory=lambda: list(STAGES))
    predict: dict = field(default_factory=dict)  # PredictConfig keys for every test inference
    zero_shot: dict = field(default_factory=dict)  # ... for the zero-shot stage only
    train: dict = field(default_factory=dict)  # VideoTrainConfig keys for SFT and IT
    sft: dict = field(default_factory=dict)  # ... for one setting (its `datasets`: what is trained on)
    it: dict = field(default_factory=dict)


def read_experiment(path: str | os.PathLike, **overrides) -> VideoExperiment:
    raw = {**_read_yaml(path), **{k: v for k, v in overrides.items() if v is not None}}
    known = {f.name for f in dataclasses.fields(VideoExperiment)}
    bad = sorted(set(raw) - known)
    if bad:
        raise ValueError(f"{path}: unknown config key '{bad[0]}' (known: {', '.join(sorted(known))})")
    for key in ("name", "model", "out"):
        if not raw.get(key):
            raise ValueError(f"{path}: missing key '{key}'")
    for section in SECTIONS:
        sec = raw.get(section) or {}
        if not isinstance(sec, dict):
            raise ValueError(f"{path}: config section '{section}' must be a mapping")
        allowed = _PREDICT_KEYS if section in ("predict", "zero_shot") else _TRAIN_KEYS | {"datasets"}
        bad = sorted(set(sec) - allowed)
        if bad:
            raise ValueError(f"{path}: unknown {section} key '{bad[0]}'")
        raw[section] = dict(sec)
    if str(raw["predict"].get("modality", "video")) != "video":
        raise ValueError(f"{path}: predict.modality must be video for a video experiment")
    for key in ("datasets", "stages"):
        if isinstance(raw.get(key), str):
            raw[key] = [x.strip() for x in raw[key].split(",") if x.strip()]
    exp = VideoExperiment(**raw)
    wrong = [x for x in exp.stages if x not in STAGES]
    if wrong:
        raise ValueError(f"{path}: unknown stage '{wrong[0]}' (known: {', '.join(STAGES)})")
    return exp


def _combine(out: Path, parts: dict[str, Path], config: dict) -> dict:
    """One run directory (for `mmla report`) from the per-dataset SFT test runs."""
    from .evaluation import evaluate_records
    from .runs import read_jsonl, write_config, write_json

    out.mkdir(parents=True, exist_ok=True)
    records = [r for p in parts.values() for r in _dedupe(read_jsonl(p / "predictions.jsonl")[0])]
    (out / "predictions.jsonl").write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records))
    result = evaluate_records(records)
    result["missing_clips"] = sum(bool(r.get("clip_error")) for r in records)
    write_json(out / "metrics.json", result)
    write_config(out / "config.yaml", config)
    return result


def run_experiment(exp: VideoExperiment, progress: bool = True, limit: int | None = None) -> dict:
    """The stages of `exp`, each resumable (rerun skips finished predictions and trained adapters):
    <out>/zero-shot; <out>/sft-train/<DS> (adapter) + <out>/sft-test/<DS>, combined in <out>/sft;
    <out>/it-train (adapter) + <out>/it. Returns {stage: metrics}."""
    from .tasks import parse_datasets

    out = Path(exp.out)
    tests = ",".join(exp.datasets)

    def predict(adapter, datasets, setting, dest, extra=None):
        values = {**exp.predict, **(extra or {}), "model": exp.model, "data": exp.data, "datasets": [datasets],
                  "adapter": adapter, "setting": setting, "paper_model": exp.paper_model,
                  "name": f"{exp.name} {setting}", "out": str(dest)}
        if limit:
            values["limit"] = limit
        values = {k: _coerce(VideoPredictConfig, k, v) for k, v in values.items()}
        return predict_video(VideoPredictConfig(**values), progress=progress)

    def train_values(setting, datasets, dest):
        section = exp.sft if setting == "sft" else exp.it
        values = {**exp.train, **{k: v for k, v in section.items() if k != "datasets"}, "model": exp.model,
                  "data": exp.data, "datasets": datasets, "setting": setting, "out": str(dest)}
        if limit:
            values.setdefault("limit", limit)
            values.setdefault("eval_limit", limit)
        return values

    results = {}
    if "zero-shot" in exp.stages:
        results["zero-shot"] = predict(None, tests, "zero-shot", out / "zero-shot", exp.zero_shot)
    if "sft" in exp.stages:
        root = data_mod.data_root(exp.data)
        wanted = parse_datasets(exp.sft.get("datasets", tests))
        have = [ds for ds in wanted if "train" in data_mod.available_splits(root, ds)]
        if not have:
            raise ValueError(f"sft: none of {', '.join(wanted)} has a train split in {root}")
        parts = {}
        for ds in have:
            tdir = out / "sft-train" / ds
            train_video(make_train_config(train_values("sft", ds, tdir), ds), progress=progress)
            parts[ds] = out / "sft-test" / ds
            predict(str(tdir / "adapter"), ds, "sft", parts[ds])
        results["sft"] = _combine(out / "sft", parts, {
            "model": exp.model, "datasets": have, "setting": "sft", "paper_model": exp.paper_model,
            "name": f"{exp.name} sft", "modality": "video", "no_train_split": [d for d in wanted if d not in have]})
    if "it" in exp.stages:
        tdir = out / "it-train"
        sets = exp.it.get("datasets", "video")
        sets = ",".join(sets) if isinstance(sets, list) else str(sets)
        trained = train_video(make_train_config(train_values("it", sets, tdir)), progress=progress)
        results["it"] = predict(trained["it"]["adapter"], tests, "it", out / "it")
    return results


def cmd_video_run(a) -> int:
    from .evaluation import format_table

    exp = read_experiment(a.config, data=a.data, out=a.out, stages=a.stages.split(",") if a.stages else None)
    results = run_experiment(exp, progress=not a.no_progress, limit=a.limit)
    for stage, res in results.items():
        print(f"{stage}:\n{format_table(res)}\nmissing clips: {res.get('missing_clips', 0)}")
    print(f"run directories for `mmla report`: " + ", ".join(str(Path(exp.out) / s) for s in results))
    return 0


def main(argv: list[str] | None = None) -> int:
    """`python -m mmla.mllm train-video|video-run ...`: the same commands as `mmla`, until cli.py registers them."""
    from . import cli

    parser = cli._Parser(prog="mmla", description="MMLA video models.")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=cli._Parser)
    add_cli(sub)
    return cli.run_parsed(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
