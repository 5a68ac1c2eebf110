"""GPT-2 in the apps: a local-folder model through the app's loading, and federated runs.

The tiny GPT-2 folders are saved like the hub's ``gpt2``: no padding token,
``n_inner=None``. A user names ``gpt2`` or ``distilgpt2`` as ``model-name``;
the loading code is the same.
"""

from __future__ import annotations

import json

import pytest
import torch
import transformers as T
from safetensors.torch import load_file
from transformers.pytorch_utils import Conv1D

import raffm_core as R
from raffm_core.task.config import CAUSAL_LM, CLASSIFICATION, RunConfig
from raffm_core.task.data import TaskInfo
from raffm_core.task.models import load_model, load_tokenizer
from tests.assets import save_tiny_gpt2, write_polarity_csv
from tests.sim import TIMEOUTS, every_node, read_json, simulate
from tests.test_gpt2 import kept_index

NUM_NODES = 3
BUDGETS = "params=0.5,params=0.65,params=0.8"


@pytest.mark.parametrize("kind", [CLASSIFICATION, CAUSAL_LM])
def test_local_gpt2_folder_loads_through_the_app(kind, tmp_path):
    folder = save_tiny_gpt2(tmp_path / "gpt2", causal_lm=kind == CAUSAL_LM)
    tokenizer = load_tokenizer(str(folder))
    assert tokenizer.pad_token == tokenizer.eos_token  # GPT-2 ships without one
    model = load_model(str(folder), TaskInfo(kind, ("0", "1")), seed=0)
    expected = T.GPT2LMHeadModel if kind == CAUSAL_LM else T.GPT2ForSequenceClassification
    assert type(model) is expected
    assert isinstance(model.transformer.h[0].attn.c_attn, Conv1D)
    layout = R.describe(model)
    assert layout.family.name == "GPT-2" and layout.ffn_size == 4 * model.config.n_embd
    batch = tokenizer(["a good film", "dull"], padding=True, return_tensors="pt")
    with torch.no_grad():
        logits = model(**batch).logits  # a classifier needs pad_token_id for batches
    assert torch.isfinite(logits).all()
    if kind == CLASSIFICATION:
        assert model.config.pad_token_id == tokenizer.pad_token_id
        with torch.no_grad():  # the padded example scores as it does alone
            alone = model(**tokenizer(["dull"], return_tensors="pt")).logits
        torch.testing.assert_close(logits[1:], alone, rtol=1e-5, atol=1e-6)


def _overrides(tmp, causal_lm: bool, rounds: int) -> dict:
    return {
        "model-name": str(save_tiny_gpt2(tmp / "gpt2", causal_lm=causal_lm)),
        "dataset": str(write_polarity_csv(tmp / "polarity.csv", 150)),
        **every_node(NUM_NODES),
        **TIMEOUTS,
        "results-dir": str(tmp / "results"),
        "num-server-rounds": rounds,
        "budget-profile": BUDGETS,
        "partitioner": "iid",
        "max-length": 16,
        "local-steps": 3,
        "batch-size": 8,
        "lr": 1e-3,
    }


