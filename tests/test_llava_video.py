"""LLaVA-Video's pooling switch on transformers' LLaVA-OneVision class: 13 x 13 averages + a newline per row."""

import pytest
import torch

from mmla.llava_video import LlavaVideoModel, tokens_per_frame, use_llava_video_pooling
from mmla.tiny import build_tiny_video_model


def test_tokens_per_frame_of_the_real_geometry():
    assert tokens_per_frame(384 // 14) == 182  # 27 patches a side -> 13 x (13 + 1)


def test_pooling_is_a_2x2_average_with_a_newline_per_row(tmp_path):
    from mmla.models import load_model

    model, proc = load_model(str(build_tiny_video_model("llava-onevision", tmp_path / "ov")), device="cpu",
                             modality="video")
    use_llava_video_pooling(model, proc)
    inner = model.model
    assert isinstance(inner, LlavaVideoModel)
    side = inner.config.vision_config.image_size // inner.config.vision_config.patch_size  # 8 in the tiny model
    dim = inner.image_newline.shape[0]
    feats = torch.randn(2, side * side, dim)
    out = inner.apply_pooling(feats)
    rows = side // 2
    assert out.shape == (2, rows * (rows + 1), dim)
    grid = out.view(2, rows, rows + 1, dim)
    want = feats.view(2, side, side, dim)[:, :2, :2].mean(dim=(1, 2))  # the top-left 2x2 window
    assert torch.allclose(grid[:, 0, 0], want, atol=1e-6)
    assert torch.equal(grid[:, :, -1], inner.image_newline.expand(2, rows, dim))  # each row ends in the newline
    with pytest.raises(ValueError, match="LLaVA-OneVision"):
        use_llava_video_pooling(torch.nn.Linear(2, 2), proc)
