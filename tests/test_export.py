"""`mmla export llamafactory`: sharegpt files, dataset_info.json, text and video variants."""

import json

from mmla.export import export_llamafactory
from mmla.prompts import render, target


def test_export_text_and_video(tmp_path, data_root, official_prompts):
    res = export_llamafactory(str(data_root), str(tmp_path), "MUStARD,MOSI,UR-FUNNY")
    info = json.loads((tmp_path / "dataset_info.json").read_text())
    files = res["files"]
    # official file names (shared/data/official_prompts.json "source")
    for ds, split in (("MUStARD", "train"), ("MUStARD", "dev")):
        assert f"{ds}_{split}_text_speaking_style_llamafactory.json" == official_prompts[ds]["llamafactory_text"][split]["source"]
        assert f"{ds}_{split}_speaking_style_llamafactory.json" == official_prompts[ds]["llamafactory_video"][split]["source"]
    assert files["MUStARD_train_text_speaking_style_llamafactory.json"] == 414
    assert files["MOSI_train_text_sentiment_llamafactory.json"] == 1284
    assert "MOSI_train_sentiment_llamafactory.json" not in files  # MOSI has no released videos
    assert files["Instruct_train_text_llamafactory.json"] == 414 + 1284
    assert res["missing"] == ["UR-FUNNY/train"]  # reported, not silently dropped
    assert files["UR-FUNNY_dev_text_speaking_style_llamafactory.json"] > 0

    text = json.loads((tmp_path / "MUStARD_train_text_speaking_style_llamafactory.json").read_text())
    row = text[0]
    assert [m["from"] for m in row["conversations"]] == ["human", "gpt"]
    assert row["conversations"][0]["value"] == render(
        "MUStARD", "llamafactory_text", "I don't think I'll be able to stop thinking about it.", "train")
    assert row["conversations"][1]["value"] == "speaking_style: sarcastic"
    assert "videos" not in row

    video = json.loads((tmp_path / "MUStARD_train_speaking_style_llamafactory.json").read_text())
    assert video[0]["videos"] == ["MUStARD/video/MUStARD_1_70.mp4"]
    assert video[0]["conversations"][0]["value"].startswith("<video>You are presented with a video")
    assert video[0]["conversations"][1]["value"] == target("MUStARD", "llamafactory_video", "sarcastic", "train", "video")

    entry = info["MUStARD_train_speaking_style_llamafactory"]
    assert entry["formatting"] == "sharegpt" and entry["columns"] == {"messages": "conversations", "videos": "videos"}
    assert entry["tags"] == {"role_tag": "from", "content_tag": "value", "user_tag": "human", "assistant_tag": "gpt"}
    assert info["MOSI_dev_text_sentiment_llamafactory"]["columns"] == {"messages": "conversations"}
    assert all((tmp_path / v["file_name"]).is_file() for v in info.values())
