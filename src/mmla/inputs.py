"""The one seam where text, video and audio differ: prompts (and clips) -> model inputs.

Everything that depends on the modality or the architecture lives here; the engine, the predict loop and the
trainer exist once and call an `Inputs`:

  chat(prompts)          chat-wrapped strings (one template call per prompt, the model kind looked up once per run)
  encode(texts, clips)   `Row`s: token ids with the media placeholders expanded, per-row media tensors
  score_rows(...)        the same for candidate scoring: prefix row + each candidate's remaining token ids
  train_item(...)        prompt + answer -> input_ids, labels (prompt masked), media
  media_kwargs(rows)     the rows' media tensors as one forward's keyword arguments
  positions(...)         rotary positions of a left-padded batch: 1-D, or the model's own index (Qwen2-VL's 3-D mrope)
  lora_target            which linear layers LoRA trains (all of a text model; the language model's of a video model)

`TextInputs` wraps a tokenizer. `VideoInputs` wraps a transformers processor (`AutoProcessor`): frames decoded by
mmla (PyAV + the frame cache, mmla.video) go to the processor as arrays with their fps, so any transformers-native
video-LLM works through its own processor and chat template, with no code per model. What must stay per model is data
in `resolve.MODEL_FAMILIES` (a row given by the caller, else the one the model's config names) and
`audio.AUDIO_FAMILIES`. `AudioInputs` does the same for a model whose processor takes audio (modalities "audio" and
"av"), the waveform decoded and cached by mmla.audio.
"""

from __future__ import annotations

import inspect
import os
from dataclasses import dataclass, field

import torch

from . import audio as audio_mod
from . import video as video_mod
from .resolve import ModelFamily, family_for
from .prompts import chat_messages, model_kind

IGNORE = -100  # label of the tokens the loss skips (prompt, media, padding)
VIDEO_TAG = "<video>"  # where the llamafactory_video prompts put the clip


def common_prefix(seqs: list[list[int]]) -> int:
    """Length of the longest common token prefix, leaving every sequence at least one token of its own."""
    return min(len(os.path.commonprefix(seqs)), min(len(s) for s in seqs) - 1)


@dataclass
class Row:
    """One model input: token ids (media placeholders expanded) and what goes with them."""

    ids: list[int]
    media: dict = field(default_factory=dict)  # per-row tensors concatenated along dim 0 in a batch
    tokens: dict = field(default_factory=dict)  # per-token extras (e.g. mm_token_type_ids), aligned with ids
    key: tuple = ()  # rows whose media shapes differ (cannot be concatenated) never share a forward


