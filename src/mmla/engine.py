"""The batched inference core, once for text and video: generation (greedy or sampled) with continuous batching,
candidate scoring with prefix reuse, and a prefill-only ceiling.

The engine works on `inputs.Row`s (token ids with media placeholders expanded, plus per-row media tensors) and
asks the model's `Inputs` (mmla.inputs) for everything that differs between text and video: media arguments of a
forward, per-token extras, rotary positions (1-D, or the model's own 3-D index for Qwen2-VL).

Why a custom loop rather than `model.generate` on padded batches: in a batch, `generate` keeps every row until the
longest answer is done, so short answers ("emotion: joy") wait for long ones, and a decode step costs about as much
for a few rows as for a full batch (it reads every weight). `_decode` is a prefill + one-token-at-a-time loop over
the model's forward with continuous batching: a row leaves the batch and its KV cache as soon as it emits EOS, and
new prompts (prefilled together, in length order so padding is small) take the free places. transformers' own
`generate_batch` (paged attention) gave identical greedy outputs but ran 3x slower on CPU (../shared/FINDINGS.md).

The next-token choice goes through transformers' own logits processors, built from the generation config as
`generate` builds them (repetition penalty, temperature, top-k, top-p, ...); a processor that reads the history sees
each row's own tokens (never padding), as `generate` does one prompt at a time. Sampling draws each row from its own
random generator (seeded per row by the caller), so a row's answer does not depend on the batch size, the order of
rows or a resume.

Generation and scoring also run the token prefix that every prompt shares (chat template, system prompt, the
instruction's first words: about a quarter of an MMLA prompt) once, not once per prompt.
"""

from __future__ import annotations

import copy
from typing import Callable, NamedTuple, Protocol

import numpy as np
import torch
from transformers import DynamicCache, GenerationConfig
from transformers.cache_utils import DynamicLayer
from transformers.generation.logits_process import (MinPLogitsWarper, TemperatureLogitsWarper, TopKLogitsWarper,
                                                    TopPLogitsWarper)

from .backends import Scored
from .inputs import Row, TextInputs, common_prefix
from .models import device_of
from .prompts import Decoding

_WARPERS = (TemperatureLogitsWarper, TopKLogitsWarper, TopPLogitsWarper, MinPLogitsWarper)  # ignore the history


def _batches(lengths: list[int], batch_size: int) -> list[list[int]]:
    """Indices grouped into batches of at most `batch_size` rows of similar length, longest first (so memory
    trouble shows up at once). Where the batches are cut is chosen to minimise the tokens run, padding included,
    plus a forward's fixed cost counted as two tokens per row of a full batch: the cheapest partition of the
    length-sorted rows into runs, by dynamic programming. (A fixed cut every `batch_size` rows pads each row to
    its batch's longest, however far apart the lengths in that batch are.)"""
    order = sorted(range(len(lengths)), key=lambda i: -lengths[i])
    w = np.array([lengths[i] for i in order], dtype=np.float64)  # length-sorted widths
    n, overhead = len(order), 2 * batch_size
    cost = np.zeros(n + 1)  # cost[j]: the cheapest batching of the first j rows
    cut = [0] * (n + 1)
    for j in range(1, n + 1):
        k = np.arange(max(0, j - batch_size), j)  # a last batch of rows k..j-1, padded to widths[k]
        c = cost[k] + (j - k) * w[k]
        best = int(np.argmin(c))
        cost[j], cut[j] = c[best] + overhead, int(k[best])
    bounds, j = [], n
    while j:
        bounds.append((cut[j], j))
        j = cut[j]
    return [order[a:b] for a, b in reversed(bounds)]


def _left_pad(seqs: list[list[int]], pad_id: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(seqs), width), dtype=torch.long)
    for r, s in enumerate(seqs):
        ids[r, width - len(s) :] = torch.tensor(s, dtype=torch.long)
        mask[r, width - len(s) :] = 1
    return ids.to(device), mask.to(device)


