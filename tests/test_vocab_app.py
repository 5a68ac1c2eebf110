"""Vocabulary trimming in a federation: nodes report their tokens, rows nobody holds stay put.

The tokenizer knows words the corpus never uses. With ``vocab-trim`` no
node reports them, so no sub-model holds their embedding rows and the global
model keeps them bit for bit in every round; the control run without it
(full vocabulary, weight decay on every row) changes them. The oracle is the
corpus itself, not the code's own record of what it sent.
"""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForSequenceClassification, AutoTokenizer

from tests.assets import tiny_bert_task
from tests.sim import TIMEOUTS, every_node, read_json, simulate
from tests.slices import load_round

NUM_NODES = 3
ROUNDS = 2
UNUSED = tuple(f"unused{i}" for i in range(40))
EMBEDDING = "bert.embeddings.word_embeddings.weight"
HIDDEN = 32  # tests/assets.py:save_tiny_bert


def run(tmp, trim: bool):
    overrides = {
        **tiny_bert_task(tmp, 120, extra_words=UNUSED),
        **every_node(NUM_NODES),
        **TIMEOUTS,
        "results-dir": str(tmp / "results"),
        "num-server-rounds": ROUNDS,
        "budget-profile": "params=0.6,params=0.75,params=0.9",
        "partitioner": "iid",
        "max-length": 16,
        "local-steps": 2,
        "batch-size": 8,
        "lr": 1e-3,
        "weight-decay": 0.01,
        "vocab-trim": trim,
        "save-round-models": True,
        "salience-norm": "l1",  # the slice oracle re-derives an L1 order (tests/slices.py)
    }
    simulate(overrides, NUM_NODES)
    return tmp / "results", AutoTokenizer.from_pretrained(tmp / "model")


@pytest.fixture(scope="module")
def trimmed(tmp_path_factory):
    return run(tmp_path_factory.mktemp("vocab-trim"), True)


@pytest.fixture(scope="module")
def whole(tmp_path_factory):
    return run(tmp_path_factory.mktemp("vocab-whole"), False)


def embedding(run_dir, round_):
    _, state = load_round(run_dir, round_, AutoModelForSequenceClassification)
    return state[EMBEDDING]


def test_rows_of_unused_words_are_never_touched(trimmed):
    run_dir, tokenizer = trimmed
    unused = tokenizer.convert_tokens_to_ids(list(UNUSED))
    used = tokenizer.convert_tokens_to_ids(["good", "bad", "film"])
    first = embedding(run_dir, 0)
    for round_ in range(1, ROUNDS + 1):
        now = embedding(run_dir, round_)
        assert torch.equal(now[unused], first[unused]), round_
        assert not torch.equal(now[used], first[used]), round_


def test_the_control_run_changes_them(whole):
    run_dir, tokenizer = whole
    unused = tokenizer.convert_tokens_to_ids(list(UNUSED))
    assert not torch.equal(embedding(run_dir, 1)[unused], embedding(run_dir, 0)[unused])


def test_records_name_the_rows_and_fractions_shrink(trimmed, whole):
    vocab_size = len(trimmed[1])
    trimmed_rounds = read_json(trimmed[0], "rounds.json")
    whole_rounds = read_json(whole[0], "rounds.json")
    for row_t, row_w in zip(trimmed_rounds[1:], whole_rounds[1:], strict=True):
        assert all(c["status"] == "accepted" for c in row_t["clients"] + row_w["clients"])
        rows = [c["vocab-rows"] for c in row_t["clients"]]
        assert all(5 < r <= vocab_size - len(UNUSED) for r in rows), rows
        assert all(c["vocab-rows"] is None for c in row_w["clients"])
        assert "vocab" not in row_t["clients"][0]["spec"]
        for c in row_t["clients"]:
            assert c["params-fraction"] <= float(c["budget"].split("=")[1]) + 1e-9
        # The rows a node does not need go to its body: as large or larger, budget for budget.
        body = {c["budget"]: c["params"] - vocab_size * HIDDEN for c in row_w["clients"]}
        larger = 0
        for c in row_t["clients"]:
            mine = c["params"] - c["vocab-rows"] * HIDDEN
            assert mine >= body[c["budget"]], c
            larger += mine > body[c["budget"]]
        assert larger > 0
