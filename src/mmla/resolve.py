"""One resolver for a run's model: model -> modality -> model family -> protocol -> decoding, for predict and train.

`MODEL_FAMILIES` holds, per model family of the paper, how the official MMLA code runs it (../shared/OFFICIAL_MODELS.md,
file and line for each fact there): the prompt variant, the system prompt and chat template, where the video goes,
the frames, the decoding, what is decoded and how the output is cleaned, and the route that runs it here. Facts the
sheet marks "(ext)" come from checkpoints and libraries, not the MMLA repository: they are recorded as settings a
user can check (`ext` lists them per row).

Choosing a row (`family_for`): the model's config (model_type, and for the text LLMs the vocabulary size and the
Llama-3.1 rope type, so that a small test model with a borrowed tokenizer is not taken for the real one); when the
config names no row, the paper model (`--paper-model NAME`); a paper model whose row shares the config's model_type
is preferred (LLaVA-Video and LLaVA-OneVision share `llava_onevision`). Under `--protocol official`, a model with no
row runs the clean protocol, and the run says so (`Resolved.note`).

Prompt variants (the user text the official script builds): P-A = prompt family `infer_script`, P-B =
`infer_script_llava`, P-C (and P-C' on IEMOCAP, a quirk of the same files) = `swift_video_prompt`.
"""

from __future__ import annotations

import os
from dataclasses import asdict, dataclass, field

from .prompts import LLAMA3_SYSTEM, PROTOCOLS, QWEN_SYSTEM, Decoding

PROMPT_VARIANTS = {"P-A": "infer_script", "P-B": "infer_script_llava", "P-C": "swift_video_prompt"}
CHATML_SYSTEM = "You are a helpful assistant."
# VideoLLaMA2's videollama2/__init__.py L72-79 (Llama-2's default system prompt, in <<SYS>> tags).
LLAMA2_SYSTEM = (
    "<<SYS>>\nYou are a helpful, respectful and honest assistant. Always answer as helpfully as possible, while being "
    "safe.  Your answers should not include any harmful, unethical, racist, sexist, toxic, dangerous, or illegal "
    "content. Please ensure that your responses are socially unbiased and positive in nature.\n\nIf a question does "
    "not make any sense, or is not factually coherent, explain why instead of answering something not correct. If "
    "you don't know the answer to a question, please don't share false information.\n<</SYS>>"
)
INTERNLM_SYSTEM = (  # InternLM2.5-chat's model.chat default meta_instruction (remote code, ext)
    "You are an AI assistant whose name is InternLM (书生·浦语).\n"
    "- InternLM (书生·浦语) is a conversational language model that is developed by Shanghai AI Laboratory (上海人工智能"
    "实验室). It is designed to be helpful, honest, and harmless.\n"
    "- InternLM (书生·浦语) can understand and communicate fluently in the language chosen by the user such as English "
    "and 中文."
)
# LLaVA-NeXT conv_templates["qwen_1_5"] (conversation.py L443-452): the prompt text follows the image token directly.
CHATML = "<|im_start|>system\n{system}<|im_end|>\n<|im_start|>user\n{media}{prompt}<|im_end|>\n<|im_start|>assistant\n"
# Mistral-7B-Instruct-v0.2's tokenizer template with a system turn, as VideoLLaMA2's checkpoint renders it (ext).
MISTRAL_SYS = "<s>[INST] {system}\n\n{media}{prompt} [/INST]"

# What a run feeds the model (auto: all the model takes), and the modalities whose rows come with their clip.
MODALITIES = ("auto", "text", "video", "audio", "av")
CLIP_MODALITIES = ("video", "audio", "av")

ROUTES = ("native", "remote-code", "server", "unsupported")


