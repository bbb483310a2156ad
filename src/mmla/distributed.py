"""Data-parallel predict: N processes started by `torchrun` or `accelerate launch` share one run directory.

Each rank reads RANK / WORLD_SIZE / LOCAL_RANK from the launcher's environment, takes a share of the rows still to
do (balanced by prompt length, and clip count for video), and appends its answers to its own part file
`predictions.rank{r}.jsonl`. Rank 0 folds the parts into predictions.jsonl at the end (and, at the start, the parts
a killed run left behind, whatever its number of ranks), checks that every row is there exactly once, and
evaluates. Ranks agree through a gloo process group carrying small Python objects only (the shared snapshot of
the run directory, the end of the work); no tensor crosses it, so the same code runs on CPUs and GPUs.

A rank that dies leaves its part on disk (every record is flushed as written); the launcher stops the others,
whose parts stay too. Rerunning the command, with any number of processes, completes only what is missing.
"""

from __future__ import annotations

import heapq
import os
from dataclasses import dataclass
from pathlib import Path

from .runs import PREDICTION_KEYS, read_jsonl, write_jsonl

PART = "predictions.rank{}.jsonl"
# How long a rank waits for the others at a rendezvous (rank 0 merging, the slowest rank finishing its share).
TIMEOUT_ENV = "MMLA_DIST_TIMEOUT_S"
# A video row's clip in prompt characters, for balancing: its frames cost the model far more than its text (a
# 4-frame 448 px clip is ~1,000 visual tokens, ~4,000 characters' worth).
CLIP_WEIGHT = 4000


@dataclass(frozen=True)
class Ranks:
    rank: int = 0
    world: int = 1
    local_rank: int = 0
    local_world: int = 1

    @property
    def main(self) -> bool:
        return self.rank == 0


def ranks() -> Ranks:
    """This process's place, from the launcher's environment (one process when there is none)."""
    values = {}
    for name, var in (("rank", "RANK"), ("world", "WORLD_SIZE"), ("local_rank", "LOCAL_RANK"),
                      ("local_world", "LOCAL_WORLD_SIZE")):
        raw = os.environ.get(var)
        if raw is None:
            continue
        try:
            values[name] = int(raw)
        except ValueError:
            raise ValueError(f"environment variable {var}={raw!r} is not an integer") from None
    r = Ranks(**values)
    if r.world < 1 or not 0 <= r.rank < r.world:
        raise ValueError(f"RANK={r.rank} does not fit WORLD_SIZE={r.world}")
    if "local_world" not in values:  # single node: every rank is local
        r = Ranks(r.rank, r.world, r.local_rank, r.world)
    return r


_GROUP = None  # the gloo group for object collectives; None with one process


def start() -> Ranks:
    """This process's ranks; with several, join the launcher's process group (once per process)."""
    global _GROUP
    r = ranks()
    if r.world == 1 or _GROUP is not None:
        return r
    import atexit
    from datetime import timedelta

    import torch
    import torch.distributed as dist

    timeout = timedelta(seconds=float(os.environ.get(TIMEOUT_ENV, 6 * 3600)))
    if torch.cuda.is_available():  # "cuda" then means this rank's GPU (a training stage may use nccl later)
        torch.cuda.set_device(r.local_rank % torch.cuda.device_count())
    if not dist.is_initialized():
        backend = "cpu:gloo,cuda:nccl" if torch.cuda.is_available() else "gloo"
        dist.init_process_group(backend, timeout=timeout)
        atexit.register(lambda: dist.is_initialized() and dist.destroy_process_group())
    _GROUP = dist.new_group(backend="gloo", timeout=timeout)
    return r


def gather(r: Ranks, obj) -> list:
    """Every rank's `obj`, in rank order, on every rank; also a rendezvous."""
    if r.world == 1:
        return [obj]
    import torch.distributed as dist

    out = [None] * r.world
    dist.all_gather_object(out, obj, group=_GROUP)
    return out


def barrier(r: Ranks) -> None:
    gather(r, None)


