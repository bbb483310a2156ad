"""What a LoRA fine-tune is made of, shared by single-adapter training (mmla.training, the transformers `Trainer`)
and concurrent training (mmla.multilora, one frozen base): the training data of a run, micro-batches, dev
evaluation and best-adapter selection, LoRA and TrainingArguments from the config, env.json and the summary, the
run directory's identity, atomic adapter saving, checkpoint lookup and the CPU mixed precision.

mmla.training owns the config and presets; nothing here depends on the modality except through the model's
`mmla.inputs` seam (media tensors and per-token extras ride along in every batch).
"""

from __future__ import annotations

import dataclasses
import json
import os
import random
import shutil
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from . import data as data_mod
from . import video as video_mod
from .prompts import candidates, render, target
from .runs import environment, open_run, read_json, write_json, writing
from .tasks import get_task

IGNORE = -100  # label of the tokens the loss skips: mmla.inputs.IGNORE (not imported: mmla.inputs imports torch)


def is_main() -> bool:
    return int(os.environ.get("RANK", "0")) == 0


def say(msg: str) -> None:
    if is_main():
        print(msg, file=sys.stderr, flush=True)


# ---------------------------------------------------------------- micro-batches


@dataclass
class Collator:
    """Micro-batches (see TrainConfig.batching): right-padded rows with an attention mask (padded) or without one
    (causal), or one packed row whose position ids restart at 0 for every example, which transformers turns into
    attention within each example only (packed). All three give the same loss.

    Video items also carry per-token extras (`tokens`, e.g. mm_token_type_ids: right-padded with 0) and media
    tensors (`media`, e.g. pixel_values_videos and video_grid_thw: concatenated along dim 0 in row order);
    `forward_kwargs` keeps only what the model's forward takes (the seam's filter)."""

    pad_id: int
    batching: str = "padded"
    forward_kwargs: Callable[[dict], dict] | None = None

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
        extras = {k: torch.zeros((len(items), width), dtype=torch.long) for k in items[0].get("tokens", {})}
        for r, it in enumerate(items):
            n = len(it["input_ids"])
            ids[r, :n] = torch.tensor(it["input_ids"])
            labels[r, :n] = torch.tensor(it["labels"])
            mask[r, :n] = 1
            for k, t in extras.items():
                t[r, :n] = torch.tensor(it["tokens"][k], dtype=torch.long)
        media = {k: torch.cat([it["media"][k] for it in items]) for k in items[0].get("media", {})}
        extras.update(media)
        batch = {"input_ids": ids, "labels": labels,
                 **(self.forward_kwargs(extras) if self.forward_kwargs else extras)}
        if self.batching == "padded":
            batch["attention_mask"] = mask
        batch["num_tokens"] = n_tokens
        return batch


def answer_positions(labels):
    """Boolean mask of the positions whose next token is an answer token (where the loss reads logits)."""
    import torch

    keep = torch.zeros_like(labels, dtype=torch.bool)
    keep[:, :-1] = labels[:, 1:] != IGNORE
    return keep


def kept(logits, keep):
    """The logits of the kept positions: a forward that ignores a mask `logits_to_keep` (Qwen2.5-Omni's thinker)
    returns every position's."""
    return logits[keep] if logits.dim() == 3 else logits


class VideoItems:
    """Video training items built when the Trainer asks: frames from the frame cache, then the seam's
    train_item (input_ids, labels, per-token extras, media tensors)."""

    def __init__(self, inputs, rows: list[tuple], cutoff: int, cache: video_mod.FrameCache):
        self.inputs, self.rows, self.cutoff, self.cache = inputs, rows, cutoff, cache

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, i: int) -> dict:
        path, chat, answer = self.rows[i]
        try:
            frames = self.inputs.load(path, self.cache)
        except video_mod.ClipError as e:  # changed on disk since the split was built
            raise ValueError(f"{path}: {e} (mmla check-data --full lists such clips)") from None
        return self.inputs.train_item(chat, answer, self.cutoff, frames)[0]