class TextInputs:
    modality = "text"
    rope_dims = 1

    def __init__(self, model, tokenizer, family: ModelFamily | None = None):
        self.model, self.tokenizer = model, tokenizer
        self.kind = model_kind(tokenizer)  # once per run: it reads the vocabulary
        self.row = family if family is not None else family_for(getattr(model, "config", None))
        self.own_system = audio_mod.audio_family(getattr(model, "config", None)).get("system")  # omni models
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
        self.media_token_ids: set[int] = set()

    # ---- prompts -> strings
    def messages(self, prompt: str, protocol: str, training: bool = False) -> list[dict]:
        if protocol == "official" and not training and self.row is not None:  # the row's official system prompt
            return ([{"role": "system", "content": self.row.system}] if self.row.system else []) + \
                [{"role": "user", "content": prompt}]
        msgs = chat_messages(prompt, protocol, self.kind, training=training)
        if self.own_system and not training:
            # an omni model reads text under its own system prompt too, so that the modality ablation's text
            # column differs from the others by the input only
            msgs = [{"role": "system", "content": self.own_system}] + [m for m in msgs if m["role"] != "system"]
        return msgs

    def chat(self, prompts: list[str], protocol: str, training: bool = False,
             histories: list[list[tuple[str, str]]] | None = None) -> list[str]:
        """The full model input strings, each ending with the assistant turn's header. `histories`: earlier
        (user, assistant) turns per prompt, put after the system turn (InternLM's official "hello" exchange)."""
        msgs = [self.messages(p, protocol, training) for p in prompts]
        for m, turns in zip(msgs, histories or ()):
            at = 1 if m and m[0]["role"] == "system" else 0
            m[at:at] = [t for u, a in turns for t in ({"role": "user", "content": u},
                                                      {"role": "assistant", "content": a})]
        if not msgs:
            return []
        return self._template(msgs)

    def _template(self, msgs: list[list[dict]]) -> list[str]:
        return self.tokenizer.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)

    def end_of_turn(self, protocol: str) -> str:
        """What the chat template writes after an assistant answer (e.g. '<|im_end|>'), trailing newline dropped.
        LLaMA-Factory trains on the answer followed by it; rendering a dummy answer finds it for any chat model."""
        msgs = self.messages("x", protocol, training=True)
        head = self._template([msgs])[0]
        marker = "ANSWER-7f3a"
        full = self._render(msgs + [self._answer_turn(marker)])
        if full.startswith(head) and marker in full[len(head):]:
            return full[len(head):].split(marker, 1)[1].rstrip()
        return self.tokenizer.eos_token or ""

    def _answer_turn(self, text: str) -> dict:
        return {"role": "assistant", "content": text}

    def _render(self, msgs: list[dict]) -> str:
        return self.tokenizer.apply_chat_template(msgs, tokenize=False)

    # ---- strings -> rows
    def tokenize(self, texts: list[str]) -> list[list[int]]:
        return self.tokenizer(texts, add_special_tokens=False)["input_ids"] if texts else []

    def encode(self, texts: list[str], clips: list | None = None) -> list[Row]:
        return [Row(ids) for ids in self.tokenize(texts)]

    def score_rows(self, texts: list[str], candidates: list[list[str]], clips: list | None = None):
        """Per prompt: a Row of the token prefix shared by all its candidates (prompt + candidate tokenised jointly,
        e.g. the prompt plus "emotion: "), and each candidate's remaining token ids."""
        out = []
        for k, (text, cands) in enumerate(zip(texts, candidates)):
            joint = self.tokenize([text + c for c in cands])
            n = common_prefix(joint)
            row = self._expand(joint[0][:n], text, clips[k] if clips else None)
            out.append((row, [s[n:] for s in joint]))
        return out

    def _expand(self, ids: list[int], text: str, clip) -> Row:
        return Row(ids)

    def train_item(self, chat_prompt: str, answer: str, cutoff: int, clip=None) -> tuple[dict, bool]:
        """input_ids = prompt + answer (tokenised apart, as LLaMA-Factory does), labels masking the prompt.
        Over `cutoff`: keep the answer, cut the end of the prompt (LLaMA-Factory cuts the source first)."""
        p, a = self.tokenize([chat_prompt, answer])
        return encode_ids(p, a, cutoff), len(p) + len(a) > cutoff

    # ---- rows -> forward arguments
    def media_kwargs(self, rows: list[Row], device) -> dict:
        return {}

    def token_kwargs(self, rows_ids: torch.Tensor, tokens: list[dict], width: int, device) -> dict:
        return {}

    def positions(self, ids: torch.Tensor, mask: torch.Tensor, media: dict, tokens: dict) -> torch.Tensor:
        """Rotary positions (B, L) of a left-padded batch: 0 at each row's first real token."""
        return (mask.cumsum(-1) - 1).clamp(min=0)

    def prefix_limit(self, ids: list[int]) -> int:
        """How much of a row may go into a prefix shared by all rows (a KV cache computed once)."""
        return len(ids)

    def forward_kwargs(self, kwargs: dict) -> dict:
        return kwargs

    def last_logits(self, model, **kwargs) -> torch.Tensor:
        """One forward; the next-token logits (B, V) at each row's last position."""
        return model(**kwargs, logits_to_keep=1).logits[:, -1]

    @property
    def lora_target(self) -> str:
        return "all-linear"  # every linear layer but the output layer (LLaMA-Factory `all`)

    # ---- the model's context
    @property
    def context_length(self) -> int | None:
        """The positions the model was trained on (its config's max_position_embeddings), or None if unknown."""
        config = self.model.config
        config = config.get_text_config() if hasattr(config, "get_text_config") else config
        n = getattr(config, "max_position_embeddings", None)
        return int(n) if n else None

    def excess(self, rows: list, new_tokens: int) -> list[int]:
        """Per row: how many tokens its prompt (plus the longest candidate's rest, for score rows) and `new_tokens`
        generated ones run past the model's context; 0 when it fits."""
        n = self.context_length
        if n is None:
            return [0] * len(rows)
        sizes = [len(r.ids) if isinstance(r, Row) else len(r[0].ids) + max(len(c) for c in r[1]) for r in rows]
        return [max(0, k + new_tokens - n) for k in sizes]


