"""The model in this process: loaded with mmla.models, fed through its input seam (mmla.inputs), run by mmla.engine
(continuous batching, shared-prefix reuse, per-row sampling generators)."""

from __future__ import annotations

from . import Options, frame_setting_for


class LocalBackend:
    def __init__(self, options: Options):
        from ..inputs import make_inputs
        from ..models import family_of, load_model, read_config

        video = options.modality == "video"
        self.family = family_of(read_config(options.model, options.trust_remote_code)) if video else {}
        setting = frame_setting_for(self.family, options.frames) if video else None
        model, tok = load_model(options.model, adapter=options.adapter, dtype=options.dtype, device=options.device,
                                trust_remote_code=options.trust_remote_code, modality=options.modality,
                                **(options.placement or {}))
        self._hold(model, make_inputs(model, tok, setting), placed=options.placement is not None)

    @classmethod
    def of(cls, model, inputs) -> LocalBackend:
        """A model already loaded, with its input seam (mmla.inputs.make_inputs)."""
        self = cls.__new__(cls)
        self.family = {}
        self._hold(model, inputs, placed=False)
        return self

    def _hold(self, model, inputs, placed: bool) -> None:
        self.model, self.inputs, self.placed = model, inputs, placed
        self.modality, self.kind = inputs.modality, inputs.kind
        self.family = getattr(inputs, "family", None) or self.family
        self.setting = getattr(inputs, "setting", None)
        self.generation_config = model.generation_config

    def prepare(self, prompts, protocol, frames=None, candidates=None):
        texts = self.inputs.chat(prompts, protocol)
        if candidates is not None:
            return self.inputs.score_rows(texts, candidates, frames)
        return self.inputs.encode(texts, frames)

    def excess(self, rows, new_tokens: int) -> list[int]:
        return self.inputs.excess(rows, new_tokens)

    def generate(self, rows, *, decoding, batch_size, on_result) -> None:
        from .. import engine

        engine.generate(self.model, self.inputs, rows, decoding=decoding, batch_size=batch_size, on_result=on_result)

    def sample(self, rows, *, decoding, seeds, batch_size, on_result) -> None:
        from .. import engine

        engine.generate(self.model, self.inputs, rows, decoding=decoding, batch_size=batch_size, seeds=seeds,
                        on_result=on_result)

    def score(self, rows, *, batch_size, on_result) -> None:
        from .. import engine

        engine.score(self.model, self.inputs, rows, batch_size=batch_size, on_result=on_result)

    def describe(self) -> dict:
        from ..models import device_of

        out = {"device": str(device_of(self.model)), "context_length": self.inputs.context_length}
        if self.placed:  # where accelerate put each module (GPU index, cpu or disk)
            placed = getattr(self.model, "hf_device_map", None)
            out["hf_device_map"] = {k: str(v) for k, v in placed.items()} if placed else None
        return out

