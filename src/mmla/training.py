"""LoRA fine-tuning of text and video models: SFT (one adapter per dataset) and IT (one adapter on the union of
the train splits). One trainer: everything that differs between text and video goes through the model's input seam
(mmla.inputs); the parts it shares with concurrent training (mmla.multilora) are in mmla.finetune.

The recipe, as the official LLaMA-Factory runs it (../shared/PROTOCOL.md, "Fine-tuning"):

config  YAML -> `TrainConfig` (a dataclass), then the preset (`paper` | `fast`) for the setting (sft | it) and the
        modality (from the model, or `modality`), then key=value overrides; the resolved config is written to
        <out>/config.yaml beside env.json.
data    each train row becomes <chat template(prompt)> + <answer><end of turn>, with the prompt in the
        `llamafactory_text` family (video: `llamafactory_video`, the clip where its "<video>" tag is) and the
        released answer string ("emotion: sadness"); the chat wrapping is the official training template's;
        prompt tokens (and vision tokens) are masked from the loss (labels -100), cut at `cutoff_len` tokens.
        Video: the frames of the family's training setting (Qwen2-VL: `official-train`), decoded once into the frame
        cache; a row whose clip is missing or unreadable is left out and counted; items are built when the Trainer
        asks for them, so only one micro-batch of frames is in memory. LoRA on the language model's linear layers
        only for video (vision tower and projector frozen), on every linear layer for text.
train   a transformers `Trainer` subclass: DDP under torchrun / accelerate launch, gradient accumulation with
        the loss normalised over all answer tokens of the optimiser step, cosine schedule, checkpoints for
        resuming (<out>/checkpoints), a tqdm bar with loss and tokens/s, <out>/train_log.jsonl.
select  every `eval_steps`: the official teacher-forced answer accuracy on dev (`eval_accuracy`, LLaMA-Factory
        compute_accuracy) and the real classification accuracy (`eval_gen_accuracy`: score or generate + the
        official parser, inference prompt family); the best by `select_metric` is kept as <out>/adapter.
A finished run (train_result.json) is reused only under the same identity config; another one is refused.

Presets. Text: `paper` is the official configuration (SFT: lr 5e-5, 8 epochs, batch 1 x accumulation 4, LoRA
r16/a32; IT: lr 1e-4, batch 2 x 4, LoRA r8/a16; cosine, no warmup, grad norm 1.0, cutoff 1024, bf16 where
available). `fast` is the same optimisation executed faster: the effective batch in one micro-batch (the same
examples in every optimiser step, right padding without an attention mask so that SDPA runs its causal kernel),
logits only at the answer positions (`logits_to_keep` with a boolean mask, never a full-vocabulary tensor for the
prompt) and bf16 matmuls (bf16 on a GPU as the paper; on a CPU `mixed`: bf16 frozen matmuls with fp32 outputs,
which keeps the fp32 loss curve). Because the Trainer normalises the loss by the number of answer tokens of the
whole optimiser step, 4 micro-batches of 1 and 1 micro-batch of 4 give the same update (tests check both).
Video: a model whose family (mmla.resolve.MODEL_FAMILIES) names a `paper_preset` gets that table under `paper`, per
dataset for SFT (Qwen2-VL-7B: the official yamls' lr / epochs / warmup / batch x accumulation; LoRA r8/a16), except
the keys the user set; `fast` adds answer-only logits (and `mixed` on a CPU) but keeps the micro-batches, whose
frames are what fills memory. A video model without a table gets the text presets (`paper_table=NAME` picks one).
`batching=packed` (padding-free rows, text only) and `group_by_length=true` are there for large batches.
"""

from __future__ import annotations

import dataclasses
import os
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path

from . import data as data_mod
from . import multilora
from . import video as video_mod
from .config import coerce
from .finetune import Collator, DevEval, Run, build_split, check_identity, frames_of, is_main, \
    load_for_training, lora_config, prepare_base, run_env, run_record, say, save_adapter, summary, trainer_classes, \
    training_arguments
from .prompts import PROTOCOLS
from .resolve import CLIP_MODALITIES, MODALITIES
from .runs import claim, last_checkpoint, read_json, read_jsonl, write_config, write_json, write_jsonl, writing
from .tasks import PROMPT_FAMILIES, VIDEO_DATASETS, get_task, parse_datasets

