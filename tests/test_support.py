"""A task the model cannot do is one error naming the model, its family, the task and what
the family supports: in the library (``load_task``, ``load_model``) and in the preflight.

The model folders hold only a config: the check reads ``model_type`` and must
come before any weight, tokenizer or data is read (the dataset named below
does not exist, so a check that came later would fail differently).
"""

from __future__ import annotations

import re

import pytest

from raffm_core.errors import UnsupportedModelError
from raffm_core.families import FAMILIES
from raffm_core.task import RunConfig, load_task
from raffm_core.task.config import TASKS
from raffm_core.task.data import TaskInfo
from raffm_core.task.models import load_model
from raffm_core.task.support import FAMILY_TASKS, supported_tasks
from tests.assets import save_tiny_gpt2, write_polarity_csv
from tests.models import CONFIGS, SEQ2SEQ_CONFIGS

NOWHERE = "/nowhere/data.csv"

EXPECTED = {  # written from the README's family table, not from FAMILY_TASKS
    "bert": ("classification", "regression", "extractive-qa"),
    "roberta": ("classification", "regression", "extractive-qa"),
    "distilbert": ("classification", "regression", "extractive-qa"),
    "vit": ("classification",),
    "llama": ("classification", "regression", "causal-lm"),
    "qwen2": ("classification", "regression", "causal-lm"),
    "gpt2": ("classification", "causal-lm"),
    "t5": ("seq2seq",),
}

QA, S2S, LM = "BERT, DistilBERT families", "T5 family", "LLaMA, GPT-2 families"
ENCODER = "'classification', 'regression', 'extractive-qa'"
# model, task, the family the message names, the tasks it lists, who runs the task
CASES = [
    ("gpt2", "extractive-qa", "GPT-2", "'classification', 'causal-lm'", QA),
    ("llama", "extractive-qa", "LLaMA", "'classification', 'regression', 'causal-lm'", QA),
    ("gpt2", "seq2seq", "GPT-2", "'classification', 'causal-lm'", S2S),
    ("bert", "seq2seq", "BERT", ENCODER, S2S),
    ("distilbert", "seq2seq", "DistilBERT", ENCODER, S2S),
    ("bert", "causal-lm", "BERT", ENCODER, LM),
    ("t5", "classification", "T5", "'seq2seq'", "BERT, DistilBERT, ViT, LLaMA, GPT-2 families"),
    ("t5", "extractive-qa", "T5", "'seq2seq'", QA),
]
IDS = [f"{model}-{task}" for model, task, *_ in CASES]


def save_config(tmp_path, name: str) -> str:
    """A folder with only the tiny model's config (GPT-2: saved like the hub's ``gpt2``)."""
    folder = tmp_path / name
    if name == "gpt2":
        return str(save_tiny_gpt2(folder))
    (SEQ2SEQ_CONFIGS if name == "t5" else CONFIGS)[name]().save_pretrained(folder)
    return str(folder)


def expected(name: str, model_type: str, task: str, family: str, supported: str, runs: str):
    """The whole message as a regex; only what the task needs is left open."""
    return (
        rf"^task = '{task}' is not supported for '{re.escape(name)}' \(model_type "
        rf"'{model_type}', the {family} family\); the {family} family supports task = "
        rf"{supported}\. '{task}' needs [^:]+: the {runs}$"
    )


def test_every_family_has_its_tasks_and_every_task_a_family():
    assert set(FAMILY_TASKS) == {f.name for f in FAMILIES}
    assert {t for tasks in FAMILY_TASKS.values() for t in tasks} == set(TASKS) - {"auto"}
    for model_type, tasks in EXPECTED.items():
        assert supported_tasks(model_type) == tasks, model_type


@pytest.mark.parametrize("model, task, family, supported, runs", CASES, ids=IDS)
def test_load_task_refuses_before_reading_anything(model, task, family, supported, runs, tmp_path):
    name = save_config(tmp_path, model)
    cfg = RunConfig(model_name=name, task=task, dataset=NOWHERE, partitioner="iid")
    with pytest.raises(
        UnsupportedModelError, match=expected(name, model, task, family, supported, runs)
    ):
        load_task(cfg)


@pytest.mark.parametrize("model, task, family, supported, runs", CASES, ids=IDS)
def test_load_model_refuses_before_reading_weights(model, task, family, supported, runs, tmp_path):
    name = save_config(tmp_path, model)  # no weights: loading them would fail otherwise
    with pytest.raises(
        UnsupportedModelError, match=expected(name, model, task, family, supported, runs)
    ):
        load_model(name, TaskInfo(task, ("0", "1")))


@pytest.mark.parametrize("model, task, family, supported, runs", CASES, ids=IDS)
def test_preflight_refuses_in_one_line(model, task, family, supported, runs, tmp_path, capsys):
    from tests.test_preflight import preflight

    name = save_config(tmp_path, model)
    args = [f'model-name="{name}"', f'task="{task}"', f'dataset="{NOWHERE}"', 'partitioner="iid"']
    capsys.readouterr()  # saving the model printed a progress bar
    assert preflight.main(args) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith("preflight: "), err
    assert re.search(
        expected(name, model, task, family, supported, runs), err.removeprefix("preflight: ")
    ), err


def test_auto_is_checked_as_what_it_resolves_to(tmp_path):
    """Float labels make ``auto`` a regression, which the GPT-2 family does not run here."""
    path = tmp_path / "sts.csv"
    path.write_text("text,label\n" + "".join(f"film {i},{i / 7:.3f}\n" for i in range(20)))
    name = save_config(tmp_path, "gpt2")
    cfg = RunConfig(model_name=name, dataset=str(path), partitioner="iid")
    with pytest.raises(
        UnsupportedModelError,
        match=expected(
            name,
            "gpt2",
            "regression",
            "GPT-2",
            "'classification', 'causal-lm'",
            "BERT, DistilBERT, LLaMA families",
        ),
    ):
        load_task(cfg)
    polarity = write_polarity_csv(tmp_path / "polarity.csv", 20)  # class labels: classification
    assert (
        load_task(RunConfig(model_name=name, dataset=str(polarity))).info.kind == "classification"
    )
