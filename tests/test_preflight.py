"""scripts/preflight.py: a mistake is one line and exit 2 before any federation starts."""

from __future__ import annotations

import importlib.util
import re
from pathlib import Path

import pytest

from tests.assets import save_tiny_bert, write_polarity_csv

ROOT = Path(__file__).resolve().parents[1]
spec = importlib.util.spec_from_file_location("preflight", ROOT / "scripts" / "preflight.py")
preflight = importlib.util.module_from_spec(spec)
spec.loader.exec_module(preflight)


@pytest.fixture(autouse=True)
def hub_offline(monkeypatch):
    """As HF_HUB_OFFLINE=1 does in run_local.sh (read at import, so before preflight's import)."""
    import huggingface_hub

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)


@pytest.fixture(scope="module")
def good(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("preflight")
    return [
        f'dataset="{write_polarity_csv(tmp / "d.csv", 40)}"',
        f'model-name="{save_tiny_bert(tmp / "model")}"',
        "min-available-nodes=4",
        'budget-profile="params=0.6,params=1.0"',
    ]


def test_good_settings_pass_and_strings_get_their_quotes_back(good, capsys):
    assert preflight.main([*good, "strategy=fedrolex", "lr=3e-4"]) == 0
    line = capsys.readouterr().out.strip()
    assert 'strategy="fedrolex"' in line and "lr=0.0003" in line


@pytest.mark.parametrize(
    "override, message",
    [
        ("strategy=foo", "strategy = 'foo' is not supported"),
        ("num-server-rounds=0", "num-server-rounds = 0, expected >= 1"),
        ('dataset="/nowhere/d.csv"', "dataset file /nowhere/d.csv does not exist"),
        ('text-column="sentence"', r"no column\(s\) \['sentence'\]"),
        ('model-name="bert-base-uncased"', "neither a local folder nor in the Hugging Face cache"),
        ('budget-profile="bogus"', "cannot parse budget 'bogus'"),
        (
            'budget-profile="params=0.01,params=0.02"',
            r"every budget \(params=0.01, params=0.02\) is below the smallest sub-network, "
            r"which needs [0-9,]+ parameters",
        ),
        ("min-available-nodes=100", "32 training examples for 100 nodes"),
    ],
    ids=["strategy", "rounds", "file", "column", "hub-model", "budget", "tiny-budget", "nodes"],
)
def test_a_mistake_is_one_line_and_exit_2(good, override, message, capsys):
    assert preflight.main([*good, override]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("preflight: ") and len(err.splitlines()) == 1
    assert re.search(message, err), err
