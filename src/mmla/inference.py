"""Zero-shot inference: a recipe of setup -> run -> save.

setup: resolve the config, read the data, open (or resume) the run directory.
run:   chat-wrap each prompt, generate (or score the candidate answers) in length-sorted batches,
       append every finished sample to predictions.jsonl at once.
save:  evaluate everything in predictions.jsonl with the official parser and write metrics.json.

Rerunning into the same run directory skips the samples already there.
"""

from __future__ import annotations

import dataclasses
import sys
from dataclasses import dataclass, field
from pathlib import Path

from . import data as data_mod
from .evaluation import evaluate_records, parse_output
from .prompts import PROTOCOLS, chat_text, model_kind, official_decoding, render
from .runs import JsonlAppender, environment, read_config, read_jsonl, write_config, write_json
from .tasks import FAMILIES, get_task, parse_datasets

MODES = ("generate", "score")


@dataclass
class PredictConfig:
    model: str = "smollm2-135m"
    adapter: str | None = None
    data: str | None = None  # --data, else $MMLA_DATA, else ./data/mmla
    datasets: list[str] = field(default_factory=lambda: ["all"])
    split: str = "test"
    mode: str = "generate"
    protocol: str = "official"
    family: str | None = None  # default: infer_script under the official protocol, clean otherwise
    modality: str = "text"
    frames: str = "official-infer"  # video: frame setting (mmla.video.SETTINGS)
    num_frames: int | None = None  # video: overrides of the frame setting
    fps: float | None = None
    max_pixels: int | None = None
    no_frame_cache: bool = False  # video: decode every clip again
    limit: int | None = None  # first N rows of each dataset
    batch_size: int = 32
    max_new_tokens: int | None = None  # default: the protocol's
    seed: int = 0
    dtype: str = "auto"
    device: str = "auto"
    threads: int | None = None
    skip_bad_rows: bool = False
    trust_remote_code: bool = False
    setting: str = "zero-shot"  # zero-shot | sft | it: what the run reproduces, for reports
    paper_model: str | None = None  # the paper's model name this run reproduces, e.g. Qwen2-1.5B
    name: str | None = None
    out: str = "runs/predict"


# Settings that change predictions: a run directory refuses to resume under different ones.
_IDENTITY = ("model", "adapter", "split", "mode", "protocol", "family", "modality", "max_new_tokens", "seed", "dtype")


def resolve(cfg: PredictConfig) -> PredictConfig:
    """Validate and fill defaults; every error is one line."""
    cfg = dataclasses.replace(cfg)
    cfg.datasets = parse_datasets(cfg.datasets if len(cfg.datasets) != 1 else cfg.datasets[0])
    if cfg.mode not in MODES:
        raise ValueError(f"--mode must be one of {', '.join(MODES)}, got '{cfg.mode}'")
    if cfg.protocol not in PROTOCOLS:
        raise ValueError(f"--protocol must be one of {', '.join(PROTOCOLS)}, got '{cfg.protocol}'")
    cfg.family = cfg.family or ("infer_script" if cfg.protocol == "official" else "clean")
    if cfg.family not in FAMILIES:
        raise ValueError(f"--family must be one of {', '.join(FAMILIES)}, got '{cfg.family}'")
    if cfg.split not in data_mod.SPLITS:
        raise ValueError(f"--split must be one of {', '.join(data_mod.SPLITS)}, got '{cfg.split}'")
    for key in ("limit", "batch_size", "max_new_tokens", "threads"):
        v = getattr(cfg, key)
        if v is not None and int(v) < 1:
            raise ValueError(f"--{key.replace('_', '-')} must be a positive integer, got {v}")
    cfg.data = str(data_mod.data_root(cfg.data))
    return cfg


def load_examples(cfg: PredictConfig) -> tuple[list[data_mod.Example], list[str]]:
    examples, skipped = [], []
    for ds in cfg.datasets:
        sd = data_mod.load_split(Path(cfg.data), ds, cfg.split, skip_bad_rows=cfg.skip_bad_rows)
        examples += sd.examples[: cfg.limit] if cfg.limit else sd.examples
        skipped += sd.skipped
    return examples, skipped


