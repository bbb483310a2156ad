"""LoRA fine-tuning: SFT (one adapter per dataset) and IT (one adapter on the union of the train splits).

The recipe, as the official LLaMA-Factory runs it (../shared/PROTOCOL.md, "Fine-tuning"):

config  YAML -> `TrainConfig` (a dataclass), then the preset (`paper` | `fast`) for the setting (sft | it),
        then key=value overrides; the resolved config is written to <out>/config.yaml beside env.json.
data    each train row becomes <chat template(prompt)> + <answer><end of turn>, with the prompt in the
        `llamafactory_text` family (or `clean`) and the released answer string ("emotion: sadness");
        the chat wrapping is the official training template's (`chat_messages(..., training=True)`);
        prompt tokens are masked from the loss (labels -100), cut at `cutoff_len` tokens.
train   a transformers `Trainer` subclass: DDP under torchrun / accelerate launch, gradient accumulation with
        the loss normalised over all answer tokens of the optimiser step, cosine schedule, checkpoints for
        resuming (<out>/checkpoints), a tqdm bar with loss and tokens/s, <out>/train_log.jsonl.
select  every `eval_steps`: the official teacher-forced answer accuracy on dev (`eval_accuracy`, LLaMA-Factory
        compute_accuracy) and the real classification accuracy (`eval_gen_accuracy`: score or generate + the
        official parser, inference prompt family); the best by `select_metric` is kept as <out>/adapter.

Presets. `paper` is the official configuration (SFT: lr 5e-5, 8 epochs, batch 1 x accumulation 4, LoRA r16/a32;
IT: lr 1e-4, batch 2 x 4, LoRA r8/a16; cosine, no warmup, grad norm 1.0, cutoff 1024, bf16 where available).
`fast` is the same optimisation executed faster: the effective batch in one micro-batch (the same examples in
every optimiser step, right padding without an attention mask so that SDPA runs its causal kernel), logits only
at the answer positions (the body's hidden states are projected by lm_head only where the loss reads them:
`logits_to_keep` with a boolean mask, never a full-vocabulary tensor for the prompt) and bf16 matmuls (bf16 on a
GPU as the paper; on a CPU `mixed`: bf16 frozen matmuls with fp32 outputs, which keeps the fp32 loss curve).
Because the Trainer normalises the loss by the number of answer tokens of the whole optimiser step, 4
micro-batches of 1 and 1 micro-batch of 4 give the same update (tests/test_training.py checks both).
`batching=packed` (padding-free rows) and `group_by_length=true` are there for large batches.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import random
import shutil
import sys
import time
import typing
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from . import data as data_mod
from .prompts import PROTOCOLS, chat_messages, model_kind, render, target
from .runs import environment, read_config, read_jsonl, write_config, write_json
from .tasks import FAMILIES, get_task, parse_datasets

IGNORE = -100
SETTINGS = ("sft", "it")
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
    datasets: list[str] = field(default_factory=lambda: ["all"])
    setting: str = "auto"  # sft (one adapter per dataset) | it (one adapter on all) | auto: it for "all"
    preset: str = "paper"  # paper | fast
    out: str = "runs/train"
    family: str = "llamafactory_text"  # training prompts: llamafactory_text (faithful) | clean
    protocol: str = "official"  # chat wrapping: official training template | clean (tokenizer's own)
    limit: int | None = None  # first N train rows per dataset (quick runs)
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
    lora_target: str = "all-linear"  # every linear layer but the output layer (LLaMA-Factory `all`)
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
    threads: int | None = None  # torch CPU threads
    trust_remote_code: bool = False
    # dev evaluation, model selection, checkpoints, logging
    eval_steps: int = 20  # 0: no dev evaluation (the final adapter is kept)
    eval_limit: int | None = None  # dev rows per dataset (a seeded random subset)
    eval_gen: str = "score"  # real classification accuracy by: score | generate (+ official parser) | none
    eval_family: str | None = None  # its prompts (default: infer_script when training on llamafactory_text)
    eval_batch_size: int = 16
    eval_max_new_tokens: int = 16
    select_metric: str = "eval_accuracy"  # eval_accuracy (official) | eval_gen_accuracy
    save_steps: int = 10  # resume checkpoints
    save_total_limit: int = 2
    logging_steps: int = 1


# Each preset per setting; everything else comes from the dataclass defaults, then YAML, then key=value.
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

# Settings that change the trained weights: a run directory refuses to resume under different ones.
_IDENTITY = ("model", "datasets", "setting", "family", "protocol", "limit", "learning_rate", "num_epochs", "max_steps",
             "per_device_batch_size", "gradient_accumulation_steps", "lr_scheduler", "warmup_ratio", "weight_decay",
             "optim", "cutoff_len", "seed", "lora_rank", "lora_alpha", "lora_dropout", "lora_target")


# ---------------------------------------------------------------- config


def coerce(cls, key: str, value):
    """`value` (from YAML or a key=value string) as the type of `cls`'s field `key`; errors are one line."""
    hints = typing.get_type_hints(cls)
    if key not in hints:
        known = ", ".join(f.name for f in dataclasses.fields(cls))
        raise ValueError(f"unknown config key '{key}' (known: {known})")
    hint = hints[key]
    args = [a for a in typing.get_args(hint) if a is not type(None)]
    optional = type(None) in typing.get_args(hint)
    base = typing.get_origin(hint) if typing.get_origin(hint) is list else (args[0] if optional else hint)
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
            s = str(value).strip().lower()
            if s in ("true", "yes", "1", "on"):
                return True
            if s in ("false", "no", "0", "off"):
                return False
            raise ValueError
        if base is int:
            f = float(value)
            if f != int(f):
                raise ValueError
            return int(f)
        if base is float:
            return float(value)
        return str(value)
    except (TypeError, ValueError):
        name = getattr(base, "__name__", str(base))
        raise ValueError(f"config key '{key}' expects {name}, got {value!r}") from None


