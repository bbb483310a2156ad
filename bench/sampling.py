"""The official protocol's sampling at greedy speed: mmla's continuous-batching sampler against padded
`model.generate` batches of the same size, same prompts, same sampling settings, in one run.

The official Qwen2 zero-shot script inherits Qwen2-Instruct's generation config (temperature 0.7, top_p 0.8, top_k
20, repetition penalty 1.05; the script allows 1,024 new tokens); here those settings are applied to the embedded
model with --max-new-tokens (default 256). Prompts: the official infer_script prompts of N real test rows (the first
N/k of each of k datasets), chat-wrapped by the model's template.

  padded   `model.generate(do_sample=True, ...)` on length-sorted, left-padded batches of --batch-size: every row of a
           batch waits for its longest answer (what sampling through `generate` costs)
  ours     mmla.engine.generate with the same Decoding: continuous batching (a row leaves at EOS, a queued prompt
           takes its place), transformers' logits processors, one random generator per row

    .venv/bin/python bench/sampling.py                      # CPU: embedded model, fp32, 2 threads, 96 prompts
"""

from __future__ import annotations

import argparse
import os
import platform
import shlex
import sys
import time
from pathlib import Path

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
import torch  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))
from results import emit  # noqa: E402  (bench/results.py)
from mmla import engine  # noqa: E402
from mmla.data import load_split  # noqa: E402
from mmla.inference import row_seed  # noqa: E402
from mmla.inputs import TextInputs  # noqa: E402
from mmla.models import load_model  # noqa: E402
from mmla.prompts import Decoding, render  # noqa: E402

DATA = os.environ.get("MMLA_DATA") or str(Path(__file__).resolve().parents[2] / "shared" / "data" / "mmla")
QWEN2_INSTRUCT = dict(do_sample=True, temperature=0.7, top_p=0.8, top_k=20, repetition_penalty=1.05)


@torch.inference_mode()
def padded(model, inputs: TextInputs, rows, decoding: Decoding, batch_size: int, seed: int) -> list[list[int]]:
    torch.manual_seed(seed)
    out: list[list[int] | None] = [None] * len(rows)
    eos = engine.eos_ids(model, inputs.tokenizer)
    for batch in engine._batches([len(r.ids) for r in rows], batch_size):
        ids, mask = engine._left_pad([rows[i].ids for i in batch], inputs.pad_id, model.device)
        gen = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=decoding.max_new_tokens,
                             do_sample=True, temperature=decoding.temperature, top_p=decoding.top_p,
                             top_k=decoding.top_k, repetition_penalty=decoding.repetition_penalty,
                             eos_token_id=eos, pad_token_id=inputs.pad_id)
        for i, toks in zip(batch, gen[:, ids.shape[1]:].tolist()):
            cut = next((k + 1 for k, t in enumerate(toks) if t in eos), len(toks))
            out[i] = toks[:cut]
    return out


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--data", default=DATA)
    ap.add_argument("--datasets", default="MELD,MOSI,MUStARD,AnnoMi-client")
    ap.add_argument("--n", type=int, default=96)
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--max-new-tokens", type=int, default=256)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    names = args.datasets.split(",")
    per = -(-args.n // len(names))
    model, tok = load_model(args.model, dtype="float32")
    inputs = TextInputs(model, tok)
    examples = [e for ds in names for e in load_split(Path(args.data), ds, "test").examples[:per]]
    prompts = inputs.chat([render(e.dataset, "infer_script", e.text) for e in examples], "official")
    rows = inputs.encode(prompts)
    decoding = Decoding(**QWEN2_INSTRUCT, max_new_tokens=args.max_new_tokens)
    seeds = [row_seed(args.seed, e.dataset, e.id) for e in examples]
    engine.generate(model, inputs, rows[:4], decoding=Decoding(max_new_tokens=2), batch_size=4)  # warm-up

    t = time.perf_counter()
    base = padded(model, inputs, rows, decoding, args.batch_size, args.seed)
    t_padded = time.perf_counter() - t
    lengths: dict[int, int] = {}

    def count(i: int, text: str) -> None:
        lengths[i] = len(tok(text, add_special_tokens=False)["input_ids"])

    t = time.perf_counter()
    engine.generate(model, inputs, rows, decoding=decoding, batch_size=args.batch_size, seeds=seeds,
                    on_result=count)
    t_ours = time.perf_counter() - t
    n = len(rows)
    result = {
        "command": "PYTHONPATH=src " + shlex.join([sys.executable.replace(str(Path.cwd()) + "/", ""), *sys.argv]),
        "device": f"cpu ({platform.processor() or platform.machine()}), {torch.get_num_threads()} threads",
        "model": args.model, "n": n, "batch_size": args.batch_size, "max_new_tokens": args.max_new_tokens,
        "sampling": QWEN2_INSTRUCT,
        "new_tokens_mean": {"padded": round(sum(map(len, base)) / n, 1),
                            "ours": round(sum(lengths.values()) / n, 1)},
        "rows_at_max_new_tokens": {"padded": sum(len(b) >= args.max_new_tokens for b in base),
                                   "ours": sum(v >= args.max_new_tokens for v in lengths.values())},
        "seconds": {"padded": round(t_padded, 2), "ours": round(t_ours, 2)},
        "samples_per_s": {"padded": round(n / t_padded, 3), "ours": round(n / t_ours, 3)},
        "speedup": round(t_padded / t_ours, 2),
    }
    return emit(result, args.out)


if __name__ == "__main__":
    main()
