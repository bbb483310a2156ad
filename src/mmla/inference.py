"""Inference, text and video alike: a recipe of setup -> run -> save.

setup: resolve the config (modality from the model unless given), read the data, open (or resume) the run directory,
       load the model and its input seam (mmla.inputs), resolve the decoding.
run:   render and chat-wrap the prompts (in batch), find and decode the clips (video; in a background thread, one
       chunk ahead of the model), generate or score in length-sorted continuous batches (mmla.engine); every finished
       sample is appended to predictions.jsonl at once. A clip that is missing or does not decode gives a record
       with an empty output and a `clip_error`; the run goes on.
save:  evaluate everything in predictions.jsonl with the official parser and write metrics.json.

Rerunning the same command into the same run directory skips the samples already there (and retries failed clips).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

from . import data as data_mod
from . import distributed
from . import video as video_mod
from .evaluation import evaluate_samples, parse_output
from .prompts import PROTOCOLS, Decoding, candidates, official_decoding, render
from .runs import PREDICTION_KEYS, JsonlAppender, claim, environment, read_config, read_jsonl, startup_done, \
    write_config, write_json
from .tasks import FAMILIES, VIDEO_DATASETS, get_task, parse_datasets

MODES = ("generate", "score")
MODALITIES = ("auto", "text", "video", "audio", "av")
CLIP_MODALITIES = ("video", "audio", "av")  # rows that come with their clip


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
    modality: str = "auto"  # auto: everything the model takes (av for an omni model, video for a VLM), else text
    frames: str | None = None  # video: frame setting (mmla.video.SETTINGS); default the model family's official one
    num_frames: int | None = None  # video: overrides of the frame setting
    fps: float | None = None
    max_pixels: int | None = None
    no_frame_cache: bool = False  # video: decode every clip again (frames and audio)
    max_audio_seconds: float | None = None  # audio, av: sound kept per clip (default: the model family's, mmla.audio)
    audio_in_video: bool | None = None  # av: interleave audio with the frames (default: the model family's)
    limit: int | None = None  # first N rows of each dataset
    batch_size: int = 32
    max_new_tokens: int | None = None  # default: the protocol's
    seed: int = 0  # sampling: row r draws from a generator seeded from (seed, dataset, id)
    num_samples: int = 1  # sampling: K answers per row; metrics: majority vote, and mean +/- std over the draws
    dtype: str = "auto"
    device: str = "auto"
    device_map: str | None = None  # "auto": split the model over the GPUs, then CPU, then disk (accelerate)
    max_memory: str | None = None  # with device_map: per-device caps, e.g. "0=70GiB,1=70GiB,cpu=200GiB"
    threads: int | None = None
    skip_bad_rows: bool = False
    trust_remote_code: bool = False
    setting: str = "zero-shot"  # zero-shot | sft | it: what the run reproduces, for reports
    paper_model: str | None = None  # the paper's model name this run reproduces, e.g. Qwen2-1.5B
    name: str | None = None
    out: str = "runs/predict"
    # an OpenAI-compatible server instead of a local model (mmla.openai_backend): vLLM, SGLang, a hosted API
    backend: str = "local"  # local | openai
    base_url: str | None = None
    api_key_env: str | None = None  # the NAME of the environment variable holding the key; the key is never stored
    concurrency: int = 8  # openai: requests in flight


# Settings that change predictions: a run directory refuses to resume under different ones. They are compared as
# the user gave them (None = the protocol's default), so the same command always resumes.
_IDENTITY = ("model", "adapter", "split", "mode", "protocol", "family", "modality", "max_new_tokens", "seed", "dtype",
             "frames", "num_frames", "fps", "max_pixels", "num_samples", "backend", "max_audio_seconds", "audio_in_video")


def resolve(cfg: PredictConfig) -> PredictConfig:
    """Validate and fill defaults; every error is one line."""
    from .models import modality_of

    cfg = dataclasses.replace(cfg)
    if cfg.modality not in MODALITIES:
        raise ValueError(f"--modality must be one of {', '.join(MODALITIES)}, got '{cfg.modality}'")
    if cfg.backend not in ("local", "openai"):
        raise ValueError(f"--backend must be local or openai, got '{cfg.backend}'")
    if cfg.backend == "openai" and not cfg.base_url:
        raise ValueError("--backend openai needs --base-url (e.g. http://127.0.0.1:8000/v1)")
    if cfg.modality == "auto":  # a served model may have no config here: text unless told
        cfg.modality = modality_of(cfg.model, cfg.trust_remote_code) if cfg.backend == "local" else "text"
    spec = cfg.datasets if len(cfg.datasets) != 1 else cfg.datasets[0]
    if cfg.modality in CLIP_MODALITIES and spec == "all":  # MLLM experiments use the 9 datasets whose videos are released
        spec = "video"
    cfg.datasets = parse_datasets(spec)
    if cfg.modality in CLIP_MODALITIES:
        if cfg.backend != "local" and cfg.modality != "video":
            raise ValueError(f"--modality {cfg.modality} runs a local model only (the server backend sends no audio)")
        if cfg.max_audio_seconds is not None and float(cfg.max_audio_seconds) <= 0:
            raise ValueError(f"--max-audio-seconds must be positive, got {cfg.max_audio_seconds}")
        no_video = [ds for ds in cfg.datasets if not get_task(ds).has_video]
        if no_video:
            raise ValueError(f"no videos are released for {', '.join(no_video)}: use --datasets video "
                             f"({', '.join(VIDEO_DATASETS)}) or --modality text")
        video_mod.frame_setting(cfg.frames or "official-infer", num_frames=cfg.num_frames, fps=cfg.fps,
                                max_pixels=cfg.max_pixels)  # validates
    if cfg.mode not in MODES:
        raise ValueError(f"--mode must be one of {', '.join(MODES)}, got '{cfg.mode}'")
    if cfg.protocol not in PROTOCOLS:
        raise ValueError(f"--protocol must be one of {', '.join(PROTOCOLS)}, got '{cfg.protocol}'")
    cfg.family = cfg.family or ("infer_script" if cfg.protocol == "official" else "clean")
    if cfg.family not in FAMILIES:
        raise ValueError(f"--family must be one of {', '.join(FAMILIES)}, got '{cfg.family}'")
    if cfg.split not in data_mod.SPLITS:
        raise ValueError(f"--split must be one of {', '.join(data_mod.SPLITS)}, got '{cfg.split}'")
    if cfg.num_samples > 1 and cfg.mode == "score":
        raise ValueError("--num-samples draws several generated answers: it needs --mode generate")
    for key in ("limit", "batch_size", "max_new_tokens", "threads", "num_samples", "concurrency"):
        v = getattr(cfg, key)
        if v is not None and int(v) < 1:
            raise ValueError(f"--{key.replace('_', '-')} must be a positive integer, got {v}")
    if cfg.device_map not in (None, "auto"):
        raise ValueError(f"--device-map must be auto, got '{cfg.device_map}'")
    if cfg.max_memory is not None:
        from .models import parse_max_memory

        if cfg.device_map is None:
            raise ValueError("--max-memory caps what --device-map auto puts on each device: add --device-map auto")
        parse_max_memory(cfg.max_memory)  # validates
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
    if out.exists() and not out.is_dir():
        raise ValueError(f"{out}: --out names an existing file, not a run directory")
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


def key(r: dict) -> tuple:
    return r["dataset"], r["split"], r["id"], r.get("sample", 0)


def dedupe(records: list[dict]) -> list[dict]:
    """One record per (dataset, split, id, sample): the last one written."""
    return list({key(r): r for r in records}.values())


def decoding_for(cfg: PredictConfig, model, inputs) -> Decoding:
    """The protocol's decoding: the official script's (per model kind / family) or greedy (clean)."""
    if cfg.protocol == "official":
        if inputs.modality != "text" or inputs.family:  # the official MLLM infer.py (an omni model reading text too): the checkpoint's generation config
            decoding = official_decoding("qwen", model.generation_config)
            decoding.max_new_tokens = inputs.family.get("max_new_tokens", decoding.max_new_tokens)
        else:
            decoding = official_decoding(inputs.kind, model.generation_config)
    else:
        decoding = Decoding()
    decoding.max_new_tokens = cfg.max_new_tokens or decoding.max_new_tokens
    return decoding


def row_seed(seed: int, dataset: str, id_: str, sample: int = 0) -> int:
    """A row's sampling seed: the same whatever the batch, the order of rows or a resume."""
    tail = f"|{sample}" if sample else ""
    return int(hashlib.sha256(f"{seed}|{dataset}|{id_}{tail}".encode()).hexdigest()[:15], 16)