TRAIN_SETTINGS = ("sft", "it")  # what training trains (mmla.paper.PAPER_SETTINGS adds zero-shot)
PRESET_NAMES = ("paper", "fast")
EVAL_GEN = ("score", "generate", "none")
SELECT = ("eval_accuracy", "eval_gen_accuracy")
PRECISIONS = ("auto", "fp32", "bf16", "mixed")
BATCHING = ("padded", "causal", "packed")


@dataclass
class TrainConfig:
    # what to train
    model: str = "smollm2-135m"  # HF id, local path or alias
    data: str | None = None  # data root (default: $MMLA_DATA, else ./data/mmla)
    datasets: list[str] = field(default_factory=lambda: ["all"])  # video: all = the 9 with released videos
    setting: str = "auto"  # sft (one adapter per dataset) | it (one adapter on all) | auto: it for all / video
    preset: str = "paper"  # paper | fast
    out: str = "runs/train"
    modality: str = "auto"  # auto: video for a vision-language model (mmla.resolve.resolve_model), else text
    family: str | None = None  # training prompts: llamafactory_text / llamafactory_video (faithful) | clean
    protocol: str = "official"  # chat wrapping: official training template | clean (tokenizer's own)
    limit: int | None = None  # first N train rows per dataset (quick runs)
    # video frames (default: the model family's training setting, e.g. official-train)
    frames: str | None = None
    num_frames: int | None = None
    fps: float | None = None
    max_pixels: int | None = None
    no_frame_cache: bool = False  # decode every clip again
    max_audio_seconds: float | None = None  # audio, av: sound kept per clip (default: the model family's)
    paper_table: str | None = None  # video: the per-dataset table `paper` applies (default: the model family's)
    # optimisation (the preset sets these)
    learning_rate: float = 5e-5
    num_epochs: float = 8.0
    max_steps: int | None = None  # optimiser steps; overrides num_epochs
    per_device_batch_size: int = 1
    gradient_accumulation_steps: int = 4
    lr_scheduler: str = "cosine"
    warmup_ratio: float = 0.0
    weight_decay: float = 0.0
    max_grad_norm: float = 1.0
    optim: str = "adamw_torch"
    cutoff_len: int = 1024
    seed: int = 42
    # LoRA
    lora_rank: int = 16
    lora_alpha: int = 32
    lora_dropout: float = 0.0
    lora_target: str | None = None  # default: the seam's (text: all-linear; video: the language model's linears)
    # execution (the preset sets these)
    # fp32 | bf16: bf16 weights + autocast, LoRA weights fp32 (LLaMA-Factory's bf16) | mixed: the frozen matmuls in
    # bf16 with fp32 outputs, all else fp32 (the fp32 loss curve at bf16 matmul speed, for CPUs with bf16 units)
    # | auto: bf16 on a bf16 GPU; otherwise fp32 (paper) or mixed (fast)
    precision: str = "auto"
    # micro-batch layout: padded (right padding + attention mask, LLaMA-Factory) | causal (right padding, no mask:
    # causal attention already keeps real tokens from the padding after them, so SDPA runs its causal kernel)
    # | packed (padding-free: one row, position ids restart per example; for flash-attention varlen kernels)
    batching: str = "padded"
    answer_logits_only: bool = False  # lm_head only where the loss reads (else full-vocabulary logits)
    group_by_length: bool = False
    gradient_checkpointing: bool = False
    device: str = "auto"  # auto | cpu | cuda
    device_map: str | None = None  # auto: one copy of the base model split over the GPUs, then CPU (one process)
    max_memory: str | None = None  # with device_map: per-device caps, e.g. "0=70GiB,1=70GiB,cpu=200GiB"
    threads: int | None = None  # torch CPU threads
    trust_remote_code: bool = False
    # dev evaluation, model selection, checkpoints, logging
    eval_steps: int = 20  # 0: no dev evaluation (the final adapter is kept)
    eval_limit: int | None = None  # dev rows per dataset (a seeded random subset)
    eval_gen: str = "score"  # real classification accuracy by: score | generate (+ official parser) | none
    eval_family: str | None = None  # its prompts (default: infer_script when training on llamafactory_*)
    eval_batch_size: int = 16
    eval_max_new_tokens: int = 16
    select_metric: str = "eval_accuracy"  # eval_accuracy (official) | eval_gen_accuracy
    save_steps: int = 10  # resume checkpoints
    save_total_limit: int = 2
    logging_steps: int = 1
    # SFT of several datasets in one process over one frozen base, one adapter per dataset (mmla.multilora);
    # otherwise `train` trains them one after another
    concurrent: bool = False
    # rows per joint forward of a concurrent run (None: one micro-batch of every adapter still training). Each
    # adapter's optimiser step is the same whatever the grouping (only the rounding of its gradient sum moves): more
    # rows fill a GPU that a batch of 4 per adapter leaves idle, at the memory of a larger forward
    concurrent_rows: int | None = None
    explicit: list[str] = field(default_factory=list)  # set by make_config: the keys the user gave (kept per dataset)


