"""The batched engine against transformers' own `generate` and a naive per-candidate forward."""

import csv
import os

import pytest
import torch

from mmla import engine
from mmla.models import load_model
from mmla.tiny import build_tiny_model
from mmla.inputs import TextInputs
from mmla.prompts import Decoding, candidates, chat_text, render


def _rows(data_root, ds, k):
    with open(data_root / ds / "test.tsv", encoding="utf-8", newline="") as f:
        return list(csv.DictReader(f, delimiter="\t"))[:k]


@pytest.fixture(scope="session")
def smollm2():
    return load_model("smollm2-135m")


@pytest.fixture(scope="session")
def tiny(tmp_path_factory):
    """Both tiny random architectures, loaded."""
    root = tmp_path_factory.mktemp("tiny")
    return {arch: load_model(build_tiny_model(arch, root / arch)) for arch in ("llama", "qwen2")}


def _real_prompts(tok, data_root, datasets, k):
    """(chat-wrapped prompt, candidate answers) for the first k test rows of each dataset."""
    out = []
    for ds in datasets:
        for r in _rows(data_root, ds, k):
            out.append((chat_text(tok, render(ds, "clean", r["text"]), "clean"), candidates(ds, "clean")))
    return out


def _one_at_a_time(model, tok, prompts, max_new_tokens):
    """The reference: transformers' generate, one prompt at a time, greedy; new token ids."""
    out = []
    for p in prompts:
        ids = tok(p, return_tensors="pt", add_special_tokens=False)["input_ids"]
        gen = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_new_tokens,
                             do_sample=False, pad_token_id=tok.pad_token_id)
        out.append(gen[0, ids.shape[1]:].tolist())
    return out


def _texts(tok, token_lists):
    return [tok.decode(t, skip_special_tokens=True) for t in token_lists]


# ---------------------------------------------------------------- generate


def test_greedy_matches_generate_on_real_prompts(smollm2, data_root):
    model, tok = smollm2
    prompts = [p for p, _ in _real_prompts(tok, data_root, ["MELD", "MOSI", "MUStARD"], 2)]
    got = {}
    # batch 2 on 6 prompts: rows leave at EOS (or at 16 tokens) and later prompts join the running batch
    texts = engine.generate(model, tok, prompts, max_new_tokens=16, batch_size=2, on_result=got.__setitem__)
    assert texts == _texts(tok, _one_at_a_time(model, tok, prompts, 16))
    assert got == dict(enumerate(texts))  # on_result saw every prompt once, with the returned text


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_greedy_matches_generate_on_tiny_models(tiny, arch):
    model, tok = tiny[arch]
    # Different lengths, so the batch has left padding and merged prompts get padded caches.
    prompts = [tok.apply_chat_template([{"role": "user", "content": "word " * n}], tokenize=False,
                                       add_generation_prompt=True) for n in (1, 9, 3, 14, 6, 2, 11)]
    want = _one_at_a_time(model, tok, prompts, 10)
    for batch_size in (1, 3, 16):
        assert engine.generate(model, tok, prompts, max_new_tokens=10, batch_size=batch_size) == _texts(tok, want)
    # Refilling at every free place exercises the cache merge and trim at each step.
    got = {}
    inputs = TextInputs(model, tok)
    rows = inputs.encode(prompts)
    choose = engine._Chooser(model, Decoding(max_new_tokens=10), None, [r.ids for r in rows])
    engine._decode(model, inputs, rows, 10, torch.tensor(engine.eos_ids(model, tok)), 3, choose, got.__setitem__,
                   refill_at=1)
    assert [got[i] for i in range(len(prompts))] == want


def test_eos_stops(tiny):
    model, tok = tiny["llama"]
    prompts = ["<|im_start|>user\nhello<|im_end|>\n<|im_start|>assistant\n", "a b c d e f"]
    free = _one_at_a_time(model, tok, prompts, 8)
    # Make the third token of the first answer an end-of-sequence token through the generation config
    # (the way chat models declare extra EOS ids); both generate paths must stop right after it.
    stop = free[0][2]
    assert stop not in free[0][:2]
    old = model.generation_config.eos_token_id
    model.generation_config.eos_token_id = [old, stop]
    try:
        want = _one_at_a_time(model, tok, prompts, 8)
        assert want[0] == free[0][:3]
        assert engine.generate(model, tok, prompts, max_new_tokens=8, batch_size=2) == _texts(tok, want)
    finally:
        model.generation_config.eos_token_id = old


def test_sampling_is_seeded(tiny):
    model, tok = tiny["qwen2"]
    prompts = ["one", "two three", "four five six"]
    kw = dict(max_new_tokens=6, do_sample=True, temperature=1.0, top_p=0.9, seed=3)
    a = engine.generate(model, tok, prompts, **kw)
    assert a == engine.generate(model, tok, prompts, **kw)
    assert a != engine.generate(model, tok, prompts, **{**kw, "seed": 4})


# ---------------------------------------------------------------- score


