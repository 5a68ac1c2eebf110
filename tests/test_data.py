"""Loading, normalizing, tokenizing, partitioning and scoring data (raffm_core.task)."""

from __future__ import annotations

import json

import datasets
import numpy as np
import pytest
import torch

from client_app.partition import load_local_data, node_budget, node_partition
from raffm_core.errors import DataError
from raffm_core.task.config import ConfigError, RunConfig
from raffm_core.task.data import DatasetSpec, TaskInfo, load_splits
from raffm_core.task.encode import encode, make_loader, take
from raffm_core.task.metrics import compute_metrics, evaluate_model
from tests.assets import polarity_rows, tiny_tokenizer

ROWS = polarity_rows(40)


def write(path, fmt: str, records: list[dict]) -> str:
    """Write ``records`` as a local csv/json/parquet file through pandas-free datasets."""
    ds = datasets.Dataset.from_list(records)
    if fmt == "csv":
        ds.to_csv(path, index=False)
    elif fmt == "jsonl":
        ds.to_json(path, lines=True)
    elif fmt == "json":
        path.write_text(json.dumps(records))
    else:
        ds.to_parquet(path)
    return str(path)


@pytest.mark.parametrize("fmt", ["csv", "json", "jsonl", "parquet"])
def test_local_files_load_and_split(tmp_path, fmt):
    records = [{"label": label, "sentence": text} for label, text in ROWS]
    path = write(tmp_path / f"data.{fmt}", fmt, records)
    spec = DatasetSpec(path, text_column="sentence", test_fraction=0.25, seed=1)
    splits = load_splits(spec)
    assert (len(splits.train), len(splits.test)) == (30, 10)
    assert splits.train.column_names == ["text", "label"]
    assert splits.task == TaskInfo("classification", ("0", "1"))
    texts = sorted([*splits.train["text"], *splits.test["text"]])
    assert texts == sorted(text for _, text in ROWS)
    again = load_splits(spec)  # the same spec gives the same split
    assert list(again.test["text"]) == list(splits.test["text"])


def test_validation_is_carved_from_train_never_from_test(tmp_path):
    records = [{"label": label, "text": text} for label, text in ROWS]
    path = write(tmp_path / "data.csv", "csv", records)
    plain = load_splits(DatasetSpec(path, test_fraction=0.25, seed=1))
    spec = DatasetSpec(path, test_fraction=0.25, seed=1, validation_fraction=0.2)
    splits = load_splits(spec)
    assert plain.validation is None
    assert (len(splits.train), len(splits.validation), len(splits.test)) == (24, 6, 10)
    assert list(splits.test["text"]) == list(plain.test["text"])  # the test split is untouched
    train, val = set(splits.train["text"]), set(splits.validation["text"])
    assert not train & val and train | val == set(plain.train["text"])
    assert set(splits.validation["label"]) <= {0, 1}  # labels encoded like the others
    assert list(load_splits(spec).validation["text"]) == list(splits.validation["text"])


def test_string_labels_become_indices_in_sorted_order(tmp_path):
    records = [{"label": "pos" if label else "neg", "text": text} for label, text in ROWS]
    splits = load_splits(DatasetSpec(write(tmp_path / "d.csv", "csv", records), seed=0))
    assert splits.task.label_names == ("neg", "pos")
    by_text = {r["text"]: r["label"] for r in records}
    for row in splits.train:
        assert row["label"] == ("neg", "pos").index(by_text[row["text"]])


def test_sentence_pairs_are_encoded_as_pairs(tmp_path):
    records = [{"q": text, "a": "good film", "label": label} for label, text in ROWS]
    path = write(tmp_path / "pairs.parquet", "parquet", records)
    splits = load_splits(DatasetSpec(path, text_column="q", text_pair_column="a"))
    assert set(splits.train.column_names) == {"text", "text_pair", "label"}
    tokenizer = tiny_tokenizer()
    encoded = encode(splits.train, tokenizer, max_length=32)
    first = encoded[0]
    assert first["token_type_ids"][-3:] == [1, 1, 1]  # "good film [SEP]" is segment B
    assert tokenizer.decode(first["input_ids"]).endswith("[SEP] good film [SEP]")