def parse_overrides(items: typing.Iterable[str]) -> dict:
    """['lr=1e-4', 'eval.limit=3'] -> {'lr': '1e-4', 'eval.limit': '3'} (values stay strings; coerce types them)."""
    out = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise ValueError(f"override '{item}' is not key=value")
        out[key.strip()] = value
    return out


def read_yaml(path: str | os.PathLike) -> dict:
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


def setting_of(datasets, setting: str = "auto") -> str:
    if setting in SETTINGS:
        return setting
    if setting != "auto":
        raise ValueError(f"setting must be one of auto, {', '.join(SETTINGS)}, got '{setting}'")
    spec = datasets[0] if isinstance(datasets, (list, tuple)) and len(datasets) == 1 else datasets
    return "it" if spec == "all" else "sft"


def make_config(values: dict | None = None) -> TrainConfig:
    """defaults < preset (for the setting) < `values` (YAML keys, CLI flags and key=value, already merged)."""
    values = dict(values or {})
    typed = {k: coerce(TrainConfig, k, v) for k, v in values.items()}
    preset = typed.get("preset", TrainConfig.preset)
    if preset not in PRESET_NAMES:
        raise ValueError(f"preset must be one of {', '.join(PRESET_NAMES)}, got '{preset}'")
    setting = setting_of(typed.get("datasets", ["all"]), typed.get("setting", "auto"))
    cfg = TrainConfig(**{**PRESETS[(preset, setting)], **typed})
    cfg.setting = setting
    return validate(cfg)


def validate(cfg: TrainConfig) -> TrainConfig:
    cfg.datasets = parse_datasets(cfg.datasets if len(cfg.datasets) != 1 else cfg.datasets[0])
    checks = [("preset", PRESET_NAMES), ("setting", SETTINGS), ("protocol", PROTOCOLS), ("eval_gen", EVAL_GEN),
              ("select_metric", SELECT), ("precision", PRECISIONS), ("batching", BATCHING)]
    for key, allowed in checks:
        if getattr(cfg, key) not in allowed:
            raise ValueError(f"{key} must be one of {', '.join(allowed)}, got '{getattr(cfg, key)}'")
    for key in ("family", "eval_family"):
        v = getattr(cfg, key)
        if v is not None and v not in FAMILIES:
            raise ValueError(f"{key} must be one of {', '.join(FAMILIES)}, got '{v}'")
    for key in ("per_device_batch_size", "gradient_accumulation_steps", "cutoff_len", "lora_rank", "eval_batch_size",
                "eval_max_new_tokens", "save_steps", "logging_steps", "limit", "eval_limit", "max_steps", "threads"):
        v = getattr(cfg, key)
        if v is not None and v < 1:
            raise ValueError(f"{key} must be a positive integer, got {v}")
    if not 0 <= cfg.warmup_ratio < 1:
        raise ValueError(f"warmup_ratio must be in [0, 1), got {cfg.warmup_ratio}")
    if cfg.eval_steps < 0:
        raise ValueError(f"eval_steps must be >= 0, got {cfg.eval_steps}")
    if cfg.select_metric == "eval_gen_accuracy" and cfg.eval_gen == "none":
        raise ValueError("select_metric=eval_gen_accuracy needs eval_gen=score or generate")
    if cfg.eval_family is None:
        cfg.eval_family = "infer_script" if cfg.family == "llamafactory_text" else cfg.family
    return cfg


# ---------------------------------------------------------------- data


