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

from . import backends
from . import data as data_mod
from . import distributed
from . import video as video_mod
from .prefetch import Arrivals, Prefetch, Stager, chunks_of
from .evaluation import evaluate_samples, parse_output, preload_metrics
from .prompts import PROTOCOLS, Decoding, candidates, render
from .resolve import CLIP_MODALITIES, MODALITIES
from .runs import PREDICTION_KEYS, JsonlAppender, claim, environment, open_run, read_jsonl, read_run_config, \
    startup_done, write_config, write_json
from .tasks import PROMPT_FAMILIES, VIDEO_DATASETS, get_task, parse_datasets

MODES = ("generate", "score")
# A prompt longer than the model's context, as lm-evaluation-harness treats it (it keeps a context's end), but cutting
# only the utterance, so that the instruction and the label list stay whole; every such row is named and marked.
CONTEXT_POLICY = "cut the utterance from its start until prompt + answer tokens fit; refuse the row if none fits"


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
    frames: str | None = None  # video: frame setting (mmla.video.FRAME_SETTINGS); default the model family's official one
    num_frames: int | None = None  # video: overrides of the frame setting
    fps: float | None = None
    max_pixels: int | None = None
    no_frame_cache: bool = False  # video: decode every clip again (frames and audio)
    decode_workers: int | None = None  # video: threads decoding the next batches' clips (default: from the cores)
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
    # what runs the prompts (mmla.backends): the model here, or an OpenAI-compatible server (vLLM, SGLang, an API)
    backend: str = "local"  # a name in mmla.backends.BACKENDS
    base_url: str | None = None
    api_key_env: str | None = None  # the NAME of the environment variable holding the key; the key is never stored
    concurrency: int = 8  # openai: requests in flight


# Settings that change predictions: a run directory refuses to resume under different ones. They are compared as
# the user gave them (None = the protocol's default), so the same command always resumes.
_IDENTITY = ("model", "adapter", "split", "mode", "protocol", "family", "modality", "max_new_tokens", "seed", "dtype",
             "frames", "num_frames", "fps", "max_pixels", "num_samples", "backend", "max_audio_seconds", "audio_in_video")


def resolve(cfg: PredictConfig) -> PredictConfig:
    """Validate and fill defaults; every error is one line."""
    cfg = dataclasses.replace(cfg)
    if cfg.modality not in MODALITIES:
        raise ValueError(f"--modality must be one of {', '.join(MODALITIES)}, got '{cfg.modality}'")
    if cfg.backend not in backends.names():
        raise ValueError(f"--backend must be one of {', '.join(backends.names())}, got '{cfg.backend}'")
    if cfg.protocol not in PROTOCOLS:
        raise ValueError(f"--protocol must be one of {', '.join(PROTOCOLS)}, got '{cfg.protocol}'")
    # a served model may have no config here: text unless told, its family from --paper-model
    model = resolved(cfg)
    cfg.modality = model.modality
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
        video_mod.frame_setting(cfg.frames or default_frames(model), num_frames=cfg.num_frames, fps=cfg.fps,
                                max_pixels=cfg.max_pixels)  # validates
    if cfg.mode not in MODES:
        raise ValueError(f"--mode must be one of {', '.join(MODES)}, got '{cfg.mode}'")
    cfg.family = cfg.family or model.prompt_family
    if cfg.family not in PROMPT_FAMILIES:
        raise ValueError(f"--family must be one of {', '.join(PROMPT_FAMILIES)}, got '{cfg.family}'")
    if cfg.split not in data_mod.SPLITS:
        raise ValueError(f"--split must be one of {', '.join(data_mod.SPLITS)}, got '{cfg.split}'")
    if cfg.num_samples > 1 and cfg.mode == "score":
        raise ValueError("--num-samples draws several generated answers: it needs --mode generate")
    for key in ("limit", "batch_size", "max_new_tokens", "threads", "num_samples", "concurrency", "decode_workers"):
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


def key(r: dict) -> tuple:
    return r["dataset"], r["split"], r["id"], r.get("sample", 0)