def _naive_scores(model, tok, prompt, cands, first_only=False):
    """Each candidate's summed token log-probs after the candidates' common token prefix, from full forwards."""
    joint = [tok(prompt + c, add_special_tokens=False)["input_ids"] for c in cands]
    k = len(os.path.commonprefix(joint))
    k = min(k, min(len(j) for j in joint) - 1)
    # One forward over all candidates, right-padded: padding after a sequence cannot affect it (causal).
    ids = torch.tensor([j + [0] * (max(map(len, joint)) - len(j)) for j in joint])
    logp = torch.log_softmax(model(ids).logits.float(), dim=-1)
    return [sum(logp[c, t - 1, j[t]].item() for t in range(k, k + 1 if first_only else len(j)))
            for c, j in enumerate(joint)]


def test_score_matches_naive_log_likelihood(smollm2, data_root):
    model, tok = smollm2
    # MELD-DA's labels share first tokens ("statement-opinion" / "statement-non-opinion"): a second pass;
    # the others differ at the first token.
    items = _real_prompts(tok, data_root, ["MELD-DA", "MELD", "MUStARD"], 1)
    prompts, cands = [p for p, _ in items], [c for _, c in items]
    full = engine.score(model, tok, prompts, cands, batch_size=2, shortcut=False)
    fast = engine.score(model, tok, prompts, cands, batch_size=2)
    with torch.inference_mode():
        for (p, c), f, s in zip(items, full, fast):
            naive = _naive_scores(model, tok, p, c)
            assert f.scores == pytest.approx(naive, abs=2e-3)
            assert f.best == max(range(len(c)), key=naive.__getitem__)
            if c[0].startswith("dialogue act"):
                assert s == f  # candidates share a first token: the shortcut does not apply
            else:
                assert s.scores == pytest.approx(_naive_scores(model, tok, p, c, first_only=True), abs=2e-3)


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_score_on_tiny_models(tiny, arch):
    model, tok = tiny[arch]
    # A candidate that is a prefix of another, repeated continuations, one-token and long candidates.
    prompts = ["Q: pick one\nA:", "Another, longer question here?\nA:", "x"]
    cands = [[" red", " red car", " blue car", " red carpet"], [" yes", " no", " yes!"], [" a b c", " a b d", " e"]]
    got = {}
    res = engine.score(model, tok, prompts, cands, batch_size=2, shortcut=False, on_result=got.__setitem__)
    assert got == dict(enumerate(res))
    with torch.inference_mode():
        for p, c, r in zip(prompts, cands, res):
            assert r.scores == pytest.approx(_naive_scores(model, tok, p, c), abs=1e-4)


def test_feeds_share_rows():
    # "1 2 3" is read off the row of "1 2 4 5" (both need "1 2" fed); a one-token candidate needs no row.
    feeds, serve = engine._feeds([[1, 2, 3], [1, 2, 4, 5], [6], [7, 8]])
    assert feeds == [(1, 2, 4), (7,)]
    assert serve == [0, 0, None, 1]


def test_batches_cut_where_padding_costs_more_than_a_forward():
    import random

    rng = random.Random(0)
    lengths = [rng.choice([90, 95, 100, 130, 135, 140]) + rng.randint(0, 5) for _ in range(200)]
    batches = engine._batches(lengths, 32)
    assert sorted(i for b in batches for i in b) == list(range(200))  # every row once
    assert all(1 <= len(b) <= 32 for b in batches)
    flat = [lengths[i] for b in batches for i in b]
    assert flat == sorted(flat, reverse=True)  # longest first
    run = lambda bs: sum(len(b) * max(lengths[i] for i in b) + 2 * 32 for b in bs)  # noqa: E731
    fixed = [sorted(range(200), key=lambda i: -lengths[i])[k : k + 32] for k in range(0, 200, 32)]
    assert run(batches) < run(fixed)
    assert len(engine._batches([7] * 70, 32)) == 3  # equal lengths: no padding to save, as few forwards as can be
    assert engine._batches([], 4) == [] and engine._batches([3], 4) == [[0]]


def test_prefill_only_counts_tokens(tiny):
    model, tok = tiny["llama"]
    prompts = ["a", "b c d", "e f"]
    assert engine.prefill_only(model, tok, prompts, batch_size=2) == sum(len(tok(p)["input_ids"]) for p in prompts)


def test_empty_input(tiny):
    model, tok = tiny["llama"]
    assert engine.generate(model, tok, []) == []
    assert engine.score(model, tok, [], []) == []
    assert engine.prefill_only(model, tok, []) == 0


# ---------------------------------------------------------------- sampling and logits processors


def test_greedy_applies_repetition_penalty_like_generate(tiny):
    model, tok = tiny["qwen2"]
    prompts = [tok.apply_chat_template([{"role": "user", "content": "word " * n}], tokenize=False,
                                       add_generation_prompt=True) for n in (1, 9, 3, 14)]
    want = []
    for p in prompts:
        ids = tok(p, return_tensors="pt", add_special_tokens=False)["input_ids"]
        gen = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=12, do_sample=False,
                             repetition_penalty=1.3, pad_token_id=tok.pad_token_id)
        want.append(tok.decode(gen[0, ids.shape[1]:], skip_special_tokens=True))
    got = engine.generate(model, tok, prompts, batch_size=3, decoding=Decoding(max_new_tokens=12,
                                                                                repetition_penalty=1.3))
    assert got == want
    assert got != engine.generate(model, tok, prompts, max_new_tokens=12, batch_size=3)  # the penalty matters


