"""Extractive QA: the SQuAD metric, windows, post-processing, models, data, a federated run."""

from __future__ import annotations

import json
import random

import datasets
import numpy as np
import pytest
import torch
import transformers as T

import raffm_core as R
from raffm_core.errors import DataError, UnsupportedModelError
from raffm_core.task import load_task
from raffm_core.task.config import ConfigError, RunConfig
from raffm_core.task.encode import make_loader
from raffm_core.task.qa import QASettings, encode_qa
from raffm_core.task.qa_metrics import (
    best_answers,
    evaluate_qa,
    exact_match,
    normalize_answer,
    squad_scores,
    token_f1,
)
from tests.assets import tiny_tokenizer
from tests.models import CONFIGS

COLORS = ["red", "blue", "green", "pink", "grey"]
FILLER = ["the", "car", "of", "was", "seen", "near", "park", "in", "a", "town", "by", "old"]
QUESTION = ["what", "color", "?", "light"]
WORDS = COLORS + FILLER + QUESTION


# --- the official SQuAD metric, by hand ---------------------------------------------


@pytest.mark.parametrize(
    "text, normalized",
    [
        ("The Eiffel Tower!", "eiffel tower"),
        ("  an   apple,  a pear ", "apple pear"),
        ("Theory of an Anthem", "theory of anthem"),  # "the" inside a word stays
        ("U.S.A.", "usa"),
        ("", ""),
    ],
)
def test_answers_are_normalized_as_the_official_script_does(text, normalized):
    assert normalize_answer(text) == normalized


@pytest.mark.parametrize(
    "prediction, gold, em, f1",
    [
        ("the Denver Broncos", "Denver Broncos", 1.0, 1.0),
        ("Denver", "Denver Broncos", 0.0, 2 * (1 * 0.5) / 1.5),  # P 1, R 1/2
        ("Broncos of Denver city", "Denver Broncos", 0.0, 2 * (0.5 * 1.0) / 1.5),  # P 2/4, R 1
        ("Carolina Panthers", "Denver Broncos", 0.0, 0.0),
        ("", "", 1.0, 1.0),  # unanswerable, abstained
        ("Denver", "", 0.0, 0.0),  # unanswerable, answered
    ],
)
def test_exact_match_and_f1_of_one_answer(prediction, gold, em, f1):
    assert exact_match(prediction, gold) == em
    assert token_f1(prediction, gold) == pytest.approx(f1)


def test_scores_take_the_best_gold_and_split_v2_into_has_and_no_answer():
    golds = {
        "a": ["Denver Broncos", "Broncos"],  # "Broncos" matches the second gold
        "b": ["Santa Clara, California"],  # "Santa Clara": P 1, R 2/3 -> F1 0.8
        "c": [],  # unanswerable, abstained
        "d": [],  # unanswerable, answered
    }
    predictions = {"a": "Broncos", "b": "Santa Clara", "c": "", "d": "Levi's Stadium"}
    scores = squad_scores(predictions, golds)
    assert scores["exact-match"] == pytest.approx((1 + 0 + 1 + 0) / 4)
    assert scores["f1"] == pytest.approx((1 + 0.8 + 1 + 0) / 4)
    assert scores["has-ans-exact-match"] == 0.5 and scores["has-ans-f1"] == pytest.approx(0.9)
    assert scores["no-ans-exact-match"] == scores["no-ans-f1"] == 0.5
    assert set(squad_scores(predictions, golds, with_splits=False)) == {"exact-match", "f1"}
    with pytest.raises(DataError, match="no prediction"):
        squad_scores({"a": "x"}, golds)


# --- windows and span targets, against positions worked out by hand ----------------------


def squad_rows(n: int, seed: int = 0, unanswerable: float = 0.0) -> list[dict]:
    """Questions "what color ?" over a filler context with one color (some "light <color>")."""
    rng = random.Random(seed)
    rows = []
    for i in range(n):
        words = [rng.choice(FILLER) for _ in range(rng.randint(5, 26))]
        if rng.random() < unanswerable:
            rows.append(
                {
                    "id": f"q{i}",
                    "question": "what color ?",
                    "context": " ".join(words),
                    "answers": {"text": [], "answer_start": []},
                }
            )
            continue
        answer = rng.choice(COLORS)
        if rng.random() < 0.3:
            answer = "light " + answer
        at = rng.randint(0, len(words))
        context = " ".join(words[:at] + [answer] + words[at:])
        start = len(" ".join(words[:at])) + (1 if at else 0)
        assert context[start : start + len(answer)] == answer
        rows.append(
            {
                "id": f"q{i}",
                "question": "what color ?",
                "context": context,
                "answers": {"text": [answer], "answer_start": [start]},
            }
        )
    return rows