def placement(cfg) -> dict:
    """load_model's arguments for device_map=auto: one copy of the base model split over the GPUs, then the CPU
    (accelerate's dispatch; the Trainer then leaves it where it is). No offload folder: frozen weights that live on
    disk would be read back at every forward and backward, so a model that does not fit GPUs + CPU is refused."""
    if not cfg.device_map:
        return {}
    from .models import parse_max_memory

    return {"device_map": cfg.device_map, "max_memory": parse_max_memory(cfg.max_memory) if cfg.max_memory else None}


def refuse_disk(model, cfg) -> None:
    placed = getattr(model, "hf_device_map", None) or {}
    if "disk" in map(str, placed.values()):
        raise ValueError(f"max_memory={cfg.max_memory!r} leaves part of {cfg.model} on disk: training needs it on the "
                         f"GPUs and the CPU (raise the caps)")


def precision_for(cfg, device) -> str:
    """The precision a run uses: `precision`, or for auto bf16 on a bf16 GPU, else fp32 (paper) or mixed (fast)."""
    import torch

    if cfg.precision != "auto":
        return cfg.precision
    if device.type == "cuda" and torch.cuda.is_bf16_supported():
        return "bf16"
    return "mixed" if cfg.preset == "fast" else "fp32"


# ---------------------------------------------------------------- dev evaluation


class DevEval:
    """eval_accuracy: LLaMA-Factory's compute_accuracy (per dev example, the share of answer tokens that the
    argmax under teacher forcing gets right; then the mean over examples), through the training collator.
    eval_gen_accuracy: the share of dev examples classified right, by scoring the candidate answers or by greedy
    generation + the official parser (mmla.engine, the inference prompt family; video rows with their frames).
    Under DDP each process takes a shard and the counts are summed."""

    def __init__(self, cfg, inputs, dev, collate: Collator, cache: video_mod.FrameCache | None = None):
        self.cfg, self.inputs, self.dev, self.collate, self.cache = cfg, inputs, dev, collate, cache
        self.prompts = inputs.chat([render(e.dataset, cfg.eval_family, e.text, "dev", inputs.modality)
                                    for e in dev.examples], cfg.protocol)

    def _frames(self, j: int):
        return self.inputs.load(self.dev.clips[j], self.cache)

    def __call__(self, model, split_dev: bool = True) -> dict:
        import torch
        import torch.distributed as dist

        from . import engine
        from .evaluation import parse_output

        world = dist.get_world_size() if split_dev and dist.is_available() and dist.is_initialized() else 1
        rank = dist.get_rank() if world > 1 else 0
        shard = list(range(rank, len(self.dev.items), world))
        was_training = model.training
        model.eval()
        sums = torch.zeros(3, dtype=torch.float64)  # teacher-forced accuracy sum, classified right, examples
        video = self.inputs.modality != "text"
        modality = self.inputs.modality
        with torch.no_grad():
            bs = self.cfg.eval_batch_size
            for i in range(0, len(shard), bs):
                items = [self.dev.items[j] for j in shard[i : i + bs]]
                batch = {k: v.to(model.device) for k, v in self.collate(items).items() if k != "num_tokens"}
                labels = batch.pop("labels")
                keep = answer_positions(labels)
                pred = kept(model(**batch, logits_to_keep=keep, use_cache=False).logits, keep).argmax(-1)
                right = (pred == labels[:, 1:][keep[:, :-1]]).float()
                counts = [sum(t != IGNORE for t in it["labels"]) for it in items]  # answer tokens per example
                sums[0] += sum(part.mean().item() for part in torch.split(right, counts))
            if self.cfg.eval_gen != "none" and shard:
                ex = [self.dev.examples[j] for j in shard]
                texts = [self.prompts[j] for j in shard]
                frames = [self._frames(j) for j in shard] if video else None
                if self.cfg.eval_gen == "score":
                    cands = [candidates(e.dataset, self.cfg.eval_family, "dev", modality) for e in ex]
                    res = engine.score(model, self.inputs, self.inputs.score_rows(texts, cands, frames),
                                       batch_size=bs)
                    preds = [get_task(e.dataset).labels[r.best] for e, r in zip(ex, res)]
                else:
                    outs = engine.generate(model, self.inputs, self.inputs.encode(texts, frames),
                                           max_new_tokens=self.cfg.eval_max_new_tokens, batch_size=bs)
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