def eos_ids(model, tokenizer) -> list[int]:
    """The tokenizer's EOS plus the generation config's (chat models often end turns with another token)."""
    ids = {tokenizer.eos_token_id} if tokenizer.eos_token_id is not None else set()
    cfg = getattr(model, "generation_config", None)
    extra = getattr(cfg, "eos_token_id", None) if cfg is not None else None
    ids.update(extra if isinstance(extra, (list, tuple)) else [extra] if extra is not None else [])
    return sorted(ids)


class _Prefix(NamedTuple):
    length: int
    kv: list[tuple[torch.Tensor, torch.Tensor]]  # per layer: keys, values for a batch of one
    ids: list[int]


def _shared_prefix(model, inputs: TextInputs, rows: list[Row]) -> _Prefix | None:
    """Run once the token prefix every row shares (chat template, system prompt, "The speaker says:"); it stops
    before the first media token (vision features enter at the prefill)."""
    seqs = [r.ids for r in rows]
    n = min(common_prefix(seqs), inputs.prefix_limit(seqs[0]))
    if n == 0:
        return None
    cache = DynamicCache(config=model.config)
    ids = torch.tensor([seqs[0][:n]], device=device_of(model))
    pos = torch.arange(n, device=device_of(model))[None]
    if inputs.rope_dims > 1:
        pos = pos.expand(inputs.rope_dims, 1, n)
    inputs.last_logits(model, input_ids=ids, position_ids=pos, cache=cache, use_cache=True)
    return _Prefix(n, [(layer.keys, layer.values) for layer in cache.layers], seqs[0][:n])


def _prefill(model, inputs: TextInputs, rows: list[Row], prefix: _Prefix | None):
    """Run rows that all start with `prefix`; only the tokens after it are computed.

    Returns the KV cache, attention mask, each row's last position and next-token logits. Each row is laid out as
    [prefix][left padding][own tokens], the padding masked out, so every row's last token is in the last column."""
    p = prefix.length if prefix else 0
    dev = device_of(model)
    ids, mask = _left_pad([r.ids[p:] for r in rows], inputs.pad_id, dev)
    width = ids.shape[1]
    media = inputs.media_kwargs(rows, dev)
    own_tokens = inputs.token_kwargs(ids, [{k: v[p:] for k, v in r.tokens.items()} for r in rows], width, dev)
    cache = DynamicCache(config=model.config)
    full_ids, full_mask, full_tokens = ids, mask, own_tokens
    if prefix:
        for layer, (k, v) in enumerate(prefix.kv):
            cache.update(k.expand(len(rows), -1, -1, -1), v.expand(len(rows), -1, -1, -1), layer)
        full_ids = torch.cat([torch.tensor([prefix.ids], device=dev).expand(len(rows), -1), ids], dim=1)
        full_mask = torch.cat([mask.new_ones((len(rows), p)), mask], dim=1)
        full_tokens = {k: torch.cat([v.new_zeros((len(rows), p)), v], dim=1) for k, v in own_tokens.items()}
    positions = inputs.positions(full_ids, full_mask, media, full_tokens)[..., p:]
    logits = inputs.last_logits(model, input_ids=ids, attention_mask=full_mask, position_ids=positions, cache=cache,
                                use_cache=True, **inputs.forward_kwargs({**media, **own_tokens}))
    # each row's largest position so far ((dims, B, L) for a multi-axis index such as Qwen2-VL's)
    last = positions.amax(dim=(0, 2)) if positions.dim() > 2 else positions[:, -1]
    return cache, full_mask, last[:, None], logits


# ---------------------------------------------------------------- generation