def dedupe(records: list[dict]) -> list[dict]:
    """One record per (dataset, split, id, sample): the last one written."""
    return list({key(r): r for r in records}.values())


def resolved(cfg: PredictConfig):
    """The run's model through the one resolver (mmla.resolve): modality, family row, the protocol that applies."""
    from .resolve import resolve_model

    return resolve_model(cfg.model, modality=cfg.modality, protocol=cfg.protocol, paper_model=cfg.paper_model,
                         trust_remote_code=cfg.trust_remote_code, local=cfg.backend == "local")


def default_frames(model) -> str:
    """The frame setting a resolved model runs by default: its family row's under official, else official-infer."""
    row = model.family
    return (row.frames if row is not None and row.frames and model.protocol == "official" else None) or \
        "official-infer"


def decoding_for(cfg: PredictConfig, backend, row=None, protocol: str | None = None) -> Decoding:
    """The protocol's decoding: the row's official script's (mmla.resolve) or greedy (clean). The backend gives the
    checkpoint's generation config and the model's context."""
    from .resolve import decoding_for as row_decoding

    return row_decoding(row, protocol or cfg.protocol, backend.generation_config, cfg.max_new_tokens,
                        backend.context_length)


def row_seed(seed: int, dataset: str, id_: str, sample: int = 0) -> int:
    """A row's sampling seed: the same whatever the batch, the order of rows or a resume."""
    tail = f"|{sample}" if sample else ""
    return int(hashlib.sha256(f"{seed}|{dataset}|{id_}{tail}".encode()).hexdigest()[:15], 16)


def predict(cfg: PredictConfig, *, progress: bool = True, frame_cache: video_mod.FrameCache | None = None) -> dict:
    # ---- setup
    t_start = time.perf_counter()
    # a fresh process decodes clips in a child while it imports and loads the model (mmla.prefetch)
    ahead = Prefetch.start(cfg) if frame_cache is None else Prefetch()
    try:
        cfg = resolve(cfg)
        examples, skipped = load_examples(cfg)
        with claim(Path(cfg.out), "predict"):  # one writer per run directory: a second process is refused
            return _predict(cfg, examples, skipped, progress, frame_cache, t_start, ahead)
    finally:
        ahead.close()