@dataclass(frozen=True)
class ModelFamily:
    """How the official code runs one model family, and how mmla runs it here."""

    name: str
    modality: str  # text | video
    paper_models: tuple[str, ...]  # the paper's model names of this family
    model_types: tuple[str, ...] = ()  # config.model_type values that identify it
    min_vocab: int = 0  # text LLMs: the real vocabulary size (a test model with a borrowed tokenizer has less)
    rope_type: str | None = None  # Llama-3.1/3.2: rope_scaling.rope_type "llama3" (Llama-3 has none)
    prompt: str = "P-A"  # P-A | P-B | P-C (P-C' for IEMOCAP)
    system: str | None = None  # None: the chat template's default system turn, if any
    template: str | None = None  # a format string with {system} {media} {prompt}; None: the checkpoint's template
    video_at: str = "n/a"  # where the clip goes, in words
    frames: str | None = None  # zero-shot frame setting (mmla.video.FRAME_SETTINGS)
    train_frames: str | None = None  # fine-tuning frame setting
    decoding: dict = field(default_factory=dict)  # Decoding fields; "checkpoint": inherit the generation config
    max_new_tokens: int | None = 64  # None: until the model's maximum length
    decoded: str = "new"  # new (new tokens only) | whole (the prompt too: Llama-3.1/3.2's defect)
    cleanup: str = "none"  # none | strip | drop-newlines | drop-newlines-lower
    warmup_turn: str | None = None  # a first user turn whose sampled reply stays in the context (InternLM "hello")
    processor_kwargs: dict = field(default_factory=dict)  # how its processor takes frames mmla already resized
    paper_preset: str | None = None  # the per-dataset fine-tuning table (mmla.training.VIDEO_PRESETS)
    route: str = "native"  # native | remote-code | server | unsupported
    checkpoints: tuple[str, ...] = ()  # what mmla loads (hub ids)
    pooling: str | None = None  # llava-video: its own average pooling with a newline per row (mmla.llava_video)
    official: bool = True  # False: a known architecture the paper did not run (no official setting)
    ext: tuple[str, ...] = ()  # settings taken from checkpoints/libraries, to check against the exact revision
    defects: tuple[str, ...] = ()  # the official code's own bugs that `official` reproduces
    unsupported: str | None = None  # why this row cannot run here

    @property
    def prompt_family(self) -> str:
        return PROMPT_VARIANTS[self.prompt]

    def record(self) -> dict:
        return asdict(self)


_QWEN_VL_PROCESSOR = {"do_resize": False, "cap_pixels_per_frame": False}
_LLAVA = dict(modality="video", model_types=("llava_onevision",), prompt="P-B", system=CHATML_SYSTEM, template=CHATML,
              video_at="<image> straight before the text, no newline (here the processor's video token)",
              frames="llava-infer", train_frames="official-train",
              decoding={"do_sample": False, "repetition_penalty": "checkpoint"}, max_new_tokens=1024,
              cleanup="strip", ext=("repetition_penalty 1.05 from the checkpoint generation_config",))