def _end_of_turn(tokenizer, protocol: str) -> str:
    """What the chat template writes after an assistant answer (e.g. '<|im_end|>'), trailing newline dropped.

    LLaMA-Factory trains on the answer followed by the template's end-of-turn token; rendering a dummy
    answer with the tokenizer's own template finds that token for any chat model.
    """
    msgs = chat_messages("x", protocol, model_kind(tokenizer), training=True)
    head = tokenizer.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)
    marker = "ANSWER-7f3a"
    full = tokenizer.apply_chat_template(msgs + [{"role": "assistant", "content": marker}], tokenize=False)
    if full.startswith(head) and marker in full[len(head):]:
        return full[len(head):].split(marker, 1)[1].rstrip()
    return tokenizer.eos_token or ""


def encode(tokenizer, prompt: str, answer: str, cutoff: int) -> tuple[dict, bool]:
    """Token ids of prompt + answer (tokenised apart, as LLaMA-Factory does) and labels masking the prompt."""
    return encode_ids(tokenizer(prompt, add_special_tokens=False)["input_ids"],
                      tokenizer(answer, add_special_tokens=False)["input_ids"], cutoff)


def encode_ids(p: list[int], a: list[int], cutoff: int) -> tuple[dict, bool]:
    truncated = len(p) + len(a) > cutoff
    if truncated:  # keep the answer, cut the end of the prompt (LLaMA-Factory cuts the source first)
        a = a[:cutoff]
        p = p[: max(cutoff - len(a), 1)]
    return {"input_ids": p + a, "labels": [IGNORE] * len(p) + a}, truncated


def _subset(examples: list, n: int | None, seed: int) -> list:
    if n is None or n >= len(examples):
        return examples
    keep = sorted(random.Random(seed).sample(range(len(examples)), n))
    return [examples[i] for i in keep]


@dataclass
class Split:
    items: list[dict]  # input_ids, labels
    examples: list  # data.Example, aligned with items
    truncated: int = 0


def wrap(tokenizer, prompts: list[str], protocol: str, training: bool) -> list[str]:
    """`prompts.chat_text` for many prompts (the model kind is looked up once)."""
    kind = model_kind(tokenizer)
    return [tokenizer.apply_chat_template(chat_messages(p, protocol, kind, training=training), tokenize=False,
                                          add_generation_prompt=True) for p in prompts]


def build_split(cfg: TrainConfig, tokenizer, datasets: list[str], split: str, limit: int | None,
                subset: bool = False) -> Split:
    eot = _end_of_turn(tokenizer, cfg.protocol)
    out = Split([], [])
    for ds in datasets:
        rows = data_mod.load_split(Path(cfg.data), ds, split).examples
        rows = _subset(rows, limit, cfg.seed) if subset else rows[:limit] if limit else rows
        prompts = wrap(tokenizer, [render(ds, cfg.family, e.text, split) for e in rows], cfg.protocol, True)
        p_ids = tokenizer(prompts, add_special_tokens=False)["input_ids"]
        a_ids = tokenizer([target(ds, cfg.family, e.label, split) + eot for e in rows],
                          add_special_tokens=False)["input_ids"]
        for e, p, a in zip(rows, p_ids, a_ids):
            item, cut = encode_ids(p, a, cfg.cutoff_len)
            out.items.append(item)
            out.examples.append(e)
            out.truncated += cut
    return out


@dataclass
class Collator:
    """Micro-batches (see TrainConfig.batching): right-padded rows with an attention mask (padded) or without one
    (causal), or one packed row whose position ids restart at 0 for every example, which transformers turns into
    attention within each example only (packed). All three give the same loss."""

    pad_id: int
    batching: str = "padded"

    def __call__(self, items: list[dict]) -> dict:
        import torch

        n_tokens = torch.tensor(sum(len(it["input_ids"]) for it in items))  # real tokens, for throughput
        if self.batching == "packed":
            ids = [t for it in items for t in it["input_ids"]]
            labels = [t for it in items for t in it["labels"]]
            pos = [p for it in items for p in range(len(it["input_ids"]))]
            return {"input_ids": torch.tensor([ids]), "labels": torch.tensor([labels]),
                    "position_ids": torch.tensor([pos]), "num_tokens": n_tokens}
        width = max(len(it["input_ids"]) for it in items)
        ids = torch.full((len(items), width), self.pad_id, dtype=torch.long)
        labels = torch.full((len(items), width), IGNORE, dtype=torch.long)
        mask = torch.zeros((len(items), width), dtype=torch.long)
        for r, it in enumerate(items):
            n = len(it["input_ids"])
            ids[r, :n] = torch.tensor(it["input_ids"])
            labels[r, :n] = torch.tensor(it["labels"])
            mask[r, :n] = 1
        batch = {"input_ids": ids, "labels": labels, "num_tokens": n_tokens}
        if self.batching == "padded":
            batch["attention_mask"] = mask
        return batch