def _predict(cfg: PredictConfig, examples, skipped, progress: bool, frame_cache, t_start: float,
             ahead: Prefetch) -> dict:
    out = open_run(Path(cfg.out), {k: getattr(cfg, k) for k in _IDENTITY})
    # data-parallel (torchrun / accelerate launch): rank 0 first folds the parts a killed run left into
    # predictions.jsonl; then every rank reads the same snapshot and takes its share of what is left
    ranks = distributed.start()
    if ranks.main:
        distributed.merge_parts(out)
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

    if cfg.threads:
        import torch

        torch.set_num_threads(cfg.threads)
    video = cfg.modality in CLIP_MODALITIES  # rows that come with their clip
    res = resolved(cfg)  # the model family's row, and the protocol that applies (official needs a row)
    if res.note and ranks.main:
        print(f"note: {res.note}", file=sys.stderr)
    run_cfg = dataclasses.replace(cfg, protocol=res.protocol)
    backend = decoding = histories = None
    startup_done()  # the imports are done (load_model does it too; a server backend loads no model)
    t_load = time.perf_counter()
    if todo:
        if ahead.process is not None:
            # the prefetch child decodes on another core while this one imports and loads; the metrics' imports
            # (about a second) are made now rather than at the end, where they would leave that core idle
            preload_metrics()
        backend = backends.create(cfg.backend, _options(cfg, res, out, ranks))
        decoding = decoding_for(cfg, backend, res.family, res.protocol)
        if res.protocol == "official" and res.family is not None and res.family.warmup_turn and cfg.mode == "generate":
            histories = _warmup(cfg, backend, decoding, todo, res.family.warmup_turn)
        if cfg.num_samples > 1 and not decoding.do_sample:
            raise ValueError(f"--num-samples {cfg.num_samples}: the {res.protocol} protocol decodes greedily for "
                             f"this model, so every draw would be the same")
    t_load = time.perf_counter() - t_load
    # the frames this run directory's rows were made with: the backend's, or (nothing left to do) the last run's
    frames = (backend.setting.record() if backend is not None and backend.setting is not None else
              None if backend is not None or not video else
              (read_run_config(out / "config.yaml") if (out / "config.yaml").exists() else {}).get("frame_setting"))
    cache = frame_cache if frame_cache is not None else video_mod.FrameCache(enabled=not cfg.no_frame_cache)
    if ranks.main:
        write_config(out / "config.yaml", {**dataclasses.asdict(cfg), **({"frame_setting": frames} if frames else {}),
                                           **({"audio_setting": backend.audio} if backend and cfg.modality in ("audio", "av")
                                              else {})})
    env = {**environment(None), **({"hf_device_map": None} if cfg.device_map else {}),
           "decoding": dataclasses.asdict(decoding) if decoding else None, "skipped_rows": skipped, **res.record()}
    if backend is not None:
        env.update(backend.describe())
    if video:
        from .decode import decoder_name, default_workers

        env.update(frame_setting=frames, frame_cache=str(cache.root) if cache.enabled else None,
                   video_decoder=decoder_name(), decode_workers=cfg.decode_workers or default_workers())
    if ranks.main:
        write_json(out / "env.json", env)

    # ---- run
    stats = {}
    if todo:
        sink = (JsonlAppender(pred_path, done, torn or bool(retry) or n_written != len(done) + len(retry))
                if ranks.world == 1 else JsonlAppender(distributed.part_path(out, ranks.rank)))
        # from here the decode pool reads the clips (and finds what the child decoded)
        ahead.hand_over(cache, backend.setting if video else None)
        try:
            stats = _run(run_cfg, backend, decoding, cache, todo, sink, progress, histories, res.family)
        finally:
            sink.close()
            if ranks.main:  # what the backend learnt while running (a server's model id and fingerprint)
                env.update(backend.describe())
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
        env["merge"] = distributed.merge_parts(out, [(e.dataset, e.split, e.id, k) for e, k in wanted])
    records = [r for r in dedupe(read_jsonl(pred_path, PREDICTION_KEYS)[0]) if key(r) in keys]
    result = evaluate_samples(records)
    result["skipped_rows"] = len(skipped)
    if video:
        missing = [r for r in records if r.get("clip_error")]
        result["missing_clips"] = len(missing)
        result["missing_clips_per_dataset"] = {ds: sum(r["dataset"] == ds for r in missing)
                                               for ds in sorted({r["dataset"] for r in missing})}
        env.update(missing_clips=len(missing), frame_cache_hits=cache.hits, frame_cache_misses=cache.misses,
                   prefetched_clips=ahead.close())
    if cfg.modality in ("audio", "av"):  # clips without sound ran with silence (mmla.audio)
        silent = [r for r in records if r.get("audio_track") is False]
        result["silent_clips"] = len(silent)
        result["silent_clips_per_dataset"] = {ds: sum(r["dataset"] == ds for r in silent)
                                              for ds in sorted({r["dataset"] for r in silent})}
        env.update(silent_clips=len(silent))
    write_json(out / "metrics.json", result)
    # where the time went (seconds): the bench (bench/e2e.py) adds the interpreter's start and imports to these
    stats.update(seconds_load=round(t_load, 2), seconds_evaluate=round(time.perf_counter() - t_eval, 2),
                 seconds_predict=round(time.perf_counter() - t_start, 2))
    env.update(stats)
    write_json(out / "env.json", env)
    distributed.barrier(ranks)  # the other ranks return these metrics
    return result


def candidate_probs(scored) -> list[float]:
    """A scored row's candidate probabilities, normalised over the candidates (softmax of their log-likelihoods),
    6 decimals: what calibration reads."""
    import math

    top = max(scored.scores)
    w = [math.exp(s - top) for s in scored.scores]
    total = sum(w)
    return [round(x / total, 6) for x in w]


