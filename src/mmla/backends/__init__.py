"""Inference backends: what the predict loop (mmla.inference) runs its prompts on, behind one interface.

A backend is built from plain values (`Options`), turns the protocol's prompts (and a video row's frames) into
whatever it runs (`prepare`), says how far a row overruns the model's context (`excess`), answers the rows
(`generate` greedy, `sample` with a per-row seed, `score` candidate continuations), reporting each finished row
at once, and says what it is for env.json (`describe`). The loop never asks which backend it holds.

The registry maps a `--backend` name to "module:factory"; a module is imported only when its backend is chosen,
so a backend's own dependencies (openai, vllm, ...) are needed only by the runs that use it. Adding a backend is
one file in this package and one line in BACKENDS (or `register(name, factory)` from outside the package).
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from typing import Any, Callable, NamedTuple, Protocol, runtime_checkable


class Scored(NamedTuple):
    best: int  # index of the highest-scoring candidate
    scores: list[float]  # per candidate: summed log-probability of its tokens after the shared prefix


@dataclass
class Options:
    """Everything a backend is built from: plain values, no run config."""

    model: str
    modality: str = "text"  # text | video | audio | av (resolved before the backend is built)
    frames: dict | None = None  # video, av: the frame setting: name + overrides (the predict loop resolves the name)
    audio: dict | None = None  # audio, av: overrides of the audio setting (max_seconds, interleave; None: the family's)
    family: Any = None  # the model family's row (mmla.resolve.ModelFamily), None when the model has none
    protocol: str = "official"  # the protocol that applies (clean when the model has no official row)
    adapter: str | None = None
    dtype: str = "auto"
    device: str = "auto"
    trust_remote_code: bool = False
    placement: dict | None = None  # load_model's device_map / max_memory / offload_folder
    base_url: str | None = None  # a server's /v1 URL
    api_key_env: str | None = None  # the NAME of the environment variable holding the key
    concurrency: int = 8  # requests in flight


@runtime_checkable
class Backend(Protocol):
    """What the predict loop calls. Rows are whatever `prepare` returned; `on_result(i, value)` gets row i's
    answer (a string, or a Scored) as soon as it is done, in any order.

    Optional: a backend with `streams = True` takes `more=` in generate and sample (an mmla.engine.Arrivals: rows
    that arrive while these run, numbered after them), so that the clips of the next chunks join a running batch;
    without it the loop calls generate once per chunk."""

    modality: str  # "text", "video", "audio" or "av": what `prepare` takes
    setting: Any  # video, av: the frame setting its rows use (None otherwise)
    audio: dict | None  # audio, av: the audio setting its rows use, as recorded (None otherwise)
    kind: str  # the protocol's model kind (mmla.prompts.model_kind): qwen | llama3 | other
    generation_config: Any  # the checkpoint's generation config, or None
    context_length: int | None  # the model's context in tokens, None when not known here

    def prepare(self, prompts: list[str], protocol: str, frames: list | None = None,
                candidates: list[list[str]] | None = None, histories: list | None = None) -> list:
        """`histories`: per prompt, earlier (user, assistant) turns that come before it (or None)."""

    def load_clip(self, path, cache) -> Any:
        """One clip's media as `prepare` takes it (frames, a waveform, or both), through the frame cache; raises
        mmla.video.ClipError with the reason."""

    def clip_fields(self, media) -> dict:
        """What a row records of its loaded clip beyond the clip itself (audio: whether it had a sound track)."""

    def heads(self, rows: list) -> list[str]:
        """Per prepared row, its prompt decoded back to text (special tokens kept), as a script that decodes the
        whole sequence prints it before the answer ("" where the backend cannot tell)."""

    def excess(self, rows: list, new_tokens: int) -> list[int]:
        """Per prepared row: the tokens by which it and `new_tokens` answer tokens overrun the model's context
        (0: it fits, or the context is not known here)."""

    def generate(self, rows: list, *, decoding, batch_size: int, on_result: Callable[[int, str], None]) -> None: ...

    def sample(self, rows: list, *, decoding, seeds: list[int], batch_size: int,
               on_result: Callable[[int, str], None]) -> None: ...

    def score(self, rows: list, *, batch_size: int, on_result: Callable[[int, Scored], None]) -> None: ...

    def describe(self) -> dict: ...


BACKENDS: dict[str, str | Callable[[Options], Backend]] = {
    "local": "mmla.backends.local:LocalBackend",  # the model in this process (mmla.engine)
    "openai": "mmla.backends.openai:OpenAIBackend",  # any OpenAI-compatible server (vLLM, SGLang, a hosted API)
}


def frame_setting_for(frames: dict | None):
    """The run's frame setting: the named one (official-infer when unnamed), with the overrides."""
    from ..video import frame_setting

    frames = dict(frames or {})
    name = frames.pop("name", None) or "official-infer"
    return frame_setting(name, **frames)


def register(name: str, factory: Callable[[Options], Backend] | str) -> None:
    """Make `--backend NAME` build its backend with factory(options) (or "module:callable")."""
    BACKENDS[name] = factory


def names() -> tuple[str, ...]:
    return tuple(BACKENDS)


def create(name: str, options: Options) -> Backend:
    if name not in BACKENDS:
        raise ValueError(f"--backend must be one of {', '.join(BACKENDS)}, got '{name}'")
    factory = BACKENDS[name]
    if isinstance(factory, str):
        module, attr = factory.split(":")
        factory = getattr(importlib.import_module(module), attr)
    return factory(options)
