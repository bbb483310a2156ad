"""The batched inference core: greedy generation, candidate scoring and a prefill-only baseline.

Everything here works on prompt strings that are already chat-wrapped (they contain the template's
special tokens), so they are tokenized with add_special_tokens=False.

Why a custom greedy loop rather than `model.generate` on padded batches: in a batch, `generate` keeps
every row until the longest answer is done, so short answers ("emotion: joy") wait for long ones, and a
decode step costs about as much for a few rows as for a full batch (it reads every weight). `_greedy`
is a plain prefill + one-token-at-a-time loop over the model's forward with continuous batching: a row
leaves the batch and its KV cache as soon as it emits EOS, and new prompts (prefilled together, in
length order so padding is small) take the free places. Its outputs are tested against `model.generate`
one sample at a time (tests/test_engine.py). Sampling (do_sample=True) goes through `model.generate`,
so every sampling option behaves as there.

Greedy generation and scoring also run the token prefix that every prompt shares (chat template, system
prompt, the instruction's first words: about a quarter of an MMLA prompt) once, not once per prompt.
"""

from __future__ import annotations

import os
from typing import Callable, NamedTuple

import torch
from transformers import DynamicCache
from transformers.cache_utils import DynamicLayer


def _tokenize(tokenizer, texts: list[str]) -> list[list[int]]:
    return tokenizer(texts, add_special_tokens=False)["input_ids"]


def _batches(lengths: list[int], batch_size: int) -> list[list[int]]:
    """Indices grouped into batches of similar length (longest first, so memory trouble shows up at once)."""
    order = sorted(range(len(lengths)), key=lambda i: -lengths[i])
    return [order[i : i + batch_size] for i in range(0, len(order), batch_size)]


def _left_pad(seqs: list[list[int]], pad_id: int, device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """input_ids, attention_mask and position ids (0 at each row's first real token) of a left-padded batch."""
    width = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(seqs), width), dtype=torch.long)
    for r, s in enumerate(seqs):
        ids[r, width - len(s) :] = torch.tensor(s, dtype=torch.long)
        mask[r, width - len(s) :] = 1
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    return ids.to(device), mask.to(device), positions.to(device)


def _pad_id(tokenizer) -> int:
    return tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id


def eos_ids(model, tokenizer) -> list[int]:
    """The tokenizer's EOS plus the generation config's (chat models often end turns with another token)."""
    ids = {tokenizer.eos_token_id} if tokenizer.eos_token_id is not None else set()
    cfg = getattr(model, "generation_config", None)
    extra = getattr(cfg, "eos_token_id", None) if cfg is not None else None
    ids.update(extra if isinstance(extra, (list, tuple)) else [extra] if extra is not None else [])
    return sorted(ids)


def _common_prefix(seqs: list[list[int]]) -> int:
    """Length of the longest common token prefix, leaving every sequence at least one token of its own."""
    return min(len(os.path.commonprefix(seqs)), min(len(s) for s in seqs) - 1)


class _Prefix(NamedTuple):
    length: int
    kv: list[tuple[torch.Tensor, torch.Tensor]]  # per layer: keys, values for a batch of one


def _shared_prefix(model, seqs: list[list[int]]) -> _Prefix | None:
    """Run once the token prefix every sequence shares (chat template, system prompt, "The speaker says:");
    about a quarter of an MMLA prompt, which every prefill then skips."""
    n = _common_prefix(seqs)
    if n == 0:
        return None
    cache = DynamicCache(config=model.config)
    model(input_ids=torch.tensor([seqs[0][:n]], device=model.device), cache=cache, use_cache=True, logits_to_keep=1)
    return _Prefix(n, [(layer.keys, layer.values) for layer in cache.layers])


def _prefill(model, seqs: list[list[int]], pad_id: int, prefix: _Prefix | None):
    """Run a batch of sequences that all start with `prefix`; only the tokens after it are computed.

    Returns the KV cache, attention mask, position ids and each row's next-token logits. Each row is laid out
    as [prefix][left padding][own tokens], the padding masked out, so every row's last token is in the last column.
    """
    p = prefix.length if prefix else 0
    ids, mask, positions = _left_pad([s[p:] for s in seqs], pad_id, model.device)
    cache = DynamicCache(config=model.config)
    if prefix:
        for layer, (k, v) in enumerate(prefix.kv):
            cache.update(k.expand(len(seqs), -1, -1, -1), v.expand(len(seqs), -1, -1, -1), layer)
        mask = torch.cat([mask.new_ones((len(seqs), p)), mask], dim=1)
        positions = positions + p
    out = model(
        input_ids=ids, attention_mask=mask, position_ids=positions, cache=cache, use_cache=True, logits_to_keep=1
    )
    return cache, mask, positions, out.logits[:, -1]