class _Rows:
    """Rows decoding together: KV cache, left-padded attention mask, last position, next-token logits."""

    def __init__(self, model, inputs: TextInputs, rows: list[Row], index: list[int], prefix: _Prefix | None):
        self.cache, self.mask, self.position, self.logits = _prefill(model, inputs, rows, prefix)
        self.index = list(index)  # row -> index of its sequence in the caller's list
        self.rope_dims = inputs.rope_dims
        # Merging and trimming rewrite each layer's key/value tensors directly, which is right only for
        # plain full-attention layers (not sliding-window ones); other caches keep fixed batches.
        self.mergeable = all(type(layer) is DynamicLayer for layer in self.cache.layers)

    def __len__(self) -> int:
        return len(self.index)

    def keep(self, keep: torch.Tensor) -> None:
        """Keep only these rows, and drop the left columns that none of them attends to."""
        self.cache.batch_select_indices(keep)
        self.mask, self.position, self.logits = self.mask[keep], self.position[keep], self.logits[keep]
        self.index = [self.index[i] for i in keep.tolist()]
        start = int(self.mask.any(0).int().argmax())  # first column some row attends to
        if start > 0 and self.mergeable:
            self.mask = self.mask[:, start:]
            for layer in self.cache.layers:
                layer.keys, layer.values = layer.keys[..., start:, :], layer.values[..., start:, :]

    def extend(self, other: _Rows) -> None:
        """Append other's rows; the narrower cache and mask get zero (masked) columns on the left."""
        width = max(self.mask.shape[1], other.mask.shape[1])

        def widen(x: torch.Tensor, dim: int) -> torch.Tensor:
            pad = [0, 0] * (x.dim() - 1 - dim % x.dim()) + [width - x.shape[dim], 0]
            return torch.nn.functional.pad(x, pad)

        for a, b in zip(self.cache.layers, other.cache.layers):
            a.keys = torch.cat([widen(a.keys, -2), widen(b.keys, -2)])
            a.values = torch.cat([widen(a.values, -2), widen(b.values, -2)])
        self.mask = torch.cat([widen(self.mask, 1), widen(other.mask, 1)])
        self.position = torch.cat([self.position, other.position])
        self.logits = torch.cat([self.logits, other.logits])
        self.index += other.index

    def step(self, model, token: torch.Tensor) -> None:
        """Feed one token per row (text tokens sit at the same position on every rotary axis)."""
        self.mask = torch.cat([self.mask, self.mask.new_ones((len(self), 1))], dim=1)
        self.position = self.position + 1
        pos = self.position if self.rope_dims == 1 else self.position[None].expand(self.rope_dims, -1, -1)
        self.logits = model(
            input_ids=token[:, None], attention_mask=self.mask, position_ids=pos, cache=self.cache, use_cache=True,
        ).logits[:, -1]


def _prefill_rows(lengths: list[int], slack: float = 0.125) -> int:
    """How many of these prompts (longest first) to prefill in one forward: stop before left padding passes
    `slack` of the real tokens, so a wide spread of lengths is split into several prefills."""
    real = 0
    for k, length in enumerate(lengths):
        real += length
        if k > 0 and lengths[0] * (k + 1) > (1 + slack) * real:
            return k
    return len(lengths)