def predict(cfg: PredictConfig, *, progress: bool = True, frame_cache: video_mod.FrameCache | None = None) -> dict:
    # ---- setup
    t_start = time.perf_counter()
    cfg = resolve(cfg)
    examples, skipped = load_examples(cfg)
    with claim(Path(cfg.out), "predict"):  # one writer per run directory: a second process is refused
        return _predict(cfg, examples, skipped, progress, frame_cache, t_start)


def _predict(cfg: PredictConfig, examples, skipped, progress: bool, frame_cache, t_start: float) -> dict:
    out = _open_run_dir(cfg)
    # data-parallel (torchrun / accelerate launch): rank 0 first folds the parts a killed run left into
    # predictions.jsonl; then every rank reads the same snapshot and takes its share of what is left
    ranks = distributed.start()
    if ranks.main:
        distributed.merge(out)
    distributed.barrier(ranks)
    pred_path = out / "predictions.jsonl"
    done, torn = read_jsonl(pred_path, PREDICTION_KEYS)
    n_written = len(done)
    done = dedupe(done)
    retry = [r for r in done if r.get("clip_error")]  # clips that failed before are tried again
    done = [r for r in done if not r.get("clip_error")]
    done_keys = {key(r) for r in done}
    wanted = [(e, k) for e in examples for k in range(cfg.num_samples)]  # (row, which draw)
    todo = [(e, k) for e, k in wanted if (e.dataset, e.split, e.id, k) not in done_keys]
    if (done_keys or retry) and ranks.main:
        print(f"resuming: {len(wanted) - len(todo)} of {len(wanted)} done, {len(todo)} to go"
              f"{f' ({len(retry)} missing clips retried)' if retry else ''} ({pred_path})", file=sys.stderr)
    if ranks.world > 1:  # this rank's share, balanced by prompt length (and clips: one per video row)
        weights = [len(render(e.dataset, cfg.family, e.text, cfg.split, cfg.modality)) +
                   (distributed.CLIP_WEIGHT if cfg.modality in CLIP_MODALITIES else 0) for e, _ in todo]
        todo = [todo[i] for i in distributed.shard(weights, ranks.world)[ranks.rank]]

    import torch

    from . import engine
    from .inputs import make_inputs
    from .models import device_of, family_of, load_model, read_config as model_config

    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    video = cfg.modality in CLIP_MODALITIES
    setting = None
    if video and cfg.modality != "audio":
        family = family_of(model_config(cfg.model, cfg.trust_remote_code)) if cfg.backend == "local" else {}
        setting = video_mod.frame_setting(cfg.frames or family.get("frames", "official-infer"),
                                          num_frames=cfg.num_frames, fps=cfg.fps, max_pixels=cfg.max_pixels)
    model = inputs = decoding = server = None
    runner = engine
    startup_done()  # the imports are done (load_model does it too; an OpenAI-backend run loads no model)
    t_load = time.perf_counter()
    if todo and cfg.backend == "openai":  # the same prompts and decoding, sent to a server
        from .openai_backend import ApiInputs, Runner, prepare

        server, tok, kind, decoding = prepare(cfg)
        decoding.max_new_tokens = cfg.max_new_tokens or decoding.max_new_tokens
        inputs, runner = ApiInputs(tok, kind, cfg.modality, setting), Runner(server)
        server.video_input = inputs.video_input if video else None
    elif todo:
        model, tok = load_model(cfg.model, adapter=cfg.adapter, dtype=cfg.dtype, device=cfg.device,
                                trust_remote_code=cfg.trust_remote_code, modality=cfg.modality,
                                **_placement(cfg, out, ranks))
        inputs = make_inputs(model, tok, setting, cfg.modality,
                             {"max_seconds": cfg.max_audio_seconds, "interleave": cfg.audio_in_video})
        setting = getattr(inputs, "setting", setting)
        decoding = decoding_for(cfg, model, inputs)
        if cfg.num_samples > 1 and not decoding.do_sample:
            raise ValueError(f"--num-samples {cfg.num_samples}: the {cfg.protocol} protocol decodes greedily for "
                             f"this model, so every draw would be the same")
    t_load = time.perf_counter() - t_load
    cache = frame_cache if frame_cache is not None else video_mod.FrameCache(enabled=not cfg.no_frame_cache)
    if ranks.main:
        write_config(out / "config.yaml", {**dataclasses.asdict(cfg),
                                           **({"frame_setting": setting.record()} if setting else {}),
                                           **({"audio_setting": inputs.record()} if hasattr(inputs, "record") else {})})
    env = {**environment(str(device_of(model)) if model is not None else None),
           **({"hf_device_map": _device_map(model)} if cfg.device_map else {}),
           "decoding": dataclasses.asdict(decoding) if decoding else None, "skipped_rows": skipped}
    if video:
        env.update(frame_setting=setting.record() if setting else None,
                   frame_cache=str(cache.root) if cache.enabled else None)
    if hasattr(inputs, "record"):  # audio, av: rate, channels, max seconds, interleaved with the frames or not
        env.update(audio_setting=inputs.record())
    if server is not None:  # the server's model id and fingerprint come with its first answer: written again below
        env["server"] = server.info()
    if ranks.main:
        write_json(out / "env.json", env)

    # ---- run
    stats = {}
    if todo:
        sink = (JsonlAppender(pred_path, done, torn or bool(retry) or n_written != len(done) + len(retry))
                if ranks.world == 1 else JsonlAppender(distributed.part_path(out, ranks.rank)))
        try:
            stats = _run(cfg, model, inputs, decoding, cache, todo, sink, progress, runner)
        finally:
            sink.close()
            if server is not None and ranks.main:
                env["server"] = server.info()
                write_json(out / "env.json", env)

    # ---- save
    t_eval = time.perf_counter()
    keys = {(e.dataset, e.split, e.id, k) for e, k in wanted}
    if ranks.world > 1:  # all parts are closed once every rank is here: rank 0 merges and checks them, the
        # others wait for its metrics
        env["ranks"] = distributed.gather(ranks, {"rank": ranks.rank, "rows": len(todo), "device": env["device"],
                                                  **stats})
        if not ranks.main:
            distributed.barrier(ranks)
            return json.loads((out / "metrics.json").read_text())
        env["merge"] = distributed.merge(out, [(e.dataset, e.split, e.id, k) for e, k in wanted])
    records = [r for r in dedupe(read_jsonl(pred_path, PREDICTION_KEYS)[0]) if key(r) in keys]
    result = evaluate_samples(records)
    result["skipped_rows"] = len(skipped)
    if video:
        missing = [r for r in records if r.get("clip_error")]
        result["missing_clips"] = len(missing)
        result["missing_clips_per_dataset"] = {ds: sum(r["dataset"] == ds for r in missing)
                                               for ds in sorted({r["dataset"] for r in missing})}
        env.update(missing_clips=len(missing), frame_cache_hits=cache.hits, frame_cache_misses=cache.misses)
    if cfg.modality in ("audio", "av"):  # clips without sound ran with silence (mmla.audio)
        silent = [r for r in records if r.get("audio_track") is False]
        result["silent_clips"] = len(silent)
        result["silent_clips_per_dataset"] = {ds: sum(r["dataset"] == ds for r in silent)
                                              for ds in sorted({r["dataset"] for r in silent})}
        env.update(silent_clips=len(silent), **(inputs.audio_cache_stats() if inputs is not None else {}))
    write_json(out / "metrics.json", result)
    # where the time went (seconds): the bench (bench/e2e.py) adds the interpreter's start and imports to these
    stats.update(seconds_load=round(t_load, 2), seconds_evaluate=round(time.perf_counter() - t_eval, 2),
                 seconds_predict=round(time.perf_counter() - t_start, 2))
    env.update(stats)
    write_json(out / "env.json", env)
    distributed.barrier(ranks)  # the other ranks return these metrics
    return result