# ---------------------------------------------------------------- one run, adapters, checkpoints


def save_adapter(trainer, dest: Path) -> None:
    """Save the peft adapter (safetensors) atomically: into a temporary sibling, then renamed over `dest`.
    Every process calls this (FSDP and ZeRO-3 gather the weights); process 0 writes."""
    tmp = dest.with_name(f".{dest.name}.tmp")
    main = trainer.is_world_process_zero()
    if main:
        shutil.rmtree(tmp, ignore_errors=True)
    with writing(dest):  # a full disk or a size limit: one line naming the adapter; the old one stays
        trainer.save_model(str(tmp))
    if not main:
        return
    (tmp / "training_args.bin").unlink(missing_ok=True)
    replace_dir(tmp, dest)


def replace_dir(tmp: Path, dest: Path) -> None:
    """Put a finished directory in place of `dest`: at every moment one complete version exists on disk."""
    old = dest.with_name(f".{dest.name}.old")
    shutil.rmtree(old, ignore_errors=True)
    if dest.exists():
        os.replace(dest, old)
    os.replace(tmp, dest)
    shutil.rmtree(old, ignore_errors=True)


class Run:
    """One training run (one adapter) in one output directory: its dev evaluation and best adapter so far
    (best.json survives a resume, so a worse later adapter never replaces a better one)."""

    def __init__(self, cfg, datasets: list[str], out: Path):
        self.cfg, self.datasets, self.out = cfg, datasets, out
        self.name = datasets[0] if len(datasets) == 1 else f"{cfg.setting} ({len(datasets)} datasets)"
        self.dev_eval: DevEval | None = None
        best = out / "best.json"
        self.best = read_json(best) if best.exists() else None

    def keep_if_best(self, trainer, metrics: dict) -> None:
        best = better(self.best, trainer.state.global_step, self.cfg.select_metric, metrics)
        if best is None:
            return
        self.best = best
        save_adapter(trainer, self.out / "adapter")
        if trainer.is_world_process_zero():
            write_json(self.out / "best.json", self.best)


def prepare_base(model, cfg, precision: str) -> None:
    """The frozen base before LoRA is added: bf16 frozen matmuls (precision=mixed), no KV cache while training (also
    in a composite model's text config), inputs that carry gradients under gradient checkpointing."""
    if precision == "mixed":
        bf16_frozen_matmuls(model)
    for c in (model.config, getattr(model.config, "text_config", None)):
        if c is not None:
            c.use_cache = False
    if cfg.gradient_checkpointing:
        model.enable_input_require_grads()


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


# ---------------------------------------------------------------- the Trainer


def trainer_classes():
    """(MMLATrainer, LogCallback), defined on first use so that importing this module does not import
    transformers."""
    import torch.nn.functional as F
    from transformers import Trainer, TrainerCallback

    class MMLATrainer(Trainer):
        """The Trainer with an answer-only loss (optional), token counting and our dev evaluation."""

        def __init__(self, *args, run: Run, **kwargs):
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
            loss = F.cross_entropy(kept(outputs.logits, keep).float(), targets, reduction="sum")
            if num_items_in_batch is None:
                loss = loss / max(targets.numel(), 1)
            else:  # as the Trainer's own loss: over the whole optimiser step, across processes
                loss = loss / num_items_in_batch
                if self.args.average_tokens_across_devices:
                    loss = loss * self.accelerator.num_processes
            return (loss, outputs) if return_outputs else loss

        def _save_checkpoint(self, model, trial):
            # a full disk or a size limit mid-save: one line naming the checkpoint (the next run skips it)
            with writing(Path(self.args.output_dir) / f"checkpoint-{self.state.global_step}"):
                super()._save_checkpoint(model, trial)

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

        def __init__(self, run: Run, progress: bool):
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
                        f"{k} {v:.4f}" for k, v in rec.items() if k.endswith("accuracy")), file=sys.stderr)
            else:
                return
            if state.is_world_process_zero:
                log = self.run.out / "train_log.jsonl"
                with writing(log), open(log, "a", encoding="utf-8") as f:
                    f.write(json.dumps(rec) + "\n")

        def on_train_end(self, args, state, control, **kw):
            if self.bar is not None:
                self.bar.close()

    return MMLATrainer, LogCallback


