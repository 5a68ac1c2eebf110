"""The run config: pyproject.toml and RunConfig agree, and bad values are errors."""

from __future__ import annotations

import tomllib
from pathlib import Path

import pytest

from raffm_core.task.config import ConfigError, RunConfig, parse_overrides

PYPROJECT = Path(__file__).resolve().parent.parent / "pyproject.toml"


def app_config() -> dict:
    with PYPROJECT.open("rb") as f:
        return tomllib.load(f)["tool"]["flwr"]["app"]["config"]


def test_pyproject_defaults_are_the_dataclass_defaults():
    # run_simulation passes an empty run config, flwr run the pyproject's:
    # both must mean the same run.
    assert app_config() == RunConfig().to_mapping()


def test_run_config_overrides_defaults_which_override_builtins():
    cfg = RunConfig.from_mapping({"lr": 3e-5}, defaults={"lr": 1.0, "local-steps": 4})
    assert (cfg.lr, cfg.local_steps, cfg.batch_size) == (3e-5, 4, RunConfig().batch_size)


@pytest.mark.parametrize(
    "mapping, message",
    [
        ({"learning-rate": 0.1}, "unknown run-config key"),
        ({"lr": "fast"}, "lr must be of type float"),
        ({"local-steps": 2.5}, "local-steps must be of type int"),
        ({"save-models": 1}, "save-models must be of type bool"),
        ({"fraction-train": 1.5}, r"fraction-train = 1.5, expected in \[0, 1\]"),
        ({"partitioner": "shards"}, "partitioner = 'shards' is not supported"),
        ({"server-update": "fedyogi"}, "server-update = 'fedyogi' is not supported"),
        ({"proximal-mu": 0.1}, "only used with server-update = 'fedprox'"),
        ({"budget-profile": " , "}, "budget-profile is empty"),
        ({"min-replies": 0}, "min-replies = 0, expected >= 1"),
        ({"validation-fraction": 1.0}, r"validation-fraction = 1.0, expected in \[0, 1\)"),
        ({"eval-every": 0}, "eval-every = 0, expected >= 1"),
        ({"salience-norm": "l3"}, "salience-norm = 'l3' is not supported"),
    ],
)
def test_bad_values_are_errors_that_name_the_key(mapping, message):
    with pytest.raises(ConfigError, match=message):
        RunConfig.from_mapping(mapping)


def test_ints_are_accepted_for_floats():
    assert RunConfig.from_mapping({"dirichlet-alpha": 1}).dirichlet_alpha == 1.0


def test_budget_tiers_are_split_and_stripped():
    cfg = RunConfig(budget_profile="params=0.6, params=1.0,")
    assert cfg.budget_tiers == ("params=0.6", "params=1.0")


def test_lora_with_a_baseline_strategy_is_an_error_naming_both():
    with pytest.raises(ConfigError, match="peft = 'lora'.*strategy = 'heterofl'"):
        RunConfig.from_mapping({"peft": "lora", "strategy": "heterofl"})


@pytest.mark.parametrize(
    "items, expected",
    [
        (["strategy=fedrolex"], {"strategy": "fedrolex"}),
        (['strategy="fedrolex"'], {"strategy": "fedrolex"}),
        (["lora-target-modules=query, value"], {"lora-target-modules": "query, value"}),
        (['lora-target-modules="query, value"'], {"lora-target-modules": "query, value"}),
        (["dataset-config=1 lr=5e-5"], {"dataset-config": "1", "lr": 5e-5}),
        (["resume=true", "seed=3"], {"resume": True, "seed": 3}),
        (["  lr=0.5  seed=1 "], {"lr": 0.5, "seed": 1}),
        (['prompt-template="{a} {b}" seed=1'], {"prompt-template": "{a} {b}", "seed": 1}),
        (["seed=1", "seed=2"], {"seed": 2}),
        (["lr=fast"], {"lr": "fast"}),  # left to RunConfig, which names the key and type
        ([""], {}),
    ],
    ids=[
        "bare",
        "quoted",
        "comma-space",
        "quoted-comma-space",
        "number-as-string",
        "typed",
        "extra-spaces",
        "quoted-spaces",
        "last-wins",
        "untyped",
        "empty",
    ],
)
def test_overrides_take_the_run_configs_types(items, expected):
    got = parse_overrides(items)
    assert got == expected
    assert [type(v) for v in got.values()] == [type(v) for v in expected.values()]


@pytest.mark.parametrize(
    "items, named",
    [(["lr"], "'lr'"), (["=3"], "'=3'"), (["seed=1 =2"], "'=2'"), ([3], "3")],
    ids=["no-equals", "no-key", "second-of-two", "not-a-string"],
)
def test_a_bad_override_is_a_config_error_that_quotes_it(items, named):
    with pytest.raises(ConfigError, match=f"run-config override {named} is not"):
        parse_overrides(items)


def test_parsed_overrides_are_what_run_config_reads():
    cfg = RunConfig.from_mapping(parse_overrides(["strategy=heterofl lr=3e-4", "seed=7"]))
    assert (cfg.strategy, cfg.lr, cfg.seed) == ("heterofl", 3e-4, 7)