def answer_positions(labels):
    """Boolean mask of the positions whose next token is an answer token (where the loss reads logits)."""
    import torch

    keep = torch.zeros_like(labels, dtype=torch.bool)
    keep[:, :-1] = labels[:, 1:] != IGNORE
    return keep


# ---------------------------------------------------------------- dev evaluation


class DevEval:
    """eval_accuracy: LLaMA-Factory's compute_accuracy (per dev example, the share of answer tokens that the
    argmax under teacher forcing gets right; then the mean over examples). eval_gen_accuracy: the share of dev
    examples classified right, by scoring the candidate answers or by greedy generation + the official parser,
    with the inference prompt family. Under DDP each process takes a shard and the counts are summed."""

    def __init__(self, cfg: TrainConfig, tokenizer, dev: Split):
        self.cfg, self.tok, self.dev = cfg, tokenizer, dev
        self.collate = Collator(tokenizer.pad_token_id, cfg.batching)
        ex = dev.examples
        self.prompts = wrap(tokenizer, [render(e.dataset, cfg.eval_family, e.text, "dev") for e in ex], cfg.protocol,
                            training=False)

    def __call__(self, model, split_dev: bool = True) -> dict:
        import torch
        import torch.distributed as dist

        from . import engine, prompts
        from .evaluation import parse_output

        world = dist.get_world_size() if split_dev and dist.is_available() and dist.is_initialized() else 1
        rank = dist.get_rank() if world > 1 else 0
        shard = list(range(rank, len(self.dev.items), world))
        was_training = model.training
        model.eval()
        sums = torch.zeros(3, dtype=torch.float64)  # teacher-forced accuracy sum, classified right, examples
        with torch.no_grad():
            bs = self.cfg.eval_batch_size
            for i in range(0, len(shard), bs):
                items = [self.dev.items[j] for j in shard[i : i + bs]]
                batch = {k: v.to(model.device) for k, v in self.collate(items).items() if k != "num_tokens"}
                labels = batch.pop("labels")
                keep = answer_positions(labels)
                pred = model(**batch, logits_to_keep=keep, use_cache=False).logits.argmax(-1)
                right = (pred == labels[:, 1:][keep[:, :-1]]).float()
                counts = [sum(t != IGNORE for t in it["labels"]) for it in items]  # answer tokens per example
                sums[0] += sum(part.mean().item() for part in torch.split(right, counts))
            if self.cfg.eval_gen != "none" and shard:
                ex = [self.dev.examples[j] for j in shard]
                inputs = [self.prompts[j] for j in shard]
                if self.cfg.eval_gen == "score":
                    cands = [prompts.candidates(e.dataset, self.cfg.eval_family, "dev") for e in ex]
                    res = engine.score(model, self.tok, inputs, cands, batch_size=bs)
                    preds = [get_task(e.dataset).labels[r.best] for e, r in zip(ex, res)]
                else:
                    outs = engine.generate(model, self.tok, inputs, max_new_tokens=self.cfg.eval_max_new_tokens,
                                           batch_size=bs)
                    preds = [parse_output(o, get_task(e.dataset).labels) for e, o in zip(ex, outs)]
                sums[1] += sum(p == e.label for p, e in zip(preds, ex))
        sums[2] = len(shard)
        if world > 1:
            dev_sums = sums.to(model.device)
            dist.all_reduce(dev_sums)
            sums = dev_sums.cpu()
        model.train(was_training)
        n = max(sums[2].item(), 1)
        metrics = {"eval_accuracy": round(sums[0].item() / n, 6)}
        if self.cfg.eval_gen != "none":
            metrics["eval_gen_accuracy"] = round(sums[1].item() / n, 6)
        return metrics


# ---------------------------------------------------------------- the trainer