def test_second_file_as_test_split(tmp_path):
    records = [{"label": label, "text": text} for label, text in ROWS]
    train = write(tmp_path / "train.csv", "csv", records[:30])
    test = write(tmp_path / "test.csv", "csv", records[30:])
    splits = load_splits(DatasetSpec(train, test_split=test))
    assert (len(splits.train), len(splits.test)) == (30, 10)


def test_float_labels_make_a_regression_task(tmp_path):
    records = [
        {"s1": text, "s2": "plot", "score": float(i % 5)} for i, (_, text) in enumerate(ROWS)
    ]
    path = write(tmp_path / "sts.jsonl", "jsonl", records)
    splits = load_splits(
        DatasetSpec(path, text_column="s1", text_pair_column="s2", label_column="score")
    )
    assert splits.task.kind == "regression"
    assert splits.task.num_labels == 1 and splits.task.primary_metric == "pearson"
    assert splits.train.features["label"].dtype == "float32"


@pytest.mark.parametrize(
    "spec_kwargs, message",
    [
        ({"text_column": "missing"}, "no column(s) ['missing']"),
        ({"label_column": "nope"}, "no column(s) ['nope']"),
        ({"test_split": "validation"}, "a local dataset has a single split"),
    ],
)
def test_bad_specs_name_the_problem(tmp_path, spec_kwargs, message):
    records = [{"label": label, "text": text} for label, text in ROWS]
    path = write(tmp_path / "d.csv", "csv", records)
    with pytest.raises(
        DataError,
        match=message.replace("(", r"\(")
        .replace(")", r"\)")
        .replace("[", r"\[")
        .replace("]", r"\]"),
    ):
        load_splits(DatasetSpec(path, **spec_kwargs))


def test_unlabeled_test_split_is_an_error(tmp_path):
    records = [{"label": label, "text": text} for label, text in ROWS]
    train = write(tmp_path / "train.csv", "csv", records)
    test = write(tmp_path / "test.csv", "csv", [{"label": -1, "text": "the film"}] * 3)
    with pytest.raises(DataError, match="label -1 is not one of the train labels"):
        load_splits(DatasetSpec(train, test_split=test))


def test_classification_metrics_match_hand_computation():
    task = TaskInfo("classification", ("a", "b", "c"))
    labels = np.array([0, 0, 1, 1, 2, 2])
    logits = np.eye(3)[[0, 1, 1, 1, 0, 2]]
    metrics = compute_metrics(task, logits, labels)
    assert metrics["accuracy"] == pytest.approx(4 / 6)
    # per class (precision, recall): a (1/2, 1/2), b (2/3, 1), c (1, 1/2)
    f1 = [2 * p * r / (p + r) for p, r in [(1 / 2, 1 / 2), (2 / 3, 1), (1, 1 / 2)]]
    assert metrics["f1"] == pytest.approx(sum(f1) / 3)


def test_pearson_matches_its_definition():
    task = TaskInfo("regression")
    gold = np.array([0.0, 1.0, 2.0, 3.0, 5.0])
    pred = np.array([[0.5], [0.8], [2.5], [2.9], [4.0]])
    x, y = pred.reshape(-1) - pred.mean(), gold - gold.mean()
    expected = (x * y).sum() / np.sqrt((x * x).sum() * (y * y).sum())
    assert compute_metrics(task, pred, gold)["pearson"] == pytest.approx(expected)
    assert compute_metrics(task, np.ones(5), gold)["pearson"] == 0.0


def test_evaluate_model_scores_a_regressor(tmp_path):
    import transformers as T

    tokenizer = tiny_tokenizer()
    records = [{"text": text, "label": float(label)} for label, text in ROWS]
    ds = encode(
        datasets.Dataset.from_list(records).cast_column("label", datasets.Value("float32")),
        tokenizer,
        16,
    )
    config = T.BertConfig(
        vocab_size=len(tokenizer),
        hidden_size=16,
        num_hidden_layers=1,
        num_attention_heads=2,
        intermediate_size=16,
        num_labels=1,
        max_position_embeddings=32,
        problem_type="regression",
    )
    torch.manual_seed(0)
    model = T.BertForSequenceClassification(config)
    metrics = evaluate_model(model, make_loader(ds, tokenizer, 8), TaskInfo("regression"))
    assert metrics["num-examples"] == len(records)
    assert set(metrics) == {"loss", "pearson", "num-examples"}
    assert -1 <= metrics["pearson"] <= 1


