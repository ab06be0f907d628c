"""Training sequences: a row's question-answer pairs grouped into multi-turn conversations,
tokenised with the loss on every answer and nothing else."""
from __future__ import annotations

import pytest

from vkd.data.items import expand_train_row, train_sequences
from vkd.data.layout import TRAIN_SPLIT, read_rows
from vkd.train import Tokenize


def _image_row(data):
    return next(r for r in read_rows(data, TRAIN_SPLIT) if r["image"] is not None)


def test_sequences_hold_every_pair_once_in_a_seeded_order(small_data):
    row = _image_row(small_data)
    pairs = [(p["question"], p["answer"]) for p in expand_train_row(row)]
    seqs = train_sequences(row, turns=4, seed=0)
    assert [len(s["questions"]) for s in seqs] == [4] * (len(pairs) // 4) + ([len(pairs) % 4] if len(pairs) % 4 else [])
    grouped = [(q, a) for s in seqs for q, a in zip(s["questions"], s["answers"])]
    assert sorted(grouped) == sorted(pairs) and grouped != pairs, "every pair once, shuffled"
    assert train_sequences(row, turns=4, seed=0) == seqs, "same seed, same grouping"
    assert train_sequences(row, turns=4, seed=1) != seqs
    assert all(s["image"] == seqs[0]["image"] is not None for s in seqs)
    single = train_sequences(row, turns=1)
    assert [(s["questions"][0], s["answers"][0]) for s in single] == pairs, "one turn: the row's own order"
    with pytest.raises(ValueError, match="train.turns"):
        train_sequences(row, turns=0)


def test_a_conversation_is_trained_on_every_answer(tiny, small_data):
    row = _image_row(small_data)
    conv = train_sequences(row, turns=3, seed=0)[0]
    tokenize = Tokenize(tiny, 256)
    multi = tokenize([conv])
    first = tokenize([{"image": conv["image"], "question": conv["questions"][0], "answer": conv["answers"][0]}])
    n_first = int(first["attention_mask"].sum())
    assert (multi["input_ids"][0, :n_first] == first["input_ids"][0, :n_first]).all(), \
        "the first turn is the single-question prompt and answer"
    labelled = multi["input_ids"][0][multi["labels"][0] != -100].tolist()
    assert labelled == sum(tiny.target_ids(conv["answers"]), []), "labels are exactly the answers (+ EOS each)"
    text = tiny.tokenizer.decode(multi["input_ids"][0][multi["attention_mask"][0] == 1], skip_special_tokens=True)
    for q, a in zip(conv["questions"], conv["answers"]):
        assert f"Question: {q}\nAnswer: {a}" in text
    assert (multi["pixel_values"][0] == first["pixel_values"][0]).all() and multi["has_image"][0]


def test_a_long_conversation_keeps_whole_turns(tiny, small_data):
    conv = train_sequences(_image_row(small_data), turns=6, seed=0)[0]
    full = Tokenize(tiny, 512)([conv])
    n = int(full["attention_mask"].sum())
    cut = Tokenize(tiny, n - 1)([conv])
    labelled = cut["input_ids"][0][cut["labels"][0] != -100].tolist()
    assert labelled == sum(tiny.target_ids(conv["answers"][:5]), []), "the last turn is dropped whole"