def encode_ids(p: list[int], a: list[int], cutoff: int) -> dict:
    if len(p) + len(a) > cutoff:
        a = a[:cutoff]
        p = p[: max(cutoff - len(a), 1)]
    return {"input_ids": p + a, "labels": [IGNORE] * len(p) + a}


class VideoInputs(TextInputs):
    """A video-LLM through its processor: one user turn with a video part where the prompt's "<video>" tag is
    (first if there is none; LLaMA-Factory replaces the tag with the vision tokens, so the tag never reaches the
    model as text), frames handed to the processor as arrays with their fps."""

    modality = "video"

    def __init__(self, model, processor, setting: video_mod.FrameSetting, family: ModelFamily | None = None):
        super().__init__(model, processor.tokenizer, family)
        self.processor = processor
        self.family = {**(self.row.record() if self.row is not None else {}), **audio_mod.audio_family(model.config)}
        # Under the clean protocol a model that reads time from its inputs (Qwen2.5-VL's temporal positions) is told
        # the clip's real sampled frame rate; the official script tells it 1 fps whatever the clip (set by the caller).
        self.time_from_clip = False
        self._init_video(setting)
        self._init_model(model)

    def _init_video(self, setting: video_mod.FrameSetting) -> None:
        vp = self.processor.video_processor
        # Frames are resized by mmla to sides that are multiples of the processor's patch x merge size, so that
        # processors which take them as they are (Qwen2-VL) see exactly the official frames.
        factor = getattr(vp, "patch_size", None) and getattr(vp, "merge_size", None) and vp.patch_size * vp.merge_size
        self.setting = video_mod.frame_setting(setting, factor=factor) if factor else setting
        self.processor_kwargs = {"do_sample_frames": False, **self.family.get("processor_kwargs", {})}

    def _init_model(self, model) -> None:
        # The tokens that stand for media features (some models put a video's frames under image tokens).
        names = ("video_token_id", "image_token_id", "video_token_index", "image_token_index", "audio_token_id",
                 "audio_token_index")
        found = [getattr(o, n, None) for o in (self.processor, model.config) for n in names]
        self.media_token_ids = {t for t in found if isinstance(t, int)}
        inner = _inner(model)
        self._rope = getattr(inner, "get_rope_index", None)
        self.rope_dims = 3 if self._rope is not None else 1
        self._forward_params = set(inspect.signature(_core(model).forward).parameters)

    def load(self, path, cache: video_mod.FrameCache | None):
        """What `encode` takes for one clip (ClipError with the reason if it cannot be had)."""
        return video_mod.load_frames(path, self.setting, cache)

    def clip_fields(self, clip) -> dict:
        """What a prediction record says about the clip beyond its path."""
        return {}

    def _parts(self) -> list[dict]:
        return [{"type": "video"}]

    def messages(self, prompt: str, protocol: str, training: bool = False) -> list[dict]:
        # The official video inference sends the user turn only (the checkpoint's template adds its default system
        # prompt, e.g. Qwen2-VL's "You are a helpful assistant.", also LLaMA-Factory's qwen2_vl one).
        parts = prompt.split(VIDEO_TAG)
        if len(parts) > 2:
            raise ValueError(f"a prompt may hold one {VIDEO_TAG} tag, this one has {len(parts) - 1}")
        text = lambda s: [{"type": "text", "text": s}] if s else []  # noqa: E731
        content = self._parts() + text(prompt) if len(parts) == 1 else \
            text(parts[0]) + self._parts() + text(parts[1])
        # the row's official system prompt; an omni model's own (mmla.audio) in every protocol and modality
        system = (self.family.get("system") if protocol == "official" and not training else None) or self.own_system
        return ([{"role": "system", "content": [{"type": "text", "text": system}]}] if system else []) + \
            [{"role": "user", "content": content}]

    def chat(self, prompts: list[str], protocol: str, training: bool = False) -> list[str]:
        template = self.family.get("template")
        if protocol != "official" or training or not template:
            return super().chat(prompts, protocol, training)
        # the official script's own conversation template; its image token becomes the processor's video token
        media = getattr(self.processor, "video_token", None) or VIDEO_TAG
        return [template.format(system=self.family.get("system") or "", media=media, prompt=p) for p in prompts]

    def _template(self, msgs):
        return [self.processor.apply_chat_template(m, tokenize=False, add_generation_prompt=True) for m in msgs]

    def _render(self, msgs):
        return self.processor.apply_chat_template(msgs, tokenize=False)

    def _answer_turn(self, text: str) -> dict:
        return {"role": "assistant", "content": [{"type": "text", "text": text}]}

    def _process(self, text: str, frames: video_mod.Frames) -> dict:
        n = len(frames.array)
        meta = {"total_num_frames": n, "fps": self.setting.fps, "frames_indices": list(range(n))}
        if self.time_from_clip and frames.video_fps and frames.total_frames:
            meta = {"total_num_frames": frames.total_frames, "fps": frames.video_fps,
                    "frames_indices": list(frames.indices), "duration": frames.duration}
        return self.processor(text=[text], videos=[frames.array], video_metadata=[meta], return_tensors="pt",
                              add_special_tokens=False, **self.processor_kwargs)

    def _row(self, out: dict) -> Row:
        ids = out["input_ids"][0].tolist()
        media, tokens = {}, {}
        for k, v in out.items():
            if k in ("input_ids", "attention_mask"):
                continue
            if not isinstance(v, torch.Tensor):
                v = torch.tensor(v)
            if v.dim() == 2 and v.shape == out["input_ids"].shape:
                tokens[k] = v[0].tolist()  # per token: left-padded with 0 in a batch
            elif k in self._forward_params or k == "second_per_grid_ts":
                media[k] = v if v.dim() > 0 else v[None]
        key = tuple((k, tuple(v.shape[1:])) for k, v in sorted(media.items()))
        return Row(ids, media, tokens, key)

    def encode(self, texts: list[str], clips: list | None = None) -> list[Row]:
        return [self._row(self._process(t, fr)) for t, fr in zip(texts, clips)]

    def _expand(self, ids: list[int], text: str, frames) -> Row:
        """Token ids of `text` + more text tokens -> the same with the media placeholders expanded."""
        row = self._row(self._process(text, frames))
        base = self.tokenize([text])[0]
        # the processor's ids equal the tokenizer's but for the expanded placeholders: common head and tail
        head = len(os.path.commonprefix([base, row.ids]))
        tail = len(os.path.commonprefix([base[::-1], row.ids[::-1]]))
        tail = min(tail, len(base) - head, len(row.ids) - head)
        stop = len(base) - tail
        if ids[:stop] != base[:stop]:
            raise ValueError("a candidate answer changes how the prompt is tokenised; cannot score it")
        extra = ids[stop:]
        keep = len(row.ids) - tail
        row.ids = row.ids[:keep] + extra
        row.tokens = {k: v[:keep] + [0] * len(extra) for k, v in row.tokens.items()}
        return row

    def train_item(self, chat_prompt: str, answer: str, cutoff: int, clip=None) -> tuple[dict, bool]:
        row = self._row(self._process(chat_prompt, clip))
        a = self.tokenize([answer])[0]
        p = row.ids
        truncated = len(p) + len(a) > cutoff
        if truncated:
            keep = cutoff - len(a)
            last_media = max((i for i, t in enumerate(p) if t in self.media_token_ids), default=-1)
            if keep <= last_media:
                raise ValueError(f"cutoff_len {cutoff} would cut into the {self.modality} clip; raise cutoff_len")
            p = p[:keep]
        item = {"input_ids": p + a, "labels": [IGNORE] * len(p) + a, "media": row.media,
                "tokens": {k: v[: len(p)] + [0] * len(a) for k, v in row.tokens.items()}}
        return item, truncated

    def media_kwargs(self, rows: list[Row], device) -> dict:
        out = {}
        for k in rows[0].media:
            v = torch.cat([r.media[k] for r in rows]).to(device)
            out[k] = v
        return out

    def token_kwargs(self, rows_ids: torch.Tensor, tokens: list[dict], width: int, device) -> dict:
        """Per-token extras of left-padded rows (0 on the padding)."""
        out = {}
        for k in tokens[0] if tokens else ():
            t = torch.zeros((len(tokens), width), dtype=torch.long)
            for r, tk in enumerate(tokens):
                if tk[k]:
                    t[r, width - len(tk[k]):] = torch.tensor(tk[k], dtype=torch.long)
            out[k] = t.to(device)
        return out

    def positions(self, ids, mask, media, tokens):
        if self._rope is None:
            return super().positions(ids, mask, media, tokens)
        params = inspect.signature(self._rope).parameters
        kw = {k: v for k, v in {**media, **tokens, **self._rope_extra(media), "attention_mask": mask}.items()
              if k in params}
        positions, _ = self._rope(input_ids=ids, **kw)
        return positions

    def _rope_extra(self, media: dict) -> dict:
        """Rope-index arguments named otherwise than the processor's outputs (Qwen2.5-Omni: second_per_grids)."""
        return {"second_per_grids": media["video_second_per_grid"]} if "video_second_per_grid" in media else {}

    def prefix_limit(self, ids: list[int]) -> int:
        # a shared prefix stops before the first media token: the vision features enter at the prefill
        return next((i for i, t in enumerate(ids) if t in self.media_token_ids), len(ids))

    def forward_kwargs(self, kwargs: dict) -> dict:
        """Only what the model's forward takes (Qwen2-VL has no second_per_grid_ts)."""
        return {k: v for k, v in kwargs.items() if k in self._forward_params}

    @property
    def lora_target(self) -> str:
        # LoRA on the language model's linear layers only: the vision tower and projector stay frozen
        # (LLaMA-Factory: lora_target all, freeze_vision_tower and freeze_multi_modal_projector by default).
        return r".*language_model.*\.(q_proj|k_proj|v_proj|o_proj|gate_proj|up_proj|down_proj)$"


