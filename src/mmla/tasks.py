"""The 12 MMLA tasks: one declarative entry per dataset.

This is the single source of truth for labels, task words and the per-file quirks of the
released prompts. Prompts, the parser, metrics and training all read from here.

The official prompt files are not uniform (see ../shared/PROTOCOL.md): the task words shown to the
model, the label casing, the label separator and a few spaces differ per dataset, per file family and
even per split. Each quirk is written down below as data, next to the dataset it belongs to, so that
rendering a row reproduces the released string byte for byte.
"""

from __future__ import annotations

from dataclasses import dataclass, field

# Families of prompt strings.
#   llamafactory_text   text-only LLaMA-Factory train/dev files (what the official LLM fine-tuning trains on)
#   llamafactory_video  LLaMA-Factory video train/dev files (MLLM fine-tuning), "<video>" first
#   swift_video_prompt  the ms-swift video prompt files (the released test prompts)
#   infer_script        the string the official zero-shot infer.py builds at run time (also used after SFT/IT):
#                       P-A of ../shared/OFFICIAL_MODELS.md (LLMs, Qwen2-VL, VideoLLaMA2)
#   infer_script_llava  the LLaVA-NeXT infer.py's string (P-B): one space before "Only", Ch-sims offered 3 labels
#   clean               our consistent wording with the correct label lists (recommended for new work)
# (Named PROMPT_FAMILIES: the model families, which pick one of these per model, are mmla.resolve.MODEL_FAMILIES.)
PROMPT_FAMILIES = ("llamafactory_text", "llamafactory_video", "swift_video_prompt", "infer_script",
                   "infer_script_llava", "clean")

SPLITS = ("train", "dev", "test")

DIMENSIONS = {
    "intent": "intent",
    "emotion": "emotion",
    "dialogue_act": "dialogue act",
    "sentiment": "sentiment",
    "speaking_style": "speaking style",
    "communication_behavior": "communication behavior",
}

TEXT_LEAD = "The speaker says: "
VIDEO_LEAD = "You are presented with a video in which the speaker says: "
ASK_TEXT = " Based on the text, what is"
ASK_VIDEO = " Based on the text, video, and audio content, what is"


@dataclass(frozen=True)
class PromptStyle:
    """Everything that varies between the released prompt strings.

    Rendered as:
      {lead}{text}{ask} the {T} of this speaker?\\n
      The candidate labels for {T} are: [{labels joined}].{before_respond}Respond in the format: '{T}: [label]'.
      {before_only}Only one label should be provided.
    and the answer (training target) as '{T}: {label}'.
    """

    task_words: str
    lead: str = VIDEO_LEAD
    ask: str = ASK_VIDEO
    label_case: str = "lower"  # casing of the candidate list: lower | capitalized
    answer_case: str = "lower"  # casing of the label in the target string
    joiner: str = ", "
    before_respond: str = " "
    before_only: str = " "
    labels: tuple[str, ...] | None = None  # overrides the task's label list (infer_script's Ch-sims defect)


@dataclass(frozen=True)
class Task:
    name: str
    task: str  # intent | emotion | dialogue_act | sentiment | speaking_style | communication_behavior
    labels: tuple[str, ...]  # official order; lower case
    has_video: bool  # videos released (MLLM experiments use only these 9)
    splits: tuple[str, ...] = SPLITS
    # per-family overrides of PromptStyle fields; a "splits" key holds per-split overrides on top
    quirks: dict = field(default_factory=dict)

    @property
    def task_words(self) -> str:
        """The task as shown to the model, underscores turned into spaces."""
        return DIMENSIONS[self.task]

    def style(self, family: str, split: str = "test", modality: str = "text") -> PromptStyle:
        if family not in PROMPT_FAMILIES:
            raise ValueError(f"unknown prompt family '{family}' (known: {', '.join(PROMPT_FAMILIES)})")
        base = _family_defaults(self, family, modality)
        over = dict(self.quirks.get(family, {}))
        per_split = over.pop("splits", {}).get(split, {})
        return PromptStyle(**{**base, **over, **per_split})


def _family_defaults(task: Task, family: str, modality: str) -> dict:
    if family == "llamafactory_text":
        # The text files write the raw task name (dialogue_act, speaking_style) and most omit the
        # space before "Only one label"; datasets that have it set before_only=" " below.
        return dict(task_words=task.task, lead=TEXT_LEAD, ask=ASK_TEXT, before_only="")
    if family == "llamafactory_video":
        return dict(task_words=task.task_words, lead="<video>" + VIDEO_LEAD)
    if family == "swift_video_prompt":
        return dict(task_words=task.task)
    if family == "infer_script":
        # infer.py: f"...says: {text}. Based on ...[{labels}].Respond ...'.  Only one ..."
        return dict(task_words=task.task_words, ask="." + ASK_VIDEO, before_respond="", before_only="  ")
    if family == "infer_script_llava":
        # LLaVA-NeXT/infer.py: the same f-string with one space before "Only" (its label table has Ch-sims' 3 labels)
        return dict(task_words=task.task_words, ask="." + ASK_VIDEO, before_respond="", before_only=" ")
    # clean: one wording for every dataset, the correct label list, the words a person would read
    if modality in ("video", "audio", "av"):  # a clip with its sound: the video wording names all three
        return dict(task_words=task.task_words)
    return dict(task_words=task.task_words, lead=TEXT_LEAD, ask=ASK_TEXT)