def _trainer_classes():
    """Defined on first use so that importing this module does not import transformers."""
    import torch
    import torch.nn.functional as F
    from transformers import Trainer, TrainerCallback

    class MMLATrainer(Trainer):
        """The Trainer with an answer-only loss (optional), token counting and our dev evaluation."""

        def __init__(self, *args, run: "_Run", **kwargs):
            super().__init__(*args, **kwargs)
            self.run = run
            self.tokens_seen = 0

        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
            inputs = dict(inputs)
            n_tokens = inputs.pop("num_tokens", None)
            if model.training and n_tokens is not None:
                self.tokens_seen += int(n_tokens)
            if not self.run.cfg.answer_logits_only:  # the model's own loss over full-vocabulary logits
                return super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
            labels = inputs.pop("labels")
            keep = answer_positions(labels)
            outputs = model(**inputs, logits_to_keep=keep, use_cache=False)  # logits (answer tokens, vocab) only
            targets = labels[:, 1:][keep[:, :-1]]
            loss = F.cross_entropy(outputs.logits.float(), targets, reduction="sum")
            if num_items_in_batch is None:
                loss = loss / max(targets.numel(), 1)
            else:  # as the Trainer's own loss: over the whole optimiser step, across processes
                loss = loss / num_items_in_batch
                if self.args.average_tokens_across_devices:
                    loss = loss * self.accelerator.num_processes
            return (loss, outputs) if return_outputs else loss

        def evaluate(self, eval_dataset=None, ignore_keys=None, metric_key_prefix="eval"):
            t0 = time.time()
            ds = self.accelerator.state.deepspeed_plugin if self.is_deepspeed_enabled else None
            sharded = self.is_fsdp_enabled or (ds is not None and ds.zero_stage == 3)
            # sharded weights: every forward is a collective, so every process runs the whole dev set
            metrics = self.run.dev_eval(self.model, split_dev=not sharded)
            metrics["eval_runtime"] = round(time.time() - t0, 2)
            self.log(metrics)
            self.control = self.callback_handler.on_evaluate(self.args, self.state, self.control, metrics)
            self.run.keep_if_best(self, metrics)
            return metrics

    class LogCallback(TrainerCallback):
        """train_log.jsonl (process 0) and a tqdm bar with loss, learning rate and tokens/s."""

        def __init__(self, run: "_Run", progress: bool):
            self.run, self.progress, self.bar = run, progress, None
            self.t_mark, self.tokens_mark, self.trainer = time.time(), 0, None

        def on_train_begin(self, args, state, control, **kw):
            if state.is_world_process_zero and self.progress:
                from tqdm.auto import tqdm

                self.bar = tqdm(total=state.max_steps, initial=state.global_step, desc=f"train {self.run.name}",
                                unit="step", dynamic_ncols=True)
            self._mark()

        def _mark(self):
            self.t_mark, self.tokens_mark = time.time(), self.trainer.tokens_seen if self.trainer else 0

        def on_step_end(self, args, state, control, **kw):
            if self.bar is not None:
                self.bar.update(state.global_step - self.bar.n)

        def on_evaluate(self, args, state, control, **kw):
            self._mark()  # evaluation and saving time do not count against throughput

        def on_save(self, args, state, control, **kw):
            self._mark()

        def on_log(self, args, state, control, logs=None, **kw):
            logs = logs or {}
            if "loss" in logs:
                dt = max(time.time() - self.t_mark, 1e-9)
                tps = (self.trainer.tokens_seen - self.tokens_mark) * args.world_size / dt
                self._mark()
                rec = {"step": state.global_step, "epoch": round(state.epoch or 0.0, 4), "loss": logs["loss"],
                       "lr": logs.get("learning_rate"), "tokens_per_s": round(tps, 1)}
                if "grad_norm" in logs:
                    rec["grad_norm"] = logs["grad_norm"]
                if self.bar is not None:
                    self.bar.set_postfix(loss=f"{logs['loss']:.4f}", lr=f"{rec['lr']:.2e}", tok_s=f"{tps:.0f}")
            elif any(k.startswith("eval_") for k in logs):
                rec = {"step": state.global_step, **{k: v for k, v in logs.items() if k.startswith("eval_")}}
                if self.bar is not None:
                    self.bar.write(f"step {state.global_step}: " + ", ".join(
                        f"{k} {v:.4f}" for k, v in rec.items() if k.endswith("accuracy")))
            else:
                return
            if state.is_world_process_zero:
                with open(self.run.out / "train_log.jsonl", "a", encoding="utf-8") as f:
                    f.write(json.dumps(rec) + "\n")

        def on_train_end(self, args, state, control, **kw):
            if self.bar is not None:
                self.bar.close()

    return MMLATrainer, LogCallback


def _is_main() -> bool:
    return int(os.environ.get("RANK", "0")) == 0


def _say(msg: str) -> None:
    if _is_main():
        print(msg, file=sys.stderr, flush=True)


def last_checkpoint(ckpt_dir: Path) -> Path | None:
    """The newest complete Trainer checkpoint (trainer_state.json is written last; a torn one is skipped)."""
    if not ckpt_dir.is_dir():
        return None
    found = []
    for d in ckpt_dir.glob("checkpoint-*"):
        try:
            step = int(d.name.split("-")[1])
            json.loads((d / "trainer_state.json").read_text())
        except (ValueError, OSError):
            continue
        found.append((step, d))
    return max(found)[1] if found else None


