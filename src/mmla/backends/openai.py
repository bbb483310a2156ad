"""Any OpenAI-compatible server as an inference backend: vLLM, SGLang, TGI, llama.cpp, `transformers serve`,
or a hosted API (GPT-4o).

Large models are served by the engines built for them (`vllm serve --tensor-parallel-size 8`); mmla only sends
the same chat messages and decoding it would use locally, through the `openai` client, N requests in flight, and
reports each finished sample at once so that the caller can append it to predictions.jsonl (a rerun resumes).

Retrying 429 and 5xx responses and lost connections is the client's own bounded retry with backoff. Whatever
still fails ends the run with one line (`OpenAIBackendError`, a ValueError), after every sample that did finish
has been reported. The API key is read from the named environment variable and kept only in the client.
"""

from __future__ import annotations

import base64
import io
import os
import re
from concurrent.futures import CancelledError, ThreadPoolExecutor, as_completed
from pathlib import Path
from types import SimpleNamespace
from typing import Any, Callable

from ..prompts import Decoding, chat_messages, model_kind
from . import Options, Scored, frame_setting_for

VIDEO_INPUTS = ("frames-jpeg", "frames-png", "video_url")
NO_KEY = "EMPTY"  # local servers want no key, but the client insists on one (vLLM's convention)


class OpenAIBackendError(ValueError):
    """One line: the server's URL and what went wrong."""


def _first_line(text: Any, limit: int = 200) -> str:
    s = str(text or "").strip()
    s = s.splitlines()[0] if s else ""
    return s[:limit]


def api_key(env: str | None) -> str:
    if not env:
        return NO_KEY
    key = os.environ.get(env)
    if not key:
        raise OpenAIBackendError(f"--api-key-env {env}: the environment variable {env} is not set or empty")
    return key


