"""The model in this process: loaded with mmla.models, fed through its input seam (mmla.inputs), run by mmla.engine
(continuous batching, shared-prefix reuse, per-row sampling generators)."""

from __future__ import annotations

from . import Options, frame_setting_for


class LocalBackend:
    def __init__(self, options: Options):
        from ..inputs import make_inputs
        from ..models import load_model

        row = options.family
        setting = frame_setting_for(options.frames) if options.frames is not None else None
        model, tok = load_model(options.model, adapter=options.adapter, dtype=options.dtype, device=options.device,
                                trust_remote_code=options.trust_remote_code, modality=options.modality,
                                **(options.placement or {}))
        if row is not None and row.pooling == "llava-video":  # the original LLaVA-Video's pooling, not the -hf one
            from ..llava_video import use_llava_video_pooling

            use_llava_video_pooling(model, tok)
        inputs = make_inputs(model, tok, setting, row, options.modality, options.audio)
        inputs.time_from_clip = options.protocol == "clean"  # clean: the clip's real frame rate, where time is read
        self._hold(model, inputs, placed=options.placement is not None)

    @classmethod
    def of(cls, model, inputs) -> LocalBackend:
        """A model already loaded, with its input seam (mmla.inputs.make_inputs)."""
        self = cls.__new__(cls)
        self._hold(model, inputs, placed=False)
        return self

    def _hold(self, model, inputs, placed: bool) -> None:
        self.model, self.inputs, self.placed = model, inputs, placed
        self.modality, self.kind, self.row = inputs.modality, inputs.kind, inputs.row
        self.setting = getattr(inputs, "setting", None)
        self.generation_config = model.generation_config
        self.context_length = inputs.context_length
        self.audio = inputs.record() if hasattr(inputs, "record") else None  # audio, av: the audio setting

    def prepare(self, prompts, protocol, frames=None, candidates=None, histories=None):
        texts = self.inputs.chat(prompts, protocol, **({"histories": histories} if histories else {}))
        if candidates is not None:
            return self.inputs.score_rows(texts, candidates, frames)
        return self.inputs.encode(texts, frames)

    def load_clip(self, path, cache):
        return self.inputs.load(path, cache)

    def clip_fields(self, media) -> dict:
        return self.inputs.clip_fields(media) if hasattr(self.inputs, "clip_fields") else {}

    def heads(self, rows) -> list[str]:
        return [self.inputs.tokenizer.decode(r.ids) for r in rows]

    def excess(self, rows, new_tokens: int) -> list[int]:
        return self.inputs.excess(rows, new_tokens)

    streams = True  # generate and sample take `more`: rows that join the batch as they are prepared

    def generate(self, rows, *, decoding, batch_size, on_result, more=None) -> None:
        from .. import engine

        engine.generate(self.model, self.inputs, rows, decoding=decoding, batch_size=batch_size, on_result=on_result,
                        more=more)

    def sample(self, rows, *, decoding, seeds, batch_size, on_result, more=None) -> None:
        from .. import engine

        engine.generate(self.model, self.inputs, rows, decoding=decoding, batch_size=batch_size, seeds=seeds,
                        on_result=on_result, more=more)

    def score(self, rows, *, batch_size, on_result) -> None:
        from .. import engine

        engine.score(self.model, self.inputs, rows, batch_size=batch_size, on_result=on_result)

    def describe(self) -> dict:
        from ..models import device_of

        out = {"device": str(device_of(self.model)), "context_length": self.inputs.context_length}
        if self.audio is not None:  # rate, channels, max seconds, interleaved with the frames or not; cache use
            out.update(audio_setting=self.audio, **self.inputs.audio_cache_stats())
        if self.placed:  # where accelerate put each module (GPU index, cpu or disk)
            placed = getattr(self.model, "hf_device_map", None)
            out["hf_device_map"] = {k: str(v) for k, v in placed.items()} if placed else None
        return out

