"""The training loop's parts, for text and video alike: micro-batches, dev evaluation, the transformers `Trainer`
subclass and its logging callback, atomic adapter saving, checkpoint lookup and the CPU mixed precision.

mmla.training owns the config, presets and data and calls these; nothing here depends on the modality except
through the model's `mmla.inputs` seam (media tensors and per-token extras ride along in every batch).
"""

from __future__ import annotations

import json
import os
import shutil
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from . import video as video_mod
from .prompts import candidates, render
from . import runs
from .runs import read_json, write_json, writing
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


def last_checkpoint(ckpt_dir: Path, say=None) -> Path | None:
    """The newest checkpoint that can be resumed from: each is validated (mmla.runs.checkpoint_problem), so one
    torn by a kill mid-save or truncated on a full disk is skipped for the one before it, named through `say`."""
    return runs.last_checkpoint(ckpt_dir, say)


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
        value = metrics[self.cfg.select_metric]
        if self.best is not None and value <= self.best["value"]:
            return
        self.best = {"step": trainer.state.global_step, "metric": self.cfg.select_metric, "value": value,
                     **{k: v for k, v in metrics.items() if k.endswith("accuracy")}}
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