class _Chooser:
    """The next token of each row: transformers' logits processors (from the generation config, as `generate`
    builds them), then argmax, or a draw from the row's own generator when sampling."""

    def __init__(self, model, decoding: Decoding, seeds: list[int] | None, seqs: list[list[int]]):
        gc = copy.deepcopy(getattr(model, "generation_config", None) or GenerationConfig())
        gc.update(do_sample=decoding.do_sample, **{k: getattr(decoding, k) for k in
                                                  ("temperature", "top_p", "top_k", "repetition_penalty")
                                                  if getattr(decoding, k) is not None})
        if not decoding.do_sample:  # greedy ignores the checkpoint's sampling settings, as generate does
            gc.temperature = gc.top_p = gc.top_k = gc.min_p = None
        self.processors = model._get_logits_processor(generation_config=gc, input_ids_seq_length=1,
                                                      device=device_of(model))
        # Sampling with top_k=1 (Qwen2-VL-Instruct's shipped config) always takes the top token: greedy.
        self.sample = bool(decoding.do_sample) and gc.top_k != 1
        self.history = any(not isinstance(p, _WARPERS) for p in self.processors)
        self.device = device_of(model)
        self.seqs: list[list[int]] = []
        self.gens: dict[int, torch.Generator] = {}
        self.add(seqs, seeds)

    def add(self, seqs: list[list[int]], seeds: list[int] | None) -> None:
        """Rows that join (indices continue from the rows before them); `seeds`: theirs, when sampling."""
        start = len(self.seqs)
        self.seqs += seqs
        if self.sample:
            for k in range(len(seqs)):
                self.gens[start + k] = torch.Generator(device=self.device)
                self.gens[start + k].manual_seed(int(seeds[k]) if seeds is not None else start + k)

    def __call__(self, logits: torch.Tensor, index: list[int], out: dict[int, list[int]]) -> torch.Tensor:
        scores = logits.float()
        if self.processors:
            if self.history:  # each row's own tokens, left-filled with its first token (a repeat changes nothing)
                hist = [self.seqs[i] + out[i] for i in index]
                width = max(len(h) for h in hist)
                ids = torch.tensor([[h[0]] * (width - len(h)) + h for h in hist], device=logits.device)
            else:
                ids = torch.zeros((len(index), 1), dtype=torch.long, device=logits.device)
            scores = self.processors(ids, scores)
        if not self.sample:
            return scores.argmax(-1)
        probs = torch.softmax(scores, dim=-1)
        return torch.cat([torch.multinomial(probs[r], 1, generator=self.gens[i]) for r, i in enumerate(index)])


class Arrivals(Protocol):
    """Rows that arrive while generation runs (mmla.inference feeds the prepared clips of the next chunks)."""

    def take(self, wait: bool) -> tuple[list[Row], list[int] | None] | None:
        """(rows, their sampling seeds or None) that have arrived since the last call ([] when none yet, or, with
        `wait`, the next ones once they come); None when no more will come."""