# Text: each preset per setting; everything else comes from the dataclass defaults, then YAML, then key=value.
_PAPER = dict(lr_scheduler="cosine", warmup_ratio=0.0, max_grad_norm=1.0, cutoff_len=1024, num_epochs=8.0,
              lora_dropout=0.0, precision="auto", batching="padded", answer_logits_only=False, eval_steps=20,
              save_steps=10)
PRESETS = {
    ("paper", "sft"): dict(_PAPER, learning_rate=5e-5, per_device_batch_size=1, gradient_accumulation_steps=4,
                           lora_rank=16, lora_alpha=32),
    ("paper", "it"): dict(_PAPER, learning_rate=1e-4, per_device_batch_size=2, gradient_accumulation_steps=4,
                          lora_rank=8, lora_alpha=16),
}
_FAST = dict(batching="causal", answer_logits_only=True, precision="auto")
PRESETS[("fast", "sft")] = dict(PRESETS[("paper", "sft")], **_FAST, per_device_batch_size=4, gradient_accumulation_steps=1)
PRESETS[("fast", "it")] = dict(PRESETS[("paper", "it")], **_FAST, per_device_batch_size=8, gradient_accumulation_steps=1)

# Video: the paper's per-dataset tables, keyed by the name a model family gives as `paper_preset`.
# Qwen2-VL-7B, the official LLaMA-Factory yamls (../shared/paper/hyperparams.md section 2.5): per dataset for SFT
# and once for IT (IT/train_lora/Instruct_Qwen2-VL-7B-Instruct.yaml): learning rate, epochs, warmup ratio,
# per-device batch, gradient accumulation; dev evaluation and checkpoints every 5 (SFT) / 10 (IT) steps.
VIDEO_PRESETS = {
    "qwen2-vl-7b": {
        "sft": {
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
        },
        "it": (1.0e-4, 5, 0.3, 8, 4),
        "eval_steps": {"sft": 5, "it": 10},
    },
    # Qwen2-VL-72B: the 72B yamls (DeepSpeed ZeRO-3 offload over 8 GPUs). Only a merge config was published for its
    # IT run, so IT takes the 7B IT row.
    "qwen2-vl-72b": {
        "sft": {
            "MIntRec": (1.0e-4, 20, 0.1, 4, 2),
            "MIntRec2.0": (1.0e-4, 20, 0.1, 4, 2),
            "MELD": (1.1e-4, 10, 0.4, 4, 2),
            "IEMOCAP": (1.0e-4, 7, 0.2, 2, 2),
            "MELD-DA": (1.1e-4, 10, 0.5, 4, 2),
            "IEMOCAP-DA": (3.0e-4, 5, 0.1, 4, 2),
            "MOSI": (1.0e-4, 10, 0.2, 2, 2),
            "Ch-sims": (1.0e-4, 10, 0.2, 4, 2),
            "UR-FUNNY": (3.0e-4, 3, 0.1, 4, 2),
            "MUStARD": (4.0e-4, 10, 0.3, 2, 2),
            "AnnoMi-client": (2.0e-4, 5, 0.1, 4, 2),
            "AnnoMi-therapist": (2.0e-4, 5, 0.1, 4, 2),
        },
        "it": (1.0e-4, 5, 0.3, 8, 4),
        "eval_steps": {"sft": 5, "it": 10},
    },
}
_VIDEO_COMMON = dict(lr_scheduler="cosine", lora_rank=8, lora_alpha=16, lora_dropout=0.0, cutoff_len=1024,
                     max_grad_norm=1.0, weight_decay=0.0, precision="auto", batching="padded",
                     answer_logits_only=False)