_DA = (
    "greeting", "question", "answer", "statement-opinion", "statement-non-opinion", "apology",
    "command", "agreement", "disagreement", "acknowledge", "backchannel", "others",
)

_TASKS = [
    Task(
        "MIntRec", "intent",
        ("complain", "praise", "apologise", "thank", "criticize", "agree", "taunt", "flaunt", "joke",
         "oppose", "comfort", "care", "inform", "advise", "arrange", "introduce", "leave", "prevent",
         "greet", "ask for help"),
        has_video=True,
        quirks={"llamafactory_text": dict(before_only=" ", label_case="capitalized", answer_case="capitalized")},
    ),
    Task(
        "MIntRec2.0", "intent",
        ("acknowledge", "advise", "agree", "apologise", "arrange", "ask for help", "asking for opinions",
         "care", "comfort", "complain", "confirm", "criticize", "doubt", "emphasize", "explain", "flaunt",
         "greet", "inform", "introduce", "invite", "joke", "leave", "oppose", "plan", "praise", "prevent",
         "refuse", "taunt", "thank", "warn"),
        has_video=True,
        quirks={"llamafactory_text": dict(before_only=" ", label_case="capitalized", answer_case="capitalized")},
    ),
    Task(
        "MELD", "emotion", ("neutral", "surprise", "fear", "sadness", "joy", "anger", "disgust"),
        has_video=True,
        quirks={"llamafactory_text": dict(before_only=" ")},
    ),
    Task(
        "IEMOCAP", "emotion", ("angry", "happy", "sad", "neutral", "frustrated", "excited"),
        has_video=False,
        quirks={
            "llamafactory_text": dict(answer_case="capitalized"),
            # The Swift IEMOCAP files glue ".Based on the text" to the utterance and never mention video.
            "swift_video_prompt": dict(ask=".Based on the text, what is", before_only="", answer_case="capitalized"),
        },
    ),
    Task("MELD-DA", "dialogue_act", _DA, has_video=True, quirks={"llamafactory_text": dict(before_only=" ")}),
    Task("IEMOCAP-DA", "dialogue_act", _DA, has_video=False),
    Task("MOSI", "sentiment", ("positive", "negative"), has_video=False),
    Task(
        "Ch-sims", "sentiment", ("neutral", "positive", "negative"),
        has_video=True,
        quirks={
            "llamafactory_text": dict(answer_case="capitalized"),
            # Known defect of the official infer.py: it offers only two labels; the gold data has three.
            "infer_script": dict(labels=("positive", "negative")),
        },
    ),
    Task("UR-FUNNY", "speaking_style", ("humorous", "serious"), has_video=True),
    Task("MUStARD", "speaking_style", ("sincere", "sarcastic"), has_video=True),
    Task(
        "AnnoMi-client", "communication_behavior", ("neutral", "change", "sustain"),
        has_video=True,
        quirks={
            "llamafactory_text": dict(task_words="talk_type"),
            "swift_video_prompt": dict(splits={s: dict(task_words="talk_type") for s in ("train", "dev")}),
        },
    ),
    Task(
        "AnnoMi-therapist", "communication_behavior", ("question", "therapist_input", "reflection", "other"),
        has_video=True,
        quirks={
            "llamafactory_text": dict(task_words="therapist_behaviour"),
            # The Swift train/dev files print the candidate list with no separator at all.
            "swift_video_prompt": dict(
                splits={s: dict(task_words="therapist_behaviour", joiner="") for s in ("train", "dev")}
            ),
        },
    ),
]

TASKS: dict[str, Task] = {t.name: t for t in _TASKS}
DATASETS: tuple[str, ...] = tuple(TASKS)
VIDEO_DATASETS: tuple[str, ...] = tuple(t.name for t in _TASKS if t.has_video)


def get_task(name: str) -> Task:
    try:
        return TASKS[name]
    except KeyError:
        raise ValueError(f"unknown dataset '{name}' (known: {', '.join(DATASETS)})") from None


def parse_datasets(spec: str | list[str] | tuple[str, ...]) -> list[str]:
    """'all', 'video' or a comma-separated list of dataset names -> validated list."""
    if isinstance(spec, (list, tuple)):
        names = [str(s).strip() for s in spec]
    elif spec.strip() == "all":
        return list(DATASETS)
    elif spec.strip() == "video":
        return list(VIDEO_DATASETS)
    else:
        names = [s.strip() for s in spec.split(",") if s.strip()]
    if not names:
        raise ValueError("no dataset given (use 'all' or names like MELD,MOSI)")
    return [get_task(n).name for n in names]