def _open_run_dir(cfg: PredictConfig) -> Path:
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    cfg_path = out / "config.yaml"
    if cfg_path.exists():
        old = read_config(cfg_path)
        for key in _IDENTITY:
            if key in old and old[key] != getattr(cfg, key):
                raise ValueError(
                    f"{cfg_path}: this run directory was made with {key}={old[key]!r}, not {getattr(cfg, key)!r}; "
                    f"use another --out"
                )
    return out


def predict(cfg: PredictConfig, *, progress: bool = True) -> dict:
    if cfg.modality == "video":  # video + text models: same run directory, plus clips and frames (mmla.mllm)
        from .mllm import predict_video

        return predict_video(cfg, progress=progress)
    # ---- setup
    cfg = resolve(cfg)
    examples, skipped = load_examples(cfg)
    out = _open_run_dir(cfg)
    pred_path = out / "predictions.jsonl"
    done, torn = read_jsonl(pred_path)
    done_keys = {(r["dataset"], r["split"], r["id"]) for r in done}
    todo = [e for e in examples if (e.dataset, e.split, e.id) not in done_keys]
    if done_keys:
        n_done = len(examples) - len(todo)
        print(f"resuming: {n_done} of {len(examples)} done, {len(todo)} to go ({pred_path})", file=sys.stderr)

    import torch

    from .models import load_model

    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    model, tok = None, None
    if todo or cfg.max_new_tokens is None:
        model, tok = load_model(cfg.model, adapter=cfg.adapter, dtype=cfg.dtype, device=cfg.device,
                                trust_remote_code=cfg.trust_remote_code)
    decoding = None
    if model is not None:
        kind = model_kind(tok)
        if cfg.protocol == "official":
            decoding = official_decoding(kind, model.generation_config)
        else:
            from .prompts import Decoding

            decoding = Decoding()
        cfg.max_new_tokens = cfg.max_new_tokens or decoding.max_new_tokens
        decoding.max_new_tokens = cfg.max_new_tokens
    _open_run_dir(cfg)  # check again now that max_new_tokens is resolved
    write_config(out / "config.yaml", cfg)
    write_json(out / "env.json", {**environment(str(model.device) if model is not None else None),
                                  "decoding": dataclasses.asdict(decoding) if decoding else None,
                                  "skipped_rows": skipped})

    # ---- run
    if todo:
        _run(cfg, model, tok, decoding, todo, JsonlAppender(pred_path, done, torn), progress)

    # ---- save
    wanted = {(e.dataset, e.split, e.id) for e in examples}
    records, _ = read_jsonl(pred_path)
    records = [r for r in records if (r["dataset"], r["split"], r["id"]) in wanted]
    result = evaluate_records(records)
    result["skipped_rows"] = len(skipped)
    write_json(out / "metrics.json", result)
    return result


def _run(cfg, model, tok, decoding, todo, sink: JsonlAppender, progress: bool) -> None:
    from tqdm.auto import tqdm

    from . import engine, prompts

    texts = [render(e.dataset, cfg.family, e.text, cfg.split, cfg.modality) for e in todo]
    inputs = [chat_text(tok, p, cfg.protocol) for p in texts]
    bar = tqdm(total=len(todo), desc=f"{cfg.mode} {cfg.model}", unit="sample", disable=not progress)

    def record(i: int, output: str) -> None:
        e = todo[i]
        sink.write({"dataset": e.dataset, "split": e.split, "id": e.id, "text": e.text, "label": e.label,
                    "prompt": texts[i], "output": output, "pred": parse_output(output, get_task(e.dataset).labels)})
        bar.update(1)

    try:
        if cfg.mode == "generate":
            engine.generate(model, tok, inputs, max_new_tokens=decoding.max_new_tokens, batch_size=cfg.batch_size,
                            do_sample=decoding.do_sample, temperature=decoding.temperature, top_p=decoding.top_p,
                            seed=cfg.seed, on_result=record)
        else:
            cands = [prompts.candidates(e.dataset, cfg.family, cfg.split, cfg.modality) for e in todo]

            def scored(i: int, s) -> None:
                record(i, cands[i][s.best])  # the chosen answer string, e.g. "emotion: joy"

            engine.score(model, tok, inputs, cands, batch_size=cfg.batch_size, on_result=scored)
    finally:
        sink.close()
        bar.close()
