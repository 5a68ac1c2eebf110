"""RaFFM with LoRA in the app: index-set slicing, aggregation oracle, a simulated round.

The oracles here do not use the layout's couplings: which rows of ``B`` and
which columns of ``A`` a node holds is worked out by hand from what a head
group and an FFN neuron are in a LLaMA layer.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
import transformers as T
from flwr.app import ArrayRecord, ConfigRecord
from safetensors.torch import load_file
from tokenizers import Tokenizer, models, pre_tokenizers

import raffm_core as R
from raffm_core.lora import (
    LoraSettings,
    attach_lora,
    build_lora_submodel,
    is_head_key,
    place_spec,
    read_base_slices,
    trainable_state,
)
from raffm_core.task.config import ConfigError, RunConfig
from raffm_core.task.keys import ARRAYS, CONFIG, SPEC
from server_app.lora import LoraGlobalModel, RaFFMLoRA
from tests.assets import FILLER, NEGATIVE, POSITIVE, write_polarity_csv
from tests.fakes import FakeGrid, budget_reply, train_reply
from tests.models import scramble_adapters, tiny_model
from tests.sim import TIMEOUTS, every_node, simulate

TARGETS = ("q_proj", "v_proj", "o_proj", "up_proj", "down_proj")


def save_tiny_llama(path, num_labels=2, seed=0):
    """A tiny LLaMA (GQA: 6 query heads on 3 key/value heads) classifier and tokenizer."""
    words = ["<pad>", "<unk>"] + POSITIVE + NEGATIVE + FILLER
    tok = Tokenizer(models.WordLevel(vocab={w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer = T.PreTrainedTokenizerFast(
        tokenizer_object=tok,
        unk_token="<unk>",
        pad_token="<pad>",
        model_input_names=["input_ids", "attention_mask"],
    )
    torch.manual_seed(seed)
    config = T.LlamaConfig(
        vocab_size=len(words),
        hidden_size=48,
        num_hidden_layers=2,
        num_attention_heads=6,
        num_key_value_heads=3,
        intermediate_size=64,
        max_position_embeddings=32,
        pad_token_id=0,
        num_labels=num_labels,
    )
    model = T.LlamaForSequenceClassification(config)
    with torch.no_grad():  # make salience rankings non-trivial
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


# ------------------------------------------------------------ library level
def test_place_spec_maps_prefixes_to_the_original_indices_of_the_top_units():
    model = tiny_model("llama")
    layout = R.describe(model)
    ranking = R.rank_units(model.state_dict(), layout)
    spec = R.SubnetSpec.uniform(layout.num_layers, 1, 7)
    placed = place_spec(spec, ranking)
    for kept, perm in zip(placed.layers, ranking.layers, strict=True):
        assert list(kept.ffn) == sorted(perm.ffn[:7].tolist())
        heads = list(range(kept.heads)) if isinstance(kept.heads, int) else list(kept.heads)
        assert heads == sorted(perm.heads[:1].tolist())
    # the indices are the most salient units: L1 norms, computed independently
    state = model.state_dict()
    for i, kept in enumerate(placed.layers):
        p = f"model.layers.{i}.mlp."
        score = (
            state[p + "gate_proj.weight"].abs().sum(1)
            + state[p + "up_proj.weight"].abs().sum(1)
            + state[p + "down_proj.weight"].abs().sum(0)
        )
        assert set(kept.ffn) == set(torch.topk(score.double(), 7).indices.tolist())


def test_sub_model_from_checkpoint_slices_equals_extraction_from_the_full_model(tmp_path):
    path = save_tiny_llama(tmp_path / "llama")
    model = T.AutoModelForSequenceClassification.from_pretrained(path).eval()
    layout = R.describe(model)
    spec = place_spec(
        R.select_subnet(layout, "params=0.6"), R.rank_units(model.state_dict(), layout)
    )
    assert not spec.is_prefix
    base = read_base_slices(path, layout, spec, [k for k in layout.shapes if k != "score.weight"])
    oracle = R.extract_state_dict(model.state_dict(), layout, spec)
    for key, tensor in base.items():
        assert torch.equal(tensor, oracle[key]), key

    settings = LoraSettings(rank=2, target_modules=TARGETS)
    lora_layout = R.describe(model)
    full = attach_lora(model, settings)
    scramble_adapters(full)  # B starts at zero: make the adapters matter
    from raffm_core.lora import with_lora

    lora_layout = with_lora(layout, TARGETS, 2)
    sliced = R.extract_state_dict(trainable_state(full), lora_layout, spec)
    config = R.base_config(model)
    sub = build_lora_submodel(config, spec, path, settings, sliced, layout)
    merged_sub = sub.merge_and_unload().state_dict()
    merged_full = full.merge_and_unload().state_dict()
    for key, expected in R.extract_state_dict(merged_full, layout, spec).items():
        torch.testing.assert_close(merged_sub[key], expected, rtol=1e-6, atol=1e-6)


# ------------------------------------------------- aggregation vs. numpy oracle
def _oracle_positions(key: str, spec: R.SubnetSpec, shape, group_rows: int, kv_rows: int):
    """Per-axis kept positions of one adapter or head tensor, from first principles."""
    index = [np.arange(n) for n in shape]
    if not key.startswith("model.layers."):  # the task head is never sliced
        return index
    layer = spec.layers[int(key.split(".")[2])]

    def units(width):
        return list(range(width)) if isinstance(width, int) else list(width)

    def blocks(width, size):
        return np.array([u * size + j for u in units(width) for j in range(size)])

    module = key.split(".")[-3]
    if key.endswith("lora_B.weight"):  # B is (out, r): its rows follow the kept outputs
        if module == "q_proj":
            index[0] = blocks(layer.heads, group_rows)
        elif module in ("k_proj", "v_proj"):
            index[0] = blocks(layer.heads, kv_rows)
        elif module in ("gate_proj", "up_proj"):
            index[0] = blocks(layer.ffn, 1)
    elif key.endswith("lora_A.weight"):  # A is (r, in): its columns follow the kept inputs
        if module == "o_proj":
            index[1] = blocks(layer.heads, group_rows)
        elif module == "down_proj":
            index[1] = blocks(layer.ffn, 1)
    return index


@pytest.mark.usefixtures("flower_task")
def test_strategy_aggregates_lora_slices_as_a_numpy_weighted_mean():
    torch.manual_seed(0)
    model = tiny_model("llama")  # 6 query heads on 2 key/value heads, head_dim 8
    lora = LoraGlobalModel(model, LoraSettings(rank=3, target_modules=TARGETS), seed=1)
    with torch.no_grad():
        for v in lora.state().values():
            v.add_(torch.randn_like(v) * 0.1)  # B starts at zero; make every key non-trivial
    start = {k: v.clone() for k, v in lora.state().items()}
    strategy = RaFFMLoRA(
        lora, R.base_config(model).to_json_string(), min_available_nodes=3, min_train_nodes=3
    )
    budgets = {11: "params=0.45", 12: "params=0.7", 13: "params=1.0"}
    examples = {11: 5, 12: 9, 13: 2}
    deltas = {11: 0.3, 12: -0.7, 13: 0.05}
    query = FakeGrid(budgets, lambda m: budget_reply(m, budgets[m.metadata.dst_node_id]))
    strategy.query_budgets(query)
    instructions = list(strategy.configure_train(1, ArrayRecord(start), ConfigRecord({}), query))
    replies = []
    for message in instructions:
        message.metadata.__dict__["_message_id"] = f"m{message.metadata.dst_node_id}"
        node = message.metadata.dst_node_id
        replies.append(train_reply(message, delta=deltas[node], num_examples=examples[node]))
    arrays, _ = strategy.aggregate_train(1, replies)
    new = arrays.to_torch_state_dict()
    assert set(new) == set(start)
    specs = {
        m.metadata.dst_node_id: R.SubnetSpec.from_json(m.content[CONFIG][SPEC])
        for m in instructions
    }
    assert not specs[11].is_prefix and not specs[12].is_prefix  # index sets, never prefixes
    group_rows, kv_rows = 3 * 8, 8
    partial = 0
    for key, old in start.items():
        old64 = old.numpy().astype(np.float64)
        num, den = np.zeros_like(old64), np.zeros_like(old64)
        for node, spec in specs.items():
            grid = np.ix_(*_oracle_positions(key, spec, old64.shape, group_rows, kv_rows))
            num[grid] += examples[node] * (old64[grid] + deltas[node])
            den[grid] += examples[node]
        expected = np.where(den > 0, num / np.where(den > 0, den, 1), old64)
        np.testing.assert_allclose(new[key].numpy(), expected, rtol=1e-5, atol=1e-6, err_msg=key)
        partial += int(len(np.unique(den)) > 1)
    assert partial > 0  # some elements were held by fewer nodes than others
    # only adapters and head travelled
    for message in instructions:
        sent = message.content[ARRAYS]
        assert set(sent) == set(start)
        assert all(".lora_" in k or is_head_key(k) for k in sent)


def test_lora_run_config_is_validated():
    assert RunConfig().peft == "none"
    with pytest.raises(ConfigError, match="peft = 'qlora' is not supported"):
        RunConfig.from_mapping({"peft": "qlora"})
    with pytest.raises(ConfigError, match="lora-rank = 0"):
        RunConfig.from_mapping({"lora-rank": 0})
    with pytest.raises(ConfigError, match="lora-dropout = 1.0"):
        RunConfig.from_mapping({"lora-dropout": 1.0})


def test_unknown_lora_target_names_the_elastic_modules():
    with pytest.raises(R.UnsupportedModelError, match=r"\['query'\].*q_proj"):
        LoraGlobalModel(tiny_model("llama"), LoraSettings(target_modules=("query",)))


# ----------------------------------------------------------- simulation round
NUM_NODES = 3


@pytest.fixture(scope="module")
def lora_run(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("lora-simulation")
    model_dir = save_tiny_llama(tmp / "llama")
    overrides = {
        "model-name": str(model_dir),
        "dataset": str(write_polarity_csv(tmp / "polarity.csv", 150)),
        **every_node(NUM_NODES),
        **TIMEOUTS,
        "results-dir": str(tmp / "results"),
        "num-server-rounds": 1,
        "budget-profile": "params=0.5,params=0.75,params=1.0",
        "partitioner": "iid",
        "max-length": 16,
        "local-steps": 3,
        "batch-size": 8,
        "lr": 1e-2,
        "peft": "lora",
        "lora-rank": 4,
        "lora-dropout": 0.0,
        "lora-target-modules": "q_proj,v_proj,o_proj,down_proj",
    }
    simulate(overrides, NUM_NODES)
    return model_dir, tmp / "results"


def test_a_lora_round_moves_only_adapters_and_head(lora_run):
    model_dir, results = lora_run
    base = T.AutoModelForSequenceClassification.from_pretrained(model_dir)
    layout = R.describe(base)
    from raffm_core.lora import with_lora

    lora_layout = with_lora(layout, ("q_proj", "v_proj", "o_proj", "down_proj"), 4)
    rounds = json.loads((results / "rounds.json").read_text())
    clients = rounds[1]["clients"]
    assert len(clients) == NUM_NODES and all(c["status"] == "accepted" for c in clients)
    for client in clients:
        spec = R.SubnetSpec.from_dict(client["spec"])
        shapes = lora_layout.sub_shapes(spec)
        travelling = [k for k in shapes if ".lora_" in k or is_head_key(k)]
        expected = ArrayRecord({k: torch.zeros(shapes[k]) for k in travelling}).count_bytes()
        assert client["bytes-down"] == client["bytes-up"] == expected
        assert client["peak-memory-mb"] > 0 and client["train-steps"] == 3
        if float(client["budget"].removeprefix("params=")) < 1:
            assert not spec.is_prefix
    # Base weights are bit-identical after the round; only the adapters (and the
    # head) moved. The merged final model is base + alpha/r * B A on targets.
    adapters = load_file(str(results / "final-adapters.safetensors"))
    assert any(k.endswith("lora_B.weight") and v.abs().sum() > 0 for k, v in adapters.items())
    final = T.AutoModelForSequenceClassification.from_pretrained(results / "final-model")
    final_state, base_state = final.state_dict(), base.state_dict()
    scale = RunConfig().lora_alpha / 4
    for key, tensor in base_state.items():
        module = key.removesuffix(".weight")
        if module + ".lora_A.weight" in adapters:
            delta = adapters[module + ".lora_B.weight"] @ adapters[module + ".lora_A.weight"]
            torch.testing.assert_close(final_state[key], tensor + scale * delta)
        elif is_head_key(key):
            assert torch.equal(final_state[key], adapters[key])
        else:
            assert torch.equal(final_state[key], tensor), key
    summary = json.loads((results / "summary.json").read_text())
    assert summary["final-accuracy"] is not None