def test_windows_and_answer_positions_match_manual_token_positions():
    context = [f"w{i}" for i in range(23)]
    tok = tiny_tokenizer(WORDS + context)
    text = " ".join(context)
    cases = {  # answer word indices in the context
        "one": (8, 8),
        "two": (10, 11),
        "last": (22, 22),
        "first": (0, 0),
    }
    rows = []
    for name, (i, j) in cases.items():
        answer = " ".join(context[i : j + 1])
        rows.append(
            {
                "id": name,
                "question": "what color ?",
                "context": text,
                "answers": {"text": [answer], "answer_start": [text.index(answer)]},
            }
        )
    max_length, stride = 16, 4
    enc = encode_qa(
        datasets.Dataset.from_list(rows), tok, max_length, QASettings(doc_stride=stride)
    )
    # [CLS] what color ? [SEP] <10 context tokens> [SEP]; windows advance 10 - 4 = 6 words
    prefix, room = 5, max_length - 5 - 1
    starts = [0, 6, 12, 18]  # context word of each window's first token; 18 + 10 > 23 ends it
    assert len(enc) == len(cases) * len(starts)
    for n, name in enumerate(cases):
        i, j = cases[name]
        for w, first in enumerate(starts):
            row = enc[n * len(starts) + w]
            assert row["example_id"] == name
            held = context[first : first + room]
            ids = tok.convert_tokens_to_ids(
                ["[CLS]", "what", "color", "?", "[SEP]", *held, "[SEP]"]
            )
            assert row["input_ids"] == ids
            if first <= i and j < first + room:
                expected = (prefix + i - first, prefix + j - first)
            else:
                expected = (0, 0)  # the window lacks the whole answer: [CLS]
            assert (row["start_positions"], row["end_positions"]) == expected, (name, w)
            assert row["cls_index"] == 0
            # offsets: only context tokens, and they point at their words
            for t, (a, b) in enumerate(row["offset_mapping"]):
                if prefix <= t < prefix + len(held):
                    assert text[a:b] == held[t - prefix]
                else:
                    assert (a, b) == (-1, -1)


def test_post_processing_picks_the_best_valid_span_across_windows():
    features = {
        "example_id": ["x", "x", "y"],
        "offset_mapping": [
            [[-1, -1], [0, 3], [4, 7], [8, 11], [-1, -1]],
            [[-1, -1], [8, 11], [12, 15], [16, 19], [-1, -1]],
            [[-1, -1], [0, 2], [3, 5], [-1, -1]],
        ],
        "context": ["aaa bbb ccc ddd eee", "aaa bbb ccc ddd eee", "pp qq"],
        "cls_index": [0, 0, 0],
    }
    neg = -9.0
    start = [
        np.array([0.0, 1.0, 2.0, neg, 9.0]),  # 9.0 on [SEP]: not in the context
        np.array([0.0, neg, 3.0, neg, neg]),
        np.array([5.0, 1.0, 0.0, neg]),
    ]
    end = [
        np.array([0.0, neg, 1.0, 2.5, neg]),
        np.array([0.0, neg, neg, 2.0, neg]),
        np.array([5.0, 0.0, 1.0, neg]),
    ]
    # x: window 1 best "bbb ccc" (2 + 2.5 = 4.5); window 2 "ddd eee" (3 + 2 = 5) wins
    settings = QASettings(max_answer_length=2)
    assert best_answers(features, start, end, settings) == {"x": "ddd eee", "y": "pp qq"}
    # one token at most: x "bbb" (2 + 1 = 3) beats "ccc" (neg + 2.5) and "eee" (neg + 2)
    one = best_answers(features, start, end, QASettings(max_answer_length=1))
    assert one["x"] == "bbb"
    # v2: y's null score 10 exceeds its best span 2 by 8: "" unless the threshold is above 8
    v2 = QASettings(max_answer_length=2, unanswerable=True)
    assert best_answers(features, start, end, v2)["y"] == ""
    assert best_answers(features, start, end, QASettings(2, 2, 20, 8.5, True))["y"] == "pp qq"
    # x's null score is the lowest over its windows (0), below its best span (5): answered
    assert best_answers(features, start, end, v2)["x"] == "ddd eee"


# --- models: every encoder family, a decoder is an error --------------------------------


def tiny_qa_model(family: str, vocab: int, seed: int = 0) -> T.PreTrainedModel:
    """A tiny ``*ForQuestionAnswering`` of ``family`` from :data:`tests.models.CONFIGS`."""
    if family == "xlm-roberta":
        config = T.XLMRobertaConfig(**CONFIGS["roberta"]().to_dict())
    else:
        config = CONFIGS[family]()
    config.vocab_size, config.num_labels = vocab, 2
    torch.manual_seed(seed)
    model = T.AutoModelForQuestionAnswering.from_config(config)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    return model.eval()