def _options(cfg: PredictConfig, res, out: Path, ranks: distributed.Ranks) -> backends.Options:
    """What a backend is built from: plain values, and the resolver's family row."""
    frames = {"name": cfg.frames or default_frames(res), "num_frames": cfg.num_frames, "fps": cfg.fps,
              "max_pixels": cfg.max_pixels}
    audio = {"max_seconds": cfg.max_audio_seconds, "interleave": cfg.audio_in_video}
    return backends.Options(model=cfg.model, modality=cfg.modality,
                            frames=frames if cfg.modality in ("video", "av") else None,
                            audio=audio if cfg.modality in ("audio", "av") else None,
                            family=res.family, protocol=res.protocol, adapter=cfg.adapter, dtype=cfg.dtype,
                            device=cfg.device, trust_remote_code=cfg.trust_remote_code,
                            placement=_placement(cfg, out, ranks), base_url=cfg.base_url,
                            api_key_env=cfg.api_key_env, concurrency=cfg.concurrency)


def _warmup(cfg: PredictConfig, backend, decoding: Decoding, todo: list, turn: str) -> list:
    """The official InternLM script's first exchange, per row: `turn` ("hello") and a reply drawn as the answer
    will be (seeded per row, so a resume gets the same reply). Returns each todo row's history."""
    rows = backend.prepare([turn] * len(todo), "official")
    replies = [""] * len(todo)

    def keep(r: int, text: str) -> None:
        replies[r] = text

    if decoding.do_sample:
        seeds = [row_seed(cfg.seed, e.dataset, f"{e.id}|{turn}", k) for e, k in todo]
        backend.sample(rows, decoding=decoding, seeds=seeds, batch_size=cfg.batch_size, on_result=keep)
    else:
        backend.generate(rows, decoding=decoding, batch_size=cfg.batch_size, on_result=keep)
    return [[(turn, r)] for r in replies]


def _placement(cfg: PredictConfig, out: Path, ranks: distributed.Ranks) -> dict | None:
    """load_model's placement arguments: one device (None), or --device-map auto over this rank's GPUs, then CPU,
    then an offload folder in the run directory."""
    if cfg.device_map is None:
        return None
    import torch

    from .models import parse_max_memory

    memory = parse_max_memory(cfg.max_memory) if cfg.max_memory else None
    if ranks.world > 1 and torch.cuda.is_available():  # several copies side by side: each on its own GPUs
        from accelerate.utils import get_max_memory

        mine = distributed.gpus_of(ranks, torch.cuda.device_count())
        memory = {k: v for k, v in get_max_memory(memory).items() if not isinstance(k, int) or k in mine}
    return {"device_map": cfg.device_map, "max_memory": memory,
            "offload_folder": str(out / "offload" / f"rank{ranks.rank}")}