class AudioInputs(VideoInputs):
    """An audio-capable model through its processor (Qwen2-Audio, Qwen2.5-Omni, Qwen3-Omni, ...): modality
    "audio" (the clip's sound + text) or "av" (frames + sound + text). The waveform decoded by mmla (mmla.audio,
    cached) goes to the processor as an array at its feature extractor's rate; for av, the family's table says
    whether the processor interleaves it with the frames (Qwen2.5-Omni: `load_audio_from_video`, and the model's
    rope index then takes `use_audio_in_video`) or it is a separate audio part after the video."""

    def __init__(self, model, processor, modality: str, setting: video_mod.FrameSetting | None = None,
                 max_seconds: float | None = None, interleave: bool | None = None, family: ModelFamily | None = None):
        TextInputs.__init__(self, model, processor.tokenizer, family)
        if not audio_mod.takes_audio(processor):
            raise ValueError(f"{model.config.model_type}: its processor takes no audio (use --modality text or video)")
        self.processor, self.modality = processor, modality
        self.family = {**(self.row.record() if self.row is not None else {}), **audio_mod.audio_family(model.config)}
        self.time_from_clip = False  # the frames' rate as the official scripts tell it (1 fps)
        if modality == "av":
            if getattr(processor, "video_processor", None) is None or not self.family.get("video", True):
                raise ValueError(f"{model.config.model_type} hears but does not see: use --modality audio")
            self._init_video(setting or video_mod.FRAME_SETTINGS["official-infer"])
        else:
            self.setting, self.processor_kwargs = None, {}
        self.audio_setting = audio_mod.audio_setting(processor, self.family, max_seconds, interleave, modality)
        self._init_model(model)
        self._audio_caches: dict[int, audio_mod.AudioCache] = {}
        core = _core(model)
        self._keeps_logits = "logits_to_keep" in self._forward_params or not (
            hasattr(core, "model") and hasattr(core, "lm_head"))

    def load(self, path, cache: video_mod.FrameCache | None):
        # decode workers call this at once: setdefault keeps one audio cache per frame cache (and its counts)
        audio_cache = (self._audio_caches.setdefault(id(cache), audio_mod.AudioCache.beside(cache))
                       if cache is not None else None)
        sound = audio_mod.load_audio(path, self.audio_setting, audio_cache)
        if self.modality == "audio":
            return sound
        return audio_mod.AvClip(video_mod.load_frames(path, self.setting, cache), sound)

    def audio_cache_stats(self) -> dict:
        return {"audio_cache_hits": sum(c.hits for c in self._audio_caches.values()),
                "audio_cache_misses": sum(c.misses for c in self._audio_caches.values())}

    def clip_fields(self, clip) -> dict:
        sound = clip.audio if isinstance(clip, audio_mod.AvClip) else clip
        return {"audio_track": bool(sound.has_track)}

    def _parts(self) -> list[dict]:
        # the "audio" key: Qwen2-Audio's template tests `'audio' in content`, not the part's type
        audio = [{"type": "audio", "audio": "clip"}]
        if self.modality == "audio":
            return audio
        # interleaved: the video part stands for both (the processor puts the audio tokens inside it)
        return [{"type": "video"}] + ([] if self.audio_setting.interleave else audio)

    def _process(self, text: str, clip) -> dict:
        s = self.audio_setting
        sound = clip.audio if isinstance(clip, audio_mod.AvClip) else clip
        # Every row's features padded to the same length (max_seconds): rows then share a forward, and a row's
        # features never depend on the others in its batch.
        pad = int(round(self.family.get("pad_seconds", s.max_seconds) * s.rate))
        kw = dict(text=[text], audio=[sound.wave], return_tensors="pt", add_special_tokens=False,
                  audio_kwargs={"sampling_rate": s.rate, "max_length": pad, "truncation": True,
                                "padding": "max_length"})
        if self.modality == "av":
            frames = clip.frames
            n = len(frames.array)
            kw.update(videos=[frames.array], fps=self.setting.fps, **self.processor_kwargs,
                      video_metadata=[{"total_num_frames": n, "fps": self.setting.fps,
                                       "frames_indices": list(range(n))}])
            if s.interleave:
                kw.update(audio_from_video_indices=[0], load_audio_from_video=True)
        return self.processor(**kw)

    def _rope_extra(self, media: dict) -> dict:
        extra = {**super()._rope_extra(media), "use_audio_in_video": self.audio_setting.interleave}
        if "feature_attention_mask" in media:
            extra["audio_seqlens"] = media["feature_attention_mask"].sum(-1)
        return extra

    def forward_kwargs(self, kwargs: dict) -> dict:
        out = super().forward_kwargs(kwargs)
        if self.audio_setting.interleave and "use_audio_in_video" in self._forward_params:
            # a training forward computes its own rope index, which must know the audio is inside the video (a
            # tensor, so that the collated batch moves to the device like the rest)
            out["use_audio_in_video"] = torch.tensor(True)
        return out

    def last_logits(self, model, **kwargs) -> torch.Tensor:
        if self._keeps_logits:
            return super().last_logits(model, **kwargs)
        # Qwen2.5-Omni's thinker ignores logits_to_keep and projects every position onto the vocabulary (at a
        # prefill of ~600 tokens, most of a small model's time): run its body, then the head on the last position.
        core = _core(model)
        hidden = core.model(**kwargs).last_hidden_state[:, -1]
        return core.lm_head(hidden)

    def record(self) -> dict:
        """The audio setting of a run (env.json, config.yaml)."""
        return self.audio_setting.record()


def _core(model):
    """The transformers model under a peft wrapper (LoRA layers are injected in place)."""
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def _inner(model):
    core = _core(model)
    return getattr(core, "model", core)


def make_inputs(model, tokenizer_or_processor, setting: video_mod.FrameSetting | None = None,
                family: ModelFamily | None = None, modality: str | None = None,
                audio: dict | None = None) -> TextInputs:
    """The seam for a loaded model: audio (or audio + video) when `modality` says so (`audio`: overrides of the
    audio setting, max_seconds and interleave), video when it came with a processor that takes videos. `family`:
    the row the resolver chose (default: the one the model's config names)."""
    if modality in ("audio", "av"):
        return AudioInputs(model, tokenizer_or_processor, modality, setting, family=family, **(audio or {}))
    if setting is not None and hasattr(tokenizer_or_processor, "video_processor"):
        return VideoInputs(model, tokenizer_or_processor, setting, family)
    tok = getattr(tokenizer_or_processor, "tokenizer", tokenizer_or_processor)
    return TextInputs(model, tok, family)