def _decode(model, inputs: TextInputs, rows: list[Row], max_new_tokens: int, eos: torch.Tensor, batch_size: int,
            choose: _Chooser, on_done: Callable[[int, list[int]], None], refill_at: int | None = None,
            more: Arrivals | None = None) -> None:
    """Continuation of every row with continuous batching; on_done(i, new_tokens) as each finishes.

    Up to `batch_size` rows decode together. A row leaves the batch (and the KV cache) as soon as it emits EOS or
    reaches max_new_tokens. Once `refill_at` places are free (default: a quarter), the next prompts, longest first,
    are prefilled (in groups of similar length and the same media shapes, so there is little padding) and join the
    running rows, so the batch stays full while long answers finish. This matters most on CPU, where a decode step
    costs nearly as much for a few rows as for 16: it reads every weight once.

    `more`: rows that arrive while these decode (the clips of the next chunks, decoded meanwhile). They join the
    queue as they come (each step takes what has arrived); the loop waits for them only when it has nothing to run.
    Their indices continue after `rows`'.
    """
    rows = list(rows)
    queue = sorted(range(len(rows)), key=lambda i: -len(rows[i].ids))
    prefix = _shared_prefix(model, inputs, rows) if rows else None
    skip = prefix.length if prefix else 0
    refill_at = refill_at or max(1, batch_size // 4)
    out: dict[int, list[int]] = {}
    running: _Rows | None = None
    while queue or running or more is not None:
        # rows that arrived: into the queue (a batch's worth waiting at most, so that prepared media do not pile
        # up; wait for some only when there is nothing to run)
        while more is not None and len(queue) < batch_size:
            got = more.take(wait=running is None and not queue)
            if got is None:
                more = None
            elif got[0]:
                new_rows, seeds = got
                choose.add([r.ids for r in new_rows], seeds)
                if not rows:  # the first rows to come: the prefix they share is run once, as for rows given
                    prefix = _shared_prefix(model, inputs, new_rows)
                    skip = prefix.length if prefix else 0
                rows += new_rows
                queue = sorted(queue + list(range(len(rows) - len(new_rows), len(rows))),
                               key=lambda i: -len(rows[i].ids))
            else:
                break
        if not queue and running is None:
            continue
        while queue and (running is None or (running.mergeable and batch_size - len(running) >= refill_at)):
            free = batch_size - (len(running) if running else 0)
            key = rows[queue[0]].key
            same = [i for i in queue if rows[i].key == key][:free]
            # a row that does not begin with the shared prefix (one that arrived later) is prefilled whole
            fits = prefix is None or all(rows[i].ids[:prefix.length] == prefix.ids and len(rows[i].ids) > prefix.length
                                         for i in same)
            take = _prefill_rows([len(rows[i].ids) - (skip if fits else 0) for i in same])
            group = same[:take]
            taken = set(group)
            queue = [i for i in queue if i not in taken]
            new = _Rows(model, inputs, [rows[i] for i in group], group, prefix if fits else None)
            if running is None:
                running = new
            else:
                running.extend(new)
            out.update((i, []) for i in group)
            if not running.mergeable:
                break
        token = choose(running.logits, running.index, out)
        for i, t in zip(running.index, token.tolist()):
            out[i].append(t)
        full = torch.tensor([len(out[i]) >= max_new_tokens for i in running.index], device=token.device)
        done = torch.isin(token, eos) | full
        if bool(done.any()):
            for j in done.nonzero().squeeze(1).tolist():
                on_done(running.index[j], out.pop(running.index[j]))
            if bool(done.all()):
                running = None
                continue
            keep = (~done).nonzero().squeeze(1)
            running.keep(keep)
            token = token[keep]
        running.step(model, token)


def _as_rows(model, tok_or_inputs, prompts) -> tuple[TextInputs, list[Row]]:
    """The seam and rows of a call: an `Inputs` with Rows, or (for text) a tokenizer with prompt strings."""
    inputs = _text(model, tok_or_inputs)
    rows = prompts if not prompts or isinstance(prompts[0], Row) else inputs.encode(list(prompts))
    return inputs, rows


def _text(model, tok_or_inputs) -> TextInputs:
    return tok_or_inputs if isinstance(tok_or_inputs, TextInputs) else TextInputs(model, tok_or_inputs)


@torch.inference_mode()
def generate(
    model,
    inputs,
    prompts: list,
    *,
    max_new_tokens: int = 64,
    batch_size: int = 16,
    decoding: Decoding | None = None,
    do_sample: bool = False,
    temperature: float | None = None,
    top_p: float | None = None,
    top_k: int | None = None,
    repetition_penalty: float | None = None,
    seed: int | None = None,
    seeds: list[int] | None = None,
    on_result: Callable[[int, str], None] | None = None,
    more: Arrivals | None = None,
) -> list[str]:
    """Generated text for each prompt (a chat-wrapped string or an `inputs.Row`), in input order; stops at EOS.

    `inputs`: the model's mmla.inputs seam (a tokenizer is accepted for text). `decoding` (or the keyword
    arguments) says greedy or sampling; `seeds` gives each row its own random generator when sampling (`seed`
    alone: row i gets a generator seeded from (seed, i)).
    `on_result(index, text)` is called as each prompt completes, so a caller can write results to disk as they come.
    `more`: rows that arrive while these run (see `_decode`); their texts follow these, in arrival order.
    """
    inputs, rows = _as_rows(model, inputs, prompts)
    if not rows and more is None:
        return []
    decoding = decoding or Decoding(do_sample=do_sample, temperature=temperature, top_p=top_p, top_k=top_k,
                                    repetition_penalty=repetition_penalty, max_new_tokens=max_new_tokens)
    tok = inputs.tokenizer
    eos_list = eos_ids(model, tok)
    texts: dict[int, str] = {}

    def done(i: int, tokens: list[int]) -> None:
        texts[i] = tok.decode(tokens, skip_special_tokens=True)
        if on_result is not None:
            on_result(i, texts[i])

    if seeds is None and seed is not None:
        seeds = [seed * 1_000_003 + i for i in range(len(rows))]
    choose = _Chooser(model, decoding, seeds, [r.ids for r in rows])
    _decode(model, inputs, rows, decoding.max_new_tokens, torch.tensor(eos_list, device=device_of(model)), batch_size,
            choose, done, more=more)
    return [texts[i] for i in range(len(texts))]


# ---------------------------------------------------------------- scoring


def _feeds(rests: list[list[int]]) -> tuple[list[tuple[int, ...]], list[int | None]]:
    """Token rows a second pass must feed for one prompt's candidates, and which row serves each candidate.

    A candidate with remaining tokens r needs the next-token log-probs after feeding r[:-1]. Any row that
    begins with r[:-1] provides them, so only maximal continuations get a row of their own, e.g.
    "statement-opinion" is read off the row of "statement-non-opinion" up to their shared "statement-".
    Candidates with a single remaining token need no row (the prefill already scored it): None.
    """
    needed = sorted({tuple(r[:-1]) for r in rests if len(r) > 1}, key=len, reverse=True)
    feeds: list[tuple[int, ...]] = []
    for f in needed:
        if not any(g[: len(f)] == f for g in feeds):
            feeds.append(f)
    serve = [
        None if len(r) == 1 else next(j for j, g in enumerate(feeds) if g[: len(r) - 1] == tuple(r[:-1]))
        for r in rests
    ]
    return feeds, serve


@torch.inference_mode()
def score(
    model,
    inputs,
    prompts: list,
    candidates: list[list[str]] | None = None,
    *,
    batch_size: int = 16,
    shortcut: bool = True,
    on_result: Callable[[int, Scored], None] | None = None,
) -> list[Scored]:
    """Rank each prompt's candidate continuations by log-likelihood; one `Scored` per prompt, in input order.

    `prompts`: chat-wrapped strings with `candidates`, or (Row, rests) pairs from `inputs.score_rows`. prompt +
    candidate is tokenized jointly; the longest token prefix shared by all of a prompt's candidates (the prompt plus
    e.g. "emotion: ") is run once, in length-sorted batches (and the part that all prompts share, once for all). A
    candidate's score is the summed log-probability of its tokens after that prefix (the shared part would add the
    same to every candidate). With `shortcut`, a prompt whose candidates all differ at their first own token is
    scored by that token's log-probability alone: that token already decides the answer, and no second pass is
    needed. Otherwise the remaining tokens run in a second pass on top of the prefix's KV cache.
    `on_result(index, Scored)` is called as each batch completes.
    """
    inputs = _text(model, inputs)
    if candidates is not None:
        if len(prompts) != len(candidates):
            raise ValueError(f"{len(prompts)} prompts but {len(candidates)} candidate lists")
        if any(len(c) == 0 for c in candidates):
            raise ValueError("every prompt needs at least one candidate")
        prompts = inputs.score_rows(list(prompts), candidates)
    if not prompts:
        return []
    heads = [row for row, _ in prompts]
    rests = [r for _, r in prompts]
    shared = _shared_prefix(model, inputs, heads)
    results: list[Scored | None] = [None] * len(prompts)
    for batch in _key_batches(heads, batch_size, shared.length if shared else 0):
        cache, mask, last, logits = _prefill(model, inputs, [heads[i] for i in batch], shared)
        first = torch.log_softmax(logits.float(), dim=-1)
        # Every candidate starts with the log-probability of its first own token, read off the prefill.
        b_idx = [b for b, i in enumerate(batch) for _ in rests[i]]
        t_idx = [r[0] for i in batch for r in rests[i]]
        flat = first[b_idx, t_idx].tolist()
        scores, k = {}, 0
        for i in batch:
            scores[i] = flat[k : k + len(rests[i])]
            k += len(rests[i])

        # The tokens after the first: a second pass, unless the first tokens already tell the candidates apart.
        rows: list[tuple[int, tuple[int, ...]]] = []  # (batch position of the prompt, tokens to feed)
        picks: list[tuple[int, int, int, int, int]] = []  # (prompt, candidate, row, position in row, target token)
        for b, i in enumerate(batch):
            if shortcut and len({r[0] for r in rests[i]}) == len(rests[i]):
                continue
            feeds, serve = _feeds(rests[i])
            for c, r in enumerate(rests[i]):
                if serve[c] is not None:
                    picks += [(i, c, len(rows) + serve[c], t, r[t + 1]) for t in range(len(r) - 1)]
            rows += [(b, f) for f in feeds]
        if rows:
            logps = _continuation_logp(model, inputs, cache, mask, last, rows, picks)
            for (i, c, *_), v in zip(picks, logps):
                scores[i][c] += v

        for i in batch:
            s = scores[i]
            results[i] = Scored(best=max(range(len(s)), key=s.__getitem__), scores=s)
        if on_result is not None:
            for i in sorted(batch):
                on_result(i, results[i])
    return results


def _key_batches(rows: list[Row], batch_size: int, skip: int = 0) -> list[list[int]]:
    """Length-sorted batches of rows whose media can share a forward (`skip`: leading tokens already run)."""
    groups: dict[tuple, list[int]] = {}
    for i, r in enumerate(rows):
        groups.setdefault(r.key, []).append(i)
    out = []
    for members in groups.values():
        out += [[members[j] for j in b] for b in _batches([len(rows[i].ids) - skip for i in members], batch_size)]
    return out


def _continuation_logp(model, inputs, cache, mask, last, rows, picks) -> list[float]:
    """Feed token rows on top of their prompt's cached prefix; return the log-prob of each pick's target token."""
    width = max(len(f) for _, f in rows)
    dev = mask.device
    index = torch.tensor([b for b, _ in rows], device=dev)
    # Rows are right-padded: the padding comes after the real tokens, so causal attention keeps it out of them.
    ids = torch.full((len(rows), width), inputs.pad_id, dtype=torch.long)
    for r, (_, f) in enumerate(rows):
        ids[r, : len(f)] = torch.tensor(f, dtype=torch.long)
    cache.batch_select_indices(index)  # each row gets its own copy of its prompt's prefix cache
    mask = torch.cat([mask[index], mask.new_ones((len(rows), width))], dim=1)
    pos = last[index] + 1 + torch.arange(width, device=dev)
    if inputs.rope_dims > 1:
        pos = pos[None].expand(inputs.rope_dims, -1, -1)
    logits = model(input_ids=ids.to(dev), attention_mask=mask, position_ids=pos, cache=cache, use_cache=True).logits
    # Normalise only the positions that are read.
    row, at, target = (torch.tensor(x, device=dev) for x in list(zip(*picks))[2:])
    logp = torch.log_softmax(logits[row, at].float(), dim=-1)
    return logp.gather(1, target[:, None]).squeeze(1).tolist()


# ---------------------------------------------------------------- ceiling


@torch.inference_mode()
def prefill_only(model, inputs, prompts: list, batch_size: int = 16) -> int:
    """One plain forward over each prompt (no KV cache, no shared prefix): what any method that reads the
    model's answer from a full prompt must at least do. Returns the number of tokens run."""
    inputs, rows = _as_rows(model, inputs, prompts)
    if not rows:
        return 0
    for batch in _key_batches(rows, batch_size):
        group = [rows[i] for i in batch]
        ids, mask = _left_pad([r.ids for r in group], inputs.pad_id, device_of(model))
        media = inputs.media_kwargs(group, device_of(model))
        tokens = inputs.token_kwargs(ids, [r.tokens for r in group], ids.shape[1], device_of(model))
        positions = inputs.positions(ids, mask, media, tokens)
        inputs.last_logits(model, input_ids=ids, attention_mask=mask, position_ids=positions, use_cache=False,
                           **inputs.forward_kwargs({**media, **tokens}))
    return sum(len(r.ids) for r in rows)