@pytest.mark.parametrize("family", ["bert", "roberta", "xlm-roberta", "distilbert"])
def test_every_encoder_family_extracts_qa_sub_models_with_the_span_head_whole(family):
    model = tiny_qa_model(family, 61)
    layout = R.describe(model)
    ids = torch.randint(3, 61, (2, 12), generator=torch.Generator().manual_seed(0))
    full = R.extract_submodel(model, layout.full_spec())
    with torch.no_grad():
        ref, out = model(input_ids=ids), full(input_ids=ids)
    torch.testing.assert_close(out.start_logits, ref.start_logits)
    spec = R.select_subnet(layout, "params=0.7")
    sub = R.extract_submodel(model, spec)
    size = sum(p.numel() for p in sub.parameters())
    assert type(sub) is type(model) and size < sum(p.numel() for p in model.parameters())
    assert torch.equal(
        sub.state_dict()["qa_outputs.weight"], model.state_dict()["qa_outputs.weight"]
    )
    assert torch.equal(sub.state_dict()["qa_outputs.bias"], model.state_dict()["qa_outputs.bias"])
    with torch.no_grad():
        assert sub(input_ids=ids).end_logits.shape == (2, 12)


def test_a_decoder_only_model_with_extractive_qa_is_an_error_that_lists_the_encoders(tmp_path):
    CONFIGS["llama"]().save_pretrained(tmp_path / "llama")
    cfg = RunConfig(
        model_name=str(tmp_path / "llama"), task="extractive-qa", dataset="squad", partitioner="iid"
    )
    with pytest.raises(UnsupportedModelError, match=r"'llama', the LLaMA family.*BERT, DistilBERT"):
        load_task(cfg)


# --- data: local files, column names, errors ------------------------------------------


def write_squad(path, rows, rename: dict | None = None):
    rename = rename or {}
    rows = [{rename.get(k, k): v for k, v in r.items()} for r in rows]
    if path.suffix == ".parquet":
        datasets.Dataset.from_list(rows).to_parquet(str(path))
    elif path.suffix == ".jsonl":
        path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    else:
        path.write_text(json.dumps(rows))
    return path


def save_qa_folder(path, seed: int = 0):
    tok = tiny_tokenizer(WORDS)
    model = tiny_qa_model("bert", len(tok), seed)
    model.save_pretrained(path)
    tok.save_pretrained(path)
    return path


@pytest.mark.parametrize("suffix", [".json", ".jsonl", ".parquet"])
def test_local_squad_files_load_with_their_column_names(tmp_path, suffix):
    rows = squad_rows(20, unanswerable=0.3)
    rename = {"question": "q", "context": "passage", "answers": "gold", "id": "qid"}
    path = write_squad(tmp_path / f"train{suffix}", rows, rename)
    cfg = RunConfig(
        model_name=str(save_qa_folder(tmp_path / "model")),
        task="extractive-qa",
        dataset=str(path),
        question_column="q",
        context_column="passage",
        answers_column="gold",
        id_column="qid",
        partitioner="iid",
        max_length=24,
        doc_stride=8,
    )
    task = load_task(cfg)
    assert task.info.kind == "extractive-qa" and task.info.primary_metric == "f1"
    assert task.info.settings.unanswerable  # some empty answer lists: SQuAD v2.0
    assert len(task.splits.train) + len(task.splits.test) == 20
    enc = task.encode(task.splits.test, 24)
    assert len(enc) >= len(task.splits.test)  # a window or more per question
    model = task.load_model(0)
    assert isinstance(model, T.BertForQuestionAnswering)
    metrics = evaluate_qa(model, make_loader(enc, task.preprocessor, 8), task.info.settings)
    assert metrics["num-examples"] == len(task.splits.test)
    assert {"has-ans-f1", "no-ans-f1"} & set(metrics)
    with pytest.raises(DataError, match=r"no column\(s\) \['query'\]; the columns are"):
        load_task(RunConfig(**{**cfg.__dict__, "question_column": "query"}))


def test_qa_config_and_partitioning_errors(tmp_path):
    with pytest.raises(ConfigError, match="doc-stride = 64 must be below max-length = 64"):
        RunConfig(task="extractive-qa", doc_stride=64, max_length=64)
    from client_app.partition import load_local_data

    cfg = RunConfig(
        model_name=str(save_qa_folder(tmp_path / "model")),
        task="extractive-qa",
        dataset=str(write_squad(tmp_path / "train.json", squad_rows(30))),
        partitioner="dirichlet",
        max_length=24,
        doc_stride=8,
    )
    with pytest.raises(ConfigError, match="extractive-qa task has none, use partitioner = 'iid'"):
        load_local_data(cfg, 0, 3, 24)