def test_take_is_a_seeded_subset():
    ds = datasets.Dataset.from_dict({"x": list(range(100))})
    assert take(ds, 0, 1) is ds
    picked = take(ds, 10, 1)["x"]
    assert len(set(picked)) == 10 and list(picked) == list(take(ds, 10, 1)["x"])


# --- what a node holds ------------------------------------------------------


@pytest.mark.parametrize("partitioner", ["iid", "dirichlet"])
def test_partitions_cover_the_train_split_once(tmp_path, partitioner):
    from tests.assets import save_tiny_bert, write_polarity_csv

    data = write_polarity_csv(tmp_path / "d.csv", 200)
    model = save_tiny_bert(tmp_path / "m")
    cfg = RunConfig.from_mapping(
        {
            "dataset": str(data),
            "model-name": str(model),
            "partitioner": partitioner,
            "dirichlet-alpha": 1.0,
        }
    )
    parts = [load_local_data(cfg, pid, 4, 16) for pid in range(4)]
    tokenizer = parts[0].tokenizer
    train = [
        tokenizer.decode(ids, skip_special_tokens=True)
        for p in parts
        for ids in p.train["input_ids"]
    ]
    assert len(train) == 160 and len(set(train)) == len(
        set(load_splits(DatasetSpec.from_run_config(cfg)).train["text"])
    )
    assert sum(len(p.test) for p in parts) == 40


def test_budgets_follow_the_profile_or_the_node_config():
    cfg = RunConfig(budget_profile="params=0.6, params=0.8,params=1.0")
    nodes = [{"partition-id": i, "num-partitions": 6} for i in range(6)]
    assert [node_budget(cfg, n) for n in nodes] == ["params=0.6", "params=0.8", "params=1.0"] * 2
    drawn = RunConfig(budget_assignment="random", budget_profile=cfg.budget_profile)
    assert [node_budget(drawn, n) for n in nodes] == [node_budget(drawn, n) for n in nodes]
    assert node_budget(cfg, {"budget": "memory-mb=900"}) == "memory-mb=900"
    with pytest.raises(ConfigError, match="partition-id"):
        node_partition({})


def test_a_dataset_folder_loads_through_the_hub_code_path_and_splits(tmp_path, monkeypatch):
    """A folder name goes through ``datasets.load_dataset(name)``, as a hub name does.

    Such a dataset is backed by cache files on disk, which an in-memory
    ``train_test_split`` cannot index; the split must still work.
    """
    monkeypatch.setenv("HF_DATASETS_CACHE", str(tmp_path / "cache"))
    folder = tmp_path / "polarity-like"
    folder.mkdir()
    write(folder / "train.csv", "csv", [{"label": lab, "text": t} for lab, t in ROWS])
    spec = DatasetSpec(str(folder), test_fraction=0.25, seed=3)
    splits = load_splits(spec)
    assert (len(splits.train), len(splits.test)) == (30, 10)
    assert sorted([*splits.train["text"], *splits.test["text"]]) == sorted(t for _, t in ROWS)


def test_small_dirichlet_partitions_cover_every_example_once_and_none_is_empty():
    from client_app.partition import dirichlet_indices

    labels = np.array([0] * 1440 + [1] * 1440)  # 100 clients of the polarity corpus
    parts = dirichlet_indices(labels, 100, 0.5, seed=3)
    assert min(map(len, parts)) >= 1
    assert sorted(i for part in parts for i in part) == list(range(len(labels)))
    assert parts == dirichlet_indices(labels, 100, 0.5, seed=3)
    shares = [np.mean(labels[part]) for part in parts if len(part) >= 10]
    assert np.std(shares) > 0.2  # label skew, not an IID split


def test_many_small_partitions_load_and_too_few_examples_is_a_clear_error(tmp_path):
    path = tmp_path / "d.csv"
    datasets.Dataset.from_list([{"label": y, "text": t} for y, t in polarity_rows(200)]).to_csv(
        path, index=False
    )
    cfg = RunConfig.from_mapping(
        {"dataset": str(path), "model-name": "embedded:minilm", "seed": 1, "test-fraction": 0.2}
    )
    sizes = [len(load_local_data(cfg, pid, 100, 16).train) for pid in range(100)]
    assert min(sizes) >= 1 and sum(sizes) == 160
    with pytest.raises(ConfigError, match="160 examples for 161 partitions"):
        load_local_data(cfg, 0, 161, 16)
