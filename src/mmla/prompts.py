"""Prompt strings and chat wrapping.

`render` reproduces the released prompt strings byte for byte from a TSV row (every quirk comes
from the task registry); `chat_messages` / `chat_text` wrap a prompt the way the official inference
(protocol "official") or the tokenizer's own template (protocol "clean") does.
"""

from __future__ import annotations

from dataclasses import dataclass

from .tasks import PromptStyle, Task, get_task

PROTOCOLS = ("official", "clean")

QWEN_SYSTEM = "You are Qwen, created by Alibaba Cloud. You are a helpful assistant."
# Left in the official Llama-3 script from the Hugging Face example; it is part of the protocol.
LLAMA3_SYSTEM = "You are a pirate chatbot who always responds in pirate speak!"
# LLaMA-Factory's `qwen` training template; its `llama3` template has no default system prompt.
QWEN_TRAIN_SYSTEM = "You are a helpful assistant."


def _case(label: str, case: str) -> str:
    return label.capitalize() if case == "capitalized" else label


def _labels(task: Task, style: PromptStyle) -> tuple[str, ...]:
    return style.labels if style.labels is not None else task.labels


def render(task: Task | str, family: str, text: str, split: str = "test", modality: str = "text") -> str:
    """The prompt for one utterance, before any chat wrapping. `text` is used verbatim."""
    task = get_task(task) if isinstance(task, str) else task
    s = task.style(family, split, modality)
    labels = s.joiner.join(_case(l, s.label_case) for l in _labels(task, s))
    t = s.task_words
    return (
        f"{s.lead}{text}{s.ask} the {t} of this speaker?\n"
        f"The candidate labels for {t} are: [{labels}].{s.before_respond}"
        f"Respond in the format: '{t}: [label]'.{s.before_only}Only one label should be provided."
    )


def target(task: Task | str, family: str, label: str, split: str = "test", modality: str = "text") -> str:
    """The answer string of the released training files, e.g. 'emotion: sadness', 'intent: Praise'."""
    task = get_task(task) if isinstance(task, str) else task
    s = task.style(family, split, modality)
    return f"{s.task_words}: {_case(label.lower(), s.answer_case)}"


def candidates(task: Task | str, family: str, split: str = "test", modality: str = "text") -> list[str]:
    """One answer string per gold label (score mode ranks these), in the task's label order."""
    task = get_task(task) if isinstance(task, str) else task
    return [target(task, family, l, split, modality) for l in task.labels]


# ---------------------------------------------------------------- chat wrapping


def _has_token(tokenizer, token: str) -> bool:
    i = tokenizer.convert_tokens_to_ids(token)
    return i is not None and i != tokenizer.unk_token_id


def model_kind(tokenizer) -> str:
    """'qwen' | 'llama3' | 'other': which official inference script applies to this model.
    (Token look-ups, not `get_vocab()`, which builds a dict of the whole vocabulary: 45 ms for 49k tokens.)"""
    if _has_token(tokenizer, "<|eot_id|>") and _has_token(tokenizer, "<|start_header_id|>"):
        return "llama3"
    if _has_token(tokenizer, "<|im_start|>") and _has_token(tokenizer, "<|endoftext|>") and len(tokenizer) > 150000:
        return "qwen"
    return "other"


@dataclass
class Decoding:
    """How to decode; recorded in the run config."""

    do_sample: bool = False
    temperature: float | None = None
    top_p: float | None = None
    top_k: int | None = None
    repetition_penalty: float | None = None
    max_new_tokens: int = 64


def chat_messages(prompt: str, protocol: str, kind: str, *, training: bool = False) -> list[dict]:
    if protocol not in PROTOCOLS:
        raise ValueError(f"unknown protocol '{protocol}' (known: {', '.join(PROTOCOLS)})")
    system = None
    if protocol == "official":
        if training:
            system = QWEN_TRAIN_SYSTEM if kind == "qwen" else None
        elif kind == "qwen":
            system = QWEN_SYSTEM
        elif kind == "llama3":
            system = LLAMA3_SYSTEM
    msgs = [{"role": "system", "content": system}] if system else []
    return msgs + [{"role": "user", "content": prompt}]


def chat_text(tokenizer, prompt: str, protocol: str, *, training: bool = False) -> str:
    """The full model input string, ending with the assistant turn's header."""
    msgs = chat_messages(prompt, protocol, model_kind(tokenizer), training=training)
    return tokenizer.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)