class OpenAIBackend:
    """The backend for an OpenAI-compatible server: prompts become chat messages (the protocol's system turn + the
    user turn), a video row's frames become image parts; one request per row, `concurrency` in flight, each answer
    reported as it finishes. Score mode tokenises prompt + candidate here (it needs the model's tokenizer) and
    ranks from the prompt log-probabilities of the completions endpoint."""

    def __init__(self, options: Options, max_retries: int = 5, timeout: float = 600.0,
                 video_input: str = "frames-jpeg"):
        import openai

        base_url, concurrency = options.base_url, options.concurrency
        if not base_url:
            raise OpenAIBackendError("--backend openai needs --base-url (e.g. http://127.0.0.1:8000/v1)")
        if not re.match(r"^https?://", base_url or ""):
            raise OpenAIBackendError(f"--base-url must be an http(s) URL such as http://127.0.0.1:8000/v1, "
                                     f"got {base_url!r}")
        if int(concurrency) < 1:
            raise OpenAIBackendError(f"--concurrency must be a positive integer, got {concurrency}")
        if video_input not in VIDEO_INPUTS[:2]:  # the predict loop sends the run's frames
            raise OpenAIBackendError(f"video input must be frames-jpeg or frames-png, got '{video_input}'")
        self.base_url = base_url.rstrip("/")
        self.model = options.model
        self.api_key_env = options.api_key_env
        self.concurrency = int(concurrency)
        self.max_retries = int(max_retries)
        self.client = openai.OpenAI(base_url=self.base_url, api_key=api_key(options.api_key_env),
                                    max_retries=max_retries, timeout=timeout)
        self.served: list[str] | None = None
        self.server_model: str | None = None
        self.system_fingerprint: str | None = None
        self.check()
        self.tokenizer = local_tokenizer(self.model)
        self.kind = model_kind(self.tokenizer) if self.tokenizer is not None else kind_from_name(self.model)
        self.generation_config = generation_config(self.model, self.kind)
        self.modality = options.modality
        self.row = options.family  # from --paper-model: a served model's config is not read here
        self.context_length = None  # the server knows it (and refuses a request past it, in one line)
        self.setting = frame_setting_for(options.frames) if self.modality == "video" else None
        self.audio = None  # servers are sent text and frames only
        self.video_input = video_input if self.modality == "video" else None

    # ---------------------------------------------------------------- the predict loop's calls

    def _messages(self, prompt: str, protocol: str, history=None) -> list[dict]:
        """The protocol's system turn (the family row's under official, else by model kind), earlier turns, the
        prompt."""
        if protocol == "official" and self.row is not None:
            msgs = [{"role": "system", "content": self.row.system}] if self.row.system else []
            msgs.append({"role": "user", "content": prompt})
        else:
            msgs = chat_messages(prompt, protocol, self.kind)
        past = [{"role": role, "content": text}
                for turn in history or () for role, text in zip(("user", "assistant"), turn)]
        return msgs[:-1] + past + msgs[-1:]

    def prepare(self, prompts, protocol, frames=None, candidates=None, histories=None):
        messages = [self._messages(p, protocol, h) for p, h in zip(prompts, histories or [None] * len(prompts))]
        if candidates is not None:
            if self.modality == "video":
                raise OpenAIBackendError("--mode score with video is not offered over the API (servers return no "
                                         "prompt log-probabilities of image parts)")
            if self.tokenizer is None:
                raise OpenAIBackendError("--mode score over the API needs the model's tokenizer here (chat template "
                                         "and token ids): pass --model as a local directory")
            texts = [self.tokenizer.apply_chat_template(m, tokenize=False, add_generation_prompt=True)
                     for m in messages]
            return list(zip(texts, candidates))
        if self.modality != "video":
            return messages
        return [video_messages(m, frames=f, video_input=self.video_input) for m, f in zip(messages, frames)]

    def excess(self, rows, new_tokens: int) -> list[int]:
        return [0] * len(rows)  # the server knows its context (and refuses a request past it, in one line)

    def load_clip(self, path, cache):
        from ..video import load_frames

        return load_frames(path, self.setting, cache)

    def clip_fields(self, media) -> dict:
        return {}

    def heads(self, rows) -> list[str]:
        return [""] * len(rows)  # the server decodes only what it generated

    def generate(self, rows, *, decoding, batch_size, on_result) -> None:
        self.sample(rows, decoding=decoding, seeds=None, batch_size=batch_size, on_result=on_result)

    def sample(self, rows, *, decoding, seeds, batch_size, on_result) -> None:
        params = request_params(decoding, 0)

        def job(k: int, msgs: list[dict]) -> Callable[[], str]:
            def call() -> str:
                seed = int(seeds[k]) % (2 ** 31) if seeds is not None else 0  # the row's own seed
                r = self.client.chat.completions.create(model=self.model, messages=msgs, **{**params, "seed": seed})
                self._note(r)
                return r.choices[0].message.content or ""
            return call

        self._map([job(k, m) for k, m in enumerate(rows)], on_result)

    def score(self, rows, *, batch_size, on_result) -> None:
        self._score([t for t, _ in rows], [c for _, c in rows], on_result, tokenizer=self.tokenizer)

    def describe(self) -> dict:
        """env.json: no local device; the server, whose model id and fingerprint come with its first answer."""
        return {"device": None, "server": self.info()}

    # ---------------------------------------------------------------- errors

    def _error(self, e: BaseException) -> OpenAIBackendError:
        import openai

        where = f"{self.base_url} (model '{self.model}')"
        if isinstance(e, OpenAIBackendError):
            return e
        if isinstance(e, openai.AuthenticationError):
            how = f"the key in ${self.api_key_env}" if self.api_key_env else "no key (pass --api-key-env VAR)"
            return OpenAIBackendError(f"{where}: 401 unauthorized, {how} was refused: {_first_line(e.message)}")
        if isinstance(e, openai.PermissionDeniedError):
            return OpenAIBackendError(f"{where}: 403 forbidden: {_first_line(e.message)}")
        if isinstance(e, openai.NotFoundError):
            return OpenAIBackendError(f"{where}: 404 not found (unknown model, or not the /v1 base URL of an "
                                      f"OpenAI-compatible server): {_first_line(e.message)}")
        if isinstance(e, (openai.APITimeoutError, openai.APIConnectionError)):
            cause = e.__cause__ or e
            return OpenAIBackendError(
                f"{where}: no answer after {self.max_retries} retries ({type(cause).__name__}: "
                f"{_first_line(cause) or 'connection failed'}); finished samples are saved, rerun to resume")
        if isinstance(e, (openai.RateLimitError, openai.InternalServerError)):
            return OpenAIBackendError(f"{where}: HTTP {e.status_code} after {self.max_retries} retries: "
                                      f"{_first_line(e.message)}; finished samples are saved, rerun to resume")
        if isinstance(e, openai.APIStatusError):
            return OpenAIBackendError(f"{where}: HTTP {e.status_code}: {_first_line(e.message)}")
        return OpenAIBackendError(f"{where}: {type(e).__name__}: {_first_line(e)}")

    # ---------------------------------------------------------------- server

    def check(self) -> None:
        """Fail early, with one line, on a wrong URL, a refused key or a model the server does not serve."""
        try:
            self.served = [m.id for m in self.client.models.list()]
        except Exception as e:  # noqa: BLE001 - every failure becomes one line
            raise self._error(e) from None
        if self.served and self.model not in self.served:
            shown = ", ".join(self.served[:5]) + (", ..." if len(self.served) > 5 else "")
            raise OpenAIBackendError(f"{self.base_url}: model '{self.model}' is not served there (it serves: {shown})")

    def info(self) -> dict:
        """What env.json records about the server; the key is never part of it."""
        return {"backend": "openai", "base_url": self.base_url, "model": self.model, "served_models": self.served,
                "server_model": self.server_model, "system_fingerprint": self.system_fingerprint,
                "api_key_env": self.api_key_env, "concurrency": self.concurrency, "max_retries": self.max_retries,
                "video_input": self.video_input}

    # ---------------------------------------------------------------- requests

    def _map(self, jobs: list[Callable[[], Any]], on_result: Callable[[int, Any], None]) -> None:
        """Run jobs with `concurrency` in flight; on_result(i, value) in this thread as each finishes. On the first
        failure nothing new starts, what is in flight is awaited (and reported if it succeeds), then it raises."""
        failure: BaseException | None = None
        with ThreadPoolExecutor(self.concurrency, thread_name_prefix="mmla-openai") as pool:
            futures = {pool.submit(job): i for i, job in enumerate(jobs)}
            try:
                for f in as_completed(futures):
                    try:
                        value = f.result()
                    except CancelledError:
                        continue
                    except Exception as e:  # noqa: BLE001 - reported as one line below
                        if failure is None:
                            failure = e
                            for g in futures:
                                g.cancel()
                        continue
                    on_result(futures[f], value)
            except BaseException:  # Ctrl-C: start nothing new
                for g in futures:
                    g.cancel()
                raise
        if failure is not None:
            raise self._error(failure) from None

    def _note(self, response) -> None:
        if self.server_model is None:
            self.server_model = getattr(response, "model", None)
        if self.system_fingerprint is None:
            self.system_fingerprint = getattr(response, "system_fingerprint", None) or None

    def _score(self, prompts: list[str], candidates: list[list[str]], on_result: Callable[[int, Scored], None],
               *, tokenizer) -> None:
        """Rank candidates as mmla.engine.score does, from the prompt log-probabilities of the completions endpoint
        (echo, logprobs, one token): prompt + candidate is tokenized here, jointly, and sent as token ids; a
        candidate's score is the sum of its tokens' log-probabilities after the token prefix all candidates share."""
        if tokenizer is None:
            raise OpenAIBackendError(f"{self.base_url}: --mode score over the API needs the model's tokenizer here "
                                     f"(chat template and token ids): pass --model as a local directory")
        jobs = []
        for prompt, cands in zip(prompts, candidates):
            ids = tokenizer([prompt + c for c in cands], add_special_tokens=False)["input_ids"]
            jobs.append(lambda ids=ids: rank(ids, self._prompt_logprobs(ids)))
        if jobs:
            self._probe_logprobs(jobs[0])
        self._map(jobs, on_result)

    def _prompt_logprobs(self, ids: list[list[int]]) -> list[list[float | None]]:
        r = self.client.completions.create(model=self.model, prompt=ids, echo=True, logprobs=1, max_tokens=1,
                                           temperature=0)
        self._note(r)
        out: list[list[float | None] | None] = [None] * len(ids)
        for c in r.choices:
            lp = c.logprobs.token_logprobs if c.logprobs is not None else None
            if not lp or len(lp) < len(ids[c.index]):
                raise OpenAIBackendError(self._no_logprobs())
            out[c.index] = lp[: len(ids[c.index])]  # prompt tokens only; the one generated token is dropped
        if any(o is None for o in out):
            raise OpenAIBackendError(self._no_logprobs())
        return out

    def _no_logprobs(self) -> str:
        return (f"{self.base_url} (model '{self.model}'): the server gives no prompt log-probabilities (completions "
                f"with echo and logprobs over token ids), so --mode score cannot run there; use --mode generate")

    def _probe_logprobs(self, job: Callable[[], Scored]) -> None:
        import openai

        try:
            job()
        except (openai.BadRequestError, openai.UnprocessableEntityError, openai.NotFoundError):
            raise OpenAIBackendError(self._no_logprobs()) from None
        except Exception as e:  # noqa: BLE001
            raise self._error(e) from None