# ---------------------------------------------------------------- config


def setting_of(datasets, setting: str = "auto") -> str:
    if setting in TRAIN_SETTINGS:
        return setting
    if setting != "auto":
        raise ValueError(f"setting must be one of auto, {', '.join(TRAIN_SETTINGS)}, got '{setting}'")
    spec = datasets[0] if isinstance(datasets, (list, tuple)) and len(datasets) == 1 else datasets
    return "it" if spec in ("all", "video") else "sft"


def model_info(model: str, modality: str = "auto", trust_remote_code: bool = False) -> tuple[str, dict]:
    """(modality, the model family's row of mmla.resolve.MODEL_FAMILIES as a dict) for a model; errors are one
    line. The same resolver as predict's (mmla.resolve.resolve_model)."""
    from .resolve import resolve_model

    if modality not in MODALITIES:
        raise ValueError(f"modality must be one of {', '.join(MODALITIES)}, got '{modality}'")
    if modality == "text":  # nothing to read: training a text model needs no row (and works offline)
        return "text", {}
    r = resolve_model(model, modality=modality, protocol="clean", trust_remote_code=trust_remote_code)
    row = r.family.record() if r.family is not None and r.modality != "text" else {}
    return r.modality, {k: v for k, v in row.items() if v is not None}  # unset: the defaults apply


def _preset_values(cfg_preset: str, setting: str, modality: str, table: str | None, dataset: str | None) -> dict:
    if modality != "video" or table is None:
        return dict(PRESETS[(cfg_preset, setting)])
    if table not in VIDEO_PRESETS:
        raise ValueError(f"paper_table must be one of {', '.join(VIDEO_PRESETS)}, got '{table}'")
    t = VIDEO_PRESETS[table]
    if setting == "it":
        row = t["it"]
    else:
        name = get_task(dataset).name
        if name not in t["sft"]:
            raise ValueError(f"the {table} table has no SFT row for '{name}'")
        row = t["sft"][name]
    lr, epochs, warmup, batch, accumulation = row
    values = dict(_VIDEO_COMMON, learning_rate=lr, num_epochs=float(epochs), warmup_ratio=warmup,
                  per_device_batch_size=batch, gradient_accumulation_steps=accumulation,
                  eval_steps=t["eval_steps"][setting], save_steps=t["eval_steps"][setting])
    if cfg_preset == "fast":
        values["answer_logits_only"] = True
    return values


def make_config(values: dict | None = None) -> TrainConfig:
    """defaults < preset (for the setting, the modality and, for video SFT, the dataset) < `values` (YAML keys, CLI
    flags and key=value, already merged, or a run's config.yaml)."""
    # a recorded config.yaml may come back as values: what mmla itself added to it is not a setting
    values = {k: v for k, v in (values or {}).items() if k not in ("explicit", "frame_setting", "audio_setting")}
    typed = {k: coerce(TrainConfig, k, v) for k, v in values.items()}
    preset = typed.get("preset", TrainConfig.preset)
    if preset not in PRESET_NAMES:
        raise ValueError(f"preset must be one of {', '.join(PRESET_NAMES)}, got '{preset}'")
    modality, family = model_info(typed.get("model", TrainConfig.model), typed.get("modality", "auto"),
                                  typed.get("trust_remote_code", False))
    spec = typed.get("datasets", ["all"])
    setting = setting_of(spec, typed.get("setting", "auto"))
    table = typed.get("paper_table") or (family.get("paper_preset") if modality == "video" else None)
    first = _parse(spec, modality)[0]
    cfg = TrainConfig(**{**_preset_values(preset, setting, modality, table, first), **typed})
    cfg.setting, cfg.modality, cfg.paper_table, cfg.explicit = setting, modality, table, sorted(typed)
    if modality in ("video", "av") and cfg.frames is None:
        cfg.frames = family.get("train_frames", "official-train")
    return validate(cfg)


def with_preset(cfg: TrainConfig, dataset: str) -> TrainConfig:
    """cfg with the video paper table's row of `dataset` (SFT), except the keys the user set; else cfg."""
    if cfg.modality != "video" or cfg.paper_table is None or cfg.setting != "sft":
        return cfg
    row = _preset_values(cfg.preset, "sft", "video", cfg.paper_table, dataset)
    return dataclasses.replace(cfg, **{k: v for k, v in row.items() if k not in cfg.explicit})