def test_sampled_rows_do_not_depend_on_the_batch(tiny):
    """A row draws from its own generator: the same answer at batch size 1 and 32, in any order of rows."""
    model, tok = tiny["qwen2"]
    prompts = [f"question {i}: " + "x " * (i % 7) for i in range(12)]
    dec = Decoding(do_sample=True, temperature=0.7, top_p=0.8, top_k=20, repetition_penalty=1.05, max_new_tokens=8)
    seeds = [1000 + i for i in range(12)]
    one = engine.generate(model, tok, prompts, batch_size=1, decoding=dec, seeds=seeds)
    many = engine.generate(model, tok, prompts, batch_size=32, decoding=dec, seeds=seeds)
    order = list(reversed(range(12)))
    shuffled = engine.generate(model, tok, [prompts[i] for i in order], batch_size=5, decoding=dec,
                               seeds=[seeds[i] for i in order])
    assert one == many == [shuffled[order.index(i)] for i in range(12)]
    assert len(set(one)) > 1
    assert one != engine.generate(model, tok, prompts, batch_size=4, decoding=dec, seeds=[s + 1 for s in seeds])


def test_sampler_first_token_distribution_matches_generate(tiny):
    """Over 2,000 draws for one prompt, the first sampled token follows generate's distribution (chi-square)."""
    from scipy.stats import chi2_contingency

    model, tok = tiny["llama"]
    prompt = "The speaker says: hello"
    n = 2000
    dec = Decoding(do_sample=True, temperature=2.0, top_k=8, max_new_tokens=1)
    ours = engine.generate(model, tok, [prompt] * n, batch_size=250, decoding=dec, seeds=list(range(n)))
    ids = tok(prompt, return_tensors="pt", add_special_tokens=False)["input_ids"]
    torch.manual_seed(0)
    with torch.inference_mode():
        gen = model.generate(input_ids=ids.expand(n, -1), attention_mask=torch.ones((n, ids.shape[1]), dtype=torch.long),
                             max_new_tokens=1, do_sample=True, temperature=2.0, top_k=8, pad_token_id=tok.pad_token_id)
    theirs = [tok.decode(t, skip_special_tokens=True) for t in gen[:, ids.shape[1]:].tolist()]
    cats = sorted(set(ours) | set(theirs))
    assert len(cats) >= 4  # a real spread of tokens, not one dominant answer
    table = [[ours.count(c) for c in cats], [theirs.count(c) for c in cats]]
    assert chi2_contingency(table).pvalue > 0.01


class _Pieces:
    """Rows that arrive in pieces (as mmla.prefetch.Arrivals hands the engine prepared chunks): piece k is ready
    only after the engine has asked `delay[k]` times without waiting."""

    def __init__(self, pieces, delay):
        self.pieces, self.delay, self.asked = list(pieces), list(delay), 0

    def take(self, wait):
        if not self.pieces:
            return None
        self.asked += 1
        if not wait and self.asked < self.delay[0]:
            return [], None
        self.asked = 0
        self.delay.pop(0)
        return self.pieces.pop(0)


@pytest.mark.parametrize("sample", [False, True])
def test_rows_that_arrive_while_others_decode(tiny, smollm2, sample):
    """Rows handed over in pieces while others decode (greedy on the real model, and sampled with per-row seeds)
    get the answers they get in one call; with nothing given up front, the first piece is waited for."""
    model, tok = smollm2 if not sample else tiny["qwen2"]
    prompts = [f"Question {i}: name a colour" + " and an animal" * (i % 4) + "." for i in range(11)]
    dec = Decoding(do_sample=sample, temperature=0.7, top_k=20, max_new_tokens=10)
    seeds = [500 + i for i in range(11)]
    whole = engine.generate(model, tok, prompts, batch_size=4, decoding=dec, seeds=seeds if sample else None)
    assert len(set(whole)) > 1  # rows tell apart: a mix-up of indices would show
    rows = TextInputs(model, tok).encode(prompts)
    cuts = [(0, 1), (1, 5), (5, 6), (6, 11)]
    pieces = [(rows[a:b], seeds[a:b] if sample else None) for a, b in cuts]
    seen = {}
    texts = engine.generate(model, tok, [], batch_size=4, decoding=dec, seeds=[] if sample else None,
                            more=_Pieces(pieces, [1, 3, 9, 2]), on_result=lambda i, t: seen.setdefault(i, t))
    assert texts == whole and seen == dict(enumerate(whole))
    # some rows given up front, the rest arriving
    head = engine.generate(model, tok, rows[:3], batch_size=4, decoding=dec, seeds=seeds[:3] if sample else None,
                           more=_Pieces([(rows[3:], seeds[3:] if sample else None)], [4]))
    assert head == whole
