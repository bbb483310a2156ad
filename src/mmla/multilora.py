"""Many LoRA adapters trained concurrently over one frozen base: SFT for several datasets in one process, text or
video.

The paper trains one LoRA adapter per dataset at an effective batch of 4, which leaves an accelerator mostly idle.
The base model is frozen and the same for every dataset, so the runs can share it: each joint step holds the next
optimiser step of every dataset still training, its rows sorted by length into forwards (`_joint_batches`), and
each row goes through its own dataset's adapter only.

Routing (`Router`). The micro-batch holds each adapter's rows together, so in every LoRA layer an adapter owns one
slice of rows: the frozen base layer runs once over the whole batch and each adapter's low-rank update runs on its
own slice (one batched matmul across adapters when the slices are alike), and gradients reach only the adapter that
owns a row. peft's own mixed batch (`adapter_names=`, one name per row, rows gathered and scattered by index in
every layer) computes the same; it cost more than the base model's work saved by batching on a CPU, and remains
the path for LoRA variants. PeftModel.forward refuses `adapter_names` in training mode; at the layer level it is
differentiable. Video rows go through the same seam (mmla.inputs) and collator as in a separate run: their media
tensors are concatenated in row order, the vision tower (no LoRA) sees them all, and the language model's LoRA
layers route each row to its dataset's adapter.

Per adapter, the same maths as a separate `mmla train` run of that dataset (tests/test_multilora.py checks weights
and loss curves against one): its config (for video the paper table's row of its dataset), the LoRA initialisation
(the global RNG reseeded with cfg.seed before each adapter is added, as a separate run does before get_peft_model),
the data order (the Trainer's seedable sampler: a permutation drawn from seed + epoch each epoch), its own number of
steps and epochs, the loss normalised over the answer tokens of its own optimiser step (num_items_in_batch), its own
AdamW state, learning-rate schedule and grad-norm clipping, dev evaluation, best-adapter selection and output
directory (adapter/, best.json, train_log.jsonl, config.yaml, env.json, train_result.json). Datasets of different
sizes finish at different steps; the batch then holds the rest.

Resume: every `save_steps` joint steps a checkpoint (all adapters' weights, optimiser and scheduler states, steps)
is written to <out>/.checkpoint.tmp and renamed to <out>/checkpoint; rerunning resumes from it. <out>/concurrent.json
records the dataset set and preset; a rerun with others is refused.

This module sits below mmla.training, whose `train` calls `train_concurrent` for a config with `concurrent`
(`mmla train --concurrent`, `sft: {concurrent: true}` in `mmla run`); the parts a separate run uses too (the run's
data, identity, LoRA config, TrainingArguments, best-adapter selection, env.json, summary) are mmla.finetune's.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import os
import shutil
import time
import warnings
from pathlib import Path

from . import data as data_mod
from . import video as video_mod
from .finetune import IGNORE, Collator, DevEval, answer_positions, better, build_split, check_identity, \
    frames_of, load_for_training, lora_config, prepare_base, replace_dir, run_env, run_record, say, summary, \
    training_arguments
from .runs import claim, open_run, read_json, read_jsonl, write_config, write_json, write_jsonl, writing

CKPT = "checkpoint"


class Router:
    """Which adapter each row of a batch goes through, in every LoRA layer: `spans` ((adapter, first row, end row)
    in row order, covering the batch: each adapter's rows are contiguous) or `only` (one adapter for all rows).

    A plain LoRA linear layer computes its routed update itself: the frozen base layer once over the whole batch,
    then each adapter's low-rank update on its own slice of rows, as one batched matmul (torch.bmm over stacked A
    and B) when every adapter has the same number of rows and the same rank, else one pair of matmuls per slice,
    concatenated. Slices are views and the result is one addition, so nothing is gathered or scattered by index.
    Other LoRA layers (DoRA and other variants, LoRA biases, embeddings, merged or disabled adapters) take peft's own
    mixed-batch path with one adapter name per row (`adapter_names`, differentiable at the layer level)."""

    def __init__(self):
        self.spans: list[tuple[str, int, int]] | None = None
        self.only: str | None = None

    def attach(self, model) -> int:
        import types

        from peft.tuners.lora import LoraLayer

        n = 0
        for m in model.modules():
            if isinstance(m, LoraLayer):
                m.forward = types.MethodType(self._forward(m.forward), m)
                n += 1
        return n

    def _forward(self, peft_forward):
        router = self

        def forward(layer, x, *args, **kwargs):
            spans = router.spans if router.spans is not None else (
                [(router.only, 0, x.shape[0])] if router.only is not None else None)
            if spans is None:
                return peft_forward(x, *args, **kwargs)
            if spans[-1][2] != x.shape[0] or not _plain(layer, spans):
                return peft_forward(x, *args, adapter_names=owners(spans), **kwargs)
            result = layer.base_layer(x, *args, **kwargs)
            return (result + _routed_update(layer, x, spans)).to(result.dtype)

        return forward


def owners(spans) -> list[str]:
    """The adapter of each row, from the spans."""
    return [a for a, start, end in spans for _ in range(end - start)]


def _plain(layer, spans) -> bool:
    """A vanilla LoRA linear layer for every adapter in the batch (what `_routed_update` computes)."""
    from peft.tuners.lora.layer import Linear

    if not isinstance(layer, Linear) or layer.disable_adapters or layer.merged:
        return False
    return all(a in layer.lora_A and a not in layer.lora_variant and layer.lora_B[a].bias is None
               for a, _, _ in spans)


def _routed_update(layer, x, spans):
    """Each row's update through its own adapter: B_a(A_a(dropout_a(x_rows))) * scaling_a, rows in order."""
    import torch

    names = [a for a, _, _ in spans]
    x = x.to(layer.lora_A[names[0]].weight.dtype)
    sizes = {end - start for _, start, end in spans}
    ranks = {layer.lora_A[a].weight.shape[0] for a in names}
    identity = all(isinstance(layer.lora_dropout[a], torch.nn.Identity) for a in names)
    if len(spans) > 1 and len(sizes) == 1 and len(ranks) == 1 and identity:
        k = len(spans)
        xs = x.reshape(k, -1, x.shape[-1])  # (adapters, its rows x tokens, in)
        a_t = torch.stack([layer.lora_A[a].weight for a in names]).transpose(1, 2)  # (adapters, in, r)
        b_t = torch.stack([layer.lora_B[a].weight for a in names]).transpose(1, 2)  # (adapters, r, out)
        scale = torch.tensor([layer.scaling[a] for a in names], dtype=xs.dtype, device=xs.device).view(k, 1, 1)
        return (torch.bmm(torch.bmm(xs, a_t), b_t) * scale).reshape(*x.shape[:-1], -1)
    return torch.cat([layer.lora_B[a](layer.lora_A[a](layer.lora_dropout[a](x[start:end]))) * layer.scaling[a]
                      for a, start, end in spans])