# ---------------------------------------------------------------- the data of a run

# Settings that change the trained weights: a run directory refuses to resume (or to be reused) under different
# ones. They are compared as the user gave them (None = the default), so the same command always resumes.
IDENTITY = ("model", "datasets", "setting", "modality", "family", "protocol", "limit", "frames", "num_frames", "fps",
             "max_pixels", "max_audio_seconds", "learning_rate", "num_epochs", "max_steps", "per_device_batch_size",
             "gradient_accumulation_steps", "lr_scheduler", "warmup_ratio", "weight_decay", "optim", "cutoff_len",
             "seed", "lora_rank", "lora_alpha", "lora_dropout", "lora_target")



def frames_of(cfg) -> video_mod.FrameSetting:
    return video_mod.frame_setting(cfg.frames, num_frames=cfg.num_frames, fps=cfg.fps, max_pixels=cfg.max_pixels)


# ---------------------------------------------------------------- data


def _subset(examples: list, n: int | None, seed: int) -> list:
    if n is None or n >= len(examples):
        return examples
    keep = sorted(random.Random(seed).sample(range(len(examples)), n))
    return [examples[i] for i in keep]


@dataclass
class Split:
    items: object  # text: a list of dicts (input_ids, labels); video: VideoItems, built on demand
    examples: list  # data.Example, aligned with items
    clips: list | None = None  # video: each example's clip path
    truncated: int = 0  # text: rows cut at cutoff_len
    missing: list = field(default_factory=list)  # video: {dataset, id, error} of the rows left out


def build_split(cfg, inputs, datasets: list[str], split: str, limit: int | None,
                subset: bool = False, cache: video_mod.FrameCache | None = None) -> Split:
    """The rows of `split` as training items through the seam `inputs`. Video: each clip is decoded now (into the
    frame cache, so the Trainer reads it back); a row whose clip is missing or unreadable is left out and counted."""
    eot = inputs.end_of_turn(cfg.protocol)
    video = inputs.modality != "text"  # rows that come with their clip (video, audio, av)
    finder = video_mod.ClipFinder(cfg.data) if video else None
    out = Split([], [], [] if video else None)
    rows_v = []
    for ds in datasets:
        rows = data_mod.load_split(Path(cfg.data), ds, split).examples
        rows = _subset(rows, limit, cfg.seed) if subset else rows[:limit] if limit else rows
        if video:
            found = []
            for e in rows:
                clip = finder.find(ds, e.id)
                error = clip.error
                if clip.path is not None:
                    try:
                        inputs.load(clip.path, cache)
                    except video_mod.ClipError as err:
                        error = str(err)
                if error:
                    out.missing.append({"dataset": ds, "id": e.id, "error": error})
                    continue
                found.append(e)
                out.clips.append(clip.path)
            rows = found
        chats = inputs.chat([render(ds, cfg.family, e.text, split, inputs.modality) for e in rows], cfg.protocol,
                            training=True)
        answers = [target(ds, cfg.family, e.label, split, inputs.modality) + eot for e in rows]
        if video:
            rows_v += list(zip(out.clips[len(out.examples):], chats, answers))
        else:
            for chat, answer in zip(chats, answers):
                item, cut = inputs.train_item(chat, answer, cfg.cutoff_len)
                out.items.append(item)
                out.truncated += cut
        out.examples += rows
    if video:
        out.items = VideoItems(inputs, rows_v, cfg.cutoff_len, cache)
    return out


