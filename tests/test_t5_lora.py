"""RaFFM + LoRA on the T5 family (``task = "seq2seq"``, ``peft = "lora"``).

The family's default targets are ``q`` and ``v`` of every attention block:
encoder self-attention, decoder self- and cross-attention. ``B`` (``(heads x
d_kv, r)``) is sliced by head, ``A`` (``(r, d_model)``) travels whole. The
oracles: a node's LoRA sub-model, merged, equals the extraction of the
merged full model; in a federated run, rows of ``B`` of heads no node held
stay exactly zero (their initial value), and the merged final model is the
base plus ``alpha / r * B A`` on the targets and bit-identical elsewhere.
"""

from __future__ import annotations

import pytest
import torch
import transformers as T
from flwr.app import ArrayRecord
from safetensors.torch import load_file

import raffm_core as R
from raffm_core.lora import (
    LoraSettings,
    attach_lora,
    build_lora_submodel,
    default_target_modules,
    place_spec,
    trainable_state,
    with_lora,
)
from raffm_core.task.config import RunConfig
from tests.models import scramble_adapters
from tests.seq2seq_assets import save_tiny_t5, t5_tokenizer, tiny_t5_task
from tests.sim import TIMEOUTS, every_node, read_json, simulate

RANK = 2
NUM_NODES = 3
BUDGETS = ["params=0.6", "params=0.75", "params=0.9"]


def test_t5_targets_q_and_v_of_every_attention_block():
    family = R.describe(T.T5ForConditionalGeneration(T.T5Config(num_layers=1))).family
    assert default_target_modules(family) == ("q", "v")


@pytest.mark.parametrize("gated", [True, False], ids=["flan-t5", "t5"])
def test_a_lora_t5_submodel_from_checkpoint_slices_equals_the_merged_full_model_cut(
    gated, tmp_path
):
    path = save_tiny_t5(tmp_path / "t5", gated=gated)
    model = T.AutoModelForSeq2SeqLM.from_pretrained(path).eval()
    layout = R.describe(model)
    spec = place_spec(
        R.select_subnet(layout, "params=0.6"), R.rank_units(model.state_dict(), layout)
    )
    settings = LoraSettings(rank=RANK, target_modules=default_target_modules(layout.family))
    full = attach_lora(model, settings)
    scramble_adapters(full)  # B starts at zero: make the adapters matter
    adapters = trainable_state(full)
    assert sum(".EncDecAttention." in k for k in adapters) == 8  # 2 decoder blocks x q,v x A,B
    sliced = R.extract_state_dict(adapters, with_lora(layout, settings.target_modules, RANK), spec)
    sub = build_lora_submodel(model.config, spec, path, settings, sliced, layout)
    assert type(sub.base_model.model) is T.T5ForConditionalGeneration  # a real, smaller T5
    assert sum(p.numel() for p in sub.parameters()) < sum(p.numel() for p in full.parameters())
    assert all(p.requires_grad == ("lora_" in n) for n, p in sub.named_parameters())

    merged_full = full.merge_and_unload()
    oracle = R.extract_submodel(merged_full, spec).eval()
    merged_sub = sub.merge_and_unload()
    for key, expected in oracle.state_dict().items():
        torch.testing.assert_close(merged_sub.state_dict()[key], expected, rtol=1e-6, atol=1e-6)
    batch = t5_tokenizer()(
        ["sst2 sentence: a good film", "dull"], padding=True, return_tensors="pt"
    )
    with torch.no_grad():
        want = oracle.generate(**batch, max_new_tokens=3, do_sample=False)
        assert torch.equal(merged_sub.generate(**batch, max_new_tokens=3, do_sample=False), want)