def _run(cfg, backend: backends.Backend, decoding, cache, todo, sink: JsonlAppender, progress: bool,
         histories: list | None = None, row=None) -> dict:
    """Prepare chunk k+1 (prompts, clips, frames, token ids) in a background thread while the model runs chunk k.
    Text is one chunk (the length sort and continuous batching see every prompt); video goes in chunks of a few
    batches, so only their frames are in memory. With several decode workers (mmla.decode.DecodePool, in `prefetch.Stager`)
    the clips of chunk k+2 decode while chunk k+1 is encoded and chunk k runs: at most three chunks of frames in
    memory."""
    from tqdm.auto import tqdm

    from .resolve import clean_output

    video = backend.modality in CLIP_MODALITIES
    # clips: generation takes each chunk's rows into the running batch as they are ready (one generate call)
    streaming = video and cfg.mode == "generate" and getattr(backend, "streams", False)
    stager = Stager(cfg, todo, backend.load_clip, cache, streaming) if video else None
    row = row if cfg.protocol == "official" else None  # the resolver's family row: what is decoded, the cleanup
    whole = row is not None and row.decoded == "whole" and cfg.mode == "generate"
    root = Path(cfg.data)
    bar = tqdm(total=len(todo), desc=f"{cfg.mode} {cfg.model}", unit="sample", disable=not progress)
    timing = {"seconds_prepare": 0.0, "seconds_model": 0.0}  # prepare overlaps the model: seconds_run is the wall
    t_run = time.perf_counter()

    def prepare(c: int) -> dict:
        t0 = time.perf_counter()
        chunk = chunks[c]
        ex = [todo[i][0] for i in chunk]
        prompts = [render(e.dataset, cfg.family, e.text, cfg.split, backend.modality) for e in ex]
        clips, frames, errors = [None] * len(ex), [None] * len(ex), [None] * len(ex)
        if video:
            for j, (clip, loading) in enumerate(stager.take(c)):
                clips[j] = clip
                if loading is None:
                    errors[j] = clip.error
                    continue
                try:
                    frames[j] = loading.result()
                except video_mod.ClipError as err:
                    errors[j] = str(err)
        ok = [j for j in range(len(ex)) if errors[j] is None]
        fr = [frames[j] for j in ok] if video else None
        cands = ([candidates(ex[j].dataset, cfg.family, cfg.split, backend.modality) for j in ok]
                 if cfg.mode == "score" else None)
        hist = [histories[chunk[j]] for j in ok] if histories else None
        rows = backend.prepare([prompts[j] for j in ok], cfg.protocol, fr, cands, hist)
        context = {}  # rows past the model's context: their utterance cut, or the row refused
        for r, over in enumerate(backend.excess(rows, new_tokens)):
            if over:
                j = ok[r]
                context[j], fitted = _fit(backend, cfg, ex[j], fr[r] if video else None,
                                          cands[r] if cands else None, new_tokens, hist[r] if hist else None)
                if fitted:
                    prompts[j], rows[r] = fitted
        refused = {r for r, j in enumerate(ok) if "refused" in context.get(j, {})}
        if refused:
            rows = [x for r, x in enumerate(rows) if r not in refused]
            cands = [c for r, c in enumerate(cands) if r not in refused] if cands else None
            ok = [j for r, j in enumerate(ok) if r not in refused]
        # the decoded prompt, for a script that decodes the whole sequence (special tokens kept, as batch_decode)
        heads = dict(zip(ok, backend.heads(rows))) if whole else {}
        timing["seconds_prepare"] += time.perf_counter() - t0
        return dict(chunk=chunk, prompts=prompts, clips=clips, errors=errors, ok=ok, rows=rows, cands=cands,
                    context=context, heads=heads, frames=frames)

    def record(p: dict, j: int, output: str, probs: list[float] | None = None) -> None:
        e, k = todo[p["chunk"][j]]
        if output and cfg.mode == "generate":
            output = clean_output(row, cfg.protocol, output, p["heads"].get(j, ""))
        rec = {"dataset": e.dataset, "split": e.split, "id": e.id, **({"sample": k} if cfg.num_samples > 1 else {}),
               "text": e.text, "label": e.label, "prompt": p["prompts"][j], "output": output,
               "pred": parse_output(output, get_task(e.dataset).labels),
               **({"history": histories[p["chunk"][j]]} if histories else {})}
        if probs is not None:  # score mode: the candidates' probabilities, in the candidate (= task label) order
            rec["probs"] = probs
        if video:
            clip = p["clips"][j]
            rec["video"] = clip.record(root) if clip.path is not None else None
            if p["errors"][j]:
                rec["clip_error"] = p["errors"][j]
            elif backend.modality != "video":  # what of the clip's sound the row heard (audio_track)
                rec.update(backend.clip_fields(p["frames"][j]))
        if j in p["context"]:
            rec["context"] = p["context"][j]
            past_context.append(f"{e.dataset} {e.id}")
        sink.write(rec)
        bar.update(1)

    chunks = stager.chunks if video else chunks_of(cfg, len(todo), False)
    seeds = [row_seed(cfg.seed, e.dataset, e.id, k) for e, k in todo]
    new_tokens = decoding.max_new_tokens if cfg.mode == "generate" else 0
    past_context: list[str] = []  # "dataset id" of each row longer than the model's context
    def arrive(p: dict) -> tuple[list, list[int] | None]:
        """A prepared chunk reaching the model: its failed rows are written, the rest numbered for on_result."""
        for j in range(len(p["chunk"])):
            if p["errors"][j] or "refused" in p["context"].get(j, {}):
                record(p, j, "")
        owners.extend((p, j) for j in p["ok"])
        return p["rows"], [seeds[p["chunk"][j]] for j in p["ok"]] if decoding.do_sample else None

    owners: list[tuple[dict, int]] = []  # streaming: the engine's row number -> (chunk, row in it)
    try:
        with ThreadPoolExecutor(max_workers=1) as ahead:
            if streaming:
                arrivals = Arrivals(lambda c: ahead.submit(prepare, c), len(chunks), arrive)
                t0 = time.perf_counter()
                run = backend.sample if decoding.do_sample else backend.generate
                run([], decoding=decoding, batch_size=cfg.batch_size, **({"seeds": []} if decoding.do_sample else {}),
                    on_result=lambda i, text: record(*owners[i], text), more=arrivals)
                timing["seconds_model"] += time.perf_counter() - t0 - arrivals.waited
            pending = ahead.submit(prepare, 0) if not streaming else None
            for k in range(len(chunks) if not streaming else 0):
                p = pending.result()
                if k + 1 < len(chunks):
                    pending = ahead.submit(prepare, k + 1)
                for j in range(len(p["chunk"])):
                    if p["errors"][j] or "refused" in p["context"].get(j, {}):
                        record(p, j, "")
                ok = p["ok"]
                t0 = time.perf_counter()
                if cfg.mode == "score":  # the chosen answer string, e.g. "emotion: joy"
                    backend.score(p["rows"], batch_size=cfg.batch_size,
                                  on_result=lambda r, s: record(p, ok[r], p["cands"][r][s.best], candidate_probs(s)))
                elif decoding.do_sample:  # each row draws from its own generator (mmla.inference.row_seed)
                    backend.sample(p["rows"], decoding=decoding, seeds=[seeds[p["chunk"][j]] for j in ok],
                                   batch_size=cfg.batch_size, on_result=lambda r, text: record(p, ok[r], text))
                else:
                    backend.generate(p["rows"], decoding=decoding, batch_size=cfg.batch_size,
                                     on_result=lambda r, text: record(p, ok[r], text))
                timing["seconds_model"] += time.perf_counter() - t0
    finally:
        bar.close()
        if past_context:  # lm-evaluation-harness would cut these silently: say which rows, in one line
            print(f"longer than the model's context, utterance cut from its start (recorded per row as `context`): "
                  f"{len(past_context)} rows: {', '.join(past_context)}", file=sys.stderr)
        if video:
            stager.close()
    timing["seconds_run"] = time.perf_counter() - t_run
    return {**{k: round(v, 2) for k, v in timing.items()}, "context_policy": CONTEXT_POLICY,
            "past_context": past_context}