# ---------------------------------------------------------------- a run: identity, environment, summary


def run_record(cfg, datasets: list[str]) -> dict:
    """What config.yaml records: the config with the datasets this run trains."""
    return {**dataclasses.asdict(cfg), "datasets": datasets}


def check_identity(out: Path, cfg, datasets: list[str]) -> None:
    new = run_record(cfg, datasets)
    open_run(out, {key: new[key] for key in IDENTITY})


def load_for_training(cfg, model=None):
    """(model, tokenizer or processor, device, precision) of a training run: cfg.model loaded in the precision's
    dtype (or the given (model, tokenizer) pair, for benchmarks), on the CPU until the Trainer moves it."""
    import torch

    from .models import load_model, pick_device

    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    device = pick_device(cfg.device)
    precision = precision_for(cfg, device)
    if model is not None:
        return (*model, device, precision)
    model, tok = load_model(cfg.model, dtype="bfloat16" if precision == "bf16" else "float32", device="cpu",
                            trust_remote_code=cfg.trust_remote_code, modality=cfg.modality, **placement(cfg))
    refuse_disk(model, cfg)
    return model, tok, device, precision


def lora_config(cfg, modules):
    from peft import LoraConfig

    return LoraConfig(r=cfg.lora_rank, lora_alpha=cfg.lora_alpha, lora_dropout=cfg.lora_dropout,
                      target_modules=modules, task_type="CAUSAL_LM")


def training_arguments(cfg, precision: str, device, output_dir: str = "unused", **more):
    """The TrainingArguments of a run of `cfg`: optimiser, schedule and precision (what a concurrent adapter's
    optimiser is built from too), plus the Trainer's own settings in `more`."""
    from transformers import TrainingArguments

    return TrainingArguments(
        output_dir=output_dir, learning_rate=cfg.learning_rate, lr_scheduler_type=cfg.lr_scheduler,
        warmup_steps=cfg.warmup_ratio, weight_decay=cfg.weight_decay, max_grad_norm=cfg.max_grad_norm,
        optim=cfg.optim, seed=cfg.seed, bf16=precision == "bf16", use_cpu=device.type == "cpu", report_to="none",
        **more)


def better(best: dict | None, step: int, metric: str, metrics: dict) -> dict | None:
    """The new best.json record when `metrics` beat `best` on `metric` (ties keep the earlier adapter), else None."""
    value = metrics[metric]
    if best is not None and value <= best["value"]:
        return None
    return {"step": step, "metric": metric, "value": value, **{k: v for k, v in metrics.items()
                                                               if k.endswith("accuracy")}}


def run_env(cfg, device, precision: str, world: int, lora_target, train: Split, dev: Split | None, video: bool,
            frames: dict, cache, trainable: int, **more) -> dict:
    """A training run's env.json."""
    return {
        **environment(str(device)), "precision": precision, "world_size": world, "lora_target": lora_target,
        "train_rows": len(train.items), "train_truncated": train.truncated, "dev_rows": len(dev.items) if dev else 0,
        **({**frames, "train_missing_clips": len(train.missing), "dev_missing_clips": len(dev.missing) if dev else 0,
            "frame_cache": str(cache.root) if cache.enabled else None} if video else {}),
        "trainable_parameters": trainable, **more}


def summary(out: Path, datasets: list[str], step: int, epoch: float, loss: float, seconds: float, best: dict | None,
            precision: str, world: int, train: Split, video: bool, **more) -> dict:
    """A finished adapter's train_result.json."""
    return {"adapter": str(out / "adapter"), "datasets": datasets, "steps": step, "epochs": round(epoch, 4),
            "train_loss": loss, "train_runtime_s": round(seconds, 1), "best": best, "precision": precision,
            "world_size": world, **more, **({"train_missing_clips": len(train.missing)} if video else {})}