_ROWS = [
    ModelFamily("qwen2", "text", ("Qwen2-0.5B", "Qwen2-1.5B", "Qwen2-7B"), ("qwen2",), min_vocab=151643,
                system=QWEN_SYSTEM, decoding={"checkpoint": True}, max_new_tokens=1024,
                checkpoints=("Qwen/Qwen2-0.5B-Instruct", "Qwen/Qwen2-1.5B-Instruct", "Qwen/Qwen2-7B-Instruct"),
                ext=("sampling settings of the checkpoint generation_config (T 0.7, top_p 0.8, top_k 20, rep 1.05)",)),
    ModelFamily("llama3", "text", ("Llama-3-8B",), ("llama",), min_vocab=128256, system=LLAMA3_SYSTEM,
                decoding={"do_sample": True, "temperature": 0.6, "top_p": 0.9}, max_new_tokens=256,
                checkpoints=("meta-llama/Meta-Llama-3-8B-Instruct",),
                defects=("the Hugging Face example's pirate system prompt",)),
    ModelFamily("llama3.1", "text", ("Llama-3.1-8B", "Llama-3.2-1B", "Llama-3.2-3B"), ("llama",), min_vocab=128256,
                rope_type="llama3", decoding={"checkpoint": True, "do_sample": True}, max_new_tokens=256,
                decoded="whole", cleanup="drop-newlines",
                checkpoints=("meta-llama/Llama-3.1-8B-Instruct", "meta-llama/Llama-3.2-1B-Instruct",
                             "meta-llama/Llama-3.2-3B-Instruct"),
                ext=("template default system header (3.1: knowledge/date lines; 3.2: today's date)",
                     "temperature 0.6 / top_p 0.9 from the checkpoint generation_config"),
                defects=("the whole sequence is decoded, prompt included, newlines removed",)),
    ModelFamily("internlm2.5", "text", ("InternLM2.5-7B",), ("internlm2",), system=INTERNLM_SYSTEM,
                decoding={"do_sample": True, "temperature": 0.8, "top_p": 0.8}, max_new_tokens=1024,
                cleanup="drop-newlines-lower", warmup_turn="hello", route="remote-code",
                checkpoints=("internlm/internlm2_5-7b-chat",),
                ext=("model.chat defaults: meta_instruction, do_sample, T 0.8, top_p 0.8, max_new_tokens 1024",),
                defects=("a sampled reply to a first 'hello' turn stays in the context",)),
    ModelFamily("qwen2-vl", "video", ("Qwen2-VL-7B", "Qwen2-VL-72B"), ("qwen2_vl",),
                # frames: official-infer keeps today's default (no JPEG round trip); qwen2-vl-infer adds it (the paper
                # configs use that one)
                video_at="video part before the text", frames="official-infer", train_frames="official-train",
                decoding={"checkpoint": True}, max_new_tokens=128, processor_kwargs=_QWEN_VL_PROCESSOR,
                paper_preset="qwen2-vl-7b", checkpoints=("Qwen/Qwen2-VL-7B-Instruct", "Qwen/Qwen2-VL-72B-Instruct"),
                ext=("default system turn of the chat template", "top_k 1, rep 1.05 from the generation_config")),
    ModelFamily("llava-onevision", paper_models=("LLaVA-OV-7B", "LLaVA-OV-72B"), **_LLAVA,
                checkpoints=("llava-hf/llava-onevision-qwen2-7b-ov-chat-hf",
                             "llava-hf/llava-onevision-qwen2-72b-ov-chat-hf")),
    ModelFamily("llava-video", paper_models=("LLaVA-Video-7B", "LLaVA-Video-72B"), pooling="llava-video", **_LLAVA,
                checkpoints=("llava-hf/LLaVA-Video-7B-Qwen2-hf",)),
    ModelFamily("videollama2", "video", ("VideoLLaMA2-7B",), ("videollama2_mistral",), system=LLAMA2_SYSTEM,
                template=MISTRAL_SYS, video_at="'<video>\\n' before the text", frames="videollama2-infer",
                decoding={"do_sample": False}, max_new_tokens=2048, cleanup="strip", route="unsupported",
                checkpoints=("DAMO-NLP-SG/VideoLLaMA2-7B",),
                ext=("Mistral [INST] chat template of the checkpoint tokenizer",
                     "the <<SYS>> text past its first sentence: Llama-2's default system prompt, as the sheet quotes"),
                unsupported="no transformers class and no remote code: it needs the VideoLLaMA2 repository's "
                            "modified package (STC connector, Videollama2MistralForCausalLM), which mmla does not "
                            "vendor; serve it behind an OpenAI-compatible server (--backend openai) if you have one"),
    ModelFamily("minicpm-v-2.6", "video", ("MiniCPM-V-2.6-8B",), ("minicpmv",), prompt="P-C", system=CHATML_SYSTEM,
                video_at="the frames before the text (swift prepends them)", frames="minicpm-infer",
                decoding={"do_sample": False}, max_new_tokens=None, route="remote-code",
                checkpoints=("openbmb/MiniCPM-V-2_6",),
                ext=("ms-swift 3.x template minicpmv2_6 (ChatML, default system)", "swift greedy defaults",
                     "per frame <image> + 64 query tokens + </image>, max_slice_nums 1"),
                unsupported="remote code only (modeling_minicpmv.py): its processor takes images, not "
                            "`videos=[frames]`, so mmla's video path cannot drive it; run it through ms-swift or "
                            "a vLLM server (--backend openai)"),
    # Not in the paper: known architectures without an official setting of their own.
    ModelFamily("qwen2.5-vl", "video", (), ("qwen2_5_vl",), frames="official-infer", train_frames="official-train",
                decoding={"checkpoint": True}, max_new_tokens=128, processor_kwargs=_QWEN_VL_PROCESSOR,
                paper_preset="qwen2-vl-7b", checkpoints=("Qwen/Qwen2.5-VL-7B-Instruct",),
                ext=("borrows Qwen2-VL's official setting (the paper has no Qwen2.5-VL row)",)),
    ModelFamily("qwen3-vl", "video", (), ("qwen3_vl",), processor_kwargs=_QWEN_VL_PROCESSOR, official=False),
    ModelFamily("internvl", "video", (), ("internvl",), official=False),
]
MODEL_FAMILIES: dict[str, ModelFamily] = {r.name: r for r in _ROWS}
PAPER_MODELS: dict[str, str] = {m: r.name for r in _ROWS for m in r.paper_models}