def rank(ids: list[list[int]], logprobs: list[list[float | None]]) -> Scored:
    """mmla.engine.score's ranking from per-token prompt log-probabilities: the sum over each candidate's tokens
    after the longest token prefix that all candidates share (leaving each at least one token of its own), or only
    the first of them when those already differ for every candidate (the engine's shortcut)."""
    k = min(len(os.path.commonprefix(ids)), min(len(s) for s in ids) - 1)
    if len({s[k] for s in ids}) == len(ids):  # the engine's shortcut: the first own token already decides
        scores = [float(lp[k] or 0.0) for lp in logprobs]
    else:
        scores = [float(sum(x or 0.0 for x in lp[k:])) for lp in logprobs]
    return Scored(best=max(range(len(scores)), key=scores.__getitem__), scores=scores)


def request_params(decoding: Decoding, seed: int) -> dict:
    """Decoding -> chat completion parameters. Greedy is temperature 0; a sampled decoding sends the values it
    has and leaves the rest to the server (whose defaults are the checkpoint's generation config on vLLM)."""
    p: dict = {"max_tokens": int(decoding.max_new_tokens), "seed": int(seed)}
    if not decoding.do_sample:
        p["temperature"] = 0.0
    else:
        if decoding.temperature is not None:
            p["temperature"] = float(decoding.temperature)
        if decoding.top_p is not None:
            p["top_p"] = float(decoding.top_p)
    return p


