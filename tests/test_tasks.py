import pytest

from mmla.tasks import DATASETS, PROMPT_FAMILIES, VIDEO_DATASETS, get_task, parse_datasets


def test_registry_matches_protocol_table():
    assert len(DATASETS) == 12
    assert set(VIDEO_DATASETS) == set(DATASETS) - {"MOSI", "IEMOCAP", "IEMOCAP-DA"}
    assert get_task("MELD").labels == ("neutral", "surprise", "fear", "sadness", "joy", "anger", "disgust")
    assert get_task("Ch-sims").labels == ("neutral", "positive", "negative")
    assert get_task("MELD-DA").labels == get_task("IEMOCAP-DA").labels
    assert len(get_task("MIntRec").labels) == 20 and len(get_task("MIntRec2.0").labels) == 30
    assert get_task("AnnoMi-therapist").task_words == "communication behavior"
    for name in DATASETS:
        t = get_task(name)
        assert all(l == l.lower() for l in t.labels)
        assert len(set(t.labels)) == len(t.labels)


@pytest.mark.parametrize("spec,expected", [
    ("all", list(DATASETS)),
    ("video", list(VIDEO_DATASETS)),
    ("MELD, MOSI", ["MELD", "MOSI"]),
])
def test_parse_datasets(spec, expected):
    assert parse_datasets(spec) == expected


@pytest.mark.parametrize("bad", ["Meld", "MELD,nope", ""])
def test_parse_datasets_rejects(bad):
    with pytest.raises(ValueError):
        parse_datasets(bad)


def test_unknown_family():
    with pytest.raises(ValueError, match="unknown prompt family"):
        get_task("MELD").style("nope")
    assert "clean" in PROMPT_FAMILIES