def test_nodes_hold_whole_questions_never_a_window_of_another_nodes_question(tmp_path):
    from client_app.partition import load_local_data

    cfg = RunConfig(
        model_name=str(save_qa_folder(tmp_path / "model")),
        task="extractive-qa",
        dataset=str(write_squad(tmp_path / "train.json", squad_rows(60))),
        partitioner="iid",
        max_length=16,
        doc_stride=4,
    )
    held = [set(load_local_data(cfg, p, 3, 16).train["example_id"]) for p in range(3)]
    assert all(held) and not (held[0] & held[1] or held[0] & held[2] or held[1] & held[2])
    total = sum(len(load_local_data(cfg, p, 3, 16).train) for p in range(3))
    assert total > sum(map(len, held))  # some questions have several windows, all on one node


@pytest.mark.parametrize("budget", ["params=0.6", "params=1.0"])
def test_an_exported_qa_sub_model_reloads_and_gives_the_same_answers(tmp_path, budget):
    from raffm_core.export import export_submodel

    tok = tiny_tokenizer(WORDS)
    model = tiny_qa_model("bert", len(tok), seed=2)
    R.prioritize(model)
    spec = R.select_subnet(R.describe(model), budget)
    export_submodel(model, spec, tmp_path / "out")
    reloaded = R.load_submodel(tmp_path / "out")
    assert isinstance(reloaded, T.BertForQuestionAnswering)
    settings = QASettings(doc_stride=4)
    enc = encode_qa(datasets.Dataset.from_list(squad_rows(12, seed=3)), tok, 16, settings)
    loader = make_loader(enc, tok, 8)
    sub = R.extract_submodel(model, spec)
    assert evaluate_qa(reloaded, loader, settings) == evaluate_qa(sub, loader, settings)
    batch = next(iter(loader))
    with torch.no_grad():
        torch.testing.assert_close(reloaded(**batch).start_logits, sub(**batch).start_logits)


def test_the_nested_official_squad_json_is_an_error_that_says_what_layout_is_expected(tmp_path):
    path = tmp_path / "train-v1.1.json"
    nested = {"paragraphs": [{"context": "x", "qas": []}], "title": "t"}
    path.write_text(json.dumps([{"version": "1.1", "data": nested}]))
    cfg = RunConfig(task="extractive-qa", dataset=str(path), partitioner="iid")
    with pytest.raises(DataError, match="nested SQuAD json"):
        load_task(RunConfig(**{**cfg.__dict__, "model_name": str(save_qa_folder(tmp_path / "m"))}))


def test_under_lora_the_span_head_trains_and_travels_with_the_adapters():
    from raffm_core.lora import LoraSettings, attach_lora, is_head_key

    model = tiny_qa_model("bert", 61)
    wrapped = attach_lora(model, LoraSettings(rank=2, target_modules=("query", "value")))
    trainable = {n for n, p in wrapped.base_model.model.named_parameters() if p.requires_grad}
    assert {"qa_outputs.weight", "qa_outputs.bias"} <= trainable
    assert is_head_key("qa_outputs.weight")


def test_a_tiny_qa_model_learns_squad_v2_and_abstains_where_there_is_no_answer():
    """Contexts without a color are unanswerable; the null score must win there, and only there."""
    from client_app.training import TrainSettings, train_submodel

    tok = tiny_tokenizer(WORDS)
    settings = QASettings(doc_stride=8, unanswerable=True)
    rows = squad_rows(260, seed=5, unanswerable=0.3)
    train = encode_qa(datasets.Dataset.from_list(rows[:200]), tok, 24, settings)
    test = encode_qa(datasets.Dataset.from_list(rows[200:]), tok, 24, settings)
    model = tiny_qa_model("bert", len(tok))
    before = evaluate_qa(model, make_loader(test, tok, 32), settings)
    steps = TrainSettings(
        lr=3e-3,
        local_steps=150,
        local_epochs=0,
        batch_size=16,
        weight_decay=0.0,
        proximal_mu=0.0,
        seed=0,
    )
    train_submodel(model, train, tok, steps)
    after = evaluate_qa(model, make_loader(test, tok, 32), settings)
    assert after["has-ans-f1"] >= 0.8 and after["no-ans-f1"] >= 0.8, after
    assert after["f1"] >= before["f1"] + 0.5, (before, after)