@pytest.fixture(scope="module")
def classifier_run(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("gpt2-simulation")
    simulate(
        {**_overrides(tmp, False, 2), "save-round-models": True, "salience-norm": "l1"}, NUM_NODES
    )
    return tmp / "results"


@pytest.fixture(scope="module")
def lm_run(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("gpt2-lm-simulation")
    overrides = {**_overrides(tmp, True, 1), "task": "causal-lm", "max-length": 24}
    simulate({**overrides, "lr": 1e-2, "save-round-models": True, "salience-norm": "l1"}, NUM_NODES)
    return tmp / "results"


def _check_changes_only_inside_slices(run_dir, cls) -> None:
    """Oracle: GPT-2's kept positions written from its layout (tests/test_gpt2.py)."""
    rounds = read_json(run_dir, "rounds.json")
    models = run_dir / "round-models"
    model = cls.from_pretrained(models / "round-0")
    before = {k: v.clone() for k, v in model.state_dict().items()}
    layout = R.describe(model)
    for row in rounds[1:]:
        clients = row["clients"]
        # A node the overloaded machine kept past the round timeout is "rejected" with
        # the reason "no reply within timeout": say so instead of a bare assert False.
        states = [(c["node"], c["status"], c["reason"]) for c in clients]
        assert len(clients) == NUM_NODES, f"round {row['round']}: {states}"
        assert all(c["status"] == "accepted" for c in clients), f"round {row['round']}: {states}"
        assert sorted(c["budget"] for c in clients) == BUDGETS.split(",")
        after = cls.from_pretrained(models / f"round-{row['round']}").state_dict()
        prioritized = {k: v.clone() for k, v in before.items()}
        R.permute_state(prioritized, layout, R.rank_units(prioritized, layout))
        covered = {k: torch.zeros(v.shape, dtype=torch.bool) for k, v in before.items()}
        for client in clients:
            spec = R.SubnetSpec.from_dict(client["spec"])
            assert client["params-fraction"] < 1  # every node holds only part of the model
            for key in covered:
                covered[key][kept_index(key, spec, model.config, before[key].dim())] = True
        for key in before:
            assert torch.equal(after[key][~covered[key]], prioritized[key][~covered[key]]), key
        assert sum(int((after[k] != prioritized[k]).sum()) for k in before) > 0
        assert sum(int((~c).sum()) for c in covered.values()) > 0  # not vacuous
        before = after


def test_gpt2_classifier_changes_only_inside_the_slices_nodes_held(classifier_run):
    _check_changes_only_inside_slices(classifier_run, T.GPT2ForSequenceClassification)
    summary = read_json(classifier_run, "summary.json")
    assert summary["rounds"] == 2 and summary["final-accuracy"] is not None


def test_gpt2_causal_lm_changes_only_inside_the_slices_nodes_held(lm_run):
    _check_changes_only_inside_slices(lm_run, T.GPT2LMHeadModel)
    final = T.GPT2LMHeadModel.from_pretrained(lm_run / "final-model")
    assert final.lm_head.weight is final.transformer.wte.weight  # still tied
    assert 0.0 <= read_json(lm_run, "summary.json")["final-accuracy"] <= 1.0


def test_export_script_exports_a_gpt2_submodel(classifier_run, tmp_path):
    from tests.test_export_submodels import load_script

    out = tmp_path / "deployed"
    final = classifier_run / "final-model"
    assert load_script().main([str(final), "--budget", "params=0.8", "--out", str(out)]) == 0
    report = json.loads((out / "deploy.json").read_text())
    assert report["params-fraction"] <= 0.8
    exported = R.load_submodel(out).eval()
    assert type(exported) is T.GPT2ForSequenceClassification
    assert sum(p.numel() for p in exported.parameters()) == report["params"]
    model = T.GPT2ForSequenceClassification.from_pretrained(final).eval()
    R.prioritize(model)
    spec = R.SubnetSpec.uniform(model.config.n_layer, report["heads"], report["ffn"])
    tokenizer = T.AutoTokenizer.from_pretrained(out)
    batch = tokenizer(["a good film", "dull and weak"], padding=True, return_tensors="pt")
    with torch.no_grad():
        want = R.extract_submodel(model, spec)(**batch).logits
        torch.testing.assert_close(exported(**batch).logits, want, rtol=1e-6, atol=1e-6)


def test_gpt2_causal_lm_lora_round_moves_only_adapters_on_c_attn(tmp_path):
    """``task = "causal-lm"``, ``peft = "lora"`` with the family's default target (c_attn)."""
    overrides = {
        **_overrides(tmp_path, True, 1),
        "task": "causal-lm",
        "max-length": 24,
        "lr": 1e-2,
        "peft": "lora",
        "lora-rank": 2,
        "lora-dropout": 0.0,
    }
    simulate(overrides, NUM_NODES)
    results = tmp_path / "results"
    clients = json.loads((results / "rounds.json").read_text())[1]["clients"]
    assert [c["status"] for c in clients] == ["accepted"] * NUM_NODES
    adapters = load_file(str(results / "final-adapters.safetensors"))
    assert adapters and all(".attn.c_attn.lora_" in k for k in adapters)
    assert any(k.endswith("lora_B.weight") and v.abs().sum() > 0 for k, v in adapters.items())
    base = T.GPT2LMHeadModel.from_pretrained(overrides["model-name"]).state_dict()
    final = T.GPT2LMHeadModel.from_pretrained(results / "final-model").state_dict()
    scale = RunConfig().lora_alpha / 2
    for key, tensor in base.items():
        module = key.removesuffix(".weight")
        if module + ".lora_A.weight" in adapters:  # Conv1D weight is (in, out): (B A)^T
            delta = adapters[module + ".lora_B.weight"] @ adapters[module + ".lora_A.weight"]
            torch.testing.assert_close(final[key], tensor + scale * delta.T)
        else:
            assert torch.equal(final[key], tensor), key