def epoch_order(n: int, seed: int, epoch: int) -> list[int]:
    """The row order of one epoch in a separate run: accelerate's SeedableRandomSampler (the Trainer's default)
    draws torch.randperm from a generator seeded with seed + epoch."""
    import torch

    return torch.randperm(n, generator=torch.Generator().manual_seed(seed + epoch)).tolist()


@dataclasses.dataclass
class Plan:
    """One adapter's schedule, as the Trainer computes it from the dataloader length."""

    n_rows: int
    batch: int
    accum: int
    seed: int
    max_steps: int = 0
    batches_per_epoch: int = 0
    steps_per_epoch: int = 0

    @classmethod
    def make(cls, cfg, n_rows: int) -> "Plan":
        p = cls(n_rows, cfg.per_device_batch_size, cfg.gradient_accumulation_steps, cfg.seed)
        p.batches_per_epoch = math.ceil(n_rows / p.batch)
        p.steps_per_epoch = max(p.batches_per_epoch // p.accum + int(p.batches_per_epoch % p.accum > 0), 1)
        p.max_steps = cfg.max_steps or math.ceil(cfg.num_epochs * p.steps_per_epoch)
        return p

    def steps(self, start: int = 0):
        """Yield (step, epoch as the Trainer logs it, [micro-batch row indices]) for steps start+1 .. max_steps."""
        step = 0
        for epoch in range(math.ceil(self.max_steps / self.steps_per_epoch)):
            if step + self.steps_per_epoch <= start:  # a whole epoch already trained: no need to draw its order
                step += self.steps_per_epoch
                continue
            order = epoch_order(self.n_rows, self.seed, epoch)
            micro = [order[i : i + self.batch] for i in range(0, self.n_rows, self.batch)]
            for u in range(self.steps_per_epoch):
                mb = micro[u * self.accum : (u + 1) * self.accum]
                step += 1
                if step > start:
                    yield step, epoch + (u * self.accum + len(mb)) / self.batches_per_epoch, mb
                if step >= self.max_steps:
                    return


class Adapter:
    """One dataset's adapter: its config, data, plan, optimiser, schedule, evaluation and output directory."""

    def __init__(self, cfg, ds: str, name: str, out: Path, inputs, collate: Collator, cache):
        self.cfg, self.ds, self.name, self.out = cfg, ds, name, out
        self.train = build_split(cfg, inputs, [ds], "train", cfg.limit, cache=cache)
        if len(self.train.items) == 0:
            raise ValueError(f"no train row of {ds} has a usable clip (mmla check-data lists them)")
        self.plan = Plan.make(cfg, len(self.train.items))
        self.dev_eval = None
        if cfg.eval_steps > 0 and "dev" in data_mod.available_splits(Path(cfg.data), ds):
            dev = build_split(cfg, inputs, [ds], "dev", cfg.eval_limit, subset=True, cache=cache)
            if len(dev.items):
                self.dev_eval = DevEval(cfg, inputs, dev, collate, cache)
        if cfg.eval_steps > 0 and self.dev_eval is None:
            say(f"no dev rows for {ds}: no dev evaluation, the final adapter is kept")
        best = out / "best.json"
        self.best = read_json(best) if best.exists() else None
        self.step, self.epoch, self.done = 0, 0.0, (out / "train_result.json").exists()
        self.params: list = []
        self.optimizer = self.scheduler = self.it = None
        self.losses: list[float] = []  # this session's step losses (train_loss, as the Trainer reports it)
        self.t_start = time.time()

    def log(self, rec: dict) -> None:
        with open(self.out / "train_log.jsonl", "a", encoding="utf-8") as f:
            f.write(json.dumps(rec) + "\n")


def _optimiser(model, a: Adapter, precision: str, device) -> None:
    """The Trainer's optimiser and schedule (create_optimizer / create_scheduler) over this adapter's parameters,
    from the TrainingArguments a separate run of its config builds."""
    from transformers import Trainer, get_scheduler

    args = training_arguments(a.cfg, precision, device)
    decay = set(Trainer.get_decay_parameter_names(None, model))  # uses no Trainer state
    mine = [(n, p) for n, p in model.named_parameters() if f".{a.name}." in n]
    a.params = [p for _, p in mine]
    groups = [{"params": [p for n, p in mine if n in decay], "weight_decay": args.weight_decay},
              {"params": [p for n, p in mine if n not in decay], "weight_decay": 0.0}]
    cls, kwargs = Trainer.get_optimizer_cls_and_kwargs(args, model)
    a.optimizer = cls(groups, **kwargs)
    a.scheduler = get_scheduler(args.lr_scheduler_type, optimizer=a.optimizer,
                                num_warmup_steps=args.get_warmup_steps(a.plan.max_steps),
                                num_training_steps=a.plan.max_steps, scheduler_specific_kwargs=args.lr_scheduler_kwargs)


# ---------------------------------------------------------------- checkpoints


def save_adapter(model, a: Adapter, dest: Path) -> None:
    """The adapter as an ordinary peft directory (what a separate run writes), atomically."""
    tmp = dest.with_name(f".{dest.name}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    with writing(dest):
        model.save_pretrained(str(tmp), selected_adapters=[a.name])  # peft writes a non-default adapter to tmp/<name>
    if (tmp / "README.md").exists():  # the model card, which a separate run keeps beside the adapter
        os.replace(tmp / "README.md", tmp / a.name / "README.md")
    replace_dir(tmp / a.name, dest)
    shutil.rmtree(tmp, ignore_errors=True)


def save_checkpoint(out: Path, model, adapters: list[Adapter], joint_step: int) -> None:
    import torch
    from safetensors.torch import save_file

    tmp = out / f".{CKPT}.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    live = [a for a in adapters if not a.done]
    names = {id(p): n for n, p in model.named_parameters()}
    with writing(out / CKPT):
        save_file({names[id(p)]: p.detach().cpu().contiguous() for a in live for p in a.params},
                  str(tmp / "adapters.safetensors"))
        for a in live:
            torch.save({"optimizer": a.optimizer.state_dict(), "scheduler": a.scheduler.state_dict()},
                       tmp / f"{a.name}.pt")
    write_json(tmp / "state.json", {"joint_step": joint_step, "steps": {a.ds: a.step for a in live},
                                    "names": {a.ds: a.name for a in live}})
    replace_dir(tmp, out / CKPT)


def load_checkpoint(out: Path, model, adapters: list[Adapter]) -> int:
    """Restore the adapters still training from <out>/checkpoint; returns the joint step (0: none)."""
    import torch
    from safetensors.torch import load_file

    ck = out / CKPT
    if not (ck / "state.json").exists() and (out / f".{CKPT}.old" / "state.json").exists():
        ck = out / f".{CKPT}.old"  # killed between the two renames
    if not (ck / "state.json").exists():
        return 0
    state = read_json(ck / "state.json")
    try:
        weights = load_file(str(ck / "adapters.safetensors"))
    except Exception as e:  # written before the rename, so only a damaged disk gets here
        raise ValueError(f"{ck}: unreadable checkpoint ({type(e).__name__}); remove it to start again") from None
    params = dict(model.named_parameters())
    with torch.no_grad():
        for key, value in weights.items():
            params[key].copy_(value)
    for a in adapters:
        if a.done or a.ds not in state["steps"]:
            continue
        a.step = state["steps"][a.ds]
        saved = torch.load(ck / f"{a.name}.pt", weights_only=True)
        a.optimizer.load_state_dict(saved["optimizer"])
        a.scheduler.load_state_dict(saved["scheduler"])
        write_jsonl(a.out / "train_log.jsonl", [r for r in read_jsonl(a.out / "train_log.jsonl")[0]
                                                if r.get("step", 0) <= a.step])
    return state["joint_step"]


def _check_run_dir(out: Path, cfg, datasets: list[str]) -> None:
    want = {"datasets": datasets, "preset": cfg.preset}
    open_run(out, want, "concurrent.json")
    if not (out / "concurrent.json").exists():
        write_json(out / "concurrent.json", want)


# ---------------------------------------------------------------- training


def _check_config(cfg, datasets: list[str]) -> None:
    if cfg.setting != "sft":
        raise ValueError("concurrent training is for SFT (one adapter per dataset), not setting=it")
    if cfg.batching == "packed":
        raise ValueError("concurrent training routes whole rows to adapters: use batching=padded or causal, not packed")
    if cfg.group_by_length:
        raise ValueError("concurrent training reproduces the random sampler: set group_by_length=false")
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        raise ValueError("concurrent training runs in one process: start it without torchrun / accelerate launch")
    if len(set(datasets)) != len(datasets):
        raise ValueError(f"concurrent training: a dataset is named twice in {','.join(datasets)}")


def _joint_batches(todo, width: int | None = None):
    """The forwards of one joint step: (rows, spans). Every row of every adapter's optimiser
    step, longest first, in forwards of `width` rows (default: as many as one micro-batch of each adapter), so rows
    of similar length share a forward and pad less; within a forward each adapter's rows are together (one slice
    per adapter, as the Router wants). An adapter's rows are summed into its gradient before its optimiser step,
    whichever forwards they take: the grouping changes only the rounding of that sum."""
    order = {a.name: k for k, (a, *_rest) in enumerate(todo)}
    rows = sorted(((it, a.name) for a, _, _, micro in todo for mb in micro for it in mb),
                  key=lambda r: -len(r[0]["input_ids"]))
    width = width or sum(len(micro[0]) for *_rest, micro in todo)
    for start in range(0, len(rows), width):
        group = sorted(rows[start : start + width], key=lambda r: order[r[1]])  # stable: keeps length order
        spans: list[tuple[str, int, int]] = []
        for k, (_, name) in enumerate(group):
            if spans and spans[-1][0] == name:
                spans[-1] = (name, spans[-1][1], k + 1)
            else:
                spans.append((name, k, k + 1))
        yield [it for it, _ in group], spans


def _step_losses(model, batch: dict, owner, n_items, n_adapters: int, answer_only: bool):
    """Forward one joint micro-batch; returns the per-adapter losses (sum of answer-token cross-entropy over the
    adapter's rows / the adapter's answer tokens in its whole optimiser step), as a vector."""
    import torch
    import torch.nn.functional as F

    labels = batch.pop("labels")
    if answer_only:
        keep = answer_positions(labels)
        logits = model(**batch, logits_to_keep=keep, use_cache=False).logits.float()
        token = F.cross_entropy(logits, labels[:, 1:][keep[:, :-1]], reduction="none")
        row = torch.zeros(labels.shape[0], device=token.device).index_add(0, keep.nonzero()[:, 0], token)
    else:  # the model's own loss: full-vocabulary logits, shifted labels, -100 ignored
        logits = model(**batch, use_cache=False).logits.float()
        shift = F.pad(labels, (0, 1), value=IGNORE)[:, 1:]
        token = F.cross_entropy(logits.flatten(0, 1), shift.flatten(), ignore_index=IGNORE, reduction="none")
        row = token.view(shift.shape).sum(-1)
    per = torch.zeros(n_adapters, device=row.device).index_add(0, owner, row)
    return per / n_items


def _setup(cfg, datasets: list[str], out: Path, model, frame_cache, preset):
    """Load the base (or take the given (model, tokenizer or processor) pair), build every adapter's data, add one
    LoRA adapter per dataset and the router. Returns (model, router, adapters, precision, device, collate, extra)."""
    from peft import get_peft_model
    from transformers import set_seed

    from .inputs import make_inputs

    model, tok, device, precision = load_for_training(cfg, model)
    video = cfg.modality == "video"
    inputs = make_inputs(model, tok, frames_of(cfg) if video else None)
    cache = (frame_cache or video_mod.FrameCache(enabled=not cfg.no_frame_cache)) if video else None
    collate = Collator(inputs.pad_id, cfg.batching, inputs.forward_kwargs if video else None)
    adapters = []
    for i, ds in enumerate(datasets):
        (out / ds).mkdir(parents=True, exist_ok=True)
        adapters.append(Adapter(preset(ds), ds, f"a{i}", out / ds, inputs, collate, cache))
    prepare_base(model, cfg, precision)
    with warnings.catch_warnings():  # peft calls a transformers property that warns of its own deprecation
        warnings.simplefilter("ignore", FutureWarning)
        for a in adapters:
            lora = lora_config(a.cfg, a.cfg.lora_target or inputs.lora_target)
            set_seed(cfg.seed)  # each adapter initialised as a separate run of this config initialises its one
            if not hasattr(model, "peft_config"):
                model = get_peft_model(model, lora, adapter_name=a.name)
            else:
                model.add_adapter(a.name, lora)
    for n, p in model.named_parameters():  # peft leaves only the active adapter trainable
        p.requires_grad_(".lora_" in n)
    model.to(device)
    if cfg.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    router = Router()
    router.attach(model)
    for a in adapters:
        _optimiser(model, a, precision, device)
    frames = {"frame_setting": inputs.setting.record()} if video else {}
    extra = {"frames": frames, "video": video, "cache": cache, "lora_target": cfg.lora_target or inputs.lora_target}
    return model, router, adapters, precision, device, collate, extra


def train_concurrent(cfg, datasets: list[str], out: Path, progress: bool = True, model=None,
                     frame_cache: video_mod.FrameCache | None = None, *, preset) -> dict:
    """Train one LoRA adapter per dataset, all at once over one frozen base, into <out>/<DS>/. Resumes from
    <out>/checkpoint; skips adapters already finished. `model`: an already loaded (model, tokenizer or processor)
    pair (benchmarks); `preset(ds)`: the config of that dataset's adapter (mmla.training.with_preset).
    Returns {dataset: summary}; mmla.training.train calls this for a config with `concurrent`. One writer per run
    directory: another process in `out` or in one of its <DS> directories is refused."""
    _check_config(cfg, datasets)
    out = Path(out)
    with contextlib.ExitStack() as held:
        for d in [out] + [out / ds for ds in datasets]:
            held.enter_context(claim(d, "train"))
        return _train_concurrent(cfg, datasets, out, progress, model, frame_cache, preset)


def _train_concurrent(cfg, datasets: list[str], out: Path, progress: bool, model, frame_cache, preset) -> dict:
    _check_run_dir(out, cfg, datasets)
    for ds in datasets:
        check_identity(out / ds, preset(ds), [ds])
    if all((out / ds / "train_result.json").exists() for ds in datasets):
        say(f"already trained: {', '.join(datasets)} in {out}")
        return {ds: read_json(out / ds / "train_result.json") for ds in datasets}

    import torch

    model, router, adapters, precision, device, collate, extra = _setup(cfg, datasets, out, model, frame_cache, preset)
    ckpt_step = load_checkpoint(out, model, adapters)
    if ckpt_step:
        say(f"resuming from joint step {ckpt_step} in {out} (" + ", ".join(
            f"{a.ds} step {a.step}" for a in adapters if not a.done) + ")")
    frames, video = extra["frames"], extra["video"]
    for a in adapters:
        if a.done:
            say(f"already trained: {a.out / 'adapter'}")
            continue
        if not ckpt_step and (a.out / "train_log.jsonl").exists():
            (a.out / "train_log.jsonl").unlink()
        a.it = a.plan.steps(a.step)
        dev = a.dev_eval.dev if a.dev_eval else None
        write_config(a.out / "config.yaml", {**run_record(a.cfg, [a.ds]), **frames})
        write_json(a.out / "env.json", run_env(
            a.cfg, device, precision, 1, extra["lora_target"], a.train, dev, video, frames, extra["cache"],
            sum(p.numel() for p in a.params), concurrent_with=[b.ds for b in adapters if b is not a]))

    autocast = (torch.autocast(device.type, dtype=torch.bfloat16) if precision == "bf16"
                else torch.autocast(device.type, enabled=False))
    live = [a for a in adapters if not a.done]
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=max(a.plan.max_steps - a.step for a in live) if live else 0,
                   desc=f"train {len(live)} adapters", unit="step", dynamic_ncols=True)
    joint, t_start, train_time = ckpt_step, time.time(), 0.0
    joint_log = out / "joint_log.jsonl"
    if joint_log.exists():  # drop what a killed run logged after its last checkpoint
        write_jsonl(joint_log, [r for r in read_jsonl(joint_log)[0] if r["joint_step"] <= ckpt_step])
    model.train()
    while live:
        t0 = time.time()
        todo = []  # (adapter, step, epoch, its micro-batches of items); video items are built here, once
        for a in live:
            step, epoch, micro = next(a.it)
            todo.append((a, step, epoch, [[a.train.items[i] for i in mb] for mb in micro]))
        index = {a.name: k for k, (a, *_rest) in enumerate(todo)}
        # each adapter's loss over the answer tokens of its whole optimiser step, as the Trainer's num_items_in_batch
        n_items = torch.tensor([max(sum(sum(t != IGNORE for t in it["labels"][1:]) for mb in micro for it in mb), 1)
                                for *_r, micro in todo], dtype=torch.float32, device=device)
        step_loss = torch.zeros(len(todo), dtype=torch.float64)
        tokens = [0] * len(todo)
        for rows, spans in _joint_batches(todo, cfg.concurrent_rows):
            batch = collate(rows)
            batch.pop("num_tokens")
            batch = {k: v.to(device) for k, v in batch.items()}
            owner_names = owners(spans)
            owner = torch.tensor([index[o] for o in owner_names], device=device)
            for r, o in zip(rows, owner_names):
                tokens[index[o]] += len(r["input_ids"])
            router.spans = spans
            with autocast:
                per = _step_losses(model, batch, owner, n_items, len(todo), cfg.answer_logits_only)
            per.sum().backward()
            step_loss += per.detach().double().cpu()
        router.spans = None
        dt = max(time.time() - t0, 1e-9)
        train_time += dt
        joint += 1
        with open(joint_log, "a", encoding="utf-8") as f:
            f.write(json.dumps({"joint_step": joint, "adapters": len(todo), "tokens": sum(tokens),
                                "tokens_per_s": round(sum(tokens) / dt, 1)}) + "\n")
        for k, (a, step, epoch, _) in enumerate(todo):
            grad_norm = None
            if a.cfg.max_grad_norm > 0:  # this adapter's own norm, as a separate run clips its only adapter
                grad_norm = float(torch.nn.utils.clip_grad_norm_(a.params, a.cfg.max_grad_norm))
            a.optimizer.step()
            lr = a.scheduler.get_last_lr()[0]
            a.scheduler.step()
            a.optimizer.zero_grad(set_to_none=True)
            a.step, a.epoch = step, epoch
            loss = float(step_loss[k])
            a.losses.append(loss)
            if step % a.cfg.logging_steps == 0 or step == a.plan.max_steps:
                rec = {"step": step, "epoch": round(epoch, 4), "loss": loss, "lr": lr,
                       "tokens_per_s": round(tokens[k] / dt, 1), "tokens": tokens[k]}
                if grad_norm is not None:
                    rec["grad_norm"] = grad_norm
                a.log(rec)
            if a.dev_eval is not None and (step % a.cfg.eval_steps == 0 or step == a.plan.max_steps):
                _evaluate(model, router, a)
            if step == a.plan.max_steps:
                _finish(model, a, adapters, precision, video)
        live = [a for a in live if not a.done]
        if bar is not None:
            bar.update(1)
            bar.set_postfix(adapters=len(todo), tok_s=f"{sum(tokens) / dt:.0f}")
        if live and joint % cfg.save_steps == 0:
            save_checkpoint(out, model, adapters, joint)
    if bar is not None:
        bar.close()
    shutil.rmtree(out / CKPT, ignore_errors=True)
    write_json(out / "concurrent_result.json", {"datasets": datasets, "joint_steps": joint,
                                                 "max_steps": {a.ds: a.plan.max_steps for a in adapters},
                                                 "train_time_s": round(train_time, 3),
                                                 "wall_s": round(time.time() - t_start, 1)})
    return {a.ds: read_json(a.out / "train_result.json") for a in adapters}


def _evaluate(model, router: Router, a: Adapter) -> None:
    t0 = time.time()
    router.only = a.name
    try:
        metrics = a.dev_eval(model)
    finally:
        router.only = None
    metrics["eval_runtime"] = round(time.time() - t0, 2)
    a.log({"step": a.step, **metrics})
    best = better(a.best, a.step, a.cfg.select_metric, metrics)
    if best is None:
        return
    a.best = best
    save_adapter(model, a, a.out / "adapter")
    write_json(a.out / "best.json", a.best)


def _finish(model, a: Adapter, adapters: list[Adapter], precision: str, video: bool) -> None:
    if a.dev_eval is None:
        save_adapter(model, a, a.out / "adapter")
    result = summary(a.out, [a.ds], a.step, a.epoch, sum(a.losses) / max(len(a.losses), 1), time.time() - a.t_start,
                     a.best, precision, 1, a.train, video, concurrent_with=[b.ds for b in adapters if b is not a])
    write_json(a.out / "train_result.json", result)
    a.done = True
    for p in a.params:  # a finished adapter no longer takes part
        p.requires_grad_(False)