def _parse(spec, modality: str) -> list[str]:
    spec = spec if len(spec) != 1 else spec[0]
    if modality in CLIP_MODALITIES and spec == "all":  # MLLM experiments use the 9 datasets whose videos are released
        spec = "video"
    return parse_datasets(spec)


def validate(cfg: TrainConfig) -> TrainConfig:
    if cfg.modality == "auto" or (cfg.modality in ("video", "av") and cfg.frames is None):
        cfg.modality, family = model_info(cfg.model, cfg.modality, cfg.trust_remote_code)
        if cfg.modality in ("video", "av"):
            cfg.frames = cfg.frames or family.get("train_frames", "official-train")
    cfg.datasets = _parse(cfg.datasets, cfg.modality)
    checks = [("preset", PRESET_NAMES), ("setting", TRAIN_SETTINGS), ("modality", MODALITIES[1:]),
              ("protocol", PROTOCOLS), ("eval_gen", EVAL_GEN), ("select_metric", SELECT), ("precision", PRECISIONS),
              ("batching", BATCHING)]
    for key, allowed in checks:
        if getattr(cfg, key) not in allowed:
            raise ValueError(f"{key} must be one of {', '.join(allowed)}, got '{getattr(cfg, key)}'")
    video = cfg.modality in CLIP_MODALITIES
    if cfg.family is None:
        cfg.family = "llamafactory_video" if video else "llamafactory_text"
    if cfg.eval_family is None:
        cfg.eval_family = "infer_script" if cfg.family.startswith("llamafactory_") else cfg.family
    for key in ("family", "eval_family"):
        if getattr(cfg, key) not in PROMPT_FAMILIES:
            raise ValueError(f"{key} must be one of {', '.join(PROMPT_FAMILIES)}, got '{getattr(cfg, key)}'")
    for key in ("per_device_batch_size", "gradient_accumulation_steps", "cutoff_len", "lora_rank", "eval_batch_size",
                "eval_max_new_tokens", "save_steps", "logging_steps", "limit", "eval_limit", "max_steps", "threads",
                "concurrent_rows"):
        v = getattr(cfg, key)
        if v is not None and v < 1:
            raise ValueError(f"{key} must be a positive integer, got {v}")
    if not 0 <= cfg.warmup_ratio < 1:
        raise ValueError(f"warmup_ratio must be in [0, 1), got {cfg.warmup_ratio}")
    if cfg.eval_steps < 0:
        raise ValueError(f"eval_steps must be >= 0, got {cfg.eval_steps}")
    if cfg.device_map not in (None, "auto") or (cfg.max_memory and not cfg.device_map):
        raise ValueError(f"device_map must be auto (max_memory needs it), got {cfg.device_map!r}")
    if cfg.device_map and int(os.environ.get("WORLD_SIZE", "1")) > 1:
        raise ValueError("device_map=auto splits one model over the GPUs: run one process (not torchrun/accelerate)")
    if cfg.select_metric == "eval_gen_accuracy" and cfg.eval_gen == "none":
        raise ValueError("select_metric=eval_gen_accuracy needs eval_gen=score or generate")
    if video:
        no_video = [ds for ds in cfg.datasets if not get_task(ds).has_video]
        if no_video:
            raise ValueError(f"no videos are released for {', '.join(no_video)}: use datasets video "
                             f"({', '.join(VIDEO_DATASETS)}) or modality=text")
        if cfg.batching == "packed":
            raise ValueError("batching=packed is for text models (a video row's positions are not 0..n-1)")
        if cfg.modality != "audio":
            frames_of(cfg)  # validates
    if cfg.modality not in ("video", "av") and any(getattr(cfg, k) is not None for k in ("frames", "num_frames", "fps", "max_pixels")):
        raise ValueError(f"frames, num_frames, fps and max_pixels are for video models; '{cfg.model}' is trained "
                         f"as text")
    return cfg


def train_one(cfg: TrainConfig, datasets: list[str], out: Path, progress: bool = True, model=None,
              frame_cache: video_mod.FrameCache | None = None) -> dict:
    """Train one adapter on `datasets` into `out`; resumes from the last checkpoint; reuses a finished run made
    under the same identity config. `model`: an already loaded (model, tokenizer or processor) pair (benchmarks);
    by default cfg.model is loaded. One writer per run directory: another process in `out` is refused."""
    with claim(out, "train"):
        return _train_one(cfg, datasets, out, progress, model, frame_cache)