def _paper_row(paper_model: str | None) -> ModelFamily | None:
    # GPT-4o and names outside the paper have no row (a report may still compare against any name)
    return MODEL_FAMILIES[PAPER_MODELS[paper_model]] if paper_model in PAPER_MODELS else None


def _config_row(config) -> ModelFamily | None:
    if config is None:
        return None
    mt = getattr(config, "model_type", None)
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    rope = getattr(text, "rope_scaling", None) or getattr(text, "rope_parameters", None) or {}
    rope_type = rope.get("rope_type", rope.get("type")) if isinstance(rope, dict) else None
    for row in _ROWS:
        if mt not in row.model_types or getattr(text, "vocab_size", 0) < row.min_vocab:
            continue
        if row.model_types == ("llama",) and (rope_type == "llama3") != (row.rope_type == "llama3"):
            continue
        if row.name == "llava-video":  # the -hf conversion keeps OneVision's model_type: only the paper model says
            continue
        return row
    return None


def family_for(config=None, paper_model: str | None = None) -> ModelFamily | None:
    """The model family's row: from the config, else from the paper model's name (see the module docstring)."""
    by_paper = _paper_row(paper_model)
    by_config = _config_row(config)
    if by_paper is not None and config is not None and getattr(config, "model_type", None) in by_paper.model_types:
        return by_paper
    return by_config or by_paper


# ---------------------------------------------------------------- the resolver


@dataclass
class Resolved:
    """What a run's model resolves to: modality, family row, the protocol that applies, and why."""

    modality: str
    family: ModelFamily | None
    protocol: str  # the protocol that applies (official falls back to clean without a row)
    prompt_family: str  # the prompt family it implies (a user's --family wins over it)
    note: str | None = None  # one line for stderr and env.json when the requested protocol did not apply

    def record(self) -> dict:
        return {"model_family": self.family.name if self.family else None, "protocol_applied": self.protocol,
                "protocol_note": self.note}