def _placement(cfg: PredictConfig, out: Path, ranks: distributed.Ranks) -> dict:
    """load_model's placement arguments: one device, or --device-map auto over this rank's GPUs, then CPU, then
    an offload folder in the run directory."""
    if cfg.device_map is None:
        return {}
    import torch

    from .models import parse_max_memory

    memory = parse_max_memory(cfg.max_memory) if cfg.max_memory else None
    if ranks.world > 1 and torch.cuda.is_available():  # several copies side by side: each on its own GPUs
        from accelerate.utils import get_max_memory

        mine = distributed.gpus_of(ranks, torch.cuda.device_count())
        memory = {k: v for k, v in get_max_memory(memory).items() if not isinstance(k, int) or k in mine}
    return {"device_map": cfg.device_map, "max_memory": memory,
            "offload_folder": str(out / "offload" / f"rank{ranks.rank}")}


def _device_map(model) -> dict | None:
    """Where accelerate put each module (GPU index, cpu or disk), for env.json."""
    placed = getattr(model, "hf_device_map", None) if model is not None else None
    return {k: str(v) for k, v in placed.items()} if placed else None


def _load_clip(inputs, path, cache):
    """What the seam's `encode` takes for one clip: frames, a waveform, or both (a server seam reads frames)."""
    if hasattr(inputs, "load"):
        return inputs.load(path, cache)
    return video_mod.load_frames(path, inputs.setting, cache)


