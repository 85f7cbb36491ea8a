"""Accuracy overall and per question type: first token, counts, unknown answers always wrong."""

from __future__ import annotations


import pytest
import torch

from vqakd.data.questions import OTHER_TYPE, QUESTION_TYPES, question_type, question_type_code
from vqakd.training.metrics import AccuracyCounter, format_table, summarize

WHAT, WHO, HOW, WHEN, WHERE = range(5)


def test_question_type_is_the_first_token():
    assert [question_type_code(t) for t in ("what", "who", "how", "when", "where")] == [0, 1, 2, 3, 4]
    for other in ("is", "whose", "which", "what's", "What", "<UNK>", ""):
        assert question_type_code(other) == OTHER_TYPE
    assert [question_type_code(t) for t in ["where", "is", "who"]] == [WHERE, OTHER_TYPE, WHO]
    # One rule for the metrics and the study report: the first NLTK token, so "what's" is "what".
    assert [question_type(q) for q in ["What's in the bowl?", "who is dancing?", "is it raining?"]] == [
        "what", "who", "other"]


def test_unknown_answers_are_never_correct():
    predictions = torch.tensor([1, 0, 2, 5, 1, 3])
    labels = torch.tensor([1, 0, 2, 5, 2, 4])
    # Label 1 (a val/test answer outside the vocabulary) and label 0 (<UNK0>) never count, even when predicted.
    counter = AccuracyCounter()
    counter.update(predictions, labels, torch.full((6,), WHAT))
    assert counter.summary()["per_type"]["what"] == {"accuracy": 2 / 6, "correct": 2, "count": 6}


def test_per_type_counts_and_accuracy():
    counter = AccuracyCounter()
    qtypes = torch.tensor([WHAT, WHAT, WHAT, WHO, WHERE, OTHER_TYPE, OTHER_TYPE, WHAT])
    labels = torch.tensor([2, 3, 1, 4, 5, 6, 7, 8])
    predictions = torch.tensor([2, 9, 1, 4, 2, 6, 2, 8])
    counter.update(predictions, labels, qtypes)
    summary = counter.summary()
    assert summary["count"] == 8 and summary["correct"] == 4 and summary["accuracy"] == 0.5
    assert summary["per_type"]["what"] == {"accuracy": 0.5, "correct": 2, "count": 4}   # unknown answer counted
    assert summary["per_type"]["who"] == {"accuracy": 1.0, "correct": 1, "count": 1}
    assert summary["per_type"]["where"] == {"accuracy": 0.0, "correct": 0, "count": 1}
    assert summary["per_type"]["how"] == {"accuracy": 0.0, "correct": 0, "count": 0}
    # "other" questions count only in the overall figure.
    assert set(summary["per_type"]) == set(QUESTION_TYPES)
    assert sum(v["count"] for v in summary["per_type"].values()) == 6


def test_batches_accumulate_like_one_pass():
    torch.manual_seed(0)
    labels = torch.randint(0, 6, (200,))
    predictions = torch.where(torch.rand(200) < 0.6, labels, torch.randint(0, 6, (200,)))
    qtypes = torch.randint(0, OTHER_TYPE + 1, (200,))
    whole = AccuracyCounter()
    whole.update(predictions, labels, qtypes)
    parts = AccuracyCounter()
    for chunk in torch.split(torch.arange(200), 37):
        parts.update(predictions[chunk], labels[chunk], qtypes[chunk])
    assert parts.all_reduce().summary() == whole.summary()      # single process: all_reduce is the identity
    hits = (predictions == labels) & (labels >= 2)
    assert whole.summary()["correct"] == int(hits.sum())
    for code, name in enumerate(QUESTION_TYPES):
        assert whole.summary()["per_type"][name]["count"] == int((qtypes == code).sum())
        assert whole.summary()["per_type"][name]["correct"] == int(hits[qtypes == code].sum())


def test_summary_and_table_format():
    summary = summarize([3, 0, 0, 0, 1, 2], [4, 0, 0, 0, 2, 4])
    assert summary["accuracy"] == pytest.approx(6 / 10) and summary["per_type"]["when"]["accuracy"] == 0.0
    table = format_table(summary, "title")
    lines = table.splitlines()
    assert lines[0] == "title" and lines[-1].split() == ["all", "60.00%", "6", "10"]
    assert lines[2].split() == ["what", "75.00%", "3", "4"]


def test_distributed_helpers_are_identities_in_one_process(monkeypatch):
    from vqakd.core import distributed as dist

    assert (dist.get_rank(), dist.get_world_size(), dist.is_main(), dist.is_initialized()) == (0, 1, True, False)
    tensor = torch.tensor([1, 2])
    assert dist.all_reduce_sum(tensor) is tensor and tensor.tolist() == [1, 2]
    with dist.session():        # not under torchrun: no process group
        assert not dist.is_initialized()
    monkeypatch.setenv("WORLD_SIZE", "4")
    monkeypatch.setenv("LOCAL_RANK", "3")
    assert dist.env_int("WORLD_SIZE", 1) == 4 and dist.env_int("LOCAL_RANK") == 3