@pytest.fixture(scope="module")
def lora_run(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("t5-lora-simulation")
    overrides = {
        **tiny_t5_task(tmp, 90),
        **every_node(NUM_NODES),
        **TIMEOUTS,
        "results-dir": str(tmp / "results"),
        "num-server-rounds": 2,
        "budget-profile": ",".join(BUDGETS),
        "rolling-tail": 0.0,  # nested prefixes: some heads are never held (checked below)
        "partitioner": "iid",
        "max-length": 16,
        "max-new-tokens": 3,
        "eval-max-examples": 12,
        "local-steps": 3,
        "batch-size": 8,
        "lr": 1e-2,
        "mixed-precision": "no",
        "peft": "lora",
        "lora-rank": RANK,
        "lora-dropout": 0.0,
    }
    simulate(overrides, NUM_NODES)
    return overrides["model-name"], tmp / "results"


def _head_rows(heads, d_kv: int) -> list[int]:
    """Rows of ``heads`` in a ``q`` or ``v`` weight (``(heads x d_kv, d_model)``) or its ``B``."""
    return [h * d_kv + j for h in heads for j in range(d_kv)]


def _layer_of(key: str, num_layers: int) -> int:
    """A spec's layer index: the encoder's blocks first, then the decoder's."""
    stack, _, block = key.split(".")[:3]
    return int(block) + (num_layers if stack == "decoder" else 0)


def test_a_t5_lora_run_trains_adapters_only_and_slice_aware(lora_run):
    model_dir, results = lora_run
    base = T.AutoModelForSeq2SeqLM.from_pretrained(model_dir)
    config = base.config
    lora_layout = with_lora(R.describe(base), ("q", "v"), RANK)
    rounds = read_json(results, "rounds.json")
    held: dict[int, set[int]] = {i: set() for i in range(2 * config.num_layers)}
    for row in rounds[1:]:
        clients = row["clients"]
        assert len(clients) == NUM_NODES and all(c["status"] == "accepted" for c in clients)
        assert sorted(c["budget"] for c in clients) == BUDGETS
        down = {}
        for client in clients:
            spec = R.SubnetSpec.from_dict(client["spec"])
            assert client["params-fraction"] < 1  # every node holds a smaller T5
            shapes = lora_layout.sub_shapes(spec)
            adapters = {k: torch.zeros(s) for k, s in shapes.items() if ".lora_" in k}
            assert client["bytes-down"] == client["bytes-up"] == ArrayRecord(adapters).count_bytes()
            down[client["budget"]] = client["bytes-down"]
            for i, kept in enumerate(spec.layers):
                heads = range(kept.heads) if isinstance(kept.heads, int) else kept.heads
                held[i].update(heads)
        assert down[BUDGETS[0]] < down[BUDGETS[-1]]  # the small node's adapters are smaller

    adapters = load_file(str(results / "final-adapters.safetensors"))
    assert len(adapters) == 24 and all(
        k.endswith((".q.lora_A.weight", ".q.lora_B.weight", ".v.lora_A.weight", ".v.lora_B.weight"))
        for k in adapters
    )
    uncovered = 0
    for key, tensor in adapters.items():
        if not key.endswith("lora_B.weight"):
            continue
        rows = _head_rows(sorted(held[_layer_of(key, config.num_layers)]), config.d_kv)
        outside = torch.ones(tensor.shape[0], dtype=torch.bool)
        outside[rows] = False
        assert torch.equal(tensor[outside], torch.zeros_like(tensor[outside])), key
        assert tensor[rows].abs().sum() > 0, key  # trained where held
        uncovered += int(outside.sum())
    assert uncovered > 0  # some head was held by no node: the check is not vacuous

    final = T.AutoModelForSeq2SeqLM.from_pretrained(results / "final-model").state_dict()
    scale = RunConfig().lora_alpha / RANK
    for key, tensor in base.state_dict().items():
        module = key.removesuffix(".weight")
        if module + ".lora_A.weight" in adapters:  # nn.Linear: (out, in) += B A
            delta = adapters[module + ".lora_B.weight"] @ adapters[module + ".lora_A.weight"]
            torch.testing.assert_close(final[key], tensor + scale * delta)
        else:
            assert torch.equal(final[key], tensor), key  # lm_head, embeddings, biases, FFN

    assert rounds[-1]["loss"] < rounds[0]["loss"]  # it learns the label words
    summary = read_json(results, "summary.json")
    assert summary["primary-metric"] == "accuracy" and 0 <= summary["final-accuracy"] <= 1
    assert {"accuracy", "loss"} <= set(rounds[-1]["federated-evaluation"])