def save_adapter(trainer, dest: Path) -> None:
    """Save the peft adapter (safetensors) atomically: into a temporary sibling, then renamed over `dest`.
    Every process calls this (FSDP and ZeRO-3 gather the weights); process 0 writes."""
    tmp = dest.with_name(f".{dest.name}.tmp")
    main = trainer.is_world_process_zero()
    if main:
        shutil.rmtree(tmp, ignore_errors=True)
    trainer.save_model(str(tmp))
    if not main:
        return
    (tmp / "training_args.bin").unlink(missing_ok=True)
    old = dest.with_name(f".{dest.name}.old")
    shutil.rmtree(old, ignore_errors=True)
    if dest.exists():
        os.replace(dest, old)
    os.replace(tmp, dest)
    shutil.rmtree(old, ignore_errors=True)


class _Run:
    """One training run (one adapter) in one output directory."""

    def __init__(self, cfg: TrainConfig, datasets: list[str], out: Path):
        self.cfg, self.datasets, self.out = cfg, datasets, out
        self.name = datasets[0] if len(datasets) == 1 else f"{cfg.setting} ({len(datasets)} datasets)"
        self.dev_eval: DevEval | None = None
        best = out / "best.json"
        self.best = json.loads(best.read_text()) if best.exists() else None

    def keep_if_best(self, trainer, metrics: dict) -> None:
        value = metrics[self.cfg.select_metric]
        if self.best is not None and value <= self.best["value"]:
            return
        self.best = {"step": trainer.state.global_step, "metric": self.cfg.select_metric, "value": value,
                     **{k: v for k, v in metrics.items() if k.endswith("accuracy")}}
        save_adapter(trainer, self.out / "adapter")
        if trainer.is_world_process_zero():
            write_json(self.out / "best.json", self.best)


def _precision(cfg: TrainConfig, device) -> str:
    import torch

    if cfg.precision != "auto":
        return cfg.precision
    if device.type == "cuda" and torch.cuda.is_bf16_supported():
        return "bf16"
    return "mixed" if cfg.preset == "fast" else "fp32"


def bf16_frozen_matmuls(model) -> int:
    """precision=mixed: store the frozen linear weights in bf16 and run their matmuls in bf16 with the output
    cast back to fp32. Activations, the residual stream, norms, attention, the LoRA weights and the loss stay fp32.

    Why not autocast on a CPU: under autocast a LoRA layer adds its (at first tiny) update to a bf16 output that is
    already rounded, so updates below half a bf16 step vanish and the loss curve departs from fp32 within a few
    steps; here the update is added in fp32. The output layer is left alone (it may share the embedding matrix).
    Returns the number of layers converted."""
    import types

    import torch
    import torch.nn.functional as F

    def forward(self, x):
        return F.linear(x.to(self.weight.dtype), self.weight, self.bias).to(x.dtype)

    head = model.get_output_embeddings()
    n = 0
    for m in model.modules():
        if isinstance(m, torch.nn.Linear) and m is not head:
            m.weight.data = m.weight.data.to(torch.bfloat16)
            if m.bias is not None:
                m.bias.data = m.bias.data.to(torch.bfloat16)
            m.forward = types.MethodType(forward, m)
            n += 1
    return n


def _check_identity(out: Path, cfg: TrainConfig, datasets: list[str]) -> None:
    path = out / "config.yaml"
    if not path.exists():
        return
    old = read_config(path)
    new = {**dataclasses.asdict(cfg), "datasets": datasets}
    for key in _IDENTITY:
        if key in old and old[key] != new[key]:
            raise ValueError(f"{path}: this run directory was made with {key}={old[key]!r}, not {new[key]!r}; "
                             f"use another --out")