# ---------------------------------------------------------------- generation


class _Rows:
    """Rows decoding together: KV cache, left-padded attention mask, last position, next-token logits."""

    def __init__(self, model, seqs: list[list[int]], index: list[int], pad_id: int, prefix: _Prefix | None):
        self.cache, self.mask, positions, self.logits = _prefill(model, seqs, pad_id, prefix)
        # self.logits: each row's next-token logits, not yet turned into a token
        self.position = positions[:, -1:]  # position of each row's last token
        self.index = list(index)  # row -> index of its sequence in the caller's list
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
        """Feed one token per row."""
        self.mask = torch.cat([self.mask, self.mask.new_ones((len(self), 1))], dim=1)
        self.position = self.position + 1
        self.logits = model(
            input_ids=token[:, None], attention_mask=self.mask, position_ids=self.position, cache=self.cache,
            use_cache=True,
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


def _greedy(model, seqs: list[list[int]], max_new_tokens: int, eos: torch.Tensor, pad_id: int, batch_size: int,
            on_done: Callable[[int, list[int]], None], refill_at: int | None = None) -> None:
    """Greedy continuation of every sequence with continuous batching; on_done(i, new_tokens) as each finishes.

    Up to `batch_size` rows decode together. A row leaves the batch (and the KV cache) as soon as it emits
    EOS or reaches max_new_tokens. Once `refill_at` places are free (default: a quarter), the next prompts,
    longest first, are prefilled (in groups of similar length, so there is little padding) and join the
    running rows, so the batch stays full while long answers finish. This matters most on CPU, where a
    decode step costs nearly as much for a few rows as for 16: it reads every weight once.
    """
    queue = sorted(range(len(seqs)), key=lambda i: -len(seqs[i]))
    prefix = _shared_prefix(model, seqs)
    skip = prefix.length if prefix else 0
    refill_at = refill_at or max(1, batch_size // 4)
    out: dict[int, list[int]] = {}
    rows: _Rows | None = None
    while queue or rows:
        while queue and (rows is None or (rows.mergeable and batch_size - len(rows) >= refill_at)):
            free = batch_size - (len(rows) if rows else 0)
            take = _prefill_rows([len(seqs[i]) - skip for i in queue[:free]])
            group, queue = queue[:take], queue[take:]
            new = _Rows(model, [seqs[i] for i in group], group, pad_id, prefix)
            if rows is None:
                rows = new
            else:
                rows.extend(new)
            out.update((i, []) for i in group)
        token = rows.logits.argmax(-1)
        for i, t in zip(rows.index, token.tolist()):
            out[i].append(t)
        full = torch.tensor([len(out[i]) >= max_new_tokens for i in rows.index], device=token.device)
        done = torch.isin(token, eos) | full
        if bool(done.any()):
            for j in done.nonzero().squeeze(1).tolist():
                on_done(rows.index[j], out.pop(rows.index[j]))
            if bool(done.all()):
                rows = None
                continue
            keep = (~done).nonzero().squeeze(1)
            rows.keep(keep)
            token = token[keep]
        rows.step(model, token)


@torch.inference_mode()
def generate(
    model,
    tokenizer,
    prompts: list[str],
    *,
    max_new_tokens: int = 64,
    batch_size: int = 16,
    do_sample: bool = False,
    temperature: float | None = None,
    top_p: float | None = None,
    seed: int | None = None,
    on_result: Callable[[int, str], None] | None = None,
) -> list[str]:
    """Generated text for each prompt, in input order. Greedy unless do_sample; stops at EOS.

    `on_result(index, text)` is called as each prompt completes (greedy) or each batch (sampling), so a
    caller can write results to disk as they come.
    """
    if not prompts:
        return []
    seqs = _tokenize(tokenizer, prompts)
    eos_list = eos_ids(model, tokenizer)
    pad_id = _pad_id(tokenizer)
    texts: list[str | None] = [None] * len(prompts)

    def done(i: int, tokens: list[int]) -> None:
        texts[i] = tokenizer.decode(tokens, skip_special_tokens=True)
        if on_result is not None:
            on_result(i, texts[i])

    if not do_sample:
        _greedy(model, seqs, max_new_tokens, torch.tensor(eos_list, device=model.device), pad_id, batch_size, done)
        return texts

    if seed is not None:
        torch.manual_seed(seed)
    for batch in _batches([len(s) for s in seqs], batch_size):
        ids, mask, _ = _left_pad([seqs[i] for i in batch], pad_id, model.device)
        gen = model.generate(
            input_ids=ids, attention_mask=mask, max_new_tokens=max_new_tokens, do_sample=True,
            temperature=temperature, top_p=top_p, eos_token_id=eos_list, pad_token_id=pad_id,
        )
        for i, tokens in zip(batch, gen[:, ids.shape[1] :].tolist()):
            done(i, tokens)
    return texts


# ---------------------------------------------------------------- scoring


class Scored(NamedTuple):
    best: int  # index of the highest-scoring candidate
    scores: list[float]  # per candidate: summed log-probability of its tokens after the shared prefix


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
    tokenizer,
    prompts: list[str],
    candidates: list[list[str]],
    *,
    batch_size: int = 16,
    shortcut: bool = True,
    on_result: Callable[[int, Scored], None] | None = None,
) -> list[Scored]:
    """Rank each prompt's candidate continuations by log-likelihood; one `Scored` per prompt, in input order.

    prompt + candidate is tokenized jointly; the longest token prefix shared by all of a prompt's
    candidates (the prompt plus e.g. "emotion: ") is run once, in length-sorted batches (and the part
    that all prompts share, once for all). A candidate's score is the summed log-probability of its tokens
    after that prefix (the shared part would add the same to every candidate). With `shortcut`, a
    prompt whose candidates all differ at their first own token is scored by that token's log-probability
    alone: that token already decides the answer, and no second pass is needed. Otherwise the remaining
    tokens run in a second pass on top of the prefix's KV cache.
    `on_result(index, Scored)` is called as each batch completes.
    """
    if len(prompts) != len(candidates):
        raise ValueError(f"{len(prompts)} prompts but {len(candidates)} candidate lists")
    if any(len(c) == 0 for c in candidates):
        raise ValueError("every prompt needs at least one candidate")
    if not prompts:
        return []
    pad_id = _pad_id(tokenizer)
    prefixes, rests = [], []  # per prompt: the shared prefix ids, and each candidate's remaining ids
    for prompt, cands in zip(prompts, candidates):
        joint = _tokenize(tokenizer, [prompt + c for c in cands])
        k = _common_prefix(joint)
        prefixes.append(joint[0][:k])
        rests.append([s[k:] for s in joint])

    shared = _shared_prefix(model, prefixes)
    results: list[Scored | None] = [None] * len(prompts)
    for batch in _batches([len(p) for p in prefixes], batch_size):
        cache, mask, positions, logits = _prefill(model, [prefixes[i] for i in batch], pad_id, shared)
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
            for (i, c, *_), v in zip(picks, _continuation_logp(model, cache, mask, positions, rows, picks, pad_id)):
                scores[i][c] += v

        for i in batch:
            s = scores[i]
            results[i] = Scored(best=max(range(len(s)), key=s.__getitem__), scores=s)
        if on_result is not None:
            for i in sorted(batch):
                on_result(i, results[i])
    return results


def _continuation_logp(model, cache, mask, positions, rows, picks, pad_id) -> list[float]:
    """Feed token rows on top of their prompt's cached prefix; return the log-prob of each pick's target token."""
    width = max(len(f) for _, f in rows)
    index = torch.tensor([b for b, _ in rows], device=mask.device)
    # Rows are right-padded: the padding comes after the real tokens, so causal attention keeps it out of them.
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    for r, (_, f) in enumerate(rows):
        ids[r, : len(f)] = torch.tensor(f, dtype=torch.long)
    cache.batch_select_indices(index)  # each row gets its own copy of its prompt's prefix cache
    mask = torch.cat([mask[index], mask.new_ones((len(rows), width))], dim=1)
    pos = positions[index, -1:] + 1 + torch.arange(width, device=mask.device)
    ids = ids.to(mask.device)
    logits = model(input_ids=ids, attention_mask=mask, position_ids=pos, cache=cache, use_cache=True).logits
    # Normalise only the positions that are read.
    row, at, target = (torch.tensor(x, device=mask.device) for x in list(zip(*picks))[2:])
    logp = torch.log_softmax(logits[row, at].float(), dim=-1)
    return logp.gather(1, target[:, None]).squeeze(1).tolist()


# ---------------------------------------------------------------- ceiling


@torch.inference_mode()
def prefill_only(model, tokenizer, prompts: list[str], batch_size: int = 16) -> int:
    """One plain forward over each prompt (no KV cache, no shared prefix): what any method that reads the
    model's answer from a full prompt must at least do. Returns the number of tokens run."""
    if not prompts:
        return 0
    seqs = _tokenize(tokenizer, prompts)
    pad_id = _pad_id(tokenizer)
    for batch in _batches([len(s) for s in seqs], batch_size):
        ids, mask, positions = _left_pad([seqs[i] for i in batch], pad_id, model.device)
        model(input_ids=ids, attention_mask=mask, position_ids=positions, use_cache=False, logits_to_keep=1)
    return sum(len(s) for s in seqs)