def _train_one(cfg: TrainConfig, datasets: list[str], out: Path, progress: bool, model, frame_cache) -> dict:
    check_identity(out, cfg, datasets)
    done = out / "train_result.json"
    if done.exists():
        say(f"already trained: {out / 'adapter'} (remove {done} to train again)")
        return read_json(done)

    import torch
    from peft import get_peft_model
    from transformers import set_seed
    from transformers.trainer_callback import ProgressCallback

    from .inputs import make_inputs

    model, tok, device, precision = load_for_training(cfg, model)
    video = cfg.modality in CLIP_MODALITIES
    inputs = make_inputs(model, tok, frames_of(cfg) if cfg.modality in ("video", "av") else None,
                         modality=cfg.modality, audio={"max_seconds": cfg.max_audio_seconds})
    cache = (frame_cache or video_mod.FrameCache(enabled=not cfg.no_frame_cache)) if video else None
    train_split = build_split(cfg, inputs, datasets, "train", cfg.limit, cache=cache)
    if len(train_split.items) == 0:
        raise ValueError(f"no train row of {', '.join(datasets)} has a usable clip (mmla check-data lists them)")
    collate = Collator(inputs.pad_id, cfg.batching, inputs.forward_kwargs if video else None)
    run = Run(cfg, datasets, out)
    dev = None
    if cfg.eval_steps > 0:
        with_dev = [ds for ds in datasets if "dev" in data_mod.available_splits(Path(cfg.data), ds)]
        dev = build_split(cfg, inputs, with_dev, "dev", cfg.eval_limit, subset=True, cache=cache)
        if len(dev.items) == 0:
            say(f"no dev rows for {', '.join(datasets)}: no dev evaluation, the final adapter is kept")
            dev = None
        else:
            run.dev_eval = DevEval(cfg, inputs, dev, collate, cache)
    eval_on = dev is not None

    ckpt = last_checkpoint(out / "checkpoints", say)
    log_path = out / "train_log.jsonl"
    if ckpt is not None:
        step = int(ckpt.name.split("-")[1])
        say(f"resuming from {ckpt.name} (step {step}) in {out}")
        if is_main():  # drop what the killed run logged after its last checkpoint
            write_jsonl(log_path, [r for r in read_jsonl(log_path)[0] if r.get("step", 0) <= step])
    elif is_main() and log_path.exists():
        log_path.unlink()

    set_seed(cfg.seed)  # the same LoRA initialisation in every run of this config
    prepare_base(model, cfg, precision)
    lora_target = cfg.lora_target or inputs.lora_target
    with warnings.catch_warnings():  # peft calls a transformers property that warns of its own deprecation
        warnings.simplefilter("ignore", FutureWarning)
        model = get_peft_model(model, lora_config(cfg, lora_target))
    world = int(os.environ.get("WORLD_SIZE", "1"))
    frames = {"frame_setting": inputs.setting.record()} if getattr(inputs, "setting", None) else {}
    frames.update({"audio_setting": inputs.record()} if hasattr(inputs, "record") else {})
    if is_main():
        write_config(out / "config.yaml", {**run_record(cfg, datasets), **frames})
        write_json(out / "env.json", run_env(
            cfg, device, precision, world, lora_target, train_split, dev if eval_on else None, video, frames, cache,
            sum(p.numel() for p in model.parameters() if p.requires_grad),
            hf_device_map={k: str(v) for k, v in (getattr(model, "hf_device_map", None) or {}).items()} or None))

    args = training_arguments(
        cfg, precision, device, str(out / "checkpoints"), per_device_train_batch_size=cfg.per_device_batch_size,
        gradient_accumulation_steps=cfg.gradient_accumulation_steps, num_train_epochs=cfg.num_epochs,
        max_steps=cfg.max_steps or -1, logging_steps=cfg.logging_steps, eval_strategy="steps" if eval_on else "no",
        eval_steps=cfg.eval_steps if eval_on else None, save_strategy="steps", save_steps=cfg.save_steps,
        save_total_limit=cfg.save_total_limit, remove_unused_columns=False,
        dataloader_num_workers=0, **({"gradient_checkpointing": True} if cfg.gradient_checkpointing else {}),
        train_sampling_strategy="group_by_length" if cfg.group_by_length else "random",
        ddp_find_unused_parameters=False, disable_tqdm=False, log_level="warning",
    )
    MMLATrainer, LogCallback = trainer_classes()
    log_cb = LogCallback(run, progress)
    trainer = MMLATrainer(model=model, args=args, train_dataset=train_split.items,
                          eval_dataset=dev.items if eval_on else None, data_collator=collate, run=run,
                          callbacks=[log_cb])
    log_cb.trainer = trainer
    trainer.remove_callback(ProgressCallback)
    t0 = time.time()
    result = trainer.train(resume_from_checkpoint=str(ckpt) if ckpt else None)
    step = trainer.state.global_step
    if eval_on and not any(h.get("step") == step and "eval_accuracy" in h for h in trainer.state.log_history):
        trainer.evaluate()  # the final weights are a candidate too
    if not eval_on:
        save_adapter(trainer, out / "adapter")
    result = summary(out, datasets, step, trainer.state.epoch or 0.0, result.training_loss, time.time() - t0,
                     run.best, precision, world, train_split, video,
                     distributed_type=str(trainer.accelerator.distributed_type.value))
    if trainer.is_world_process_zero():
        write_json(done, result)
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.barrier()
    return result