def train_one(cfg: TrainConfig, datasets: list[str], out: Path, progress: bool = True, model=None) -> dict:
    """Train one adapter on `datasets` into `out`; resumes from the last checkpoint; skips a finished run.
    `model`: an already loaded (model, tokenizer) pair (benchmarks); by default cfg.model is loaded."""
    out.mkdir(parents=True, exist_ok=True)
    _check_identity(out, cfg, datasets)
    done = out / "train_result.json"
    if done.exists():
        _say(f"already trained: {out / 'adapter'} (remove {done} to train again)")
        return json.loads(done.read_text())

    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import TrainingArguments
    from transformers.trainer_callback import ProgressCallback

    from .models import load_model, pick_device

    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    device = pick_device(cfg.device)
    precision = _precision(cfg, device)
    if model is None:
        model, tok = load_model(cfg.model, dtype="bfloat16" if precision == "bf16" else "float32", device="cpu",
                                trust_remote_code=cfg.trust_remote_code)
    else:
        model, tok = model
    train_split = build_split(cfg, tok, datasets, "train", cfg.limit)
    run = _Run(cfg, datasets, out)
    eval_on = cfg.eval_steps > 0
    if eval_on:
        run.dev_eval = DevEval(cfg, tok, build_split(cfg, tok, datasets, "dev", cfg.eval_limit, subset=True))

    ckpt = last_checkpoint(out / "checkpoints")
    log_path = out / "train_log.jsonl"
    if ckpt is not None:
        step = int(ckpt.name.split("-")[1])
        _say(f"resuming from {ckpt.name} (step {step}) in {out}")
        if _is_main():  # drop what the killed run logged after its last checkpoint
            kept = [r for r in read_jsonl(log_path)[0] if r.get("step", 0) <= step]
            log_path.write_text("".join(json.dumps(r) + "\n" for r in kept))
    elif _is_main() and log_path.exists():
        log_path.unlink()

    from transformers import set_seed

    set_seed(cfg.seed)  # the same LoRA initialisation in every run of this config
    if precision == "mixed":
        bf16_frozen_matmuls(model)
    model.config.use_cache = False
    if cfg.gradient_checkpointing:
        model.enable_input_require_grads()
    with warnings.catch_warnings():  # peft calls a transformers property that warns of its own deprecation
        warnings.simplefilter("ignore", FutureWarning)
        model = get_peft_model(model, LoraConfig(
            r=cfg.lora_rank, lora_alpha=cfg.lora_alpha, lora_dropout=cfg.lora_dropout, target_modules=cfg.lora_target,
            task_type="CAUSAL_LM"))
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if _is_main():
        write_config(out / "config.yaml", {**dataclasses.asdict(cfg), "datasets": datasets})
        write_json(out / "env.json", {
            **environment(str(device)), "precision": precision, "world_size": world,
            "train_rows": len(train_split.items), "train_truncated": train_split.truncated,
            "dev_rows": len(run.dev_eval.dev.items) if eval_on else 0,
            "trainable_parameters": sum(p.numel() for p in model.parameters() if p.requires_grad)})

    args = TrainingArguments(
        output_dir=str(out / "checkpoints"), per_device_train_batch_size=cfg.per_device_batch_size,
        gradient_accumulation_steps=cfg.gradient_accumulation_steps, num_train_epochs=cfg.num_epochs,
        max_steps=cfg.max_steps or -1, learning_rate=cfg.learning_rate, lr_scheduler_type=cfg.lr_scheduler,
        warmup_steps=cfg.warmup_ratio, weight_decay=cfg.weight_decay, max_grad_norm=cfg.max_grad_norm,
        optim=cfg.optim, seed=cfg.seed, bf16=precision == "bf16", use_cpu=device.type == "cpu",
        logging_steps=cfg.logging_steps, eval_strategy="steps" if eval_on else "no",
        eval_steps=cfg.eval_steps if eval_on else None, save_strategy="steps", save_steps=cfg.save_steps,
        save_total_limit=cfg.save_total_limit, report_to="none", remove_unused_columns=False,
        dataloader_num_workers=0, **({"gradient_checkpointing": True} if cfg.gradient_checkpointing else {}),
        train_sampling_strategy="group_by_length" if cfg.group_by_length else "random",
        ddp_find_unused_parameters=False, disable_tqdm=False, log_level="warning",
    )
    MMLATrainer, LogCallback = _trainer_classes()
    log_cb = LogCallback(run, progress)
    trainer = MMLATrainer(model=model, args=args, train_dataset=train_split.items,
                          eval_dataset=run.dev_eval.dev.items if eval_on else None,
                          data_collator=Collator(tok.pad_token_id, cfg.batching), run=run, callbacks=[log_cb])
    log_cb.trainer = trainer
    trainer.remove_callback(ProgressCallback)
    t0 = time.time()
    result = trainer.train(resume_from_checkpoint=str(ckpt) if ckpt else None)
    step = trainer.state.global_step
    if eval_on and not any(h.get("step") == step and "eval_accuracy" in h for h in trainer.state.log_history):
        trainer.evaluate()  # the final weights are a candidate too
    if not eval_on:
        save_adapter(trainer, out / "adapter")
    summary = {"adapter": str(out / "adapter"), "datasets": datasets, "steps": step,
               "epochs": round(trainer.state.epoch or 0.0, 4), "train_loss": result.training_loss,
               "train_runtime_s": round(time.time() - t0, 1), "best": run.best, "precision": precision,
               "world_size": world}
    if trainer.is_world_process_zero():
        write_json(done, summary)
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.barrier()
    return summary


