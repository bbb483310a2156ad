"""LLaVA-Video's own video pooling, as a setting of the one video path (the model family row's `pooling`).

The `-hf` conversions of LLaVA-Video load as transformers' LLaVA-OneVision class, which pools every frame's 27x27
SigLIP features bilinearly to 14x14 (196 tokens) and adds one newline token per video. The original LLaVA-Video
(LLaVA-NeXT `llava_arch.py`, checkpoint config `mm_spatial_pool_mode="average"`, `mm_newline_position="grid"`)
averages 2x2 windows to 13x13 and adds a newline after each row: 13 x 14 = 182 tokens per frame, none at the end.
`use_llava_video_pooling` switches a loaded OneVision model and its processor to that: a thin subclass of the
model's inner module (only the pooling changes; the weights are the same) and the matching token count in the
processor. ../shared/OFFICIAL_MODELS.md section 3.
"""

from __future__ import annotations

import math
import types

import torch
from torch import nn
from transformers.models.llava_onevision.modeling_llava_onevision import LlavaOnevisionModel


class LlavaVideoModel(LlavaOnevisionModel):
    """LLaVA-OneVision with LLaVA-Video's average pooling and a newline per row of each frame."""

    def apply_pooling(self, image_features):
        side = self.config.vision_config.image_size // self.config.vision_config.patch_size
        frames, _, dim = image_features.shape
        x = image_features.view(frames, side, side, dim).permute(0, 3, 1, 2)
        x = nn.functional.avg_pool2d(x, 2).permute(0, 2, 3, 1)  # 27 -> 13 (floor), as get_2dPool's "average"
        rows = x.shape[1]
        newline = self.image_newline.to(x)[None, None, None, :].expand(frames, rows, 1, dim)
        return torch.cat([x, newline], dim=2).reshape(frames, rows * (rows + 1), dim)

    def get_video_features(self, *args, **kwargs):
        out = super().get_video_features(*args, **kwargs)
        # the OneVision path appends one newline per video; the grid newlines already end every row
        out.pooler_output = out.pooler_output[:, :-1]
        return out


def tokens_per_frame(side: int) -> int:
    rows = side // 2
    return rows * (rows + 1)


def _replace_video_token(self, video_inputs: dict, video_idx: int, **kwargs) -> str:
    video = video_inputs["pixel_values_videos"][video_idx]
    frames = len(video) if isinstance(video, (list, tuple)) else video.shape[0]
    return self.video_token * (frames * tokens_per_frame(int(math.sqrt(self.num_image_tokens))))


def use_llava_video_pooling(model, processor) -> None:
    """Switch a loaded LLaVA-OneVision model (and its processor) to LLaVA-Video's pooling, in place."""
    core = model.get_base_model() if hasattr(model, "get_base_model") else model
    inner = getattr(core, "model", None)
    if not isinstance(inner, LlavaOnevisionModel):
        raise ValueError(f"LLaVA-Video pooling needs a LLaVA-OneVision class model, got {type(core).__name__}")
    inner.__class__ = LlavaVideoModel
    processor.replace_video_token = types.MethodType(_replace_video_token, processor)
