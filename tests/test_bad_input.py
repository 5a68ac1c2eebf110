"""Mistakes in the data and the model source are one clear error (issue 12).

Each case is a file a new user could have: no header row, not UTF-8, blank
labels, blank texts, a hub model name that is not cached offline.
"""

from __future__ import annotations

import logging

import huggingface_hub
import pytest

from raffm_core.errors import DataError
from raffm_core.task.config import ConfigError, RunConfig
from raffm_core.task.data import DatasetSpec, load_splits
from raffm_core.task.models import load_model_config, load_tokenizer
from tests.assets import polarity_rows

ROWS = polarity_rows(40)


def write_csv(path, rows, header=("label", "text"), encoding="utf-8"):
    lines = ([",".join(header)] if header else []) + [f'{label},"{text}"' for label, text in rows]
    path.write_bytes(("\n".join(lines) + "\n").encode(encoding))
    return str(path)


def test_a_csv_without_header_says_so_shortened_and_names_the_keys(tmp_path):
    long = [(label, text + " " + "and so on " * 30) for label, text in ROWS]
    path = write_csv(tmp_path / "d.csv", long, header=None)
    with pytest.raises(DataError) as info:
        load_splits(DatasetSpec(path))
    message = str(info.value)
    assert "seems to have no header row" in message
    assert "text-column" in message and "label-column" in message
    # the first row's 300-character sentence is shown shortened, not in full
    assert len(message) < 600, message
    assert "..." in message


def test_a_missing_column_names_the_key_to_set(tmp_path):
    path = write_csv(tmp_path / "d.csv", ROWS, header=("label", "sentence"))
    with pytest.raises(DataError, match=r"no column\(s\) \['text'\].*text-column"):
        load_splits(DatasetSpec(path))


def latin1_rows():
    return [(label, text + " café" if i % 3 == 0 else text) for i, (label, text) in enumerate(ROWS)]


def test_a_non_utf8_csv_names_the_file_and_the_option(tmp_path):
    path = write_csv(tmp_path / "d.csv", latin1_rows(), encoding="latin-1")
    with pytest.raises(DataError) as info:
        load_splits(DatasetSpec(path))
    message = str(info.value)
    assert path in message and "not valid utf-8" in message
    assert "dataset-encoding" in message and "dataset-encoding-errors" in message


@pytest.mark.parametrize(
    "encoding, errors, expected",
    [("latin-1", "strict", "café"), ("utf-8", "replace", "caf\ufffd")],
    ids=["latin-1", "replace"],
)
def test_dataset_encoding_options_read_the_file(tmp_path, encoding, errors, expected):
    path = write_csv(tmp_path / "d.csv", latin1_rows(), encoding="latin-1")
    cfg = RunConfig(dataset=path, dataset_encoding=encoding, dataset_encoding_errors=errors)
    splits = load_splits(DatasetSpec.from_run_config(cfg))
    texts = list(splits.train["text"]) + list(splits.test["text"])
    assert sum(t.endswith(expected) for t in texts) == 14


def test_dataset_encoding_errors_in_json(tmp_path):
    path = tmp_path / "d.jsonl"
    good = b'{"label": 1, "text": "good"}\n'
    path.write_bytes(b'{"label": 0, "text": "caf\xe9 bad"}\n' + good * 9)
    spec = DatasetSpec(str(path), encoding_errors="replace", test_fraction=0.5)
    splits = load_splits(spec)
    assert "caf\ufffd bad" in list(splits.train["text"]) + list(splits.test["text"])


@pytest.mark.parametrize(
    "mapping, message",
    [
        ({"dataset-encoding": "klingon"}, "dataset-encoding = 'klingon' is not a known"),
        ({"dataset-encoding-errors": "ignore"}, "dataset-encoding-errors = 'ignore'"),
    ],
)
def test_bad_encoding_options_are_config_errors(mapping, message):
    with pytest.raises(ConfigError, match=message):
        RunConfig.from_mapping(mapping)


@pytest.mark.parametrize("task", ["auto", "classification"])
def test_blank_labels_are_an_error_naming_column_and_count(tmp_path, task):
    rows = [("" if i in (3, 7, 11) else label, text) for i, (label, text) in enumerate(ROWS)]
    path = write_csv(tmp_path / "d.csv", rows)
    # before: auto read the NaN-holding column as float and chose regression
    with pytest.raises(DataError, match=r"3 of 40 rows have no label in label-column 'label'"):
        load_splits(DatasetSpec(path, task=task))


def test_blank_texts_are_kept_with_a_warning_that_counts_them(tmp_path, caplog):
    rows = [(label, "" if i in (2, 5) else text) for i, (label, text) in enumerate(ROWS)]
    path = write_csv(tmp_path / "d.csv", rows)
    with caplog.at_level(logging.WARNING, logger="raffm_core.task.data"):
        splits = load_splits(DatasetSpec(path))
    assert "2 of 40 rows have an empty text in text-column 'text'" in caplog.text
    texts = list(splits.train["text"]) + list(splits.test["text"])
    assert texts.count("") == 2 and None not in texts
    assert splits.task.kind == "classification"


@pytest.mark.parametrize("load", [load_model_config, load_tokenizer], ids=["config", "tokenizer"])
def test_an_uncached_hub_model_offline_is_named(load, monkeypatch):
    # as HF_HUB_OFFLINE=1 in the environment (read once, at import) makes it
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    name = "raffm-tests/no-such-model"
    expected = "'raffm-tests/no-such-model' is neither a local folder nor in the Hugging Face cache"
    with pytest.raises(DataError, match=expected):
        load(name)