def train(cfg: TrainConfig, progress: bool = True, model=None) -> dict:
    """SFT: one adapter per dataset (<out>/adapter for one dataset, <out>/<DS>/adapter for several);
    IT: one adapter on the union of the train splits (<out>/adapter). Returns {name: summary}."""
    cfg = validate(dataclasses.replace(cfg))
    cfg.data = str(data_mod.data_root(cfg.data))
    have = [ds for ds in cfg.datasets if "train" in data_mod.available_splits(Path(cfg.data), ds)]
    missing = [ds for ds in cfg.datasets if ds not in have]
    if missing:
        _say(f"no train split in {cfg.data} for {', '.join(missing)}: "
             f"{'not part of the IT mixture' if cfg.setting == 'it' else 'no adapter trained'} "
             f"(training on {len(have)} of {len(cfg.datasets)} datasets)")
    if not have:
        raise ValueError(f"none of {', '.join(cfg.datasets)} has a train split in {cfg.data}")
    out = Path(cfg.out)
    if cfg.setting == "it":
        return {"it": {**train_one(cfg, have, out, progress, model), "missing_train": missing}}
    if len(cfg.datasets) == 1:
        return {have[0]: train_one(cfg, have, out, progress, model)}
    return {ds: train_one(cfg, [ds], out / ds, progress, model) for ds in have}


# ---------------------------------------------------------------- merge


def merge(model: str, adapter: str, out: str, dtype: str = "auto", trust_remote_code: bool = False) -> Path:
    """Base model + LoRA adapter -> one merged model directory (safetensors) with the tokenizer."""
    from .models import load_model

    peft_model, tok = load_model(model, adapter=adapter, dtype=dtype, device="cpu",
                                 trust_remote_code=trust_remote_code)
    merged = peft_model.merge_and_unload()
    dest = Path(out)
    dest.mkdir(parents=True, exist_ok=True)
    merged.save_pretrained(dest, safe_serialization=True)
    tok.save_pretrained(dest)
    write_json(dest / "mmla_merge.json", {"base": model, "adapter": str(adapter), "dtype": dtype})
    return dest


# ---------------------------------------------------------------- CLI


def cmd_train(a) -> int:
    values = read_yaml(a.config) if a.config else {}
    for key in ("model", "data", "datasets", "preset", "out"):
        if getattr(a, key) is not None:
            values[key] = getattr(a, key)
    values.update(parse_overrides(a.overrides))
    cfg = make_config(values)
    results = train(cfg, progress=not a.no_progress)
    if _is_main():
        for name, r in results.items():
            best = r.get("best") or {}
            sel = f", best {best.get('metric')} {best.get('value')} at step {best.get('step')}" if best else ""
            print(f"{name}: {r['adapter']} ({r['steps']} steps{sel})")
    return 0


def cmd_merge(a) -> int:
    dest = merge(a.model, a.adapter, a.out, dtype=a.dtype, trust_remote_code=a.trust_remote_code)
    print(f"merged model: {dest}")
    return 0


def add_cli(subparsers) -> None:
    sp = subparsers.add_parser(
        "train", help="LoRA SFT (one adapter per dataset) or IT (--datasets all: one adapter on all)",
        description="Fine-tune with LoRA. Config: defaults < --preset < --config YAML < flags < key=value. "
                    "Rerun the same command to resume from the last checkpoint.")
    sp.add_argument("overrides", nargs="*", metavar="key=value", help="config overrides, e.g. num_epochs=2")
    sp.add_argument("--config", help="a YAML file of TrainConfig keys")
    sp.add_argument("--model", help="HF id, local path or alias (default smollm2-135m)")
    sp.add_argument("--data", help="data root (default: $MMLA_DATA, else ./data/mmla)")
    sp.add_argument("--datasets", help="one name (SFT), a comma list (SFT each) or all (IT)")
    sp.add_argument("--preset", choices=PRESET_NAMES, help="paper (official configuration) | fast")
    sp.add_argument("--out", help="output directory (rerun to resume)")
    sp.add_argument("--no-progress", action="store_true")
    sp.set_defaults(func=cmd_train)

    sp = subparsers.add_parser("merge", help="merge a LoRA adapter into its base model (safetensors)")
    sp.add_argument("--model", required=True, help="the base model (HF id, local path or alias)")
    sp.add_argument("--adapter", required=True, help="adapter directory (e.g. <train out>/adapter)")
    sp.add_argument("--out", required=True)
    sp.add_argument("--dtype", default="auto", choices=("auto", "float32", "bfloat16", "float16"))
    sp.add_argument("--trust-remote-code", action="store_true")
    sp.set_defaults(func=cmd_merge)


def main(argv: list[str] | None = None) -> int:
    """`python -m mmla.training train|merge|run|export ...`: the same commands as `mmla`, for when the
    main CLI does not register them."""
    from . import cli, experiment, export

    parser = cli._Parser(prog="mmla", description="MMLA fine-tuning, experiments and export.")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=cli._Parser)
    for module in (sys.modules[__name__], experiment, export):
        module.add_cli(sub)
    args = parser.parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except (ValueError, FileNotFoundError, NotADirectoryError, PermissionError) as e:
        msg = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        print(f"mmla: error: {msg}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