# ---------------------------------------------------------------- model, prompts, decoding


def local_tokenizer(model: str):
    """The model's tokenizer when it is here (a directory, or a hub id already cached), else None."""
    from transformers import AutoTokenizer

    try:
        if Path(model).is_dir():
            return AutoTokenizer.from_pretrained(model)
        return AutoTokenizer.from_pretrained(model, local_files_only=True)
    except Exception:  # noqa: BLE001 - a hosted model has no tokenizer here; the name decides then
        return None


def kind_from_name(model: str) -> str:
    name = model.lower()
    if re.search(r"llama-?3", name):
        return "llama3"
    if "qwen" in name:
        return "qwen"
    return "other"


def generation_config(model: str, kind: str):
    """The checkpoint's generation config when the model is here (official Qwen2 decoding inherits it); else, for
    Qwen, "sample with the server's defaults" (vLLM reads the same config), else None."""
    try:
        from transformers import GenerationConfig

        return GenerationConfig.from_pretrained(model, local_files_only=True)
    except Exception:  # noqa: BLE001 - a remote model: no generation config here
        return SimpleNamespace(do_sample=True) if kind == "qwen" else None


# ---------------------------------------------------------------- video


def _image_url(frame, fmt: str) -> str:
    from PIL import Image

    buf = io.BytesIO()
    if fmt == "jpeg":
        Image.fromarray(frame).save(buf, format="JPEG", quality=95)
    else:
        Image.fromarray(frame).save(buf, format="PNG")
    return f"data:image/{fmt};base64,{base64.b64encode(buf.getvalue()).decode()}"


def video_messages(messages: list[dict], *, frames=None, clip: str | os.PathLike | None = None,
                   video_input: str = "frames-jpeg") -> list[dict]:
    """The protocol's messages with the clip put before the text of the user turn: the run's frames as image
    parts (JPEG or PNG data URLs), or the whole clip as a `video_url` part (vLLM serves Qwen2-VL that way)."""
    if video_input not in VIDEO_INPUTS:
        raise OpenAIBackendError(f"video input must be one of {', '.join(VIDEO_INPUTS)}, got '{video_input}'")
    if video_input == "video_url":
        data = base64.b64encode(Path(clip).read_bytes()).decode()
        media = [{"type": "video_url", "video_url": {"url": f"data:video/mp4;base64,{data}"}}]
    else:
        fmt = video_input.split("-")[1]
        media = [{"type": "image_url", "image_url": {"url": _image_url(f, fmt)}} for f in frames.array]
    out = [dict(m) for m in messages]
    user = out[-1]
    user["content"] = media + [{"type": "text", "text": user["content"]}]
    return out
