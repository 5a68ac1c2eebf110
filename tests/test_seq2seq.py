"""``task = "seq2seq"``: data, encoding, generated-answer metrics, and what models may run it."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import transformers as T

import raffm_core as R
from raffm_core import DataError, UnsupportedModelError
from raffm_core.task import RunConfig, load_task
from raffm_core.task.encode import make_loader
from raffm_core.task.metrics import evaluate_model
from raffm_core.task.seq2seq import answer_scores, normalize_answer
from tests.assets import save_tiny_bert, write_polarity_csv
from tests.seq2seq_assets import QA_TEMPLATE, save_tiny_t5, tiny_t5_task, write_qa_jsonl


@pytest.mark.parametrize(
    "prediction, golds, exact, f1",
    [
        ("The Red!", ["red"], 1.0, 1.0),  # case, punctuation, articles
        ("red and blue", ["red"], 0.0, 2 * (1 / 3) * 1 / (1 / 3 + 1)),
        ("blue cat", ["red", "a blue  cat"], 1.0, 1.0),  # the best gold answer counts
        ("green", ["red"], 0.0, 0.0),
        ("", [], 1.0, 1.0),  # unanswerable (SQuAD v2): the empty answer is right
        ("red", [], 0.0, 0.0),
    ],
    ids=["normalized", "partial", "max-over-golds", "wrong", "no-answer-right", "no-answer-wrong"],
)
def test_exact_match_and_token_f1_follow_squad(prediction, golds, exact, f1):
    assert answer_scores(prediction, golds) == pytest.approx((exact, f1))


def test_normalize_answer():
    assert normalize_answer("  An  Owl, the   RED one.") == "owl red one"


def _task(overrides):
    return load_task(RunConfig.from_mapping({}, {"partitioner": "iid", **overrides}))


def test_label_words_are_the_targets(tmp_path):
    task = _task(tiny_t5_task(tmp_path, 40))
    assert task.info.kind == "seq2seq" and task.info.primary_metric == "accuracy"
    row = task.splits.train[0]
    assert row["text"].startswith("sst2 sentence: ")
    encoded = task.encode(task.splits.train, 32)
    tokenizer = task.preprocessor
    for source, item in zip(task.splits.train, encoded, strict=True):
        word = "positive" if source["label"] == 1 else "negative"
        assert tokenizer.decode(item["labels"], skip_special_tokens=True) == word
        assert item["labels"][-1] == tokenizer.eos_token_id
        assert item["references"] == [word]
        assert item["input_ids"] == tokenizer(source["text"])["input_ids"]


def test_squad_answers_are_free_form_targets(tmp_path):
    task = _task(tiny_t5_task(tmp_path, 40, qa=True))
    assert task.info.settings.free_form and task.info.primary_metric == "f1"
    row = task.splits.train[0]
    assert row["text"].startswith("question: what colour is the ")
    assert " context: the " in row["text"] and row["references"] == [row["label"]]
    assert row["label"] in row["text"].split(" context: ")[1]


def test_template_naming_a_missing_column_is_an_error(tmp_path):
    overrides = {**tiny_t5_task(tmp_path, 20, qa=True), "prompt-template": "q: {query}"}
    with pytest.raises(DataError, match=r"no column\(s\) \['query'\]"):
        _task(overrides)


@pytest.mark.parametrize("qa", [False, True], ids=["label-words", "qa"])
def test_evaluation_scores_greedy_answers(qa, tmp_path):
    """Oracle: each example generated alone, decoded and compared by hand."""
    task = _task({**tiny_t5_task(tmp_path, 40, qa=qa), "max-new-tokens": 4})
    model = task.load_model(seed=0)
    encoded = task.encode(task.splits.test, 32)
    metrics = evaluate_model(model, make_loader(encoded, task.preprocessor, 3), task.info)
    tokenizer, hits, f1s = task.preprocessor, [], []
    for item in encoded:
        ids = torch.tensor([item["input_ids"]])
        with torch.no_grad():
            out = model.generate(input_ids=ids, max_new_tokens=4, do_sample=False)
        # Word-level tokens, one-word golds: normalizing is dropping articles and marks.
        words = tokenizer.decode(out[0], skip_special_tokens=True).lower().split()
        words = [w for w in words if w not in ("a", "an", "the", "?", ".", ":")]
        gold = item["references"][0]
        hits.append(float(words == [gold]))
        hit = words.count(gold) > 0
        f1s.append(2 * (1 / len(words)) / (1 / len(words) + 1) if hit else 0.0)
    assert metrics["num-examples"] == len(encoded) and metrics["loss"] > 0
    if qa:
        assert metrics["exact-match"] == pytest.approx(sum(hits) / len(hits))
        assert metrics["f1"] == pytest.approx(sum(f1s) / len(f1s))
    else:
        assert metrics["accuracy"] == pytest.approx(sum(hits) / len(hits))


def test_a_local_t5_folder_loads_as_a_text_to_text_model(tmp_path):
    path = save_tiny_t5(tmp_path / "t5", gated=False)
    overrides = {"model-name": str(path), "dataset": str(write_polarity_csv(tmp_path / "p.csv"))}
    task = _task(overrides)  # task = "auto": an encoder-decoder runs text-to-text
    assert task.info.kind == "seq2seq"
    model = task.load_model(seed=0)
    assert isinstance(model, T.T5ForConditionalGeneration)
    assert model.lm_head.weight is model.shared.weight  # the original T5 ties it


def test_seq2seq_on_an_encoder_only_model_is_an_error(tmp_path):
    overrides = {
        "model-name": str(save_tiny_bert(tmp_path / "bert")),
        "dataset": str(write_polarity_csv(tmp_path / "p.csv")),
        "task": "seq2seq",
    }
    with pytest.raises(UnsupportedModelError, match="'seq2seq' is not supported.*'bert'.*BERT"):
        _task(overrides)


@pytest.mark.parametrize("task", ["classification", "causal-lm", "regression"])
def test_a_t5_with_another_task_is_an_error(task, tmp_path):
    overrides = {**tiny_t5_task(tmp_path, 20), "task": task}
    del overrides["prompt-template"]  # a classification run takes none
    with pytest.raises(UnsupportedModelError, match="the T5 family supports task = 'seq2seq'"):
        _task(overrides)


def test_qa_jsonl_with_two_gold_answers_keeps_both(tmp_path):
    path = write_qa_jsonl(tmp_path / "two-answers.jsonl", 10)
    lines = path.read_text().splitlines()
    lines[0] = lines[0].replace('"text": [', '"text": ["the owl", ')
    lines[0] = lines[0].replace('"answer_start": [', '"answer_start": [0, ')
    path.write_text("\n".join(lines) + "\n")
    overrides = {
        **tiny_t5_task(tmp_path, 10, qa=True),
        "dataset": str(path),
        "prompt-template": QA_TEMPLATE,
        "test-fraction": 0.5,
    }
    task = _task(overrides)
    rows = [*task.splits.train, *task.splits.test]
    two = [r for r in rows if len(r["references"]) == 2]
    assert len(two) == 1 and two[0]["references"][0] == "the owl" and two[0]["label"] == "the owl"


def test_export_script_exports_a_t5_that_reloads_with_the_same_answers(tmp_path):
    import json

    from tests.test_export_submodels import load_script, write_run

    overrides = tiny_t5_task(tmp_path, 40)
    model_dir = Path(overrides.pop("model-name"))
    write_run(tmp_path, model_dir, **overrides, **{"max-length": 24, "max-new-tokens": 3})
    out = tmp_path / "deployed"
    assert load_script().main([str(model_dir), "--budget", "params=0.8", "--out", str(out)]) == 0
    report = json.loads((out / "deploy.json").read_text())
    assert report["format"] == "transformers" and report["params-fraction"] <= 0.8
    plain = T.AutoModelForSeq2SeqLM.from_pretrained(out).eval()
    assert sum(p.numel() for p in plain.parameters()) == report["params"]
    task = _task({**overrides, "model-name": str(out), "max-new-tokens": 3, "seed": 0})
    encoded = task.encode(task.splits.test, 24)
    again = evaluate_model(plain, make_loader(encoded, task.preprocessor, 32), task.info)
    assert again["accuracy"] == pytest.approx(report["accuracy"])
    assert again["loss"] == pytest.approx(report["loss"], rel=1e-5)
    # The same answers as the sub-model extracted from the prioritized original.
    original = T.AutoModelForSeq2SeqLM.from_pretrained(model_dir).eval()
    R.prioritize(original)
    sub = R.extract_submodel(original, R.SubnetSpec.from_dict(report["spec"]))
    batch = task.preprocessor(list(task.splits.test["text"]), padding=True, return_tensors="pt")
    with torch.no_grad():
        want = sub.generate(**batch, max_new_tokens=3, do_sample=False)
        assert torch.equal(plain.generate(**batch, max_new_tokens=3, do_sample=False), want)


def test_preflight_passes_a_t5_run_and_names_a_task_it_cannot_do(tmp_path, capsys):
    from tests.test_preflight import preflight

    overrides = tiny_t5_task(tmp_path, 40)
    args = [f"{k}={v!r}".replace("'", '"') for k, v in overrides.items()]
    args += ["min-available-nodes=3", 'budget-profile="params=0.6,params=1.0"']
    assert preflight.main(args) == 0
    plain = [a for a in args if not a.startswith(("prompt-template=", "task="))]
    assert preflight.main([*plain, 'task="classification"']) == 2
    assert "the T5 family supports task = 'seq2seq'" in capsys.readouterr().err