def _fit(backend, cfg: PredictConfig, e: data_mod.Example, frames, cands, new_tokens: int,
         history: list | None = None) -> tuple[dict, tuple | None]:
    """A row past the model's context: the most of the utterance's end that fits (lm-evaluation-harness keeps the
    end of a context too long for the model), as (record, (prompt, row)); with nothing of it left (the rest of the
    prompt, or the clip, fills the context alone) the row is refused: (record, None)."""
    words = e.text.split()

    def attempt(k: int):
        prompt = render(e.dataset, cfg.family, " ".join(words[len(words) - k:]), cfg.split, backend.modality)
        row = backend.prepare([prompt], cfg.protocol, [frames] if frames is not None else None,
                              [cands] if cands is not None else None, [history] if history is not None else None)[0]
        return backend.excess([row], new_tokens)[0], prompt, row

    lo, hi, best = 0, len(words) - 1, None  # the most words k < len(words) that fit
    while lo <= hi:
        k = (lo + hi) // 2
        over, prompt, row = attempt(k)
        if over:
            hi = k - 1
        else:
            best, lo = (k, prompt, row), k + 1
    if best is None:
        return {"refused": f"the prompt without its utterance, plus {new_tokens} answer tokens, is longer than the "
                           f"model's context"}, None
    k, prompt, row = best
    return {"words_kept": k, "words": len(words)}, (prompt, row)