def _run(cfg, model, inputs, decoding, cache, todo, sink: JsonlAppender, progress: bool, runner=None) -> dict:
    """Prepare chunk k+1 (prompts, clips, frames, token ids) in a background thread while the model runs chunk k.
    Text is one chunk (the length sort and continuous batching see every prompt); video goes in chunks of a few
    batches, so only their frames are in memory."""
    from tqdm.auto import tqdm

    from . import engine

    runner = runner or engine  # mmla.engine, or a server backend with the same two calls
    video = inputs.modality in CLIP_MODALITIES
    finder = video_mod.ClipFinder(cfg.data) if video else None
    root = Path(cfg.data)
    bar = tqdm(total=len(todo), desc=f"{cfg.mode} {cfg.model}", unit="sample", disable=not progress)
    timing = {"seconds_prepare": 0.0, "seconds_model": 0.0}

    def prepare(chunk: list[int]) -> dict:
        t0 = time.perf_counter()
        ex = [todo[i][0] for i in chunk]
        prompts = [render(e.dataset, cfg.family, e.text, cfg.split, inputs.modality) for e in ex]
        clips, frames, errors = [None] * len(ex), [None] * len(ex), [None] * len(ex)
        if video:
            for j, e in enumerate(ex):
                clips[j] = finder.find(e.dataset, e.id)
                if clips[j].path is None:
                    errors[j] = clips[j].error
                    continue
                try:
                    frames[j] = _load_clip(inputs, clips[j].path, cache)
                except video_mod.ClipError as err:
                    errors[j] = str(err)
        ok = [j for j in range(len(ex)) if errors[j] is None]
        texts = inputs.chat([prompts[j] for j in ok], cfg.protocol)
        fr = [frames[j] for j in ok] if video else None
        if cfg.mode == "score":
            cands = [candidates(ex[j].dataset, cfg.family, cfg.split, inputs.modality) for j in ok]
            rows = inputs.score_rows(texts, cands, fr)
        else:
            cands, rows = None, inputs.encode(texts, fr)
        timing["seconds_prepare"] += time.perf_counter() - t0
        return dict(chunk=chunk, prompts=prompts, clips=clips, errors=errors, ok=ok, rows=rows, cands=cands,
                    frames=frames)

    def record(p: dict, j: int, output: str) -> None:
        e, k = todo[p["chunk"][j]]
        rec = {"dataset": e.dataset, "split": e.split, "id": e.id, **({"sample": k} if cfg.num_samples > 1 else {}),
               "text": e.text, "label": e.label, "prompt": p["prompts"][j], "output": output,
               "pred": parse_output(output, get_task(e.dataset).labels)}
        if video:
            clip = p["clips"][j]
            rec["video"] = clip.record(root) if clip.path is not None else None
            if p["errors"][j]:
                rec["clip_error"] = p["errors"][j]
            elif hasattr(inputs, "clip_fields"):
                rec.update(inputs.clip_fields(p["frames"][j]))
        sink.write(rec)
        bar.update(1)

    # video: a first chunk of one batch, so the model starts while the next chunk's clips decode
    sizes = [len(todo)] if not video else [cfg.batch_size] + [cfg.batch_size * 4] * len(todo)
    chunks, start = [], 0
    for size in sizes:
        if start >= len(todo):
            break
        chunks.append(list(range(start, min(start + size, len(todo)))))
        start += size
    seeds = [row_seed(cfg.seed, e.dataset, e.id, k) for e, k in todo]
    try:
        with ThreadPoolExecutor(max_workers=1) as pool:
            pending = pool.submit(prepare, chunks[0])
            for k in range(len(chunks)):
                p = pending.result()
                if k + 1 < len(chunks):
                    pending = pool.submit(prepare, chunks[k + 1])
                for j in range(len(p["chunk"])):
                    if p["errors"][j]:
                        record(p, j, "")
                ok = p["ok"]
                t0 = time.perf_counter()
                if cfg.mode == "generate":
                    runner.generate(model, inputs, p["rows"], decoding=decoding, batch_size=cfg.batch_size,
                                    seeds=[seeds[p["chunk"][j]] for j in ok],
                                    on_result=lambda r, text: record(p, ok[r], text))
                else:  # the chosen answer string, e.g. "emotion: joy"
                    runner.score(model, inputs, p["rows"], batch_size=cfg.batch_size,
                                 on_result=lambda r, s: record(p, ok[r], p["cands"][r][s.best]))
                timing["seconds_model"] += time.perf_counter() - t0
    finally:
        bar.close()
    return {k: round(v, 2) for k, v in timing.items()}
