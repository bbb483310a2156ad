import json

import pytest

from mmla import cli
from mmla.prompts import candidates, chat_messages, render, target

RELEASED_FAMILIES = ("llamafactory_text", "llamafactory_video", "swift_video_prompt")


def _cli_prompts(capsys, data_root, ds, family, split):
    assert cli.main(["prompts", "--data", str(data_root), "--dataset", ds, "--split", split, "--family", family]) == 0
    return [json.loads(l) for l in capsys.readouterr().out.splitlines()]


def test_cli_reproduces_every_released_prompt(capsys, data_root, official_prompts):
    """`mmla prompts` gives, for every dataset, family and split present, the released string of every row
    (the released templates reproduce the original files for 100% of rows: ../shared/data/PROVENANCE.md)."""
    checked = 0
    for ds, families in official_prompts.items():
        for family in RELEASED_FAMILIES:
            for split, spec in families[family].items():
                if not (data_root / ds / f"{split}.tsv").exists():
                    continue
                rows = _cli_prompts(capsys, data_root, ds, family, split)
                assert rows, (ds, family, split)
                for r in rows:
                    assert r["prompt"] == spec["prompt"].replace("{text}", r["text"]), (ds, family, split, r["id"])
                    lab = r["label"].capitalize() if spec["answer_label_case"] == "capitalized" else r["label"]
                    assert r["target"] == spec["answer"].replace("{label}", lab), (ds, family, split, r["id"])
                checked += len(rows)
    assert checked > 90_000  # all 34 files, most of them in three families


INFER_TAIL = "].Respond in the format: '{t}: [label]'.  Only one label should be provided."


@pytest.mark.parametrize("ds,t,labels", [
    ("MELD", "emotion", "neutral, surprise, fear, sadness, joy, anger, disgust"),
    ("Ch-sims", "sentiment", "positive, negative"),  # the official script's 2-label defect, kept on purpose
    ("AnnoMi-therapist", "communication behavior", "question, therapist_input, reflection, other"),
    ("MELD-DA", "dialogue act", "greeting, question, answer, statement-opinion, statement-non-opinion, apology, "
                                "command, agreement, disagreement, acknowledge, backchannel, others"),
    ("UR-FUNNY", "speaking style", "humorous, serious"),
])
def test_infer_script_strings(ds, t, labels):
    expected = (f"You are presented with a video in which the speaker says: Hi there. Based on the text, video, "
                f"and audio content, what is the {t} of this speaker?\nThe candidate labels for {t} are: [{labels}"
                + INFER_TAIL.format(t=t))
    assert render(ds, "infer_script", "Hi there") == expected


def test_clean_family_is_consistent():
    p = render("Ch-sims", "clean", "X")
    assert p == ("The speaker says: X Based on the text, what is the sentiment of this speaker?\n"
                 "The candidate labels for sentiment are: [neutral, positive, negative]. "
                 "Respond in the format: 'sentiment: [label]'. Only one label should be provided.")
    assert render("MELD", "clean", "X", modality="video").startswith("You are presented with a video")
    assert candidates("MOSI", "clean") == ["sentiment: positive", "sentiment: negative"]
    assert target("MIntRec", "llamafactory_text", "ask for help", "train") == "intent: Ask for help"


def test_chat_protocols():
    assert chat_messages("p", "official", "qwen")[0]["content"].startswith("You are Qwen, created by Alibaba Cloud.")
    assert "pirate" in chat_messages("p", "official", "llama3")[0]["content"]
    assert chat_messages("p", "clean", "qwen") == [{"role": "user", "content": "p"}]
    assert chat_messages("p", "official", "qwen", training=True)[0]["content"] == "You are a helpful assistant."
    assert chat_messages("p", "official", "llama3", training=True) == [{"role": "user", "content": "p"}]