def modality_from_config(config, model: str, modality: str = "auto") -> str:
    """What the run feeds the model: `modality` checked against what the model takes, or (auto) all of it: av for
    an omni model (audio and vision), audio for an audio LLM, video for a vision-language model, else text."""
    from .models import hears, takes_images

    if modality == "text":
        return "text"
    if config is None:
        return modality if modality != "auto" else "text"
    sees, heard = takes_images(getattr(config, "thinker_config", config)), hears(config)
    if modality == "auto":
        return ("av" if sees else "audio") if heard else "video" if sees else "text"
    if modality in ("audio", "av") and not heard:
        raise ValueError(f"model '{model}' ({config.model_type}) has no audio encoder (use modality=video or text)")
    if modality in ("video", "av") and not sees:
        what = "audio" if heard else "text"
        raise ValueError(f"model '{model}' is a {config.model_type} {what} model: it cannot take video "
                         f"(use {'--modality audio' if heard else 'modality=text'})")
    return modality


def read_model_config(model: str, trust_remote_code: bool = False):
    """The config of a model (None for the embedded alias, which is a plain text model)."""
    from .models import read_config

    return None if str(model) == "smollm2-135m" else read_config(model, trust_remote_code)


def resolve_model(model: str | os.PathLike, *, modality: str = "auto", protocol: str = "official",
                  paper_model: str | None = None, trust_remote_code: bool = False, config=None,
                  local: bool = True) -> Resolved:
    """model -> modality -> family -> protocol. `config`: an already read config; `local`: False for a served
    model (no config here: text unless `modality` says video, the family from `paper_model`)."""
    if protocol not in PROTOCOLS:
        raise ValueError(f"protocol must be one of {', '.join(PROTOCOLS)}, got '{protocol}'")
    if local and config is None:
        config = read_model_config(model, trust_remote_code)
        if config is None and modality == "video":  # the embedded alias: a text model, read without converting it
            raise ValueError(f"model '{model}' is a llama text model: it cannot take video (use modality=text)")
    modality = modality_from_config(config, str(model), modality)
    row = family_for(config, paper_model)
    if row is not None and row.modality != modality:
        row = None
    note = None
    if protocol == "official":
        if row is None or not row.official:
            what = f"({config.model_type})" if config is not None else "(no config)"
            note = (f"model '{model}' {what} has no official setting of the paper: running the clean protocol "
                    f"(give --paper-model NAME to pick one)")
            protocol, row = "clean", row if row is not None and not row.official else None
        elif row.unsupported and local:
            raise ValueError(f"{row.name}: {row.unsupported}")
    prompt_family = row.prompt_family if protocol == "official" and row is not None else "clean"
    return Resolved(modality, row, protocol, prompt_family, note)


def decoding_for(row: ModelFamily | None, protocol: str, generation_config=None, max_new_tokens: int | None = None,
                 max_length: int | None = None) -> Decoding:
    """The decoding of the row's official script (clean: greedy, 64 new tokens); `max_new_tokens` overrides."""
    if protocol != "official" or row is None:
        d = Decoding()
    else:
        spec, g = dict(row.decoding), generation_config
        d = Decoding()
        if spec.pop("checkpoint", False) and g is not None:
            d = Decoding(do_sample=bool(getattr(g, "do_sample", False)), temperature=getattr(g, "temperature", None),
                         top_p=getattr(g, "top_p", None), top_k=getattr(g, "top_k", None),
                         repetition_penalty=getattr(g, "repetition_penalty", None))
        for k, v in spec.items():
            setattr(d, k, getattr(g, k, None) if v == "checkpoint" else v)
        d.max_new_tokens = row.max_new_tokens or max_length or 4096
    d.max_new_tokens = max_new_tokens or d.max_new_tokens
    return d


def clean_output(row: ModelFamily | None, protocol: str, output: str, head: str = "") -> str:
    """The official script's output: the decoded prompt before it (`head`, Llama-3.1/3.2), then its cleanup."""
    if protocol != "official" or row is None:
        return output
    if row.decoded == "whole":
        output = head + output
    if row.cleanup == "strip":
        return output.strip()
    if row.cleanup == "drop-newlines":
        return output.replace("\n", "")
    if row.cleanup == "drop-newlines-lower":
        return output.replace("\n", "").lower()
    return output