def train(cfg: TrainConfig, progress: bool = True, model=None,
          frame_cache: video_mod.FrameCache | None = None) -> dict:
    """SFT: one adapter per dataset (<out>/adapter for one dataset, <out>/<DS>/adapter for several), one after
    another, or with cfg.concurrent all at once over one frozen base (mmla.multilora, the same <out>/<DS> layout);
    IT: one adapter on the union of the train splits (<out>/adapter). Returns {name: summary}."""
    cfg = validate(dataclasses.replace(cfg))
    if cfg.concurrent and cfg.setting != "sft":
        raise ValueError("concurrent training is for SFT (one adapter per dataset), not setting=it: name the "
                         "datasets (e.g. --datasets MELD,MOSI) or drop concurrent")
    cfg.data = str(data_mod.data_root(cfg.data))
    have = [ds for ds in cfg.datasets if "train" in data_mod.available_splits(Path(cfg.data), ds)]
    missing = [ds for ds in cfg.datasets if ds not in have]
    if missing:
        say(f"no train split in {cfg.data} for {', '.join(missing)}: "
            f"{'not part of the IT mixture' if cfg.setting == 'it' else 'no adapter trained'} "
            f"(training on {len(have)} of {len(cfg.datasets)} datasets)")
    if not have:
        raise ValueError(f"none of {', '.join(cfg.datasets)} has a train split in {cfg.data}")
    if cfg.concurrent and len(have) > 1:  # with one dataset there is nothing to share
        return multilora.train_concurrent(cfg, have, Path(cfg.out), progress, model, frame_cache,
                                          preset=lambda ds: with_preset(cfg, ds))
    out = Path(cfg.out)
    if cfg.setting == "it":
        return {"it": {**train_one(cfg, have, out, progress, model, frame_cache), "missing_train": missing}}
    if len(cfg.datasets) == 1:
        return {have[0]: train_one(with_preset(cfg, have[0]), have, out, progress, model, frame_cache)}
    return {ds: train_one(with_preset(cfg, ds), [ds], out / ds, progress, model, frame_cache) for ds in have}


# ---------------------------------------------------------------- merge


def merge(model: str, adapter: str, out: str, dtype: str = "auto", trust_remote_code: bool = False) -> Path:
    """Base model + LoRA adapter -> one merged model directory (safetensors) with its tokenizer or processor."""
    from .models import load_model

    merged, tok = load_model(model, adapter=adapter, dtype=dtype, device="cpu", trust_remote_code=trust_remote_code,
                             modality=model_info(model, "auto", trust_remote_code)[0], merge=True)
    dest = Path(out)
    dest.mkdir(parents=True, exist_ok=True)
    with writing(dest):
        merged.save_pretrained(dest, safe_serialization=True)
        tok.save_pretrained(dest)
    write_json(dest / "mmla_merge.json", {"base": model, "adapter": str(adapter), "dtype": dtype})
    return dest