# ---------------------------------------------------------------- sharing the rows


def shard(weights: list[int], world: int) -> list[list[int]]:
    """Indices per rank, balanced by weight: heaviest first, each to the least loaded rank (ties: lower rank).
    Deterministic, so every rank computes the same split from the same rows."""
    heap = [(0, r) for r in range(world)]
    shares: list[list[int]] = [[] for _ in range(world)]
    for i in sorted(range(len(weights)), key=lambda i: (-weights[i], i)):
        load, r = heapq.heappop(heap)
        shares[r].append(i)
        heapq.heappush(heap, (load + weights[i], r))
    return [sorted(s) for s in shares]


def gpus_of(r: Ranks, device_count: int) -> list[int]:
    """The GPUs a rank may spread a model over (--device-map auto under several processes): an equal slice each,
    so 8 GPUs and 2 processes per node give GPUs 0-3 to local rank 0 and 4-7 to local rank 1."""
    per = device_count // r.local_world
    if per < 1:
        raise ValueError(f"{r.local_world} processes per node but {device_count} GPUs: --device-map auto needs at "
                         f"least one GPU per process")
    return list(range(r.local_rank * per, (r.local_rank + 1) * per))


# ---------------------------------------------------------------- part files


def part_path(out: Path, rank: int) -> Path:
    return out / PART.format(rank)


def part_files(out: Path) -> list[Path]:
    found = []
    for p in out.glob(PART.format("*")):
        n = p.name[len("predictions.rank"):-len(".jsonl")]
        if n.isdigit():
            found.append((int(n), p))
    return [p for _, p in sorted(found)]


def _key(r: dict) -> tuple:
    return r["dataset"], r["split"], r["id"], r.get("sample", 0)


def merge_parts(out: Path, expected: list[tuple] | None = None) -> dict:
    """Fold every part file into predictions.jsonl (one atomic rewrite), then remove the parts. One record per
    (dataset, split, id, sample): the last written, except that a failed clip never replaces a good answer (a part
    of an earlier run may hold a failure that a later run retried). With `expected` (row keys in the order of the
    data), the rows are written in that order (other records after them) and each must be there exactly once."""
    pred = out / "predictions.jsonl"
    parts = part_files(out)
    stats = {"parts": len(parts), "records_read": 0}
    if parts:
        kept: dict[tuple, dict] = {}
        for path in [pred, *parts]:
            records, _ = read_jsonl(path, PREDICTION_KEYS)  # a torn tail (a killed rank) is left out: redone
            stats["records_read"] += len(records)
            for rec in records:
                k = _key(rec)
                if k not in kept or not rec.get("clip_error") or kept[k].get("clip_error"):
                    kept[k] = rec
        if expected is not None:  # the data's order, as one process would list the datasets
            rank = {k: i for i, k in enumerate(expected)}
            kept = dict(sorted(kept.items(), key=lambda kv: rank.get(kv[0], len(rank))))
        write_jsonl(pred, kept.values())
        for p in parts:  # after the rewrite: a kill in between leaves duplicates, which the next merge drops
            p.unlink()
    if expected is not None:
        check(pred, set(expected))
    return stats


def check(pred: Path, expected: set) -> None:
    """Every expected row in `pred` exactly once, or one line saying which are not."""
    records, torn = read_jsonl(pred, PREDICTION_KEYS)
    counts: dict[tuple, int] = {}
    for rec in records:
        k = _key(rec)
        if k in expected:
            counts[k] = counts.get(k, 0) + 1
    missing = [k for k in expected if k not in counts]
    twice = [k for k, n in counts.items() if n > 1]
    if missing or twice or torn:
        first = (missing or twice or [("", "", "?", 0)])[0]
        raise RuntimeError(f"{pred}: after merging the ranks' parts {len(missing)} rows are missing and "
                           f"{len(twice)} present more than once{' (torn last line)' if torn else ''} "
                           f"(first: {first[0]}/{first[2]}); rerun the same command to complete them")
